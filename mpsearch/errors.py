"""The one exception type that means "the user asked for something we cannot do".

The CLI turns a :class:`UserError` into one line on stderr and exit code 2; every other
exception is a bug and keeps its traceback. Messages say what is wrong and how to fix it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["UserError", "read_user_file"]


class UserError(Exception):
    """Bad input from the user: a file, a flag, a name, a missing data set."""


def read_user_file(path: str | Path, what: str, expected: str) -> str:
    """The text of a file the user named; unreadable or binary files become one-line UserErrors.

    ``what`` names the file in the message ("policy file"), ``expected`` its format ("JSON").
    """
    path = Path(path)
    try:
        return path.read_text()
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot read it ({exc.strerror}); check the path") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path}: not a text ({expected}) file; pass a {expected} file") from None
