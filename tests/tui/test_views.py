"""Pilot tests of every view against the recorded run (no model needed).

    .venv/bin/python -m pytest tests/tui/test_views.py -q
"""

import json

from textual.widgets import DataTable, Input, Log, Static, TabbedContent

from mipo_mlx_tui.app import MipoApp
from mipo_mlx_tui.compare_view import CompareView
from mipo_mlx_tui.dialogs import ConfirmScreen, HelpScreen
from mipo_mlx_tui.pairs_view import MAX_SHOWN_ROWS, PairsView
from mipo_mlx_tui.run_screen import RunScreen
from mipo_mlx_tui.runs_screen import RunsScreen
from mipo_mlx_tui.widgets import ListTable, MetricChart
from tui_helpers import FIXTURES, RECORDED_RUN, recorded_lines, wait_for


def text_of(app, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).render())


def run_app() -> MipoApp:
    return MipoApp(FIXTURES, run_dir=RECORDED_RUN, poll_seconds=0.05)


async def test_runs_view_lists_the_run_and_opens_it():
    app = MipoApp(FIXTURES, poll_seconds=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        table = app.screen.query_one("#runs-table", DataTable)
        await wait_for(pilot, lambda: table.row_count == 1)
        row = [str(cell) for cell in table.get_row_at(0)]
        assert row[0] == "run"
        assert "completed" in row[1]
        assert row[2:5] == ["smollm2-135m", "compare", "24/24"]
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, RunScreen))
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)


async def test_monitor_draws_progress_curves_and_notes():
    app = run_app()
    async with app.run_test(size=(120, 40)) as pilot:
        charts = {chart.metric: chart for chart in app.screen.query(MetricChart)}
        await wait_for(pilot, lambda: len(charts["loss"].values) == 24)
        summary = text_of(app, "#run-summary")
        assert "completed" in summary and "step 24/24" in summary and "smollm2-135m" in summary
        progress = text_of(app, "#progress")
        assert "12/12 pairs" in progress and "24/24 steps" in progress and "4/4 prompts" in progress
        assert charts["loss"].values[0] > charts["loss"].values[-1]
        assert all(len(chart.values) == 24 for chart in charts.values())
        assert "step 24" in text_of(app, "#eval-line")
        notes = app.screen.query_one("#notes", Log)
        assert "run completed" in notes.lines[-1]
        assert any("checkpoint at step 12" in line for line in notes.lines)


async def test_pairs_view_opens_pairs_moves_with_vim_keys_and_searches():
    app = run_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("2")
        view = app.screen.query_one(PairsView)
        table = view.query_one("#pairs-table", DataTable)
        await wait_for(pilot, lambda: table.row_count == 12)
        assert app.focused is table
        assert "chickpea and spinach curry" in text_of(app, "#pair-chosen")
        assert "Grill a steak" in text_of(app, "#pair-rejected")
        assert "vegetarian" in text_of(app, "#pair-prompt")
        assert "p1-q1:no-context" in text_of(app, "#pair-negative")
        assert "PMI -6.858" in text_of(app, "#pair-header")
        await pilot.press("j")
        assert "lentil salad" in text_of(app, "#pair-chosen")
        await pilot.press("G")
        assert "Blackout curtains" in text_of(app, "#pair-chosen")
        await pilot.press("g")
        assert "chickpea" in text_of(app, "#pair-chosen")
        await pilot.press("slash")
        assert isinstance(app.focused, Input)
        await pilot.press(*"spanish")
        await wait_for(pilot, lambda: table.row_count == 2)
        assert "2 of 12 pairs match" in text_of(app, "#pairs-status")
        await pilot.press("escape")
        assert app.focused is table and isinstance(app.screen, RunScreen)


