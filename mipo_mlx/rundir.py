"""The run directory: the name of every file and folder in it, opening and resuming a run, and the pairs.

    run = open_run(recipe, resume=False)          # creates OUTPUT_DIR/RUN_NAME, writes recipe.yaml
    run = reopen_run(Path("runs/quickstart"))     # a finished or interrupted run, read only (compare, export)
    pairs = read_pairs(run.path(PAIRS_FILE))      # [Pair]: TRL preference records, plus `mipo`
    writer = PairsWriter(run.path(PAIRS_FILE))    # the sample stage's: writer.written, writer.append(pair)
    latest_checkpoint(run.dir)                    # runs/quickstart/checkpoints/step-000040, or None
    good, damaged = usable_checkpoint(run.dir)    # the newest whole checkpoint, and the newer damaged ones
    second = run.in_round(2)                      # round 2's files (training.rounds), in rounds/2/

    OUTPUT_DIR/RUN_NAME/
        recipe.yaml               the resolved recipe, every key written out
        events.jsonl              the event log (its schema: events.py)
        pairs.jsonl               one Pair per line, appended by the sample stage (PairsWriter)
        checkpoints/step-NNNNNN/  adapters.safetensors, adapter_config.json, optimizer.safetensors, state.json
        checkpoints/damaged-step-NNNNNN/  a checkpoint a resume found damaged, set aside
        adapters/                 the final adapter, mlx-lm's format: adapters.safetensors, adapter_config.json
        compare/                  answers.jsonl, metrics.json, report.md: before and after
        console.log               what a run started from the TUI printed
        rounds/N/                 round N of training.rounds (N >= 2): its pairs.jsonl, checkpoints/ and adapters/

Iterative MIPO (training.rounds: R) runs the sample and train stages once per round, each
round in its own folder: round 1's is the run directory itself (so a run of one round has
only the files above), round N's is rounds/N/. Round N's pairs are sampled, and their
reference log-probs scored, by the base model with round N-1's adapter; its adapter goes on
training from that adapter's weights. The final adapter is the last round's
(final_adapter_dir); compare reads round 1's pairs, which the base model sampled.

Stages meet only through these files; this module is the one owner of their names and of
the pairs record, and imports no MLX, so that the TUI can read runs with it.

A checkpoint's state.json is written last and records the sha256 of each of its other
files (write_checkpoint_state); checkpoint_problem checks a checkpoint against them, and
against the tensors a resume expects, before anything of it is loaded. Opening a run to
write in it first removes what a killed write left there (files.remove_staging).
"""

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mipo_mlx.errors import UserError
from mipo_mlx.events import EventLog
from mipo_mlx.files import JsonlAppender, read_lines, remove_staging, replace_file, safetensors_header, sha256_of
from mipo_mlx.recipe import Recipe, dump_recipe, parse_recipe, recipe_to_dict
from mipo_mlx.seeds import derived_seed

RECIPE_FILE = "recipe.yaml"
EVENTS_FILE = "events.jsonl"
PAIRS_FILE = "pairs.jsonl"
CHECKPOINTS_DIR = "checkpoints"
ADAPTERS_DIR = "adapters"
COMPARE_DIR = "compare"
CONSOLE_LOG = "console.log"
ROUNDS_DIR = "rounds"
# An adapter folder (adapters/, each checkpoint, an export's mlx/), as mlx-lm's load_adapters reads it.
ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# The rest of a checkpoint: what --resume needs to continue the exact trajectory.
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
CHECKPOINT_PREFIX = "step-"
DAMAGED_PREFIX = "damaged-"  # checkpoints/damaged-step-NNNNNN: set aside by a resume, read by none
# The files whose sha256 a checkpoint's state.json records (under "sha256"), as they were written.
CHECKPOINT_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, OPTIMIZER_FILE)
# compare/ (and `mipo-mlx eval --out`): the answers side by side, the metrics, the report.
ANSWERS_FILE = "answers.jsonl"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
# Keys `--resume --set KEY=VALUE` may change: none of them changes what is already on disk (the
# pairs, the adapter's shape, the objective the checkpoints were trained on, the metric the best
# step was selected by); each only shapes what comes after the checkpoint the run continues from.
# The change is written into recipe.yaml and recorded as a recipe_changed event.
RESUMABLE_CHANGES = (
    # The optimizer from the next step on: step size, its schedule (over the new total), clipping, decay.
    "training.learning_rate", "training.lr_scheduler_type", "training.warmup_ratio", "training.max_grad_norm",
    "training.weight_decay",
    # How long to train, and when to stop early.
    "training.epochs", "training.max_steps", "training.early_stopping_patience",
    # When to report, evaluate on the held-out pairs and save.
    "training.report_every", "training.eval_every", "training.save_every",
    # Read after training only: the before/after comparison (not eval.max_tokens: the probes use it) and export.
    "eval.max_prompts", "eval.temperature", "eval.top_p", "eval.bootstrap_samples", "eval.math_shots",
    "eval.judge_model", "export.formats", "export.repo_id", "export.private",
)


