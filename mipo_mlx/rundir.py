"""The run directory: the name of every file and folder in it, opening and resuming a run, and the pairs.

    run = open_run(recipe, resume=False)          # creates OUTPUT_DIR/RUN_NAME, writes recipe.yaml
    run = reopen_run(Path("runs/quickstart"))     # a finished or interrupted run (compare, export)
    pairs = read_pairs(run.path(PAIRS_FILE))      # [Pair]: TRL preference records, plus `mipo`
    writer = PairsWriter(run.path(PAIRS_FILE))    # the sample stage's: writer.written, writer.append(pair)
    latest_checkpoint(run.dir)                    # runs/quickstart/checkpoints/step-000040, or None

    OUTPUT_DIR/RUN_NAME/
        recipe.yaml               the resolved recipe, every key written out
        events.jsonl              the event log (its schema: events.py)
        pairs.jsonl               one Pair per line, appended by the sample stage (PairsWriter)
        checkpoints/step-NNNNNN/  adapters.safetensors, adapter_config.json, optimizer.safetensors, state.json
        adapters/                 the final adapter, mlx-lm's format: adapters.safetensors, adapter_config.json
        compare/                  answers.jsonl, metrics.json, report.md: before and after
        console.log               what a run started from the TUI printed

Stages meet only through these files; this module is the one owner of their names and of
the pairs record, and imports no MLX, so that the TUI can read runs with it.
"""

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from mipo_mlx.errors import UserError
from mipo_mlx.events import EventLog
from mipo_mlx.files import JsonlAppender, read_lines
from mipo_mlx.recipe import Recipe, dump_recipe, parse_recipe, recipe_to_dict
from mipo_mlx.seeds import derived_seed

RECIPE_FILE = "recipe.yaml"
EVENTS_FILE = "events.jsonl"
PAIRS_FILE = "pairs.jsonl"
CHECKPOINTS_DIR = "checkpoints"
ADAPTERS_DIR = "adapters"
COMPARE_DIR = "compare"
CONSOLE_LOG = "console.log"
# An adapter folder (adapters/, each checkpoint, an export's mlx/), as mlx-lm's load_adapters reads it.
ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# The rest of a checkpoint: what --resume needs to continue the exact trajectory.
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
CHECKPOINT_PREFIX = "step-"
# compare/ (and `mipo-mlx eval --out`): the answers side by side, the metrics, the report.
ANSWERS_FILE = "answers.jsonl"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
# Keys that may change between a run and its resume without changing what it computes.
RESUMABLE_CHANGES = ("training.report_every", "training.eval_every", "training.save_every")


@dataclass
class Run:
    """One run directory, its recipe and its event log, shared by the stages."""

    recipe: Recipe
    dir: Path
    events: EventLog
    resumed: bool = False

    def path(self, name: str) -> Path:
        return self.dir / name


def run_dir_of(recipe: Recipe) -> Path:
    return Path(recipe.output_dir) / recipe.run_name


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
    run_dir = run_dir_of(recipe)
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


def reopen_run(run_dir: Path, observers: list = ()) -> Run:
    """A finished or interrupted run, from its directory alone (for compare and export)."""
    recipe = saved_recipe(run_dir)
    events = EventLog(Path(run_dir) / EVENTS_FILE, observers=observers)
    return Run(recipe=recipe, dir=Path(run_dir), events=events, resumed=True)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"{CHECKPOINT_PREFIX}{step:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint of the highest step (each is written whole, so any one is complete)."""
    checkpoints = sorted((Path(run_dir) / CHECKPOINTS_DIR).glob(f"{CHECKPOINT_PREFIX}*"))
    return checkpoints[-1] if checkpoints else None


def latest_adapter(run_dir: Path) -> Path | None:
    """The final adapter, or else the newest checkpoint of a run still training; None before the first."""
    final = Path(run_dir) / ADAPTERS_DIR
    return final if (final / ADAPTER_WEIGHTS).is_file() else latest_checkpoint(run_dir)


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

    id: str | None = None  # the pair, "PROMPT_ID#J": the J-th of sampling.negatives_per_prompt for the prompt
    prompt_id: str | None = None  # the prompt's id in data.train; the held-out split keeps a prompt's pairs together
    strategy: str | None = None  # sampling.negative: random_prompt, drop_context or swap_context
    negative_source: str | None = None  # where the rejected answer's prompt came from, for people to read
    negative_prompt: Messages | None = None  # x': the messages the rejected answer was generated for
    # {"chosen", "rejected"}: log p_base(answer | prompt), summed over the answer's tokens, both given `prompt`
    ref_logps: dict | None = None
    pmi: float | None = None  # ref_logps chosen - rejected: the pair's pointwise mutual information estimate
    tokens: dict | None = None  # {"prompt", "chosen", "rejected"}: token counts, answers with their end of turn
    finish: dict | None = None  # {"chosen", "rejected"}: "stop" (end of turn) or "length" (cut at max_tokens)
    requests: dict | None = None  # {"chosen", "rejected"}: generation request ids; a resumed sample stage reuses answers by them
    sampling: dict | None = None  # {"temperature", "top_p", "max_tokens"}: the sampler of both answers
    model: str | None = None  # model.path that sampled and scored the answers
    seed: int | None = None  # the recipe's seed


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


class PairsWriter:
    """The sample stage's append-only pairs file: the pairs already in it, and one flushed line per new pair.

    A pair torn by a kill (a last line without its newline) is dropped; every other line
    must be a pair the sample stage wrote, with the fields a resume needs.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.written: dict[str, Pair] = {}
        for line in _lines(self.path, growing=True) if self.path.exists() else []:
            try:
                pair = Pair.from_json(line.json())
                if pair.mipo is None or None in (pair.mipo.id, pair.mipo.requests, pair.mipo.finish):
                    raise ValueError("not sampled")
            except ValueError:
                raise UserError(f"{path}:{line.number}: not a pair written by mipo-mlx; "
                                "move the file away to sample again") from None
            self.written[pair.mipo.id] = pair
        self._file = JsonlAppender(self.path)

    def append(self, pair: Pair) -> None:
        self._file.append(pair.to_json())
        self.written[pair.mipo.id] = pair

    def close(self) -> None:
        self._file.close()
