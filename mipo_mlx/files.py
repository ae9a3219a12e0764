"""How files are read and written, for every stage: JSON Lines, files and folders written as one unit, digests.

    lines, offset = read_lines(path)                # complete lines, split on b"\\n" only
    values, offset = read_jsonl(path, offset)       # the same lines parsed: follows a growing file
    log = JsonlAppender(path); log.append({...})    # one flushed line per value
    with atomic_folder(out) as staging: ...         # `out` appears whole when the block ends, or not at all
    replace_file(path, text)                        # the same for one file
    remove_staging(parent)                          # what a killed atomic_folder left in `parent`
    header = safetensors_header(path)               # {tensor name: {dtype, shape, data_offsets}}, checked
    digest = sha256_of(path)

JSON Lines end at b"\\n" alone: str.splitlines would also split at U+2028, U+2029 and
U+0085, which json.dumps(ensure_ascii=False) leaves raw inside strings (the appender
escapes them, so that such readers see one line per value too). A file that is being
appended to, or whose writer was killed, may end with a line that has no newline yet:
readers of a growing file leave it for their next call, and an appender cuts it off
before appending (appending after it would merge two values into one broken line) and
keeps what it cut in `dropped`, for its owner to report.

Whatever is renamed into place (atomic_folder, replace_file) is on disk first: its files
and folders are fsynced before the rename and the folder that holds it after, so a power
cut leaves the old version or the new one, never a name that points at unwritten data.
A kill inside atomic_folder leaves its staging folder (`.NAME.partial-XXXXXXXX`, and
`.NAME.retired` while the old folder is swapped out) beside NAME; the next writer of that
place removes it with remove_staging.
"""

import contextlib
import glob
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

# Line breaks to str.splitlines that json.dumps keeps raw in strings.
LINE_SEPARATORS = ("\x85", "\u2028", "\u2029")
# atomic_folder's folders beside NAME: the new one being written, and the old one while it is swapped out.
STAGING_MARK, RETIRED_MARK = ".partial-", ".retired"
# Bytes per element of each safetensors dtype (the format's own table).
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
LARGEST_SAFETENSORS_HEADER = 100_000_000  # bytes: the safetensors format refuses longer headers


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
    """Appends JSON values to a file, one flushed line each, after cutting off an unfinished last line.

    `dropped` holds the bytes of that unfinished line (b"" when the file ended whole).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dropped = b""
        if self.path.exists():
            with open(self.path, "r+b") as file:
                size = file.seek(0, os.SEEK_END)
                complete = _end_of_last_line(file, size)
                if complete != size:
                    file.seek(complete)
                    self.dropped = file.read()
                    file.truncate(complete)
        self._file = open(self.path, "a", encoding="utf-8")

    def append(self, value: Any) -> None:
        self._file.write(encode_line(value))
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            os.fsync(self._file.fileno())
            self._file.close()


def _end_of_last_line(file, size: int) -> int:
    """The byte offset just after the file's last b"\\n" (0 if it has none), read from the end."""
    end, block = size, 1 << 16
    while end > 0:
        start = max(end - block, 0)
        file.seek(start)
        newline = file.read(end - start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def _fsync(path: Path) -> None:
    """Flush a file or a folder (its entries) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(folder: Path) -> None:
    for root, _, names in os.walk(folder):
        for name in names:
            _fsync(Path(root) / name)
        _fsync(Path(root))


@contextlib.contextmanager
def atomic_folder(directory: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """A staging folder beside `directory`, renamed to it when the block ends; removed if the block fails.

    An existing `directory` must be empty, unless `replace`: then the old folder is swapped
    out in the same way and deleted. Either way a reader sees all old files or all new ones,
    and what it sees is on disk (see the module docstring).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}{STAGING_MARK}", dir=directory.parent))
    try:
        yield staging
        _fsync_tree(staging)
        if replace and directory.exists():
            retired = directory.with_name(f".{directory.name}{RETIRED_MARK}")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(directory, retired)
            os.replace(staging, directory)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            if directory.exists():
                directory.rmdir()
            os.replace(staging, directory)
        _fsync(directory.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_file(path: str | Path, text: str) -> None:
    """Write `path` whole: a temporary file beside it, flushed to disk, renamed over it."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}{STAGING_MARK}{os.getpid()}")
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def remove_staging(parent: str | Path, name: str | None = None) -> list[Path]:
    """Remove what killed writes (atomic_folder, replace_file) left in `parent`, for `name` or any name.

    A retired folder whose new version never took its place is put back (it was whole);
    staging folders and files are deleted. Returns what was removed or put back.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    found, pattern = [], "*" if name is None else glob.escape(name)
    for path in sorted(parent.glob(f".{pattern}{RETIRED_MARK}")):
        original = parent / path.name[1 : -len(RETIRED_MARK)]
        if original.exists():
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.replace(path, original)
        found.append(path)
    for path in sorted(parent.glob(f".{pattern}{STAGING_MARK}*")):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        found.append(path)
    return found


def sha256_of(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tensor_problem(info, data_bytes: int) -> str | None:
    """What is wrong with one safetensors header entry, or None."""
    if not isinstance(info, dict):
        return "has no dtype, shape and data_offsets"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    natural = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    if dtype not in SAFETENSORS_DTYPES:
        return f"has an unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(natural(d) for d in shape):
        return f"has a malformed shape {str(shape)[:40]}"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(natural(o) for o in offsets) or offsets[0] > offsets[1]:
        return f"has malformed data_offsets {str(offsets)[:40]}"
    needed = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
    if offsets[1] - offsets[0] != needed:
        return f"spans {offsets[1] - offsets[0]} bytes, but {dtype} of shape {shape} needs {needed}"
    if offsets[1] > data_bytes:
        return f"ends at byte {offsets[1]} of the tensor data, but the file holds {data_bytes}"
    return None


def safetensors_header(path: str | Path) -> dict:
    """The tensors of a safetensors file, {name: {"dtype", "shape", "data_offsets"}}, read without the data.

    The header (an 8-byte length, then JSON) and every tensor's byte range are checked
    against the file's size; ValueError says what is wrong (OSError: the file cannot be read).
    """
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        prefix = file.read(8)
        length = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or length > min(size - 8, LARGEST_SAFETENSORS_HEADER):
            raise ValueError(f"{size} bytes, too few for the header its first 8 bytes announce")
        raw = file.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise ValueError("the header is not a safetensors JSON header")
    header.pop("__metadata__", None)
    for name, info in header.items():
        problem = _tensor_problem(info, size - 8 - length)
        if problem:
            raise ValueError(f"tensor {name[:80]!r} {problem}")
    return header
