"""The Runs view: every run in the output folder with its status and last metrics.

A worker thread keeps one RunTail per run directory (new ones are picked up as they
appear) and posts all states as one coalescing RunsUpdated; enter opens a run.
"""

import time
from pathlib import Path

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static
from textual.worker import get_current_worker

from mipo_mlx.console import format_duration
from mipo_mlx_tui.messages import RunsUpdated
from mipo_mlx_tui.monitor_view import status_text
from mipo_mlx.rundir import find_runs
from mipo_mlx_tui.runstate import RunState, RunTail
from mipo_mlx_tui.widgets import ListTable, format_number

COLUMNS = ("run", "status", "model", "stage", "step", "loss", "margin", "accuracy", "duration")


def run_row(state: RunState) -> tuple[str, ...]:
    metrics = state.last_metrics
    duration = state.updated_at - state.started_at if state.started_at and state.updated_at else None
    step = f"{state.step}/{state.total_steps or '?'}" if state.step is not None else "–"
    return (
        escape(state.name),
        status_text(state.shown_status()),
        escape(state.model or "–"),
        state.stage_text or "–",
        step,
        format_number(metrics.get("loss")),
        format_number(metrics.get("rewards/margins")),
        format_number(metrics.get("rewards/accuracies")),
        format_duration(duration) if duration is not None else "–",
    )


class RunsScreen(Screen):
    """The table of runs in one output folder."""

    def __init__(self, output_dir: Path, poll_seconds: float = 1.0):
        super().__init__()
        self.output_dir = Path(output_dir)
        self.poll_seconds = poll_seconds
        self.states: list[RunState] = []
        self.sub_title = f"runs in {self.output_dir}"

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"[dim]Looking for runs in {escape(str(self.output_dir))}…[/dim]", id="runs-status")
        yield ListTable(id="runs-table")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(ListTable).add_columns(*COLUMNS)
        self.watch_runs()

    @work(thread=True, exclusive=True, group="runs", exit_on_error=False, description="watch the runs")
    def watch_runs(self) -> None:
        worker = get_current_worker()
        tails: dict[Path, RunTail] = {}
        first = True
        while not worker.is_cancelled:
            # A running run is posted every time: its process may have died silently.
            changed = first or any(tail.state.status == "running" for tail in tails.values())
            for run_dir in find_runs(self.output_dir):
                if run_dir not in tails:
                    tails[run_dir], changed = RunTail(run_dir), True
                changed |= tails[run_dir].poll()
            if changed:
                states = sorted((tail.snapshot() for tail in tails.values()), key=lambda s: -(s.updated_at or 0))
                self.post_message(RunsUpdated(states))
            first = False
            time.sleep(self.poll_seconds)

    def on_runs_updated(self, message: RunsUpdated) -> None:
        self.states = message.states
        table = self.query_one(ListTable)
        cursor = table.cursor_row
        table.clear()
        for state in self.states:
            table.add_row(*run_row(state), key=str(state.run_dir))
        if self.states:
            table.move_cursor(row=min(cursor, len(self.states) - 1))
            count = f"{len(self.states)} run" + ("s" if len(self.states) > 1 else "")
            text = f"{count} in {escape(str(self.output_dir))}  ·  enter opens one"
        else:
            text = f"No runs in {escape(str(self.output_dir))} yet. Start one with `mipo-mlx train RECIPE`, or open a recipe: `mipo-mlx tui RECIPE`."
        self.query_one("#runs-status", Static).update(text)

    @on(DataTable.RowSelected, "#runs-table")
    def _open(self, event: DataTable.RowSelected) -> None:
        self.app.open_run(Path(event.row_key.value))
