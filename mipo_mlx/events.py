"""The run's event log: one JSON object per line in RUN_DIR/events.jsonl.

It is the one interface between the engine and every observer (console, TUI, tests,
reports). Lines are appended and flushed as they happen (files.JsonlAppender); readers
tail the file.

Every line has `time` (Unix seconds), `event` (a name below) and the event's fields:

| event            | fields                                                                 |
| ---------------- | ---------------------------------------------------------------------- |
| run_started      | run_dir, recipe, model, stages (list), resumed (bool), pid             |
| stage_started    | stage ("sample", "reference", "train", "compare", "export"), total, unit |
| progress         | stage, done, total, unit, rate (units/s), tokens_per_second, eta_seconds |
| metrics          | stage, split ("train" or "eval"), step, epoch, and TRL-named metrics:  |
|                  | loss, rewards/chosen, rewards/rejected, rewards/margins,              |
|                  | rewards/accuracies, logps/chosen, logps/rejected, grad_norm,          |
|                  | learning_rate, tokens_per_second, peak_memory_gb                      |
| checkpoint_saved | step, path, sha256 (of adapters.safetensors)                            |
| note             | level ("info" or "warning"), text                                      |
| stage_finished   | stage, seconds, and a summary of the stage's counts                   |
| run_finished     | status ("completed" or "stopped"), seconds                            |
| run_failed       | error (one line), stage                                                |

    log = EventLog(run_dir / "events.jsonl")
    log.emit("progress", stage="sample", done=3, total=40, unit="pairs")
    events, offset = read_events(run_dir / "events.jsonl")
"""

import math
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
    "note",
    "stage_finished",
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


class EventLog:
    """Appends events to a JSONL file, one flushed line each; observers get each event too."""

    def __init__(self, path: str | Path, observers: list = ()):
        self.path = Path(path)
        self._file = JsonlAppender(self.path)
        self.observers = list(observers)

    def emit(self, event: str, **fields: Any) -> dict:
        if event not in EVENT_NAMES:
            raise ValueError(f"unknown event {event!r}")
        record = {"time": round(time.time(), 3), "event": event, **_json_safe(fields)}
        self._file.append(record)
        for observe in self.observers:
            observe(record)
        return record

    def close(self) -> None:
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
