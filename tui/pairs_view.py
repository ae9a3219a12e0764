"""The Pairs view: a searchable table of the MIPO pairs and the pair under the cursor.

Rows arrive in batches from RunScreen's tail worker (PairsRead), so a big file fills
in while the view stays usable; a search runs in a thread worker over the row index,
and a pair's full text is read from its byte offset only when the cursor is on it.
A run of several rounds (training.rounds) lists every round's pairs: the table gains a
round column once a round after the first has pairs, and the open pair says its round.
"""

from pathlib import Path

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Input, Static
from textual.worker import get_current_worker

from mipo_mlx.rundir import PAIRS_FILE, Pair, pair_at
from mipo_mlx_tui.messages import PairsFiltered
from mipo_mlx_tui.pairs_index import PairRow, matching, pairs_file
from mipo_mlx_tui.widgets import ListTable, format_number

# More rows than this in the table only slow it down; a search narrows them.
MAX_SHOWN_ROWS = 2000
# Search once typing pauses, not on every key: each search rebuilds the table.
SEARCH_DELAY_SECONDS = 0.25


def messages_markup(messages: list[dict]) -> str:
    """Chat messages as `role` headings over their text."""
    return "\n\n".join(f"[dim]{escape(str(m.get('role', '')))}[/dim]\n{escape(str(m.get('content', '')))}"
                       for m in messages)


def pair_header(pair: Pair) -> str:
    mipo = pair.mipo
    if mipo is None:
        return "[b]pair[/b]  from a plain preference file (no MIPO details)"
    ref = mipo.ref_logps or {}
    finish = mipo.finish or {}
    return (
        f"[b]{escape(str(mipo.id or ''))}[/b]  strategy {escape(str(mipo.strategy or '?'))}  "
        f"PMI [b]{format_number(mipo.pmi)}[/b] "
        f"[dim](ref log p chosen {format_number(ref.get('chosen'))}, rejected {format_number(ref.get('rejected'))}; "
        f"finish {finish.get('chosen', '?')}/{finish.get('rejected', '?')})[/dim]"
    )


def negative_markup(pair: Pair) -> str:
    mipo = pair.mipo
    if mipo is None or mipo.negative_prompt is None:
        return "[dim]not recorded[/dim]"
    source = escape(str(mipo.negative_source or "?"))
    return f"[dim]from[/dim] [b]{source}[/b]\n\n" + messages_markup(mipo.negative_prompt)