@dataclass
class Run:
    """One run directory, its recipe and its event log, shared by the stages.

    resumed: the run existed before this start. read_only: this process writes nothing into
    it: opened by a command that reads it (compare, export), whose events go to its observers
    and not into the run's event log, or a rank other than 0 of a run on several (distributed.py).
    changed: what `--resume --set` changed at this start, {key: (before, after)}.
    round: the round (training.rounds) whose files dir holds; dir is round_dir(home, round).
    """

    recipe: Recipe
    dir: Path
    events: EventLog
    resumed: bool = False
    read_only: bool = False
    changed: dict = field(default_factory=dict)
    round: int = 1

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def home(self) -> Path:
        """The run directory itself, whichever round's folder dir is."""
        return self.dir if self.round == 1 else self.dir.parent.parent

    def in_round(self, number: int) -> "Run":
        """The run as round `number`'s stages see it: dir is that round's folder (made when it is not there yet)."""
        directory = round_dir(self.home, number)
        if not self.read_only:
            directory.mkdir(parents=True, exist_ok=True)
        return dataclasses.replace(self, dir=directory, round=number)

    def adapter_of_round(self, number: int) -> Path:
        """The adapters/ folder round `number` ends with."""
        return round_dir(self.home, number) / ADAPTERS_DIR

    @property
    def final_adapter(self) -> Path:
        """The run's adapter: the last round's."""
        return self.adapter_of_round(self.recipe.training.rounds)


def run_dir_of(recipe: Recipe) -> Path:
    return Path(recipe.output_dir) / recipe.run_name


def round_dir(run_dir: Path, number: int) -> Path:
    """The folder of round `number`'s pairs, checkpoints and adapter: the run directory for round 1, else rounds/N."""
    return Path(run_dir) if number == 1 else Path(run_dir) / ROUNDS_DIR / str(number)


def started_rounds(run_dir: Path) -> list[int]:
    """The rounds that have a folder in the run directory, in order (round 1 always)."""
    found = [int(path.name) for path in (Path(run_dir) / ROUNDS_DIR).glob("*") if path.name.isdigit() and path.is_dir()]
    return [1, *sorted(n for n in found if n > 1)]


def final_adapter_dir(run_dir: Path) -> Path:
    """adapters/ of a run directory's last round (training.rounds of its saved recipe; 1 without one)."""
    rounds = saved_recipe(run_dir, check_paths=False).training.rounds if (Path(run_dir) / RECIPE_FILE).is_file() else 1
    return round_dir(run_dir, rounds) / ADAPTERS_DIR


def is_run_dir(path: Path) -> bool:
    return (path / EVENTS_FILE).is_file() or (path / RECIPE_FILE).is_file()


def find_runs(output_dir: Path) -> list[Path]:
    """Run directories directly inside `output_dir`, by name."""
    if not output_dir.is_dir():
        return []
    return sorted(path for path in output_dir.iterdir() if path.is_dir() and is_run_dir(path))


