"""Your own data: :func:`make_data` builds the four splits a study needs from tensors,
``Dataset`` s or ``DataLoader`` s.

Images are given as the model expects them (float ``(N, C, H, W)``, already normalized); labels
as class indices. The search measures on ``val``, the final front on ``test``; activation
ranges are calibrated on ``calibration`` (a draw of ``calibration_size`` images from ``train``
unless given); ``train`` is needed only to train a baseline for a timm name.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from mpsearch.data.splits import DatasetInfo, DataSplits, FolderSplit, Split, _check_batch_size
from mpsearch.errors import UserError

__all__ = ["MemorySplit", "as_split", "make_data"]


class MemorySplit(Split):
    """Float images already in the model's input form, and their labels, held in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        _check_batch_size(batch_size)
        n = len(self)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start: start + batch_size]
            yield self.images[idx], self.labels[idx]

    def select(self, positions: torch.Tensor) -> MemorySplit:
        return MemorySplit(self.images[positions], self.labels[positions])


def _tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise UserError(f"{what}: expected a tensor or numpy array, got {type(value).__name__}")
    return value


def as_split(data: Any, what: str) -> Split:
    """A split from a :class:`Split`, ``(images, labels)``, an images tensor (calibration only:
    labels are not needed there), a map-style ``Dataset`` of ``(image, label)`` or a ``DataLoader``
    over one (its dataset is used; mpsearch batches by itself)."""
    if isinstance(data, Split):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        images, labels = _tensor(data[0], f"{what} images"), _tensor(data[1], f"{what} labels")
        if images.dim() != 4 or labels.shape != (images.shape[0],):
            raise UserError(f"{what}: expected images (N, C, H, W) and N labels, got {tuple(images.shape)} and "
                            f"{tuple(labels.shape)}")
        if images.dtype.is_floating_point is False or labels.dtype.is_floating_point:
            raise UserError(f"{what}: images must be float (normalized as the model expects) and labels integers, "
                            f"got {images.dtype} and {labels.dtype}")
        return MemorySplit(images.to(torch.float32), labels)
    if isinstance(data, (torch.Tensor, np.ndarray)) and what == "calibration":
        images = _tensor(data, what)
        return as_split((images, torch.zeros(images.shape[0], dtype=torch.int64)), what)
    if isinstance(data, torch.utils.data.DataLoader):
        data = data.dataset
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return FolderSplit(data, torch.arange(len(data)))
    raise UserError(f"{what}: expected (images, labels) tensors, a Dataset or a DataLoader, got {type(data).__name__}")


def make_data(*, val: Any, test: Any, train: Any = None, calibration: Any = None, calibration_size: int = 512, seed: int = 0,
              num_classes: int | None = None, name: str = "custom") -> DataSplits:
    """The splits of your data set, for :func:`mpsearch.search` and :class:`mpsearch.Evaluator`.

    Each argument takes ``(images, labels)`` tensors, a ``Dataset`` or a ``DataLoader`` (see
    :func:`as_split`); ``calibration`` also takes bare images. ``num_classes`` defaults to the
    largest label in ``val`` and ``test`` plus one. ``name`` is what policies record as their data set.
    """
    splits = {"val": as_split(val, "val"), "test": as_split(test, "test")}
    if train is not None:
        splits["train"] = as_split(train, "train")
    if calibration is not None:
        splits["calibration"] = as_split(calibration, "calibration")
    elif train is not None:
        if calibration_size < 1:
            raise UserError(f"calibration_size: must be >= 1, got {calibration_size}")
        n = min(calibration_size, len(splits["train"]))
        draw = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        splits["calibration"] = splits["train"].select(draw)
    else:
        raise UserError("make_data: pass calibration= (a few hundred training images) or train= to draw them from")
    for key, split in splits.items():
        if len(split) == 0:
            raise UserError(f"make_data: the {key} split is empty")
    x, _ = next(iter(splits["val"].batches(1)))
    if x.dim() != 4 or x.shape[2] != x.shape[3]:
        raise UserError(f"make_data: images must be square (N, C, S, S), got {tuple(x.shape)} per batch")
    if num_classes is None:
        num_classes = 1 + max(int(y.max()) for key in ("val", "test") for _, y in splits[key].batches(1024))
    channels = int(x.shape[1])
    info = DatasetInfo(name, int(num_classes), channels, int(x.shape[2]), (0.0,) * channels, (1.0,) * channels)
    empty = splits["val"].select(torch.zeros(0, dtype=torch.int64))
    return DataSplits(info, splits.get("train", empty), splits["calibration"], splits["val"], splits["test"], source="user data")