class PairsView(Vertical):
    """Search box, pairs table and the open pair: prompt, chosen, rejected, negative."""

    def __init__(self, run_dir: Path, **kwargs):
        super().__init__(**kwargs)
        self.run_dir = run_dir
        self.rounds: set[int] = set()  # the rounds whose pairs have arrived
        self.rows: list[PairRow] = []
        self.shown: list[PairRow] = []
        self.query_text = ""
        self.unreadable = 0
        self.search_timer = None

    def compose(self) -> ComposeResult:
        yield Input(placeholder="Search prompts, answers and ids", id="pair-search")
        yield Static("", id="pairs-status")
        yield ListTable(id="pairs-table")
        yield Static("", id="pair-header")
        with Horizontal(id="pair-detail"):
            for part, title in (("prompt", "Prompt"), ("chosen", "Chosen"), ("rejected", "Rejected"), ("negative", "Negative came from")):
                with VerticalScroll(classes="pair-part", id=f"pair-{part}-box") as box:
                    box.border_title = title
                    yield Static("", id=f"pair-{part}")

    def on_mount(self) -> None:
        self._add_columns()
        self._update_status()

    @property
    def several_rounds(self) -> bool:
        return len(self.rounds) > 1

    def _add_columns(self) -> None:
        table = self.query_one(ListTable)
        table.add_column("#", key="index")
        if self.several_rounds:
            table.add_column("round", key="round")
        table.add_column("id", key="id")
        table.add_column("strategy", key="strategy")
        table.add_column("PMI", key="pmi")
        table.add_column("prompt", key="prompt")
        table.add_column("chosen", key="chosen")

    def focus_list(self) -> None:
        self.query_one("#pairs-table").focus()

    def focus_input(self) -> None:
        self.query_one("#pair-search").focus()

    def add_rows(self, rows: list[PairRow], unreadable: int) -> None:
        """New rows from the end of the files; shown at once when they match the search."""
        several = self.several_rounds
        self.rows.extend(rows)
        self.rounds.update(row.round for row in rows)
        self.unreadable = unreadable
        if self.several_rounds and not several:
            self._add_round_column()
        self._show(matching(rows, self.query_text) if self.query_text else rows)
        self._update_status()

    def _add_round_column(self) -> None:
        """The table again with a round column (a DataTable adds columns only at its end), the cursor kept."""
        table = self.query_one(ListTable)
        cursor, shown = table.cursor_row, self.shown
        table.clear(columns=True)
        self._add_columns()
        self.shown = []
        self._show(shown)
        table.move_cursor(row=cursor)

    def _show(self, rows: list[PairRow]) -> None:
        room = MAX_SHOWN_ROWS - len(self.shown)
        if room <= 0:
            return
        rows = rows[:room]
        self.shown.extend(rows)
        table = self.query_one(ListTable)
        for row in rows:
            pmi = "–" if row.pmi is None else f"{row.pmi:+.3f}"
            round_cell = [str(row.round)] if self.several_rounds else []
            table.add_row(str(row.index + 1), *round_cell, row.pair_id, row.strategy, pmi, row.prompt, row.chosen,
                          key=str(row.index))
        if rows and table.row_count == len(rows):
            self._open(rows[0])

    def _update_status(self) -> None:
        total = len(self.rows)
        if not total:
            text = f"[dim]No pairs yet: they appear here while sampling writes {PAIRS_FILE}.[/dim]"
        elif self.query_text:
            text = f"{len(self.shown)} of {total} pairs match [b]{escape(self.query_text)}[/b]"
        else:
            text = f"{total} pairs" + (f" in {len(self.rounds)} rounds" if self.several_rounds else "")
        if len(self.shown) >= MAX_SHOWN_ROWS:
            text += f"  [dim](first {MAX_SHOWN_ROWS} shown; search to narrow)[/dim]"
        if self.unreadable:
            text += f"  [yellow]{self.unreadable} unreadable lines skipped[/yellow]"
        self.query_one("#pairs-status", Static).update(text)

    @on(Input.Changed, "#pair-search")
    def _search_changed(self, event: Input.Changed) -> None:
        if self.search_timer is not None:
            self.search_timer.stop()
        query = event.value.strip()
        self.search_timer = self.set_timer(SEARCH_DELAY_SECONDS, lambda: self.search(query))

    @work(thread=True, exclusive=True, group="pair-search", exit_on_error=False)
    def search(self, query: str) -> None:
        rows = list(self.rows)
        found = matching(rows, query) if query else rows
        # A newer search replaced this one (exclusive=True): its result would be stale.
        if not get_current_worker().is_cancelled:
            self.post_message(PairsFiltered(query, found))

    def on_pairs_filtered(self, message: PairsFiltered) -> None:
        self.query_text = message.query
        self.shown = []
        self.query_one(ListTable).clear()
        self._show(message.rows)
        self._update_status()
        if not message.rows:
            self._clear_detail()

    @on(DataTable.RowHighlighted, "#pairs-table")
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is not None:
            self._open(self.rows[int(event.row_key.value)])

    def _open(self, row: PairRow) -> None:
        pair = pair_at(pairs_file(self.run_dir, row.round), row.offset)
        shown_round = f"[b]round {row.round}[/b]  " if self.several_rounds else ""
        self.query_one("#pair-header", Static).update(shown_round + pair_header(pair))
        self.query_one("#pair-prompt", Static).update(messages_markup(pair.prompt_messages()))
        self.query_one("#pair-chosen", Static).update(escape(pair.chosen_text))
        self.query_one("#pair-rejected", Static).update(escape(pair.rejected_text))
        self.query_one("#pair-negative", Static).update(negative_markup(pair))

    def _clear_detail(self) -> None:
        for part in ("header", "prompt", "chosen", "rejected", "negative"):
            self.query_one(f"#pair-{part}", Static).update("")
