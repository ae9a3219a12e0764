"""Fixtures for the TUI tests: a steady cursor and an empty run directory."""

import shutil
from pathlib import Path

import pytest
from textual.widgets import Input
from tui_helpers import RECORDED_RUN


@pytest.fixture(autouse=True)
def steady_cursor(monkeypatch):
    """A blinking cursor makes screenshots differ from run to run."""
    monkeypatch.setattr(Input, "_toggle_cursor", lambda self: None)


@pytest.fixture
def empty_run(tmp_path) -> Path:
    """A run directory that holds only the recorded recipe, as when a run is about to start."""
    run_dir = tmp_path / "runs" / "live"
    run_dir.mkdir(parents=True)
    shutil.copy(RECORDED_RUN / "recipe.yaml", run_dir / "recipe.yaml")
    return run_dir
