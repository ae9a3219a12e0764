"""The `train` and `sample` commands: open a run directory and chain the stages in it.

    mipo-mlx train recipes/quickstart.yaml [--set training.beta=0.2] [--resume]
    mipo-mlx sample recipes/quickstart.yaml

A run lives in OUTPUT_DIR/RUN_NAME (run_name defaults to the recipe file's name; its
files: rundir.py). Each stage is a module function `run_stage(run, load_model) -> dict`
that reads what earlier stages wrote there; `load_model()` gives the recipe's model,
loaded once for all the stages (one model in memory).

A command checks everything first (preflight.py), then loads the model, and only then
opens the run directory: a mistake found by either leaves nothing behind, so the same
command runs again once it is fixed. A resumed run says in one line what it continues
from (the pairs sampled, the checkpoint, what --set changed).
"""

import dataclasses
import functools
import importlib
import logging
import os
import time

from mipo_mlx import distributed
from mipo_mlx.console import ConsoleObserver
from mipo_mlx.events import EventLog
from mipo_mlx.preflight import preflight
from mipo_mlx.recipe import load_recipe
from mipo_mlx.rundir import COMPARE_DIR, ResumePoint, Run, open_run, run_dir_of

# Stage name -> module with run_stage(run, load_model); train chains them in this order.
STAGES = {
    "sample": "mipo_mlx.sampling",
    "train": "mipo_mlx.trainer",
    "compare": "mipo_mlx.compare",
}
logger = logging.getLogger("mipo_mlx")


class _NotesToEvents(logging.Handler):
    """Copies the package's log messages into the run's event log as `note` events."""

    def __init__(self, events: EventLog):
        super().__init__(level=logging.INFO)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        level = "warning" if record.levelno >= logging.WARNING else "info"
        self.events.emit("note", level=level, text=record.getMessage())


def model_loader(recipe):
    """A function that loads the recipe's model on its first call and gives the same one after."""

    @functools.cache
    def load_model():
        from mipo_mlx.loading import load_recipe_model

        return load_recipe_model(recipe.model)

    return load_model


def resume_line(run: Run, point: ResumePoint, stages: list[str]) -> str:
    """What a resumed run continues from, in one line."""
    parts = [f"{point.pairs} pairs already sampled"]
    if "train" in stages:
        if point.checkpoint:
            parts.append(f"training continues from {point.checkpoint} (step {point.state['step']} of "
                         f"{point.state['total_steps']})")
        else:
            parts.append("training starts from its first step (no checkpoint yet)")
        if point.damaged:
            parts.append(f"damaged, to be set aside: {', '.join(path.name for path, _ in point.damaged)}")
    if run.changed:
        parts.append("changed by --set: " + ", ".join(f"{key} {before!r} -> {after!r}"
                                                      for key, (before, after) in run.changed.items()))
    return f"resuming {run.dir}: " + "; ".join(parts)


def run_stages(run: Run, stages: list[str], load_model=None, notes: list[str] = ()) -> dict:
    """Run `stages` in order; every outcome, failure included, lands in the event log (`notes` first)."""
    handler = _NotesToEvents(run.events)
    logger.addHandler(handler)
    started_at = time.time()
    run.events.emit(
        "run_started",
        run_dir=str(run.dir),
        recipe=dataclasses.asdict(run.recipe),
        model=run.recipe.model.path,
        stages=stages,
        resumed=run.resumed,
        pid=os.getpid(),
        ranks=distributed.size(),
    )
    for note in notes:
        logger.info(note)
    load_model = load_model or model_loader(run.recipe)
    summaries, stage = {}, None
    try:
        for stage in stages:
            module = importlib.import_module(STAGES[stage])
            summaries[stage] = module.run_stage(run, load_model)
    except KeyboardInterrupt:
        run.events.emit("run_finished", status="stopped", seconds=time.time() - started_at)
        raise
    except Exception as error:
        message = " ".join(str(error).split()) or error.__class__.__name__
        run.events.emit("run_failed", error=message, stage=stage)
        raise
    finally:
        logger.removeHandler(handler)
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
    def start():
        recipe = load_recipe(args.recipe, args.overrides)
        stages = ["sample"] if args.command == "sample" else list(STAGES)
        # The run folder is rank 0's alone: other ranks may be other machines, without it.
        checked = preflight(recipe, resume=args.resume or (None if args.command == "sample" else False), stages=stages,
                            run_folder=distributed.is_main())
        load_model = model_loader(recipe)
        load_model()  # before the run directory is made: a model that does not load leaves nothing behind
        return recipe, stages, checked, load_model

    recipe, stages, checked, load_model = distributed.agree(start)
    logger.info(f"checked the recipe, {checked.train_prompts} + {checked.test_prompts or 0} prompts and the model's "
                f"files in {checked.seconds:.1f} s")
    opened = {}

    def open_on_main() -> bool:
        # Sampling alone is idempotent: it always picks up where the pairs file stopped.
        opened["run"] = open_run(recipe, resume=args.resume or args.command == "sample", observers=[ConsoleObserver()])
        return opened["run"].resumed

    resumed = distributed.from_main(open_on_main)
    current = opened.get("run") or Run(recipe=recipe, dir=run_dir_of(recipe), events=EventLog(None), resumed=resumed)
    notes = [resume_line(current, checked.resume, stages)] if checked.resume else []
    if distributed.size() > 1:
        notes.append(f"one run on {distributed.size()} ranks (mx.distributed): rank 0 writes {current.dir}")
    run_stages(current, stages, load_model, notes)
    if "compare" in stages and distributed.is_main():
        from mipo_mlx.report import report_summary

        print(report_summary(current.path(COMPARE_DIR)))
    return 0
