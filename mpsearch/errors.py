"""The one exception type that means "the user asked for something we cannot do".

The CLI turns a :class:`UserError` into one line on stderr and exit code 2; every other
exception is a bug and keeps its traceback. Messages say what is wrong and how to fix it.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """Bad input from the user: a file, a flag, a name, a missing data set."""
