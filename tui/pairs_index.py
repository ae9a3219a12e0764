"""A light index over a pairs file, so the TUI can list and search big files.

    reader = PairReader(Path("runs/quickstart/pairs.jsonl"))
    rows = reader.read_more(max_rows=500)   # PairRow per complete new line
    pair = load_pair(reader.path, rows[0].offset)  # the full record, read on demand

Rows keep only short previews, the numbers shown in the table and a lowercase
search text; the full pair is read again from its byte offset when it is opened.
Lines follow the pairs.jsonl layout of COMMON.md, or plain TRL preference records.
"""

import json
from dataclasses import dataclass
from pathlib import Path

PREVIEW_CHARS = 80


def message_text(value) -> str:
    """The text of a TRL field: a plain string or a list of chat messages."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n\n".join(str(message.get("content", "")) for message in value if isinstance(message, dict))
    return ""


def user_text(prompt) -> str:
    """The last user turn of a prompt (what a person typed), or the whole prompt string."""
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            return str(users[-1].get("content", ""))
    return message_text(prompt)


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


def pair_row(index: int, offset: int, record: dict) -> PairRow:
    mipo = record.get("mipo") or {}
    prompt, chosen, rejected = (record.get(key) for key in ("prompt", "chosen", "rejected"))
    pmi = mipo.get("pmi")
    texts = [message_text(prompt), message_text(chosen), message_text(rejected), str(mipo.get("id", ""))]
    return PairRow(
        index=index,
        offset=offset,
        pair_id=str(mipo.get("id", index + 1)),
        strategy=str(mipo.get("strategy", "")),
        pmi=float(pmi) if isinstance(pmi, (int, float)) else None,
        prompt=preview(user_text(prompt)),
        chosen=preview(message_text(chosen)),
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
        if not self.path.exists():
            return []
        rows: list[PairRow] = []
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            while len(rows) < max_rows:
                line = file.readline()
                if not line.endswith(b"\n"):
                    break
                start, self.offset = self.offset, self.offset + len(line)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    self.unreadable += 1
                    continue
                rows.append(pair_row(self.count, start, record))
                self.count += 1
        return rows


def load_pair(path: Path, offset: int) -> dict:
    """The full pair whose line starts at byte `offset`."""
    with open(path, "rb") as file:
        file.seek(offset)
        return json.loads(file.readline())


def matching(rows: list[PairRow], query: str) -> list[PairRow]:
    """Rows whose prompt, answers or id contain every word of `query` (case-insensitive)."""
    words = query.lower().split()
    return [row for row in rows if all(word in row.search_text for word in words)]