def saved_recipe(run_dir: Path, *, check_paths: bool = True) -> Recipe:
    """The recipe a run was started with; check_paths=False when read from another folder (recipe.parse_recipe)."""
    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (it has no {RECIPE_FILE})", key="RUN_DIR")
    recipe = parse_recipe(path.read_text(encoding="utf-8"), str(path), check_paths=check_paths)
    recipe.run_name = recipe.run_name or Path(run_dir).name
    return recipe


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def recipe_changes(saved_path: Path, recipe: Recipe) -> dict:
    """{key: (before, after)} for the RESUMABLE_CHANGES `recipe` makes to the saved recipe; any other change is refused."""
    # A key missing from the saved recipe is newer than the mipo-mlx that started the run, which ran as its default.
    saved = {**_flatten(recipe_to_dict(Recipe())),
             **_flatten(yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {})}
    changes = {}
    for key, value in _flatten(recipe_to_dict(recipe)).items():
        if saved.get(key) == value:
            continue
        if key not in RESUMABLE_CHANGES:
            raise UserError(
                f"{key} is {value!r} but the run was started with {saved.get(key)!r}, and a resume cannot change it "
                "(only the keys of the learning rate, its schedule, the length of training, the evaluation, saving "
                "and reporting intervals, eval and export: see the README); resume with the same value, or start a "
                "new run with --set run_name=NEW", file=str(saved_path),
            )
        changes[key] = (saved.get(key), value)
    return changes


def open_run(recipe: Recipe, *, resume: bool, observers: list = ()) -> Run:
    """Create the run directory, or reopen it to resume; never overwrite a run silently.

    Reopened, what a killed write left in it goes first, and the RESUMABLE_CHANGES of `recipe`
    are written into recipe.yaml and recorded (a recipe_changed event).
    """
    run_dir = run_dir_of(recipe)
    recipe_path = run_dir / RECIPE_FILE
    started = recipe_path.exists()
    if started and not resume:
        raise UserError(
            f"{run_dir} already holds a run; add --resume to continue it, or --set run_name=NEW for a new one",
            key="run_name",
        )
    changes = recipe_changes(recipe_path, recipe) if started else {}
    run_dir.mkdir(parents=True, exist_ok=True)
    removed = []
    for number in started_rounds(run_dir):
        folder = round_dir(run_dir, number)
        removed += remove_staging(folder) + remove_staging(folder / CHECKPOINTS_DIR)
    if changes or not started:
        replace_file(recipe_path, dump_recipe(recipe))
    events = EventLog(run_dir / EVENTS_FILE, observers=observers)
    for path in removed:
        events.emit("note", level="info", text=f"removed {path}, left by a write that was killed before it finished")
    if changes:
        events.emit("recipe_changed", changes={key: list(change) for key, change in changes.items()})
    return Run(recipe=recipe, dir=run_dir, events=events, resumed=started, changed=changes)


def reopen_run(run_dir: Path, observers: list = ()) -> Run:
    """A finished or interrupted run, from its directory alone, to read (compare, export): nothing is written into it."""
    recipe = saved_recipe(run_dir)
    return Run(recipe=recipe, dir=Path(run_dir), events=EventLog(None, observers=observers), resumed=True,
               read_only=True)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"{CHECKPOINT_PREFIX}{step:06d}"


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints, by step (damaged ones set aside are not among them)."""
    return sorted((Path(run_dir) / CHECKPOINTS_DIR).glob(f"{CHECKPOINT_PREFIX}*"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint of the highest step (each is written whole; usable_checkpoint checks it too)."""
    found = checkpoints(run_dir)
    return found[-1] if found else None


def write_checkpoint_state(directory: Path, state: dict) -> None:
    """state.json of a checkpoint being written: `state` (Trainer.state) and the sha256 of its CHECKPOINT_FILES."""
    digests = {name: sha256_of(directory / name) for name in CHECKPOINT_FILES}
    (directory / STATE_FILE).write_text(json.dumps({**state, "sha256": digests}))


def read_checkpoint_state(directory: Path) -> dict:
    """A checkpoint's state.json (checked by checkpoint_problem first)."""
    return json.loads((Path(directory) / STATE_FILE).read_text(encoding="utf-8"))


def _tensors_problem(path: Path, expected: dict) -> str | None:
    """How the tensors of a safetensors file differ from `expected`, {name: (dtype, shape)}, or None."""
    try:
        found = {name: (info["dtype"], tuple(info["shape"])) for name, info in safetensors_header(path).items()}
    except ValueError as error:
        return f"{path.name}: {error}"
    missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    changed = sorted(name for name in expected.keys() & found.keys() if expected[name] != found[name])
    if not (missing or extra or changed):
        return None
    if changed:
        name = changed[0]
        detail = f"{name} is {found[name][0]} {list(found[name][1])}, not {expected[name][0]} {list(expected[name][1])}"
    else:
        detail = f"it lacks {missing[0]}" if missing else f"it holds {extra[0]}, which the adapter has not"
    return f"{path.name} does not hold the tensors this recipe's adapter has ({detail})"


