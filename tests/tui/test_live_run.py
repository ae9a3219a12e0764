"""A run that grows while the TUI watches it, and training started and stopped from the TUI.

    .venv/bin/python -m pytest tests/tui/test_live_run.py -q
"""

import subprocess
import sys
import time

import pytest
from textual.notifications import Notify
from textual.widgets import DataTable, Static
from tui_helpers import recorded_lines, wait_for

from mipo_mlx.errors import UserError
from mipo_mlx_tui.app import MipoApp
from mipo_mlx_tui.launcher import TrainingLaunch, catch_interrupts, source_from_run_dir, stop_run
from mipo_mlx_tui.messages import TrainingExited
from mipo_mlx_tui.monitor_view import MonitorView
from mipo_mlx_tui.run_screen import RunScreen
from mipo_mlx_tui.pairs_view import PairsView
from mipo_mlx_tui.widgets import MetricChart


def append(path, lines) -> None:
    with open(path, "a", encoding="utf-8") as file:
        file.write("".join(lines))


async def test_monitor_and_pairs_follow_a_growing_run(empty_run):
    events, pairs = recorded_lines("events.jsonl"), recorded_lines("pairs.jsonl")
    sampling_half = next(i for i, line in enumerate(events) if '"done": 6,' in line) + 1
    first_metrics = next(i for i, line in enumerate(events) if '"metrics"' in line)
    append(empty_run / "events.jsonl", events[:sampling_half])
    append(empty_run / "pairs.jsonl", pairs[:6])
    app = MipoApp(empty_run.parent, run_dir=empty_run, poll_seconds=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        monitor = app.screen.query_one(MonitorView)
        loss = next(chart for chart in monitor.query(MetricChart) if chart.metric == "loss")
        progress = monitor.query_one("#progress", Static)
        await wait_for(pilot, lambda: "6/12 pairs" in str(progress.render()))
        assert loss.values == []
        pairs_table = app.screen.query_one(PairsView).query_one(DataTable)
        await wait_for(pilot, lambda: pairs_table.row_count == 6)

        # Sampling goes on, a pair line arrives in two writes, then training reports.
        append(empty_run / "pairs.jsonl", pairs[6:11] + [pairs[11][:40]])
        append(empty_run / "events.jsonl", events[sampling_half : first_metrics + 1])
        await wait_for(pilot, lambda: len(loss.values) == 1)
        assert "12/12 pairs" in str(progress.render())
        await wait_for(pilot, lambda: pairs_table.row_count == 11)
        append(empty_run / "pairs.jsonl", [pairs[11][40:]])
        append(empty_run / "events.jsonl", events[first_metrics + 1 :])
        await wait_for(pilot, lambda: len(loss.values) == 24)
        await wait_for(pilot, lambda: pairs_table.row_count == 12)
        assert "completed" in str(monitor.query_one("#run-summary", Static).render())


async def test_a_burst_of_events_reaches_the_monitor_as_few_updates(empty_run):
    events = recorded_lines("events.jsonl")
    app = MipoApp(empty_run.parent, run_dir=empty_run, poll_seconds=0.05)
    updates = []
    async with app.run_test(size=(120, 40), message_hook=updates.append) as pilot:
        monitor = app.screen.query_one(MonitorView)
        loss = next(chart for chart in monitor.query(MetricChart) if chart.metric == "loss")
        append(empty_run / "events.jsonl", events)
        await wait_for(pilot, lambda: len(loss.values) == 24)
    run_updates = [m for m in updates if type(m).__name__ == "RunUpdated"]
    assert 1 <= len(run_updates) <= 3


def resumable_recipe(run_dir, old: str, new: str):
    """The run's saved recipe with `old` replaced, and output_dir/run_name naming this folder (resuming needs them)."""
    recipe = run_dir / "recipe.yaml"
    text = recipe.read_text(encoding="utf-8").replace(old, new)
    text = text.replace("output_dir: tests/tui/fixtures", "output_dir: runs").replace("run_name: run", "run_name: live")
    recipe.write_text(text, encoding="utf-8")


def test_a_saved_recipe_with_a_typo_is_refused_before_anything_starts(empty_run):
    resumable_recipe(empty_run, "  beta:", "  bta:")
    with pytest.raises(UserError, match="training.bta: unknown key"):
        source_from_run_dir(empty_run)


async def test_training_started_from_the_tui_reports_how_it_ended(empty_run):
    # The prompts file is missing where the run started, so `mipo-mlx train` stops at once with a one-line error.
    resumable_recipe(empty_run, "train: bundled:personalization/train", "train: missing/prompts.jsonl")
    app = MipoApp(empty_run.parent, run_dir=empty_run, poll_seconds=0.05)
    messages = []
    async with app.run_test(size=(120, 40), message_hook=messages.append) as pilot:
        await pilot.press("t", "n")  # a stray key starts nothing
        assert app.launches == {} and isinstance(app.screen, RunScreen)
        await pilot.press("t")
        assert "Resume training" in str(app.screen.query_one("#confirm-question", Static).render())
        await pilot.press("y")
        launch = app.launches[empty_run]
        assert "--resume" in launch.command
        await wait_for(pilot, lambda: any(isinstance(m, TrainingExited) for m in messages), timeout=60)
    [exited] = [m for m in messages if isinstance(m, TrainingExited)]
    assert exited.exit_code == 2
    assert "data.train: file not found: missing/prompts.jsonl" in exited.last_line


def test_stop_interrupts_the_process_group_like_ctrl_c(tmp_path):
    script = (
        "import time, pathlib\n"
        "try:\n    time.sleep(30)\n"
        "except KeyboardInterrupt:\n    pathlib.Path('stopped').write_text('checkpoint saved')\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, start_new_session=True,
                               preexec_fn=catch_interrupts)
    time.sleep(0.5)
    launch = TrainingLaunch(process=process, run_dir=tmp_path, command=[])
    assert stop_run(None, launch)
    assert process.wait(timeout=10) == 0
    assert (tmp_path / "stopped").read_text() == "checkpoint saved"
    assert not stop_run(None, launch)


async def test_a_broken_event_line_is_reported_and_the_rest_stays_usable(empty_run):
    events = recorded_lines("events.jsonl")
    append(empty_run / "events.jsonl", events[:10] + ['{"time": 1, "event": "progr\n'] + events[10:])
    app = MipoApp(empty_run.parent, run_dir=empty_run, poll_seconds=0.05)
    messages = []
    async with app.run_test(size=(120, 40), message_hook=messages.append) as pilot:
        notices = lambda: [m.notification.message for m in messages if isinstance(m, Notify)]
        await wait_for(pilot, lambda: any("broken line after byte" in text for text in notices()))
        await pilot.press("2")
        assert app.screen.query_one("#tabs").active == "pairs"