async def test_pairs_view_lists_every_rounds_pairs_with_their_round(tmp_path):
    run_dir = tmp_path / "rounds"
    run_dir.mkdir()
    (run_dir / "pairs.jsonl").write_bytes((RECORDED_RUN / "pairs.jsonl").read_bytes())
    second = [json.loads(line) for line in recorded_lines("pairs.jsonl")]
    for pair in second:
        pair["chosen"][-1]["content"] = "Round two says: " + pair["chosen"][-1]["content"]
    app = MipoApp(tmp_path, run_dir=run_dir, poll_seconds=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("2")
        view = app.screen.query_one(PairsView)
        table = view.query_one("#pairs-table", DataTable)
        await wait_for(pilot, lambda: table.row_count == 12)
        assert [column.label.plain for column in table.ordered_columns][:2] == ["#", "id"]
        # Round 2 starts while the view is open: its pairs join the list, and a round column the table.
        (run_dir / "rounds" / "2").mkdir(parents=True)
        (run_dir / "rounds" / "2" / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in second))
        await wait_for(pilot, lambda: table.row_count == 24)
        assert [column.label.plain for column in table.ordered_columns][:3] == ["#", "round", "id"]
        assert [str(cell) for cell in table.get_row_at(12)][:3] == ["13", "2", "p1-q1#0"]
        assert "24 pairs in 2 rounds" in text_of(app, "#pairs-status")
        await pilot.press("G")
        assert text_of(app, "#pair-chosen").startswith("Round two says: ") and "round 2" in text_of(app, "#pair-header")
        await pilot.press("g")
        assert "chickpea" in text_of(app, "#pair-chosen") and "round 1" in text_of(app, "#pair-header")
        await pilot.press("slash", *"hoy hablamos")
        await wait_for(pilot, lambda: table.row_count == 2)
        assert [str(table.get_row_at(n)[1]) for n in range(2)] == ["1", "2"]


async def test_compare_view_shows_both_answers_with_checks():
    app = run_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("3")
        view = app.screen.query_one(CompareView)
        table = view.query_one("#answers-table", DataTable)
        await wait_for(pilot, lambda: table.row_count == 4)
        assert "base 5/8" in text_of(app, "#compare-status") and "adapted 6/8" in text_of(app, "#compare-status")
        assert "fruit salad" in text_of(app, "#base-answer")
        assert "pareve apple cake" in text_of(app, "#adapted-answer")
        assert "✗ mentions_context" in text_of(app, "#base-checks")
        assert "✓ mentions_context" in text_of(app, "#adapted-checks")
        await pilot.press("j")
        assert "Waterproof gloves" in text_of(app, "#adapted-answer")
        assert "Amsterdam" in text_of(app, "#compare-prompt")


async def test_help_lists_keys_with_ids_and_escape_closes_it():
    app = run_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        for binding_id in ("view-pairs", "start-training", "stop-training", "quit", "help"):
            assert binding_id in app.screen.text
        await pilot.press("escape")
        assert isinstance(app.screen, RunScreen)


async def test_command_palette_switches_views():
    app = run_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("ctrl+p")
        await pilot.press(*"Compare")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.screen.query_one(TabbedContent).active == "compare")


def test_every_binding_has_an_id():
    for owner in (MipoApp, RunScreen, HelpScreen, ConfirmScreen, ListTable):
        for binding in owner.BINDINGS:
            assert binding.system or binding.id, f"{owner.__name__}: {binding.key} has no id"


async def test_a_big_pair_file_is_counted_whole_shown_capped_and_searchable(tmp_path):
    run_dir = tmp_path / "big"
    run_dir.mkdir()
    lines = RECORDED_RUN.joinpath("pairs.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    total = 18_000  # about 16 MB; one pair in 12 mentions the podcast
    with open(run_dir / "pairs.jsonl", "w", encoding="utf-8") as file:
        for number in range(total):
            file.write(lines[number % len(lines)])
    app = MipoApp(tmp_path, run_dir=run_dir, poll_seconds=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("2")
        view = app.screen.query_one(PairsView)
        table = view.query_one("#pairs-table", DataTable)
        await wait_for(pilot, lambda: len(view.rows) == total, timeout=60)
        assert table.row_count == MAX_SHOWN_ROWS
        assert f"first {MAX_SHOWN_ROWS} shown" in text_of(app, "#pairs-status")
        await pilot.press("slash", *"hoy hablamos")
        await wait_for(pilot, lambda: view.query_text == "hoy hablamos", timeout=30)
        assert table.row_count == total // len(lines) < MAX_SHOWN_ROWS
        assert "Hoy Hablamos" in text_of(app, "#pair-chosen")
