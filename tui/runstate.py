"""What the TUI knows about a run, folded from its event log (no Textual in here).

    tail = RunTail(Path("runs/quickstart"))
    if tail.poll():            # read the events appended since the last poll
        state = tail.snapshot()  # a copy the UI thread may keep
        state.series["loss"]     # training loss, one value per reported step

The tail keeps a byte offset into RUN_DIR/events.jsonl and reads it with
mipo_mlx.events.read_events, so it follows a run started from any terminal.
"""

import copy
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from mipo_mlx.console import round_line
from mipo_mlx.events import read_events
from mipo_mlx.rundir import EVENTS_FILE

# Training metrics drawn as curves, in TRL's names (see mipo_mlx/events.py).
CHART_METRICS = (
    "loss",
    "rewards/margins",
    "rewards/accuracies",
    "learning_rate",
    "tokens_per_second",
    "peak_memory_gb",
)
NOTES_KEPT = 200


@dataclass
class RunState:
    """One run as its events describe it; `apply` folds one event in."""

    run_dir: Path
    status: str = "not started"
    model: str | None = None
    stages: list[str] = field(default_factory=list)
    stage: str | None = None
    round: tuple[int, int] | None = None  # (round, of rounds) when training.rounds > 1
    pid: int | None = None
    started_at: float | None = None
    updated_at: float | None = None
    progress: dict[str, dict] = field(default_factory=dict)
    step: int | None = None
    last_metrics: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    series: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in CHART_METRICS})
    checkpoints: list[dict] = field(default_factory=list)
    notes: deque = field(default_factory=lambda: deque(maxlen=NOTES_KEPT))
    notes_written: int = 0
    error: str | None = None

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def stage_text(self) -> str | None:
        """The stage, and the round it is in when the run has several: "train (round 2/3)"."""
        if self.stage and self.round:
            return f"{self.stage} (round {self.round[0]}/{self.round[1]})"
        return self.stage

    @property
    def total_steps(self) -> int | None:
        return self.progress.get("train", {}).get("total")

    def apply(self, event: dict) -> None:
        kind = event.get("event")
        self.updated_at = event.get("time", self.updated_at)
        if kind == "run_started":
            self.status, self.model, self.pid = "running", event.get("model"), event.get("pid")
            self.stages = list(event.get("stages", []))
            self.started_at = event.get("time")
            self.error = None
            ranks = event.get("ranks", 1)
            self._note(f"run started{' (resumed)' if event.get('resumed') else ''}"
                       f"{f' on {ranks} ranks' if ranks > 1 else ''}: {self.model}")
        elif kind == "stage_started":
            self.stage = event["stage"]
            self.progress[self.stage] = {"stage": self.stage, "done": 0, **event}
            self._note(f"{self.stage}: {event.get('total', '?')} {event.get('unit', '')}")
        elif kind == "progress":
            self.stage = event["stage"]
            self.progress[self.stage] = event
        elif kind == "metrics":
            self._apply_metrics(event)
        elif kind == "checkpoint_saved":
            self.checkpoints.append(event)
            self._note(f"checkpoint at step {event['step']}: {event['path']}")
        elif kind == "note":
            self._note(f"{event.get('level', 'info')}: {event.get('text', '')}")
        elif kind == "recipe_changed":
            changes = event.get("changes") or {}
            self._note("resumed with " + ", ".join(f"{key} {before!r} -> {after!r}"
                                                   for key, (before, after) in changes.items()))
        elif kind == "stage_finished":
            done = self.progress.setdefault(event["stage"], {"stage": event["stage"]})
            if done.get("total"):
                done["done"] = done["total"]
            self._note(f"{event['stage']} finished in {event.get('seconds', 0):.0f} s")
        elif kind == "round_started":
            self.round = (event["round"], event["rounds"])
            self._note(f"round {event['round']} of {event['rounds']} started")
        elif kind == "round_finished":
            self.round = None  # what runs next (compare) is the run's, not a round's
            self._note(round_line(event))
        elif kind == "run_finished":
            self.status = event.get("status", "completed")
            self._note(f"run {self.status}")
        elif kind == "run_failed":
            self.status, self.error = "failed", event.get("error")
            self._note(f"run failed in {event.get('stage')}: {self.error}")

    def _apply_metrics(self, event: dict) -> None:
        if event.get("split", "train") != "train":
            self.last_eval = event
            return
        self.step = event.get("step", self.step)
        self.last_metrics = event
        for name in CHART_METRICS:
            value = event.get(name)
            # A diverged loss arrives as the string "nan" (events.py keeps JSON valid).
            if isinstance(value, (int, float)):
                self.series[name].append(float(value))

    def _note(self, text: str) -> None:
        self.notes.append(text)
        self.notes_written += 1

    def is_alive(self) -> bool:
        """Whether the process that wrote `run_started` still runs (this machine only)."""
        if self.status != "running" or not self.pid or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def shown_status(self) -> str:
        """The status a person should read: a run whose process is gone was interrupted."""
        if self.status == "running" and not self.is_alive():
            return "interrupted"
        return self.status


class RunTail:
    """Follows one run directory's event log from a byte offset."""

    def __init__(self, run_dir: Path):
        self.state = RunState(run_dir=Path(run_dir))
        self.offset = 0

    @property
    def events_path(self) -> Path:
        return self.state.run_dir / EVENTS_FILE

    def poll(self) -> bool:
        """Fold in the events written since the last poll; True when there were any."""
        events, self.offset = read_events(self.events_path, self.offset)
        for event in events:
            self.state.apply(event)
        return bool(events)

    def snapshot(self) -> RunState:
        return copy.deepcopy(self.state)


def downsample(values: list[float], width: int) -> list[float]:
    """At most `width` points: the mean of each equal slice, so a curve keeps its level."""
    if width <= 0 or len(values) <= width:
        return list(values)
    points = []
    for column in range(width):
        start = column * len(values) // width
        end = max(start + 1, (column + 1) * len(values) // width)
        chunk = values[start:end]
        points.append(sum(chunk) / len(chunk))
    return points
