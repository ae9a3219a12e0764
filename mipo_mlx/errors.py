"""User-facing errors: one line, exit status 2, no traceback.

Raise `UserError` for anything a person can fix (a recipe key, a data line, a model
path, a flag). The CLI prints `mipo-mlx: error: <message>` and exits with status 2.
"""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the user's input, explained in one line that names the fix."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        where = ": ".join(str(part) for part in (file, key) if part)
        super().__init__(f"{where}: {message}" if where else message)
        self.file = file
        self.key = key

    def __str__(self) -> str:
        # Always one line, whatever the message was built from.
        return " ".join(super().__str__().split())
