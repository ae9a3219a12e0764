"""The run's event log: one JSON object per line in RUN_DIR/events.jsonl.

It is the one interface between the engine and every observer (console, TUI, tests,
reports). Lines are appended and flushed as they happen (files.JsonlAppender); readers
tail the file. A log opened on a file whose last line a kill cut short drops that line
and says so in a warning note, naming the event it held. A command that only reads a
run (compare, export) tells its observers and writes nothing: EventLog(None, observers).

Every line has `time` (Unix seconds), `event` (a name below) and the event's fields:

| event            | fields                                                                 |
| ---------------- | ---------------------------------------------------------------------- |
| run_started      | run_dir, recipe, model, stages (list), resumed (bool), pid, ranks      |
| stage_started    | stage ("sample", "reference", "train", "compare", "export"), total, unit |
| progress         | stage, done, total, unit, rate (units/s), tokens_per_second, eta_seconds |
|                  | and on several ranks (distributed.py): ranks, rank_tokens_per_second   |
|                  | (each rank's tokens/s, by rank; on metrics events of training too)     |
| metrics          | stage, split ("train" or "eval"), step, epoch, and TRL-named metrics:  |
|                  | loss, rewards/chosen, rewards/rejected, rewards/margins,              |
|                  | rewards/accuracies, logps/chosen, logps/rejected, grad_norm,          |
|                  | learning_rate, tokens_per_second, peak_memory_gb                      |
| checkpoint_saved | step, path, sha256 (of adapters.safetensors)                            |
| recipe_changed   | changes: {key: [before, after]} that `--resume --set` made (rundir.RESUMABLE_CHANGES) |
| note             | level ("info" or "warning"), text                                      |
| stage_finished   | stage, seconds, and a summary of the stage's counts                   |
| round_started    | round, rounds: training.rounds > 1, before a round's sample stage      |
| round_finished   | round, rounds, adapter (path), held_out (the train stage's), selected  |
| run_finished     | status ("completed" or "stopped"), seconds                            |
| run_failed       | error (one line), stage                                                |

    log = EventLog(run_dir / "events.jsonl")
    log.emit("progress", stage="sample", done=3, total=40, unit="pairs")
    events, offset = read_events(run_dir / "events.jsonl")
    for number, event in in_rounds(events): ...   # a metrics event's step counts from 1 in each round
"""

import json
import math
import re
import time
from pathlib import Path
from typing import Any

from mipo_mlx.files import JsonlAppender, read_jsonl

EVENT_NAMES = (
    "run_started",
    "stage_started",
    "progress",
    "metrics",
    "checkpoint_saved",
    "recipe_changed",
    "note",
    "stage_finished",
    "round_started",
    "round_finished",
    "run_finished",
    "run_failed",
)


def _json_safe(value: Any) -> Any:
    # JSON has no NaN or infinity; a diverged loss is written as a string so readers still parse it.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _cut_line(data: bytes) -> str:
    """What the start of a line cut short holds, for a person: its event's name and its first bytes."""
    event = re.search(rb'"event": "(\w+)"', data)
    shown = json.dumps(data[:80].decode("utf-8", errors="replace"), ensure_ascii=False)
    return f"{'a ' + event[1].decode() + ' event' if event else 'a line'} of {len(data)} bytes starting {shown}"


class EventLog:
    """Appends events to a JSONL file, one flushed line each; observers get each event too.

    path None: the events go to the observers only (a command that reads a run and must not write into it).
    """

    def __init__(self, path: str | Path | None, observers: list = ()):
        self.path = Path(path) if path is not None else None
        self._file = JsonlAppender(self.path) if self.path is not None else None
        self.observers = list(observers)
        if self._file is not None and self._file.dropped:
            self.emit("note", level="warning", text=f"{self.path} ended in {_cut_line(self._file.dropped)} that a kill "
                      "cut short; it was dropped")

    def emit(self, event: str, **fields: Any) -> dict:
        if event not in EVENT_NAMES:
            raise ValueError(f"unknown event {event!r}")
        record = {"time": round(time.time(), 3), "event": event, **_json_safe(fields)}
        if self._file is not None:
            self._file.append(record)
        for observe in self.observers:
            observe(record)
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_events(path: str | Path, offset: int = 0) -> tuple[list[dict], int]:
    """Events written after byte `offset`, and the offset to continue from.

    A last line still being written (no newline yet) is left for the next call.
    """
    return read_jsonl(path, offset)


def in_rounds(events: list[dict]) -> list[tuple[int, dict]]:
    """Each event with the round of training.rounds it belongs to: the one the last round_started began (1 before any,
    and in a run of one round)."""
    number, found = 1, []
    for event in events:
        if event["event"] == "round_started":
            number = event["round"]
        found.append((number, event))
    return found
