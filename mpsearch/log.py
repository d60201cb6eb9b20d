"""Logging through the standard :mod:`logging` module, as Optuna does.

Every module logs to a child of the ``mpsearch`` logger (``logging.getLogger(__name__)``). On
first use that logger gets a handler writing bare messages to stderr at INFO, and does not
propagate to the root logger; :func:`set_verbosity` quiets it, :func:`disable_default_handler`
hands the messages to your own logging setup instead.
"""

from __future__ import annotations

import logging
import sys
import threading

__all__ = ["set_verbosity", "get_verbosity", "disable_default_handler", "enable_default_handler"]

_lock = threading.Lock()
_handler: logging.Handler | None = None


def _root() -> logging.Logger:
    global _handler
    root = logging.getLogger("mpsearch")
    with _lock:
        if _handler is None:
            _handler = logging.StreamHandler(sys.stderr)
            _handler.setFormatter(logging.Formatter("%(message)s"))
            root.addHandler(_handler)
            root.setLevel(logging.INFO)
            root.propagate = False
    return root


def set_verbosity(level: int | str) -> None:
    """Show messages at ``level`` and above (``logging.WARNING`` silences progress messages)."""
    _root().setLevel(level)


def get_verbosity() -> int:
    return _root().getEffectiveLevel()


def disable_default_handler() -> None:
    """Stop writing to stderr and let messages propagate to the root logger (your handlers)."""
    root = _root()
    if _handler is not None:
        root.removeHandler(_handler)
    root.propagate = True


def enable_default_handler() -> None:
    root = _root()
    if _handler is not None and _handler not in root.handlers:
        root.addHandler(_handler)
    root.propagate = False


_root()
