"""One run: Monitor, Pairs and Compare tabs fed by one tailing worker.

The worker polls RUN_DIR every `poll_seconds`: new events are folded into a RunState
and posted as one coalescing RunUpdated; new pairs go out in batches, waiting while
the UI still has messages queued (backpressure); compare/answers.jsonl is read again
when it changes. Workers only post messages; the handlers here update the widgets.
"""

import time
from pathlib import Path

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, TabbedContent, TabPane
from textual.worker import get_current_worker

from mipo_mlx.errors import UserError
from mipo_mlx.files import read_jsonl
from mipo_mlx.rundir import ANSWERS_FILE, COMPARE_DIR, RECIPE_FILE
from mipo_mlx_tui.compare_view import CompareView
from mipo_mlx_tui.dialogs import ConfirmScreen
from mipo_mlx_tui.launcher import last_console_line, start_training, stop_run
from mipo_mlx_tui.messages import AnswersLoaded, PairsRead, RunUpdated, TrainingExited
from mipo_mlx_tui.monitor_view import MonitorView, status_text
from mipo_mlx_tui.pairs_index import PairReader
from mipo_mlx_tui.pairs_view import PairsView
from mipo_mlx_tui.runstate import RunState, RunTail

PAIRS_PER_MESSAGE = 500
MAX_QUEUED_MESSAGES = 4


class RunScreen(Screen):
    """Monitor, Pairs and Compare for one run directory, plus start/stop of its training."""

    BINDINGS = [
        Binding("1", "show_tab('monitor')", "Monitor", id="view-monitor"),
        Binding("2", "show_tab('pairs')", "Pairs", id="view-pairs"),
        Binding("3", "show_tab('compare')", "Compare", id="view-compare"),
        Binding("slash", "focus_input", "Search/ask", id="focus-input"),
        Binding("t", "start_training", "Train/resume", id="start-training"),
        Binding("s", "stop_training", "Stop", id="stop-training"),
    ]

    def __init__(self, run_dir: Path, poll_seconds: float = 0.5):
        super().__init__()
        # Resolved, so a run opened from the list and from the command line is the same key.
        self.run_dir = Path(run_dir).resolve()
        self.poll_seconds = poll_seconds
        self.state = RunState(run_dir=self.run_dir)
        self.sub_title = self.run_dir.name

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(id="tabs"):
            with TabPane("1 Monitor", id="monitor"):
                yield MonitorView(id="monitor-view")
            with TabPane("2 Pairs", id="pairs"):
                yield PairsView(self.run_dir, id="pairs-view")
            with TabPane("3 Compare", id="compare"):
                yield CompareView(self.run_dir, id="compare-view")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(MonitorView).show(self.state)
        self.tail_run()

    def action_show_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab
        self.focus_list()

    def _active_view(self) -> PairsView | CompareView | None:
        active = self.query_one(TabbedContent).active
        return {"pairs": self.query_one(PairsView), "compare": self.query_one(CompareView)}.get(active)

    def focus_list(self) -> None:
        """Focus the active view's table (the Monitor has none), so j/k move at once."""
        view = self._active_view()
        if view is not None:
            view.focus_list()
        else:
            self.set_focus(None)

    def action_focus_input(self) -> None:
        view = self._active_view()
        if view is not None:
            view.focus_input()

    @on(TabbedContent.TabActivated)
    def _tab_activated(self) -> None:
        self.focus_list()

    @work(thread=True, exclusive=True, group="tail", exit_on_error=False, description="tail the run")
    def tail_run(self) -> None:
        worker = get_current_worker()
        tail = RunTail(self.run_dir)
        pairs = PairReader(self.run_dir)
        answers_seen = None
        reported_launch = None
        events_readable = True
        while not worker.is_cancelled:
            try:
                if events_readable and tail.poll():
                    self.post_message(RunUpdated(tail.snapshot()))
            except ValueError:
                events_readable = False
                self.app.notify(
                    f"{tail.events_path} has a broken line after byte {tail.offset}; the monitor stops there.",
                    severity="error",
                    timeout=15,
                )
            while rows := pairs.read_more(PAIRS_PER_MESSAGE):
                self.post_message(PairsRead(rows, pairs.unreadable))
                while self.message_queue_size > MAX_QUEUED_MESSAGES and not worker.is_cancelled:
                    time.sleep(0.05)
            answers_path = self.run_dir / COMPARE_DIR / ANSWERS_FILE
            if answers_path.exists():
                stamp = answers_path.stat()
                if (stamp.st_mtime_ns, stamp.st_size) != answers_seen:
                    answers_seen = (stamp.st_mtime_ns, stamp.st_size)
                    answers, _ = read_jsonl(answers_path)
                    self.post_message(AnswersLoaded(answers))
            launch = self.app.launches.get(self.run_dir)
            if launch is not None and launch is not reported_launch and launch.exit_code() is not None:
                reported_launch = launch
                self.post_message(TrainingExited(launch.exit_code(), last_console_line(self.run_dir)))
            time.sleep(self.poll_seconds)

    def on_run_updated(self, message: RunUpdated) -> None:
        self.state = message.state
        self.sub_title = f"{self.run_dir.name} · {message.state.shown_status()}"
        self.query_one(MonitorView).show(message.state)

    def on_pairs_read(self, message: PairsRead) -> None:
        view = self.query_one(PairsView)
        view.add_rows(message.rows, message.unreadable)
        self.query_one(TabbedContent).get_tab("pairs").label = f"2 Pairs ({len(view.rows)})"

    def on_answers_loaded(self, message: AnswersLoaded) -> None:
        self.query_one(CompareView).show_answers(message)

    def on_training_exited(self, message: TrainingExited) -> None:
        if message.exit_code == 0:
            self.notify("Training finished.", title="Run")
        else:
            detail = f": {message.last_line}" if message.last_line else ""
            self.notify(f"Training exited with status {message.exit_code}{detail}", title="Run", severity="warning", timeout=10)

    def action_start_training(self) -> None:
        launch = self.app.launches.get(self.run_dir)
        if (launch is not None and launch.exit_code() is None) or self.state.is_alive():
            self.notify("This run is already training.", severity="warning")
            return
        try:
            source = self.app.run_source(self.run_dir)
        except UserError as error:
            self.notify(str(error), title="Cannot start", severity="error", timeout=10)
            return
        resume = (self.run_dir / RECIPE_FILE).exists()
        verb = "Resume" if resume else "Start"
        question = f"{verb} training [b]{escape(self.run_dir.name)}[/b] from {escape(str(source.recipe))}?"

        def answered(yes: bool | None) -> None:
            if yes:
                self.app.launches[self.run_dir] = start_training(source, resume=resume)
                self.notify(f"{verb}d training in the background; s stops it safely (a checkpoint is kept).", title="Run")

        self.app.push_screen(ConfirmScreen(question), answered)

    def action_stop_training(self) -> None:
        launch = self.app.launches.get(self.run_dir)
        pid = self.state.pid if self.state.is_alive() else None
        if pid is None and (launch is None or launch.exit_code() is not None):
            self.notify(f"Nothing to stop: the run is {status_text(self.state.shown_status())}.", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes and stop_run(pid, launch):
                self.notify("Stopping: the trainer saves a checkpoint and exits. Press t to resume.", title="Run")

        question = f"Stop training [b]{escape(self.run_dir.name)}[/b]? It saves a checkpoint first; t resumes it."
        self.app.push_screen(ConfirmScreen(question), answered)