def checkpoint_problem(directory: Path, tensors: dict | None = None) -> str | None:
    """What is wrong with a checkpoint, or None when it is whole, before anything of it is loaded.

    Its state.json reads and is for its step; each of CHECKPOINT_FILES is there with the sha256
    recorded when it was written. tensors, {file: {name: (safetensors dtype, shape)}}: what the
    files must hold, exactly (the adapter and optimizer state the recipe's LoRA layers have).
    """
    directory = Path(directory)
    try:
        state = read_checkpoint_state(directory)
    except FileNotFoundError:
        return f"it has no {STATE_FILE}"
    except (OSError, ValueError):
        return f"its {STATE_FILE} is not readable JSON"
    digests = state.get("sha256") if isinstance(state, dict) else None
    if not isinstance(digests, dict) or any(not isinstance(digests.get(name), str) for name in CHECKPOINT_FILES):
        return f"its {STATE_FILE} records no sha256 of {', '.join(CHECKPOINT_FILES)}"
    step = directory.name.removeprefix(CHECKPOINT_PREFIX)
    if not all(isinstance(state.get(key), int) for key in ("step", "epoch", "position")) or f"{state['step']:06d}" != step:
        return f"its {STATE_FILE} is not the state of step {int(step)}"
    for name in CHECKPOINT_FILES:
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_of(path) != digests[name]:
            return f"{name} is not the file written at step {int(step)} (its sha256 differs from the one recorded)"
    for name, expected in (tensors or {}).items():
        problem = _tensors_problem(directory / name, expected)
        if problem:
            return problem
    return None


def usable_checkpoint(run_dir: Path, tensors: dict | None = None) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint without a problem (checkpoint_problem), and the newer ones with theirs."""
    damaged = []
    for directory in reversed(checkpoints(run_dir)):
        problem = checkpoint_problem(directory, tensors)
        if problem is None:
            return directory, damaged
        damaged.append((directory, problem))
    return None, damaged


def set_aside(checkpoint: Path) -> Path:
    """Move a damaged checkpoint to checkpoints/damaged-step-NNNNNN, where no resume reads it (and its step is free)."""
    aside = checkpoint.with_name(DAMAGED_PREFIX + checkpoint.name)
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(checkpoint, aside)
    return aside


def no_checkpoint_left(run_dir: Path, damaged: list[tuple[Path, str]]) -> UserError:
    """The error for a run whose every checkpoint is damaged: what is wrong with each, and what to do."""
    found = "; ".join(f"{path.name}: {problem}" for path, problem in damaged)
    return UserError(f"every checkpoint of {run_dir} is damaged ({found}); move {Path(run_dir) / CHECKPOINTS_DIR} "
                     "away to train again from the first step, or start a new run with --set run_name=NEW",
                     key="--resume")


@dataclass
class ResumePoint:
    """Where a run that is resumed stands: its sampled pairs and the checkpoint training continues from."""

    pairs: int
    checkpoint: Path | None
    state: dict | None  # the checkpoint's state.json
    damaged: list[tuple[Path, str]]  # newer checkpoints with what is wrong with them
    round: int = 1  # the round these are of: the newest one started (training.rounds)


def resume_point(run_dir: Path) -> ResumePoint:
    """Where the run in `run_dir` stands, in its newest round (a UserError if a pairs line is not a sampled pair or no
    checkpoint is whole)."""
    number = started_rounds(run_dir)[-1]
    folder = round_dir(run_dir, number)
    pairs = sampled_pairs(folder / PAIRS_FILE)
    good, damaged = usable_checkpoint(folder)
    if damaged and good is None:
        raise no_checkpoint_left(folder, damaged)
    return ResumePoint(len(pairs), good, read_checkpoint_state(good) if good else None, damaged, number)


def latest_adapter(run_dir: Path) -> Path | None:
    """The newest round's adapter, or else its newest checkpoint while it trains (else the round's before); None
    before the first."""
    for number in reversed(started_rounds(run_dir)):
        folder = round_dir(run_dir, number)
        final = folder / ADAPTERS_DIR
        found = final if (final / ADAPTER_WEIGHTS).is_file() else latest_checkpoint(folder)
        if found:
            return found
    return None


def is_held_out(prompt_id: str, fraction: float, seed: int) -> bool:
    """Whether a prompt's pairs are held out of training for evaluation: all of them, the same in every stage."""
    return derived_seed(seed, "eval", prompt_id) / 2**31 < fraction


