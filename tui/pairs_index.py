"""A light index over a pairs file, so the TUI can list and search big files.

    reader = PairReader(Path("runs/quickstart/pairs.jsonl"))
    rows = reader.read_more(max_rows=500)        # PairRow per complete new line
    pair = pair_at(reader.path, rows[0].offset)  # the full mipo_mlx.rundir.Pair, read on demand

Rows keep only short previews, the numbers shown in the table and a lowercase search
text; the full pair is read again from its byte offset when it is opened. The pairs are
read by mipo_mlx.rundir: the sample stage's pairs, or plain TRL preference records.
"""

from dataclasses import dataclass
from pathlib import Path

from mipo_mlx.rundir import Pair, tail_pairs

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
    offset: int
    pair_id: str
    strategy: str
    pmi: float | None
    prompt: str
    chosen: str
    search_text: str


def pair_row(index: int, offset: int, pair: Pair) -> PairRow:
    mipo = pair.mipo
    pair_id = mipo.id if mipo and mipo.id is not None else index + 1
    pmi = mipo.pmi if mipo else None
    prompt = pair.prompt_messages()
    texts = ["\n\n".join(str(m.get("content", "")) for m in prompt), pair.chosen_text, pair.rejected_text,
             str(mipo.id if mipo and mipo.id is not None else "")]
    return PairRow(
        index=index,
        offset=offset,
        pair_id=str(pair_id),
        strategy=str(mipo.strategy or "") if mipo else "",
        pmi=float(pmi) if isinstance(pmi, (int, float)) else None,
        prompt=preview(user_text(prompt)),
        chosen=preview(pair.chosen_text),
        search_text="\n".join(texts).lower(),
    )


class PairReader:
    """Reads a pairs file from where it stopped; a line still being written waits."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0
        self.count = 0
        self.unreadable = 0

    def read_more(self, max_rows: int) -> list[PairRow]:
        found, self.offset = tail_pairs(self.path, self.offset, limit=max_rows)
        rows = []
        for offset, pair in found:
            if pair is None:
                self.unreadable += 1
                continue
            rows.append(pair_row(self.count, offset, pair))
            self.count += 1
        return rows


def matching(rows: list[PairRow], query: str) -> list[PairRow]:
    """Rows whose prompt, answers or id contain every word of `query` (case-insensitive)."""
    words = query.lower().split()
    return [row for row in rows if all(word in row.search_text for word in words)]
