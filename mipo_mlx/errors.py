"""User-facing errors: one line, exit status 2, no traceback.

Raise `UserError` for anything a person can fix (a recipe key, a data line, a model
path, a flag). The CLI prints `mipo-mlx: error: <message>` and exits with status 2; it
is the only place that prints one.

    text = read_user_text(path, what="recipe", fix="give a YAML file such as recipes/quickstart.yaml")

`read_user_text` reads a file a person gave: a missing file, a folder, an unreadable file
or bytes that are not UTF-8 (named by line, column and byte offset) are each one UserError
(`unreadable` and `not_utf8` build those for readers of their own, such as data.py's).
"""

import os
from pathlib import Path

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the user's input, explained in one line that names the fix."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        where = ": ".join(str(part) for part in (file, key) if part)
        super().__init__(f"{where}: {message}" if where else message)
        self.message = message
        self.file = file
        self.key = key

    def __str__(self) -> str:
        # Always one line, whatever the message was built from.
        return " ".join(super().__str__().split())


def rekeyed(error: UserError, key: str) -> UserError:
    """The same mistake, reported under `key` (the recipe key or flag the user wrote) instead."""
    return UserError(error.message, key=key)


def in_recipe(error: UserError, recipe: str | Path) -> UserError:
    """The same mistake, naming the recipe file when it names one of its keys and no file of its own."""
    if type(error) is not UserError or error.file or not error.key or error.key.startswith("-"):
        return error
    return UserError(error.message, file=os.fspath(recipe), key=error.key)


def not_utf8(name: str, data: bytes, error: UnicodeDecodeError, *, line: int = 1, offset: int = 0,
             key: str | None = None) -> UserError:
    """The error for `data` (from line `line` and byte `offset` of file `name` on) that is not UTF-8 at error.start."""
    line_start = data.rfind(b"\n", 0, error.start) + 1
    line += data.count(b"\n", 0, error.start)
    # The column an editor shows: characters, not bytes, before the bad byte.
    column = len(data[line_start : error.start].decode("utf-8")) + 1
    return UserError(f"{name}:{line}:{column}: byte 0x{data[error.start]:02x} (byte {offset + error.start + 1} of the "
                     "file) is not UTF-8; save the file as UTF-8", key=key)


def unreadable(path: Path, error: OSError, *, what: str, fix: str, key: str | None = None) -> UserError:
    """The error for a file a person named that cannot be opened: missing, a folder, not permitted."""
    if isinstance(error, IsADirectoryError) or path.is_dir():
        return UserError(f"{path}: is a directory, not a {what}; {fix}", key=key)
    if isinstance(error, FileNotFoundError):
        return UserError(f"{path}: {what} not found; {fix}", key=key)
    return UserError(f"{path}: cannot read it ({error.strerror or error.__class__.__name__}); {fix}", key=key)


def read_user_text(path: str | Path, *, what: str, fix: str, key: str | None = None) -> str:
    """The text of a file a person named; `what` names it ("recipe", "JSON file"), `fix` says what to give.

    A leading byte-order mark is dropped; bytes that are not UTF-8 are an error naming line and column.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise unreadable(path, error, what=what, fix=fix, key=key) from None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        raise not_utf8(os.fspath(path), data, error, key=key) from None