# Chat messages, [{"role": "system" | "user" | "assistant", "content": str}, ...].
Messages = list[dict]


@dataclass
class MipoRecord:
    """The `mipo` object of a pair: how mipo-mlx made it.

    The sample stage writes every field; a pair from elsewhere may have some or none
    (None: not recorded, and not written back).
    """

    id: str | None = None  # the pair, "PROMPT_ID#J": the J-th of sampling.negatives_per_prompt; "PROMPT_ID#echo"
    prompt_id: str | None = None  # the prompt's id in data.train; the held-out split keeps a prompt's pairs together
    strategy: str | None = None  # sampling.negative (random_prompt, drop_context, swap_context), or echo
    negative_source: str | None = None  # where the rejected answer's prompt came from, for people to read
    negative_prompt: Messages | None = None  # x': the messages the rejected answer was generated for
    # {"chosen", "rejected"}: log p_base(answer | prompt), summed over the answer's tokens, both given `prompt`;
    # "chosen_public", "rejected_public": the same over the pair's first min(chosen, rejected) answer tokens, what
    # training.ld_alpha's reference needs (absent where scoring.score_pairs could not run the model's pairs)
    ref_logps: dict | None = None
    pmi: float | None = None  # ref_logps chosen - rejected: the pair's pointwise mutual information estimate
    tokens: dict | None = None  # {"prompt", "chosen", "rejected"}: token counts, answers with their end of turn
    finish: dict | None = None  # {"chosen", "rejected"}: "stop" (end of turn) or "length" (cut at max_tokens)
    requests: dict | None = None  # {"chosen", "rejected"}: generation request ids; a resumed sample stage reuses answers by them
    sampling: dict | None = None  # {"temperature", "top_p", "max_tokens"}: the sampler of both answers
    model: str | None = None  # model.path that sampled and scored the answers (from round 2 on, with an adapter on)
    seed: int | None = None  # the sampling seed: the recipe's, or its round's (sampling.round_seed)


MIPO_FIELDS = {f.name for f in dataclasses.fields(MipoRecord)}


def _answer_text(answer: Messages | str) -> str:
    """An answer's text: a plain string, or the content of its last (assistant) message."""
    return answer if isinstance(answer, str) else answer[-1]["content"]


def _is_text_or_messages(value, answer: bool) -> bool:
    if isinstance(value, str):
        return True
    return (isinstance(value, list) and (bool(value) or not answer)
            and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value))


@dataclass
class Pair:
    """One line of pairs.jsonl: TRL's conversational preference record, plus the `mipo` object.

    prompt, chosen and rejected are the fields TRL's DPOTrainer reads, as chat messages (what
    the sample stage writes) or as plain strings (TRL's standard format, read as well).
    """

    prompt: Messages | str  # x: the user's context as a system message, earlier turns, the question
    chosen: Messages | str  # the model's answer to x: [{"role": "assistant", "content": ...}]
    rejected: Messages | str  # its answer to x' (mipo.negative_prompt), stored as an answer to x
    mipo: MipoRecord | None = None

    def prompt_messages(self) -> Messages:
        """The prompt as chat messages: a plain string (TRL's standard format) is the user's turn."""
        return [{"role": "user", "content": self.prompt}] if isinstance(self.prompt, str) else self.prompt

    @property
    def chosen_text(self) -> str:
        return _answer_text(self.chosen)

    @property
    def rejected_text(self) -> str:
        return _answer_text(self.rejected)

    @property
    def ref_logps(self) -> tuple[float, float] | None:
        """The stored reference log-probs (chosen, rejected), or None when the pair has none."""
        refs = self.mipo.ref_logps if self.mipo else None
        return (refs["chosen"], refs["rejected"]) if refs else None

    @property
    def ref_public_logps(self) -> tuple[float, float] | None:
        """The stored reference log-probs of the public parts (chosen, rejected), or None when the pair has none."""
        refs = self.mipo.ref_logps if self.mipo else None
        if not refs or "chosen_public" not in refs or "rejected_public" not in refs:
            return None
        return refs["chosen_public"], refs["rejected_public"]

    def to_json(self) -> dict:
        record = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        if self.mipo is not None:
            record["mipo"] = {k: v for k, v in dataclasses.asdict(self.mipo).items() if v is not None}
        return record

    @classmethod
    def from_json(cls, record) -> "Pair":
        """A pair from its JSON object; ValueError when it is not one (other fields are ignored)."""
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        for key in ("prompt", "chosen", "rejected"):
            if not _is_text_or_messages(record.get(key), answer=key != "prompt"):
                raise ValueError(f"{key!r} is missing or is neither a string nor chat messages")
        mipo = record.get("mipo")
        if mipo is not None and not isinstance(mipo, dict):
            raise ValueError("'mipo' is not an object")
        meta = MipoRecord(**{k: v for k, v in mipo.items() if k in MIPO_FIELDS}) if mipo is not None else None
        refs = meta.ref_logps if meta else None
        if refs is not None and not (isinstance(refs, dict) and all(
                isinstance(refs.get(side), (int, float)) for side in ("chosen", "rejected"))):
            raise ValueError("'mipo.ref_logps' needs numbers 'chosen' and 'rejected'")
        if refs is not None and not all(isinstance(refs.get(side, 0.0), (int, float))
                                        for side in ("chosen_public", "rejected_public")):
            raise ValueError("'mipo.ref_logps' 'chosen_public' and 'rejected_public' must be numbers")
        return cls(record["prompt"], record["chosen"], record["rejected"], meta)


