"""How files are read and written, for every stage: JSON Lines, and folders written as one unit.

    lines, offset = read_lines(path)                # complete lines, split on b"\\n" only
    values, offset = read_jsonl(path, offset)       # the same lines parsed: follows a growing file
    log = JsonlAppender(path); log.append({...})    # one flushed line per value
    with atomic_folder(out) as staging: ...         # `out` appears whole when the block ends, or not at all

JSON Lines end at b"\\n" alone: str.splitlines would also split at U+2028, U+2029 and
U+0085, which json.dumps(ensure_ascii=False) leaves raw inside strings (the appender
escapes them, so that such readers see one line per value too). A file that is being
appended to, or whose writer was killed, may end with a line that has no newline yet:
readers of a growing file leave it for their next call, and an appender cuts it off
before appending (appending after it would merge two values into one broken line).
"""

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

# Line breaks to str.splitlines that json.dumps keeps raw in strings.
LINE_SEPARATORS = ("\x85", "\u2028", "\u2029")


@dataclass(frozen=True)
class Line:
    """One non-blank line of a file."""

    number: int  # 1-based, counting every line from where the read started
    offset: int  # byte offset of the line's start in the file
    data: bytes  # the line as stored, newline included

    def json(self) -> Any:
        """The line's JSON value; ValueError if it holds none (UnicodeDecodeError: not UTF-8)."""
        return json.loads(self.data.decode("utf-8"))


def read_lines(path: str | Path, offset: int = 0, *, growing: bool = True,
               limit: int | None = None) -> tuple[list[Line], int]:
    """The non-blank lines after byte `offset` (at most `limit`), and the offset to continue from.

    growing: the file may still be appended to, so a last line without its newline is not
    finished and is left for the next call. Otherwise (a file a person wrote) it is a line.
    """
    lines, number = [], 0
    with open(path, "rb") as file:
        file.seek(offset)
        while limit is None or len(lines) < limit:
            data = file.readline()  # binary readline splits on b"\n" only
            if not data or (growing and not data.endswith(b"\n")):
                break
            start, offset, number = offset, offset + len(data), number + 1
            if data.strip():
                lines.append(Line(number, start, data))
    return lines, offset


def read_jsonl(path: str | Path, offset: int = 0, *, growing: bool = True) -> tuple[list, int]:
    """The JSON values of the complete lines after byte `offset`, and the offset to continue from.

    A line that is not JSON raises ValueError; a missing file has no lines yet.
    """
    if not Path(path).exists():
        return [], offset
    lines, offset = read_lines(path, offset, growing=growing)
    return [line.json() for line in lines], offset


def encode_line(value: Any) -> str:
    """`value` as one JSON line, newline included, with no character str.splitlines splits at."""
    line = json.dumps(value, ensure_ascii=False)
    for separator in LINE_SEPARATORS:
        line = line.replace(separator, f"\\u{ord(separator):04x}")
    return line + "\n"


class JsonlAppender:
    """Appends JSON values to a file, one flushed line each, after cutting off an unfinished last line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            raw = self.path.read_bytes()
            complete = raw.rfind(b"\n") + 1
            if complete != len(raw):
                with open(self.path, "r+b") as file:
                    file.truncate(complete)
        self._file = open(self.path, "a", encoding="utf-8")

    def append(self, value: Any) -> None:
        self._file.write(encode_line(value))
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            os.fsync(self._file.fileno())
            self._file.close()


@contextlib.contextmanager
def atomic_folder(directory: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """A staging folder beside `directory`, renamed to it when the block ends; removed if the block fails.

    An existing `directory` must be empty, unless `replace`: then the old folder is swapped
    out in the same way and deleted. Either way a reader sees all old files or all new ones.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield staging
        if replace and directory.exists():
            retired = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(directory, retired)
            os.replace(staging, directory)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            if directory.exists():
                directory.rmdir()
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
