"""Modal dialogs: the f1 help (what each view shows, every key) and a yes/no question."""

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Markdown, Static

from mipo_mlx.rundir import EVENTS_FILE

VIEWS_HELP = f"""\
# mipo-mlx

- **Runs**: the runs in the output folder; enter opens one.
- **1 Monitor**: sampling progress and the training curves, read live from the run's
  `{EVENTS_FILE}` (a run started in another terminal shows up too).
- **2 Pairs**: the MIPO pairs; type to search, the cursor opens a pair with its
  prompt, chosen and rejected answers, where the negative came from and its PMI.
- **3 Compare**: base and adapted answers to the held-out prompts with their checks;
  type a prompt below to see both models answer it.
- **t** starts the run's training (or resumes it); **s** stops it safely: the trainer
  saves a checkpoint first. A run started here keeps going if you quit.

Remap a key by its id in `~/.config/mipo-mlx/keymap.yaml` (or the file named by
`MIPO_MLX_KEYMAP`), one `id: keys` per line, e.g. `view-pairs: p`.
"""


def keys_table(screen: Screen) -> str:
    """A Markdown table of this app's bindings active on `screen`, with their ids."""
    rows = ["| key | does | id |", "| --- | --- | --- |"]
    for active in screen.active_bindings.values():
        binding = active.binding
        if binding.id:
            shown = screen.app.get_key_display(binding)
            rows.append(f"| `{shown}` | {binding.description or binding.action} | `{binding.id}` |")
    rows.append("| `ctrl+p` | Command palette: views and actions by name | |")
    rows.append("| `tab` | Next field (`shift+tab`: previous) | |")
    return "\n".join(rows)


class HelpScreen(ModalScreen):
    """A modal over the current screen; escape, f1 or q closes it."""

    BINDINGS = [
        Binding("escape,f1,q", "dismiss", "Close help", id="close-help"),
    ]

    def __init__(self, below: Screen):
        super().__init__()
        self.text = VIEWS_HELP + "\n## Keys\n\n" + keys_table(below)

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box"):
            yield Markdown(self.text)


class ConfirmScreen(ModalScreen[bool]):
    """Asks before something that starts or stops a process: y or enter says yes."""

    BINDINGS = [
        Binding("y,enter", "answer(True)", "Yes", id="confirm-yes"),
        Binding("n,escape", "answer(False)", "No", id="confirm-no"),
    ]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box"):
            yield Static(self.question, id="confirm-question")
            yield Static("[b]y[/b] yes    [b]n[/b] no", id="confirm-keys")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)
