"""Run directories and the `train` / `sample` commands that chain the stages.

    mipo-mlx train recipes/quickstart.yaml [--set training.beta=0.2] [--resume]
    mipo-mlx sample recipes/quickstart.yaml

A run lives in OUTPUT_DIR/RUN_NAME (run_name defaults to the recipe file's name) and holds
the resolved recipe (recipe.yaml), the event log (events.jsonl), the pairs, the
checkpoints, the final adapter and the report. Each stage is a module function
`run_stage(run) -> dict` that reads what earlier stages wrote there.
"""

import dataclasses
import importlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mipo_mlx.console import ConsoleObserver
from mipo_mlx.errors import UserError
from mipo_mlx.events import EVENTS_FILE, EventLog
from mipo_mlx.recipe import Recipe, dump_recipe, load_recipe, parse_recipe, recipe_to_dict

RECIPE_FILE = "recipe.yaml"
# Stage name -> module with run_stage(run); train chains them in this order.
STAGES = {
    "sample": "mipo_mlx.sampling",
    "train": "mipo_mlx.trainer",
    "compare": "mipo_mlx.compare",
}
# Keys that may change between a run and its resume without changing what it computes.
RESUMABLE_CHANGES = ("training.report_every", "training.eval_every", "training.save_every")
logger = logging.getLogger("mipo_mlx")


@dataclass
class Run:
    """One run directory, its recipe and its event log, shared by the stages."""

    recipe: Recipe
    dir: Path
    events: EventLog
    resumed: bool = False
    _loaded: object = field(default=None, repr=False)

    def path(self, name: str) -> Path:
        return self.dir / name

    def loaded_model(self):
        """The recipe's model, loaded once for all stages (one model in memory)."""
        if self._loaded is None:
            from mipo_mlx.loading import load_model

            self._loaded = load_model(
                self.recipe.model.path, compute=self.recipe.model.compute, revision=self.recipe.model.revision
            )
        return self._loaded


class _NotesToEvents(logging.Handler):
    """Copies the package's log messages into the run's event log as `note` events."""

    def __init__(self, events: EventLog):
        super().__init__(level=logging.INFO)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        level = "warning" if record.levelno >= logging.WARNING else "info"
        self.events.emit("note", level=level, text=record.getMessage())


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_same_recipe(saved_path: Path, recipe: Recipe) -> None:
    saved = _flatten(yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {})
    current = _flatten(recipe_to_dict(recipe))
    for key, value in current.items():
        if key not in RESUMABLE_CHANGES and saved.get(key) != value:
            raise UserError(
                f"{key} is {value!r} but the run was started with {saved.get(key)!r}; "
                f"resume with the same recipe, or start a new run with --set run_name=NEW",
                file=str(saved_path),
            )


def open_run(recipe: Recipe, *, resume: bool, observers: list = ()) -> Run:
    """Create the run directory, or reopen it to resume; never overwrite a run silently."""
    run_dir = Path(recipe.output_dir) / recipe.run_name
    recipe_path = run_dir / RECIPE_FILE
    started = recipe_path.exists()
    if started and not resume:
        raise UserError(
            f"{run_dir} already holds a run; add --resume to continue it, or --set run_name=NEW for a new one",
            key="run_name",
        )
    if started:
        _check_same_recipe(recipe_path, recipe)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        temp = recipe_path.with_suffix(".tmp")
        temp.write_text(dump_recipe(recipe), encoding="utf-8")
        os.replace(temp, recipe_path)
    events = EventLog(run_dir / EVENTS_FILE, observers=observers)
    return Run(recipe=recipe, dir=run_dir, events=events, resumed=started)


def reopen_run(run_dir: Path) -> Run:
    """A finished or interrupted run, from its directory alone (for compare and export)."""
    recipe_path = Path(run_dir) / RECIPE_FILE
    if not recipe_path.is_file():
        raise UserError(f"{run_dir} is not a run directory (it has no {RECIPE_FILE})", key="RUN_DIR")
    recipe = parse_recipe(recipe_path.read_text(encoding="utf-8"), str(recipe_path))
    events = EventLog(Path(run_dir) / EVENTS_FILE, observers=[ConsoleObserver()])
    return Run(recipe=recipe, dir=Path(run_dir), events=events, resumed=True)


def run_stages(run: Run, stages: list[str]) -> dict:
    """Run `stages` in order; every outcome, failure included, lands in the event log."""
    notes = _NotesToEvents(run.events)
    logger.addHandler(notes)
    started_at = time.time()
    run.events.emit(
        "run_started",
        run_dir=str(run.dir),
        recipe=dataclasses.asdict(run.recipe),
        model=run.recipe.model.path,
        stages=stages,
        resumed=run.resumed,
        pid=os.getpid(),
    )
    summaries, stage = {}, None
    try:
        for stage in stages:
            module = importlib.import_module(STAGES[stage])
            summaries[stage] = module.run_stage(run)
    except KeyboardInterrupt:
        run.events.emit("run_finished", status="stopped", seconds=time.time() - started_at)
        raise
    except Exception as error:
        message = " ".join(str(error).split()) or error.__class__.__name__
        run.events.emit("run_failed", error=message, stage=stage)
        raise
    finally:
        logger.removeHandler(notes)
    run.events.emit("run_finished", status="completed", seconds=time.time() - started_at)
    run.events.close()
    return summaries


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="Recipe YAML file, e.g. recipes/quickstart.yaml.")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override a recipe key, e.g. --set training.beta=0.2 (repeatable).",
    )
    parser.add_argument("--resume", action="store_true", help="Continue the run in the recipe's run directory.")


def run(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    stages = ["sample"] if args.command == "sample" else list(STAGES)
    # Sampling alone is idempotent: it always picks up where the pairs file stopped.
    resume = args.resume or args.command == "sample"
    current = open_run(recipe, resume=resume, observers=[ConsoleObserver()])
    run_stages(current, stages)
    return 0
