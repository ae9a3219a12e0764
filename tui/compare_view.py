"""The Compare view: base and adapted answers side by side, recorded or live.

The table lists the held-out prompts of compare/answers.jsonl with their checks; the
cursor shows both answers. Typing a prompt asks the run's model twice (without, then
with the adapter) on one long-lived generation worker thread that owns all MLX work
and posts the growing answers as coalescing AnswerStreamed messages.
"""

import queue
from pathlib import Path

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Input, Static
from textual.worker import get_current_worker

from mipo_mlx_tui.messages import AnswersLoaded, AnswerStreamed, GenerationStatus
from mipo_mlx_tui.pairs_index import preview, user_text
from mipo_mlx_tui.widgets import ListTable

SIDES = ("base", "adapted")
QUEUE_POLL_SECONDS = 0.2


def checks_count(checks: dict) -> str:
    if not checks:
        return "–"
    return f"{sum(bool(v) for v in checks.values())}/{len(checks)}"


def checks_markup(checks: dict) -> str:
    if not checks:
        return "[dim]no checks for this prompt[/dim]"
    return "  ".join(f"[green]✓ {escape(kind)}[/green]" if ok else f"[red]✗ {escape(kind)}[/red]" for kind, ok in checks.items())


def totals_line(answers: list[dict]) -> str:
    """How many checks each side passed over all held-out prompts."""
    passed = {side: 0 for side in SIDES}
    total = {side: 0 for side in SIDES}
    for answer in answers:
        for side in SIDES:
            checks = (answer.get("checks") or {}).get(side) or {}
            passed[side] += sum(bool(v) for v in checks.values())
            total[side] += len(checks)
    counts = "  ".join(f"{side} [b]{passed[side]}/{total[side]}[/b]" for side in SIDES)
    return f"{len(answers)} held-out prompts  ·  checks passed: {counts}"


class CompareView(Vertical):
    """Held-out answers table, two answer panes and the prompt box for live answers."""

    def __init__(self, run_dir: Path, **kwargs):
        super().__init__(**kwargs)
        self.run_dir = run_dir
        self.answers: list[dict] = []
        self.requests: queue.Queue = queue.Queue()
        self.request_count = 0
        self.generator_started = False

    def compose(self) -> ComposeResult:
        yield Static("[dim]No held-out answers yet: the compare stage writes them after training.[/dim]", id="compare-status")
        yield ListTable(id="answers-table")
        yield Static("", id="compare-prompt")
        with Horizontal(id="compare-panes"):
            for side in SIDES:
                with VerticalScroll(classes="answer-pane", id=f"{side}-pane") as pane:
                    pane.border_title = "Base model" if side == "base" else "With the adapter"
                    yield Static("", id=f"{side}-answer")
                    yield Static("", id=f"{side}-checks", classes="checks")
        yield Input(placeholder="Type a prompt and press enter: both models answer it", id="ask")

    def on_mount(self) -> None:
        self.query_one("#answers-table", ListTable).add_columns("id", "prompt", "base checks", "adapted checks")

    def focus_list(self) -> None:
        self.query_one("#answers-table").focus()

    def focus_input(self) -> None:
        self.query_one("#ask").focus()

    def show_answers(self, message: AnswersLoaded) -> None:
        self.answers = message.answers
        table = self.query_one("#answers-table", DataTable)
        table.clear()
        for number, answer in enumerate(self.answers):
            checks = answer.get("checks") or {}
            table.add_row(
                str(answer.get("id", number + 1)),
                preview(user_text(answer.get("prompt")), 60),
                checks_count(checks.get("base") or {}),
                checks_count(checks.get("adapted") or {}),
                key=str(number),
            )
        self.query_one("#compare-status", Static).update(totals_line(self.answers))
        if self.answers:
            self._show_recorded(self.answers[0])

    @on(DataTable.RowHighlighted, "#answers-table")
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is not None:
            self._show_recorded(self.answers[int(event.row_key.value)])

    def _show_recorded(self, answer: dict) -> None:
        prompt = escape(user_text(answer.get("prompt")))
        context = [m.get("content", "") for m in answer.get("prompt") or [] if isinstance(m, dict) and m.get("role") == "system"]
        if context:
            prompt = f"[dim]{escape(' '.join(context))}[/dim]  {prompt}"
        reference = answer.get("reference")
        extra = f"\n[dim]reference:[/dim] {escape(str(reference))}" if reference else ""
        self.query_one("#compare-prompt", Static).update(f"[b]{escape(str(answer.get('id', '')))}[/b]  {prompt}{extra}")
        for side in SIDES:
            self.query_one(f"#{side}-answer", Static).update(escape(str(answer.get(side, ""))))
            self.query_one(f"#{side}-checks", Static).update(checks_markup((answer.get("checks") or {}).get(side) or {}))

    @on(Input.Submitted, "#ask")
    def _ask(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt:
            return
        self.request_count += 1
        event.input.clear()
        self.query_one("#compare-prompt", Static).update(f"[b]you[/b]  {escape(prompt)}")
        for side in SIDES:
            self.query_one(f"#{side}-answer", Static).update("[dim]waiting…[/dim]")
            self.query_one(f"#{side}-checks", Static).update("")
        self.requests.put((self.request_count, [{"role": "user", "content": prompt}]))
        if not self.generator_started:
            self.generator_started = True
            self.generate_answers()

    @work(thread=True, group="generation", exit_on_error=False, description="live answers")
    def generate_answers(self) -> None:
        """The one thread that loads the model and answers every typed prompt in turn."""
        from mipo_mlx.live import LiveAnswers  # MLX loads here, on the worker, so the TUI opens at once

        live = LiveAnswers(self.run_dir)
        try:
            self._serve(live, get_current_worker())
        finally:
            live.close()

    def _serve(self, live, worker) -> None:
        self.post_message(GenerationStatus("loading the model…"))
        try:
            self.post_message(GenerationStatus(live.load()))
        except Exception as error:  # noqa: BLE001 - shown to the user, the UI stays up
            self.post_message(GenerationStatus(f"cannot load the model: {' '.join(str(error).split())}", failed=True))
            return
        while not worker.is_cancelled:
            try:
                request, messages = self.requests.get(timeout=QUEUE_POLL_SECONDS)
            except queue.Empty:
                continue
            try:
                self._answer(live, request, messages, worker)
            except Exception as error:  # noqa: BLE001 - one failed prompt must not end the worker
                self.post_message(GenerationStatus(f"generation failed: {' '.join(str(error).split())}", failed=True))

    def _answer(self, live, request: int, messages: list[dict], worker) -> None:
        for side in SIDES:
            if side == "adapted" and live.adapter is None:
                self.post_message(AnswerStreamed(request, side, "(no adapter yet: train first)", finished=True))
                continue
            text = ""
            for text in live.stream(messages, side):
                if worker.is_cancelled:
                    return
                self.post_message(AnswerStreamed(request, side, text))
            self.post_message(AnswerStreamed(request, side, text, finished=True))

    def on_answer_streamed(self, message: AnswerStreamed) -> None:
        if message.request != self.request_count:
            return
        self.query_one(f"#{message.side}-answer", Static).update(escape(message.text))
        if message.finished:
            self.query_one(f"#{message.side}-checks", Static).update("[dim]done[/dim]")

    def on_generation_status(self, message: GenerationStatus) -> None:
        self.app.notify(message.text, title="Live answers", severity="error" if message.failed else "information")

