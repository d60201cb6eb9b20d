"""Writing output files so that no reader ever sees half of one.

Every file mpsearch writes (study tables, plots, reports, policies, checkpoints, caches) goes
through :func:`atomic_write`: the content is written to a temporary file in the same folder,
flushed to disk, and renamed over the target. A process killed at any moment (kill -9, power
loss, out of memory) leaves either the old file or the new one, plus at most a stray
``.NAME.*.tmp`` file, never a truncated target.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from mpsearch.errors import UserError

__all__ = ["atomic_write", "atomic_write_text"]


def atomic_write(path: str | Path, write: Callable[[IO], None], *, binary: bool = False, what: str = "output") -> Path:
    """Call ``write(file)`` on a temp file next to ``path``, fsync it, then rename it to ``path``.

    A folder that cannot be written is the user's to fix: one :class:`UserError` naming ``what``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise UserError(f"cannot write {what} {path} ({exc.strerror}); choose a writable folder") from None
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": "", "encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write {what} {path} ({exc.strerror}); choose a writable folder") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, *, what: str = "output") -> Path:
    return atomic_write(path, lambda f: f.write(text), what=what)
