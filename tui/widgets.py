"""Widgets shared by the screens: a metric curve and a list table with vim keys."""

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import DataTable, Sparkline, Static

from mipo_mlx_tui.runstate import downsample

METRIC_TITLES = {
    "loss": "loss",
    "rewards/margins": "reward margin",
    "rewards/accuracies": "reward accuracy",
    "learning_rate": "learning rate",
    "tokens_per_second": "tokens/s",
    "peak_memory_gb": "peak memory GB",
}


def format_number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


class MetricChart(Vertical):
    """A titled curve of one metric, downsampled to the width it has on screen."""

    def __init__(self, metric: str, **kwargs):
        super().__init__(**kwargs)
        self.metric = metric
        self.values: list[float] = []

    def compose(self) -> ComposeResult:
        yield Static(self._title(), classes="chart-title")
        yield Sparkline([], summary_function=max)

    def _title(self) -> str:
        name = METRIC_TITLES.get(self.metric, self.metric)
        if not self.values:
            return f"[b]{name}[/b] [dim]–[/dim]"
        low, high = min(self.values), max(self.values)
        return f"[b]{name}[/b] {format_number(self.values[-1])}  [dim]({low:.3g}–{high:.3g})[/dim]"

    def set_values(self, values: list[float]) -> None:
        if values == self.values:
            return
        self.values = list(values)
        self._redraw()

    def on_resize(self) -> None:
        self._redraw()

    def _redraw(self) -> None:
        if not self.is_mounted:
            return
        self.query_one(".chart-title", Static).update(self._title())
        sparkline = self.query_one(Sparkline)
        sparkline.data = downsample(self.values, sparkline.size.width)


class ListTable(DataTable):
    """A row-cursor table that also moves with j/k/g/G."""

    BINDINGS = [
        Binding("j", "cursor_down", "Down", show=False, id="list-down"),
        Binding("k", "cursor_up", "Up", show=False, id="list-up"),
        Binding("g", "scroll_top", "First", show=False, id="list-first"),
        Binding("G", "scroll_bottom", "Last", show=False, id="list-last"),
    ]

    def __init__(self, **kwargs):
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
