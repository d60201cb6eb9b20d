"""The one exception type that means "the user asked for something we cannot do".

The CLI turns a :class:`UserError` into one line on stderr and exit code 2; every other
exception is a bug and keeps its traceback. Messages say what is wrong and how to fix it.
:func:`model_stage` is the exception: a model mpsearch has never seen (any timm model, any
``nn.Module``) may fail inside its own code, and that failure is the model's, not mpsearch's.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["UserError", "first_line", "model_stage", "read_user_file", "parse_user_yaml"]


class UserError(Exception):
    """Bad input from the user: a file, a setting, a name, a missing data set.

    ``fields`` lists the config fields the message names (``search.budget``), so that the CLI
    can name its flags instead (``--budget``)."""

    def __init__(self, message: str, *, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.fields = tuple(fields)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of ``exc``'s message, at most ``limit`` characters: what a one-line
    message quotes of an error raised in code mpsearch does not own (a model, a hub client)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # terminal colours (torch.onnx's messages have them)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else "")[:limit]


def quoted(exc: BaseException) -> str:
    """``Type: first line`` of an exception raised in code mpsearch does not own."""
    return f"{type(exc).__name__}: {first_line(exc)}"


@contextmanager
def model_stage(model: str, stage: str, fix: str = "it does not run under mpsearch as it is: choose another model") -> Iterator[None]:
    """Run a stage of work on ``model`` (building, training, calibrating, exporting ...): an
    exception from inside the model (or a tracer running it) that mpsearch does not recognize
    becomes one line naming the model, the stage, the error and ``fix``. The original stays
    chained as the cause, which ``--debug`` shows."""
    try:
        yield
    except (UserError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - a model's own code raises anything
        root = exc
        while root.__cause__ is not None:  # what a wrapper (torch.onnx's TorchExportError) says it failed on
            root = root.__cause__
        raise UserError(f"model {model} failed while {stage} ({quoted(root)}); {fix}, "
                        "or run with --debug for the traceback") from exc


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
