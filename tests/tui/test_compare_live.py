"""Typing a prompt in the Compare view: both answers stream in while the UI stays usable.

    .venv/bin/python -m pytest tests/tui/test_compare_live.py -q

The first test drives the real generation path with the tiny test model and a LoRA
adapter saved next to it; the second replaces the model layer to check the message
flow (one worker thread, growing answers, a failure shown without ending the app).
"""

import threading
import time

from textual.widgets import Static
from tui_helpers import FIXTURES, RECORDED_RUN, wait_for

from mipo_mlx_tui import compare_view
from mipo_mlx_tui.app import MipoApp


def pane(app, side: str) -> str:
    return str(app.screen.query_one(f"#{side}-answer", Static).render())


class ScriptedAnswers:
    """Stands in for LiveAnswers: answers word by word, and records the threads it ran on."""

    threads: list[str] = []
    closed_on: list[str] = []

    def __init__(self, run_dir):
        self.adapter = run_dir / "adapters"

    def close(self) -> None:
        ScriptedAnswers.closed_on.append(threading.current_thread().name)

    def load(self) -> str:
        ScriptedAnswers.threads.append(threading.current_thread().name)
        return "scripted model loaded"

    def stream(self, messages, side):
        ScriptedAnswers.threads.append(threading.current_thread().name)
        text = ""
        for word in f"{side} answer to {messages[-1]['content']}".split():
            text += word + " "
            yield text.strip()


async def test_typed_prompt_streams_both_answers_off_the_ui_thread(monkeypatch):
    monkeypatch.setattr("mipo_mlx.live.LiveAnswers", ScriptedAnswers)
    app = MipoApp(FIXTURES, run_dir=RECORDED_RUN, poll_seconds=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("3", "slash", *"hello there", "enter")
        await wait_for(pilot, lambda: pane(app, "adapted") == "adapted answer to hello there")
        assert pane(app, "base") == "base answer to hello there"
        assert "hello there" in str(app.screen.query_one("#compare-prompt", Static).render())
        assert app.focused.value == ""  # the box is ready for the next prompt
        await pilot.press(*"hello there again", "enter")
        await wait_for(pilot, lambda: pane(app, "base") == "base answer to hello there again")
    ui_thread = threading.main_thread().name
    assert ScriptedAnswers.threads and ui_thread not in ScriptedAnswers.threads
    # The model is loaded once, used on one thread, and that thread frees it when the app quits.
    assert len(set(ScriptedAnswers.threads)) == 1
    deadline = time.monotonic() + 5
    while not ScriptedAnswers.closed_on and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ScriptedAnswers.closed_on == ScriptedAnswers.threads[:1]


async def test_a_model_that_cannot_load_is_reported_and_the_app_keeps_going(monkeypatch):
    class Broken(ScriptedAnswers):
        def load(self):
            raise OSError("no weights\nhere")

    monkeypatch.setattr("mipo_mlx.live.LiveAnswers", Broken)
    app = MipoApp(FIXTURES, run_dir=RECORDED_RUN, poll_seconds=0.05)
    messages = []
    async with app.run_test(size=(120, 40), message_hook=messages.append) as pilot:
        await pilot.press("3", "slash", *"hi", "enter")
        failed = lambda: [m for m in messages if isinstance(m, compare_view.GenerationStatus) and m.failed]
        await wait_for(pilot, lambda: failed())
        assert failed()[0].text == "cannot load the model: no weights here"
        await pilot.press("escape", "1")
        assert app.screen.query_one("#tabs").active == "monitor"
