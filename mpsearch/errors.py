"""The one exception type that means "the user asked for something we cannot do".

The CLI turns a :class:`UserError` into one line on stderr and exit code 2; every other
exception is a bug and keeps its traceback. Messages say what is wrong and how to fix it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["UserError", "read_user_file", "parse_user_yaml"]


class UserError(Exception):
    """Bad input from the user: a file, a setting, a name, a missing data set.

    ``fields`` lists the config fields the message names (``search.budget``), so that the CLI
    can name its flags instead (``--budget``)."""

    def __init__(self, message: str, *, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.fields = tuple(fields)


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


def parse_user_yaml(text: str, what: str) -> Any:
    """YAML the user wrote, parsed as plain data; a syntax error is one line naming where it is."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise UserError(f"{what}: not valid YAML ({getattr(exc, 'problem', None) or 'syntax error'}{at}); fix the file") from None
