"""`mipo-mlx tui TARGET`: what a target opens, the user's keymap, and one-line errors.

    .venv/bin/python -m pytest tests/tui/test_cli.py -q
"""

import subprocess
import sys

import pytest
from textual.widgets import TabbedContent
from tui_helpers import FIXTURES, RECORDED_RUN, REPO_ROOT

from mipo_mlx.errors import UserError
from mipo_mlx_tui.app import KEYMAP_ENV, MipoApp, build_app, read_keymap


def test_a_run_directory_opens_that_run_over_its_folder():
    app = build_app(str(RECORDED_RUN))
    assert app.start_run_dir == RECORDED_RUN and app.output_dir == FIXTURES


def test_a_folder_of_runs_opens_the_runs_list():
    app = build_app(str(FIXTURES))
    assert app.start_run_dir is None and app.output_dir == FIXTURES


def test_a_recipe_opens_its_run_directory_and_can_start_it(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    app = build_app(str(RECORDED_RUN / "recipe.yaml"))
    assert app.start_run_dir == RECORDED_RUN.resolve()
    assert app.run_source(RECORDED_RUN.resolve()).recipe == (RECORDED_RUN / "recipe.yaml").resolve()


def test_a_missing_target_is_a_one_line_error_with_status_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mipo_mlx.cli", "tui", str(tmp_path / "nope")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "nope: not found" in result.stderr


def test_keymap_file_remaps_by_binding_id(tmp_path, monkeypatch):
    keymap = tmp_path / "keymap.yaml"
    keymap.write_text("view-pairs: p\nview-compare: c\n")
    monkeypatch.setenv(KEYMAP_ENV, str(keymap))
    assert read_keymap() == {"view-pairs": "p", "view-compare": "c"}
    keymap.write_text("- not a mapping\n")
    with pytest.raises(UserError, match="binding-id: keys"):
        read_keymap()


async def test_remapped_key_switches_the_view():
    app = MipoApp(FIXTURES, run_dir=RECORDED_RUN, keymap={"view-pairs": "p"})
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("p")
        assert app.screen.query_one(TabbedContent).active == "pairs"


def test_opening_the_tui_loads_no_mlx():
    code = "import sys, mipo_mlx_tui.app; print(any(m == 'mlx' or m.startswith('mlx.') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr
