"""Messages that worker threads post to the UI; handlers on the screens own all state.

Workers never touch widgets: they read files or run the model and post one of these.
Messages that carry "the latest picture" replace an unprocessed older one
(`can_replace`), so a fast run or a fast model cannot flood the UI.
"""

from dataclasses import dataclass

from textual.message import Message

from mipo_mlx_tui.pairs_index import PairRow
from mipo_mlx_tui.runstate import RunState


@dataclass
class RunUpdated(Message, bubble=False):
    """A fresh copy of one run's state, after new events were read."""

    state: RunState

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, RunUpdated) and message.state.run_dir == self.state.run_dir


@dataclass
class RunsUpdated(Message, bubble=False):
    """The states of all runs in the output folder."""

    states: list[RunState]

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, RunsUpdated)


@dataclass
class PairsRead(Message, bubble=False):
    """Rows of pairs newly read from the end of the pairs file (appended, never replaced)."""

    rows: list[PairRow]
    unreadable: int


@dataclass
class PairsFiltered(Message, bubble=False):
    """The rows that match the search `query`."""

    query: str
    rows: list[PairRow]

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, PairsFiltered)


@dataclass
class AnswersLoaded(Message, bubble=False):
    """The held-out answers of compare/answers.jsonl, read again after it changed."""

    answers: list[dict]

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, AnswersLoaded)


@dataclass
class GenerationStatus(Message, bubble=False):
    """A line about the live generation (loading the model, which adapter, a failure)."""

    text: str
    failed: bool = False


@dataclass
class AnswerStreamed(Message, bubble=False):
    """The text so far of one side's live answer ("base" or "adapted")."""

    request: int
    side: str
    text: str
    finished: bool = False

    def can_replace(self, message: Message) -> bool:
        return (
            isinstance(message, AnswerStreamed)
            and not message.finished
            and (message.request, message.side) == (self.request, self.side)
        )


@dataclass
class TrainingExited(Message, bubble=False):
    """The `mipo-mlx train` process started from the TUI ended."""

    exit_code: int
    last_line: str