def read_pairs(path: Path) -> list[Pair]:
    """Every pair of a pairs file, ours or TRL's; a line that is not a pair is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no pairs at {path}; run the sample stage first (mipo-mlx sample RECIPE)")
    pairs = []
    for line in _lines(path, growing=False):
        try:
            pairs.append(Pair.from_json(line.json()))
        except UnicodeDecodeError:
            raise UserError(f"cannot read {path} (UnicodeDecodeError); write it as UTF-8 JSON lines") from None
        except ValueError as error:
            raise UserError(f"{path}:{line.number}: expected a JSON object with prompt, chosen and rejected "
                            f"({' '.join(str(error).split())})") from None
    return pairs


def tail_pairs(path: Path, offset: int = 0, limit: int | None = None) -> tuple[list[tuple[int, Pair | None]], int]:
    """(line offset, pair, or None for a line that is not one) for complete lines after `offset`; where to go on."""
    if not Path(path).exists():
        return [], offset
    lines, offset = read_lines(path, offset, limit=limit)
    found = []
    for line in lines:
        try:
            found.append((line.offset, Pair.from_json(line.json())))
        except ValueError:
            found.append((line.offset, None))
    return found, offset


def pair_at(path: Path, offset: int) -> Pair:
    """The pair on the line that starts at byte `offset` (from tail_pairs)."""
    lines, _ = read_lines(path, offset, limit=1)
    return Pair.from_json(lines[0].json())


def _lines(path: Path, growing: bool):
    try:
        return read_lines(path, growing=growing)[0]
    except OSError as error:
        raise UserError(f"cannot read {path} ({error.__class__.__name__})") from None


def sampled_pairs(path: Path) -> dict[str, Pair]:
    """The pairs a sample stage wrote to `path`, by mipo.id ({} before it starts).

    A pair torn by a kill (a last line without its newline) is left out; every other line
    must be a pair the sample stage wrote, with the fields a resume needs.
    """
    written = {}
    for line in _lines(Path(path), growing=True) if Path(path).exists() else []:
        try:
            pair = Pair.from_json(line.json())
            if pair.mipo is None or None in (pair.mipo.id, pair.mipo.requests, pair.mipo.finish):
                raise ValueError("not sampled")
        except ValueError:
            raise UserError(f"{path}:{line.number}: not a pair written by mipo-mlx; "
                            "move the file away to sample again") from None
        written[pair.mipo.id] = pair
    return written


class PairsWriter:
    """The sample stage's append-only pairs file: the pairs already in it (sampled_pairs), and one flushed line per new pair."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.written: dict[str, Pair] = sampled_pairs(self.path)
        self._file = JsonlAppender(self.path)

    def append(self, pair: Pair) -> None:
        self._file.append(pair.to_json())
        self.written[pair.mipo.id] = pair

    def close(self) -> None:
        self._file.close()
