"""A model file handled by its format (:mod:`mpsearch.export.formats`): written, opened, read.

Both classifiers answer ``logits(x)``, ``predict(batches)``, ``input_shape``, ``runtime`` and
``threads``, so that comparing a file with fake quantization and timing it are written once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpsearch.errors import UserError
from mpsearch.export.formats import format_of
from mpsearch.export.onnx import OnnxClassifier, read_metadata, save_onnx
from mpsearch.export.pt2e import Pt2eClassifier, read_pt2e_metadata, save_pt2e

__all__ = ["open_exported", "exported_metadata", "save_exported"]


def save_exported(model: nn.Module, example: torch.Tensor, path: str | Path, fmt: str, *,
                  metadata: Mapping[str, Any] | None = None, calibration: Iterable[torch.Tensor] | None = None) -> Path:
    """``model`` (quantized by a policy, or float) written as ``fmt`` to ``path`` (each writer
    checks ``path`` first); ``calibration`` (image batches) sets an ONNX file's output grids."""
    if fmt == "pt2e":
        return save_pt2e(model, example, path, metadata=metadata)
    return save_onnx(model, example, path, metadata=metadata, calibration=calibration)


def open_exported(path: str | Path, *, threads: int | None = None) -> Any:
    """A classifier running the model file ``path`` (see the module doc)."""
    if format_of(path) == "pt2e":
        return Pt2eClassifier(path, threads=threads)
    if not Path(path).is_file():
        raise UserError(f"onnx: no file {path}", fields=("onnx",))
    return OnnxClassifier(path, threads=threads)


def exported_metadata(path: str | Path) -> dict[str, Any]:
    """What mpsearch recorded in the model file ``path`` (model, data set, baseline, policy)."""
    if format_of(path) == "pt2e":
        return read_pt2e_metadata(path)
    return read_metadata(path)
