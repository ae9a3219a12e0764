"""A light index over a run's pairs files, so the TUI can list and search big files.

    reader = PairReader(Path("runs/quickstart"))
    rows = reader.read_more(max_rows=500)        # PairRow per complete new line
    pair = pair_at(pairs_file(reader.run_dir, rows[0].round), rows[0].offset)  # the full mipo_mlx.rundir.Pair

Rows keep only short previews, the numbers shown in the table and a lowercase search
text; the full pair is read again from its byte offset when it is opened. The pairs are
read by mipo_mlx.rundir: the sample stage's pairs, or plain TRL preference records. A run
of several rounds (training.rounds) has a pairs file per round: round 1's is read first,
each later round's from when its folder is there, and every row says its round.
"""

from dataclasses import dataclass
from pathlib import Path

from mipo_mlx.rundir import PAIRS_FILE, Pair, round_dir, started_rounds, tail_pairs

PREVIEW_CHARS = 80


def user_text(messages) -> str:
    """The last user turn of chat messages: what a person typed."""
    users = [m for m in messages or [] if isinstance(m, dict) and m.get("role") == "user"]
    return str(users[-1].get("content", "")) if users else ""


def preview(text: str, limit: int = PREVIEW_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


@dataclass(frozen=True)
class PairRow:
    """One pair as a table row; `offset` is where its line starts in the file."""

    index: int
    round: int  # of training.rounds: whose pairs file holds it
    offset: int
    pair_id: str
    strategy: str
    pmi: float | None
    prompt: str
    chosen: str
    search_text: str


def pairs_file(run_dir: Path, number: int) -> Path:
    """Round `number`'s pairs file."""
    return round_dir(run_dir, number) / PAIRS_FILE


def pair_row(index: int, number: int, offset: int, pair: Pair) -> PairRow:
    mipo = pair.mipo
    pair_id = mipo.id if mipo and mipo.id is not None else index + 1
    pmi = mipo.pmi if mipo else None
    prompt = pair.prompt_messages()
    texts = ["\n\n".join(str(m.get("content", "")) for m in prompt), pair.chosen_text, pair.rejected_text,
             str(mipo.id if mipo and mipo.id is not None else "")]
    return PairRow(
        index=index,
        round=number,
        offset=offset,
        pair_id=str(pair_id),
        strategy=str(mipo.strategy or "") if mipo else "",
        pmi=float(pmi) if isinstance(pmi, (int, float)) else None,
        prompt=preview(user_text(prompt)),
        chosen=preview(pair.chosen_text),
        search_text="\n".join(texts).lower(),
    )


class PairReader:
    """Reads a run's pairs files, each from where it stopped; a line still being written waits."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.offsets: dict[int, int] = {}  # round -> bytes of its pairs file read
        self.count = 0
        self.unreadable = 0

    def read_more(self, max_rows: int) -> list[PairRow]:
        rows = []
        for number in started_rounds(self.run_dir):
            if len(rows) >= max_rows:
                break
            found, self.offsets[number] = tail_pairs(pairs_file(self.run_dir, number), self.offsets.get(number, 0),
                                                     limit=max_rows - len(rows))
            for offset, pair in found:
                if pair is None:
                    self.unreadable += 1
                    continue
                rows.append(pair_row(self.count, number, offset, pair))
                self.count += 1
        return rows


def matching(rows: list[PairRow], query: str) -> list[PairRow]:
    """Rows whose prompt, answers or id contain every word of `query` (case-insensitive)."""
    words = query.lower().split()
    return [row for row in rows if all(word in row.search_text for word in words)]
