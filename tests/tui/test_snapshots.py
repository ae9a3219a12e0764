"""SVG snapshots of the main screens on the recorded run (pytest-textual-snapshot).

    .venv/bin/python -m pytest tests/tui/test_snapshots.py -q
    .venv/bin/python -m pytest tests/tui/test_snapshots.py --snapshot-update   # accept a change

Deterministic: a fixed terminal size, relative paths, no clock, a steady cursor
(conftest.py), durations taken from event times, and each screenshot taken only once
the workers have delivered the recorded files.
"""

from pathlib import Path

import pytest
from textual.widgets import DataTable
from tui_helpers import REPO_ROOT, wait_for

from mipo_mlx_tui.app import MipoApp
from mipo_mlx_tui.widgets import MetricChart

SIZE = (120, 40)
FIXTURES = Path("tests/tui/fixtures")


@pytest.fixture(autouse=True)
def from_repo_root(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)


def run_app() -> MipoApp:
    return MipoApp(FIXTURES, run_dir=FIXTURES / "run", poll_seconds=0.05)


async def rows_loaded(pilot, table_id: str, rows: int) -> None:
    table = pilot.app.screen.query_one(table_id, DataTable)
    await wait_for(pilot, lambda: table.row_count == rows)
    await pilot.pause()


def test_runs_screen(snap_compare):
    async def loaded(pilot):
        await rows_loaded(pilot, "#runs-table", 1)

    assert snap_compare(MipoApp(FIXTURES, poll_seconds=0.05), terminal_size=SIZE, run_before=loaded)


def test_monitor_screen(snap_compare):
    async def loaded(pilot):
        loss = next(chart for chart in pilot.app.screen.query(MetricChart) if chart.metric == "loss")
        await wait_for(pilot, lambda: len(loss.values) == 24)
        await pilot.pause()

    assert snap_compare(run_app(), terminal_size=SIZE, run_before=loaded)


def test_pairs_screen(snap_compare):
    async def loaded(pilot):
        await pilot.press("2")
        await rows_loaded(pilot, "#pairs-table", 12)
        await pilot.press("j")

    assert snap_compare(run_app(), terminal_size=SIZE, run_before=loaded)


def test_compare_screen(snap_compare):
    async def loaded(pilot):
        await pilot.press("3")
        await rows_loaded(pilot, "#answers-table", 4)

    assert snap_compare(run_app(), terminal_size=SIZE, run_before=loaded)


def test_help_screen(snap_compare):
    async def opened(pilot):
        await rows_loaded(pilot, "#pairs-table", 12)
        await pilot.press("f1")
        await pilot.pause()

    assert snap_compare(run_app(), terminal_size=SIZE, run_before=opened)
