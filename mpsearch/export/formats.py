"""The file formats a quantized model is exported to: their names, suffixes and output checks.

=======  ========  ==========================================  ============================
format   suffix    written by                                  runs in
=======  ========  ==========================================  ============================
onnx     .onnx     :func:`mpsearch.export.onnx.save_onnx`      onnxruntime (CPU)
pt2e     .pt2      :func:`mpsearch.export.pt2e.save_pt2e`      ``torch.compile`` (inductor)
=======  ========  ==========================================  ============================

:mod:`mpsearch.export.dispatch` opens, reads and writes a file by its format.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mpsearch.errors import UserError

__all__ = ["FORMATS", "format_of", "check_output", "model_name"]

FORMATS = {"onnx": ".onnx", "pt2e": ".pt2"}


def format_of(path: str | Path) -> str:
    """The format of the model file ``path``: ``pt2e`` for a ``.pt2`` name, else ONNX (whatever
    the name, onnx itself says whether the file is one)."""
    return "pt2e" if Path(path).suffix.lower() == FORMATS["pt2e"] else "onnx"


def check_output(path: str | Path, fmt: str) -> Path:
    """``path`` if a ``fmt`` file can be written there (checked before any work is done)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise UserError(f"format: unknown model format {fmt!r}; choose one of {', '.join(FORMATS)}", fields=("format",))
    if path.suffix != FORMATS[fmt]:
        raise UserError(f"output: a {fmt} file's name ends in {FORMATS[fmt]}, got {path}", fields=("output",))
    if not path.parent.is_dir():
        what = "is not a folder" if path.parent.exists() else "does not exist"
        raise UserError(f"output: {path.parent} {what}; write the file into an existing folder", fields=("output",))
    return path


def model_name(model: object, metadata: Mapping[str, Any] | None) -> str:
    """What an export's messages call the model: its policy's model name, else its class name."""
    policy = (metadata or {}).get("policy")
    name = policy.get("model") if isinstance(policy, Mapping) else None
    return str(name or type(model).__name__)
