"""The mipo-mlx terminal UI: watch runs, browse pairs, compare answers, start training.

    mipo-mlx tui                      # the runs in ./runs
    mipo-mlx tui runs/quickstart      # one run: Monitor, Pairs, Compare
    mipo-mlx tui recipes/quickstart.yaml   # the recipe's run; t starts it
    mipo-mlx-tui ...                  # the same, as its own command

Keys: ctrl+q quits, f1 shows help, ctrl+p opens the command palette, escape goes back.
"""

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import yaml

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Input

from mipo_mlx import cli
from mipo_mlx.errors import UserError
from mipo_mlx.recipe import Recipe
from mipo_mlx.rundir import is_run_dir
from mipo_mlx_tui.dialogs import HelpScreen
from mipo_mlx_tui.launcher import RunSource, TrainingLaunch, source_from_recipe, source_from_run_dir
from mipo_mlx_tui.run_screen import RunScreen
from mipo_mlx_tui.runs_screen import RunsScreen


KEYMAP_ENV = "MIPO_MLX_KEYMAP"
DEFAULT_KEYMAP = Path("~/.config/mipo-mlx/keymap.yaml")


def read_keymap() -> dict[str, str]:
    """The user's key remapping, binding id -> keys ("view-pairs: p"); empty when absent."""
    path = Path(os.environ.get(KEYMAP_ENV) or DEFAULT_KEYMAP).expanduser()
    if not path.is_file():
        return {}
    try:
        mapping = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise UserError("not valid YAML; write one `binding-id: keys` per line", file=str(path)) from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise UserError("expected `binding-id: keys` lines such as `view-pairs: p`", file=str(path))
    return {str(key): value for key, value in mapping.items()}


class MipoApp(App):
    """Runs list at the bottom of the stack; an opened run on top; help as a modal."""

    CSS_PATH = "app.tcss"
    TITLE = "mipo-mlx"
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", priority=True, id="quit"),
        Binding("f1", "help", "Help", id="help"),
        Binding("escape", "back", "Back", id="back"),
        Binding("ctrl+c", "help_quit", show=False, system=True),
    ]

    def __init__(
        self,
        output_dir: Path,
        run_dir: Path | None = None,
        source: RunSource | None = None,
        poll_seconds: float = 0.5,
        keymap: dict[str, str] | None = None,
    ):
        super().__init__()
        self.user_keymap = keymap or {}
        self.output_dir = Path(output_dir)
        self.start_run_dir = run_dir
        self.source = source
        self.poll_seconds = poll_seconds
        self.launches: dict[Path, TrainingLaunch] = {}

    def get_default_screen(self) -> Screen:
        return RunsScreen(self.output_dir, poll_seconds=max(self.poll_seconds, 1.0))

    def on_mount(self) -> None:
        self.set_keymap(self.user_keymap)
        if self.start_run_dir is not None:
            self.open_run(self.start_run_dir)

    def open_run(self, run_dir: Path) -> None:
        self.push_screen(RunScreen(run_dir, poll_seconds=self.poll_seconds))

    def run_source(self, run_dir: Path) -> RunSource:
        """The recipe to start `run_dir` from: the one given on the command line, or its saved copy."""
        if self.source is not None and self.source.run_dir == run_dir.resolve():
            return self.source
        return source_from_run_dir(run_dir)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.screen))

    async def action_back(self) -> None:
        """Leave a search or prompt box first, then go back from a run to the runs."""
        if isinstance(self.screen, RunScreen):
            if isinstance(self.focused, Input):
                self.screen.focus_list()
            else:
                self.pop_screen()

    def get_system_commands(self, screen: Screen):
        if isinstance(screen, RunScreen):
            for tab, title, help_text in (
                ("monitor", "Monitor", "Sampling progress and training curves"),
                ("pairs", "Pairs", "Browse and search the MIPO pairs"),
                ("compare", "Compare", "Base and adapted answers side by side"),
            ):
                yield SystemCommand(title, help_text, lambda tab=tab: screen.action_show_tab(tab))
            yield SystemCommand("Start or resume training", "Run `mipo-mlx train` for this run", screen.action_start_training)
            yield SystemCommand("Stop training", "Interrupt safely; a checkpoint is kept", screen.action_stop_training)
            yield SystemCommand("Runs", "Back to the list of runs", self.pop_screen)
        yield SystemCommand("Help", "What each view shows and every key", self.action_help)
        yield from super().get_system_commands(screen)


def add_arguments(parser) -> None:
    parser.add_argument(
        "target",
        nargs="?",
        default=None,
        help="A run directory, a folder of runs, or a recipe YAML (default: the recipe default output folder, runs/).",
    )


def build_app(target: str | None) -> MipoApp:
    """The app for a command-line target; a wrong path is a one-line UserError."""
    path = Path(target) if target else Path(Recipe().output_dir)
    if path.suffix in (".yaml", ".yml"):
        source = source_from_recipe(path)
        return MipoApp(source.run_dir.parent, run_dir=source.run_dir, source=source, keymap=read_keymap())
    if target and not path.is_dir():
        raise UserError("not found; give a run directory, a folder of runs or a recipe .yaml", file=target)
    if is_run_dir(path):
        return MipoApp(path.parent, run_dir=path, keymap=read_keymap())
    return MipoApp(path, keymap=read_keymap())


class _NotifyHandler(logging.Handler):
    """Shows log records as notifications (App.notify is safe from any thread)."""

    def __init__(self, app: App):
        super().__init__(level=logging.INFO)
        self.app = app

    def emit(self, record: logging.LogRecord) -> None:
        severity = "warning" if record.levelno >= logging.WARNING else "information"
        self.app.notify(record.getMessage(), severity=severity, markup=False)


@contextmanager
def logs_as_notifications(app: App):
    """The CLI logs to the terminal the app draws on; route log lines into the app meanwhile."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [_NotifyHandler(app)]
    try:
        yield
    finally:
        root.handlers = saved


def run(args) -> int:
    app = build_app(args.target)
    with logs_as_notifications(app):
        app.run()
    return 0


def main() -> None:
    sys.exit(cli.main(["tui", *sys.argv[1:]]))
