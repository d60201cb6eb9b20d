"""The split types: a data set's static facts (:class:`DatasetInfo`), one split of it
(:class:`Split`: in memory or an image folder) and its four splits together (:class:`DataSplits`).
:mod:`mpsearch.data.datasets` builds them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mpsearch.errors import UserError

__all__ = ["DataSplits", "DatasetInfo", "FolderSplit", "Split", "TensorSplit", "digest_batches"]


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts of a data set that models and reports need."""

    name: str  # canonical name: "fashion-mnist", "digits", "cifar10", "imagefolder:/path"
    num_classes: int
    in_chans: int
    image_size: int  # square side in pixels the model sees
    mean: tuple[float, ...]  # per channel, for normalization
    std: tuple[float, ...]


def digest_batches(h: Any, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """``h`` (a hashlib object) updated with every batch's images and labels, in order: caches
    keyed by it stay with the data they were made on."""
    for x, y in batches:
        h.update(x.detach().cpu().contiguous().numpy().tobytes())
        h.update(y.detach().cpu().contiguous().numpy().tobytes())
    return h


class Split(ABC):
    """One split of a data set: a fixed, ordered list of (image, label) items."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (float32 N,C,H,W normalized images, int64 N labels); deterministic given seed."""

    @abstractmethod
    def select(self, positions: torch.Tensor) -> Split:
        """The items at ``positions`` (int64 positions into this split), in that order."""

    def subset(self, n: int | None) -> Split:
        """The first ``n`` items (all of them when ``n`` is None or >= len)."""
        if n is None or n >= len(self):
            return self
        if n < 0:
            raise UserError(f"subset size must be >= 0, got {n}; pass a non-negative count")
        return self.select(torch.arange(n))


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}; pass a positive batch size")


class TensorSplit(Split):
    """In-memory split: uint8 images normalized per batch, batched by slicing (no DataLoader)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        indices: torch.Tensor | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N,C,H,W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match {images.shape[0]} images")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(f"mean/std need {images.shape[1]} channels, got {len(mean)}/{len(std)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.mean, self.std = tuple(mean), tuple(std)
        # Source indices into the original (official) set, so splits can be checked for overlap.
        self.indices = torch.arange(len(labels)) if indices is None else indices.to(torch.int64)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Slice (optionally seeded-permuted) batches, normalizing as (x/255 - mean)/std."""
        _check_batch_size(batch_size)
        n = len(self)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else None
        for start in range(0, n, batch_size):
            if order is None:
                x, y = self.images[start : start + batch_size], self.labels[start : start + batch_size]
            else:
                idx = order[start : start + batch_size]
                x, y = self.images[idx], self.labels[idx]
            yield (x.to(torch.float32).div_(255.0).sub_(self._mean).div_(self._std), y)

    def select(self, positions: torch.Tensor) -> TensorSplit:
        return TensorSplit(
            self.images[positions], self.labels[positions], self.mean, self.std, self.indices[positions]
        )


class FolderSplit(Split):
    """A torchvision-style data set (items already transformed + normalized) restricted to indices."""

    def __init__(self, dataset: Any, indices: torch.Tensor, *, num_workers: int = 0) -> None:
        self.dataset = dataset
        self.indices = indices.to(torch.int64)
        self.num_workers = num_workers

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches from a DataLoader; shuffling is seeded through a torch.Generator."""
        _check_batch_size(batch_size)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(self.dataset, self.indices.tolist()),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(seed) if shuffle else None,
            num_workers=self.num_workers,
        )
        for x, y in loader:
            yield x.to(torch.float32), torch.as_tensor(y, dtype=torch.int64)

    def select(self, positions: torch.Tensor) -> FolderSplit:
        return FolderSplit(self.dataset, self.indices[positions], num_workers=self.num_workers)


@dataclass(frozen=True)
class DataSplits:
    """The four splits of one data set plus where it came from."""

    info: DatasetInfo
    train: Split  # baseline training
    calibration: Split  # sampled from train
    val: Split  # held out from the original training set; searches evaluate here
    test: Split  # final reports only
    source: str  # human-readable origin: a path or "sklearn bundled digits"

    def split(self, name: str) -> Split:
        """The split called ``name``: train, calibration, val or test."""
        if name not in ("train", "calibration", "val", "test"):
            raise UserError(f"unknown split {name!r}; use one of train, calibration, val, test")
        return getattr(self, name)
