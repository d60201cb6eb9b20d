"""The fp32 model's per-image correctness on a whole split, cached on disk by baseline and data.

Every re-measured front is paired with the fp32 model on the same test images (the drop and
its interval). Those predictions depend only on the baseline's weights and the split, so they
are kept under ``<cache>/fp32/<checkpoint sha256>/<split>-<data hash>.npy``: training a baseline
writes the test split's (it measures it anyway), and a study reads them instead of running the
fp32 model again. Only splits held in memory are cached: keying an image folder's split would
decode every image once more.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from mpsearch.data import DataSplits, FolderSplit, digest_batches
from mpsearch.errors import UserError
from mpsearch.host.files import atomic_write
from mpsearch.host.paths import cache_root

__all__ = ["Fp32Masks"]

logger = logging.getLogger(__name__)


class Fp32Masks:
    """Load and store one baseline's fp32 correctness masks for the splits of ``data``."""

    def __init__(self, checkpoint_sha256: str | None, data: DataSplits, batch_size: int = 256) -> None:
        self.folder = cache_root() / "fp32" / str(checkpoint_sha256)
        self.data = data
        self.batch_size = batch_size
        self.usable = checkpoint_sha256 is not None and not isinstance(data.test, FolderSplit)
        self._keys: dict[str, str] = {}

    def path(self, split: str) -> Path:
        """Where ``split``'s mask is kept: named by a hash of its images and labels in order."""
        if split not in self._keys:
            h = digest_batches(hashlib.sha256(split.encode()), self.data.split(split).batches(self.batch_size))
            self._keys[split] = h.hexdigest()[:16]
        return self.folder / f"{split}-{self._keys[split]}.npy"

    def load(self, split: str) -> torch.Tensor | None:
        """The cached mask of ``split``, or None."""
        if not self.usable or not self.path(split).is_file():
            return None
        mask = np.load(self.path(split), allow_pickle=False)
        if mask.shape != (len(self.data.split(split)),):
            return None
        return torch.from_numpy(mask.astype(bool))

    def store(self, split: str, mask: torch.Tensor) -> None:
        """Keep ``mask`` for ``split``; a cache that cannot be written costs time, not the caller."""
        if not self.usable:
            return
        try:
            atomic_write(self.path(split), lambda f: np.save(f, mask.numpy().astype(np.uint8), allow_pickle=False),
                         binary=True, what="fp32 predictions")
        except UserError as exc:
            logger.info(f"fp32 predictions not cached: {exc}")
