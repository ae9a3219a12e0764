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

With training.rounds: R > 1 (iterative MIPO), `train` runs the sample and train stages once
per round, each round in its own folder of the run (rundir.Run.in_round), then compare
once, on the last round's adapter. A resumed run skips the rounds before the last that
finished (their adapter is there) and goes on in the one it was in. round_started and
round_finished events mark the rounds; each round's held-out metrics are in its
round_finished event and in the summaries (`rounds`), and `train` prints them at the end.
Under mlx.launch (distributed.py) every rank runs every stage and round on a view of the run
that writes nothing; rank 0's run directory says which rounds finished before.
"""

import dataclasses
import functools
import importlib
import logging
import os
import time

from mipo_mlx import distributed
from mipo_mlx.console import ConsoleObserver, round_line
from mipo_mlx.errors import UserError, in_recipe
from mipo_mlx.events import EventLog, read_events
from mipo_mlx.preflight import preflight
from mipo_mlx.recipe import load_recipe
from mipo_mlx.rundir import ADAPTER_WEIGHTS, COMPARE_DIR, EVENTS_FILE, ResumePoint, Run, open_run, run_dir_of

# Stage name -> module with run_stage(run, load_model); train chains them in this order.
STAGES = {
    "sample": "mipo_mlx.sampling",
    "train": "mipo_mlx.trainer",
    "compare": "mipo_mlx.compare",
}
# The stages run once per round of training.rounds, in each round's folder; the others run once, after the rounds.
ROUND_STAGES = ("sample", "train")
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
    rounds = run.recipe.training.rounds if "train" in stages else 1
    where = f" in round {point.round} of {rounds}" if rounds > 1 else ""
    return f"resuming {run.dir}{where}: " + "; ".join(parts)


def start_round(run: Run, number: int, rounds: int) -> bool:
    """Whether round `number` of a run of several is to run (one before the last that finished is not); says which."""
    adapter = run.adapter_of_round(number)
    # Rank 0's run directory says, on every rank: the others may be on machines without it.
    if number < rounds and distributed.from_main((adapter / ADAPTER_WEIGHTS).is_file):
        logger.info(f"round {number} of {rounds} finished before: its adapter is {adapter}")
        return False
    run.events.emit("round_started", round=number, rounds=rounds)
    return True


def finish_round(run: Run, number: int, rounds: int, summaries: dict) -> dict:
    """The round's summary (its stages' and held-out evidence), as a round_finished event too."""
    train = summaries["train"]
    run.events.emit("round_finished", round=number, rounds=rounds, adapter=str(run.adapter_of_round(number)),
                    held_out=train["held_out"], selected=train["selected"])
    return {stage: summaries[stage] for stage in ROUND_STAGES}


def round_lines(run: Run) -> list[str]:
    """A line for each finished round (console.round_line), from the event log: those of earlier starts too."""
    events, _ = read_events(run.path(EVENTS_FILE))
    last = {event["round"]: event for event in events if event["event"] == "round_finished"}
    return [round_line(last[number]) for number in sorted(last)]


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
    rounds = run.recipe.training.rounds if "train" in stages else 1
    summaries, stage = {}, None
    try:
        for number in range(1, rounds + 1):
            if rounds > 1 and not start_round(run, number, rounds):
                continue
            current = run.in_round(number)
            for stage in [name for name in stages if name in ROUND_STAGES]:
                summaries[stage] = importlib.import_module(STAGES[stage]).run_stage(current, load_model)
            if rounds > 1:
                summaries.setdefault("rounds", {})[number] = finish_round(run, number, rounds, summaries)
        for stage in [name for name in stages if name not in ROUND_STAGES]:
            summaries[stage] = importlib.import_module(STAGES[stage]).run_stage(run, load_model)
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
        try:
            checked = preflight(recipe, resume=args.resume or (None if args.command == "sample" else False),
                                stages=stages, run_folder=distributed.is_main())
        except UserError as error:
            raise in_recipe(error, args.recipe) from None
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
    current = opened.get("run") or Run(recipe=recipe, dir=run_dir_of(recipe), events=EventLog(None), resumed=resumed,
                                       read_only=True)
    notes = [resume_line(current, checked.resume, stages)] if checked.resume else []
    if distributed.size() > 1:
        notes.append(f"one run on {distributed.size()} ranks (mx.distributed): rank 0 writes {current.dir}")
    run_stages(current, stages, load_model, notes)
    if not distributed.is_main():  # rank 0 alone prints
        return 0
    if "train" in stages and recipe.training.rounds > 1:
        print("\n".join(round_lines(current)))
    if "compare" in stages:
        from mipo_mlx.report import report_summary

        print(report_summary(current.path(COMPARE_DIR)))
    return 0
