"""The Monitor view: sampling progress, training curves and the run's notes, live.

It only draws RunState copies that RunScreen's tail worker posts; it reads no file.
"""

from rich.markup import escape
from textual.app import ComposeResult
from textual.containers import Grid, Vertical
from textual.widgets import Log, Static

from mipo_mlx.console import format_duration, format_metrics, progress_line
from mipo_mlx_tui.runstate import CHART_METRICS, RunState
from mipo_mlx_tui.widgets import MetricChart

STAGE_ORDER = ("sample", "reference", "train", "compare", "export")
STATUS_STYLES = {
    "running": "green",
    "completed": "blue",
    "stopped": "yellow",
    "interrupted": "yellow",
    "failed": "red",
}


def status_text(status: str) -> str:
    style = STATUS_STYLES.get(status, "dim")
    return f"[{style}]{status}[/{style}]"


def run_summary(state: RunState) -> str:
    """One line: model, status, stage, step and how long the run has gone."""
    parts = [f"[b]{escape(state.name)}[/b]", status_text(state.shown_status())]
    if state.model:
        parts.append(f"model {escape(state.model)}")
    if state.stage:
        parts.append(f"stage {state.stage_text}")
    if state.step is not None:
        parts.append(f"step {state.step}/{state.total_steps or '?'}")
    if state.started_at and state.updated_at:
        parts.append(f"elapsed {format_duration(state.updated_at - state.started_at)}")
    return "  ·  ".join(parts)


def progress_text(state: RunState) -> str:
    stages = sorted(state.progress, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER))
    lines = [progress_line(state.progress[stage]) for stage in stages if "done" in state.progress[stage]]
    if not lines:
        return "[dim]Nothing has run yet. Press t to start training, or run `mipo-mlx train RECIPE` in another terminal.[/dim]"
    return "\n".join(lines)


class MonitorView(Vertical):
    """Progress bars, six metric curves, the last evaluation and the notes."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.notes_shown = 0

    def compose(self) -> ComposeResult:
        yield Static("", id="run-summary")
        yield Static("", id="progress")
        with Grid(id="charts"):
            for metric in CHART_METRICS:
                yield MetricChart(metric, classes="chart")
        yield Static("", id="eval-line")
        yield Log(id="notes", max_lines=500)

    def show(self, state: RunState) -> None:
        self.query_one("#run-summary", Static).update(run_summary(state))
        self.query_one("#progress", Static).update(progress_text(state))
        for chart in self.query(MetricChart):
            chart.set_values(state.series[chart.metric])
        error = f"\n[red]error: {escape(state.error)}[/red]" if state.error else ""
        last_eval = escape(format_metrics(state.last_eval)) if state.last_eval else "[dim]no evaluation yet[/dim]"
        self.query_one("#eval-line", Static).update(last_eval + error)
        new_notes = state.notes_written - self.notes_shown
        if new_notes > 0:
            self.query_one("#notes", Log).write_lines(list(state.notes)[-new_notes:])
            self.notes_shown = state.notes_written
