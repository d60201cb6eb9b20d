"""Data sets for baseline training, calibration, search and final reports.

- :mod:`~mpsearch.data.splits`: the split types (:class:`Split`, :class:`DataSplits`, ...);
- :mod:`~mpsearch.data.datasets`: the loaders, :func:`load_dataset`, and how every data set is
  divided into its four fixed splits (train, calibration, val, test);
- :mod:`~mpsearch.data.custom`: :func:`make_data`, the same splits from your own tensors,
  ``Dataset`` s or ``DataLoader`` s.
"""

from __future__ import annotations

from mpsearch.data.custom import MemorySplit, as_split, make_data
from mpsearch.data.datasets import (
    DATASETS,
    DEBIAN_FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    FASHION_MNIST_URL,
    IMAGEFOLDER_PREFIX,
    SPLIT_SEED,
    fashion_mnist_search_dirs,
    load_dataset,
    read_idx,
)
from mpsearch.data.splits import DatasetInfo, DataSplits, FolderSplit, Split, TensorSplit, digest_batches

__all__ = [  # the public names of the three modules
    "DataSplits", "DatasetInfo", "FolderSplit", "Split", "TensorSplit", "digest_batches", "MemorySplit", "as_split", "make_data",
    "DATASETS", "DEBIAN_FASHION_MNIST_DIR", "FASHION_MNIST_FILES", "FASHION_MNIST_URL", "IMAGEFOLDER_PREFIX", "SPLIT_SEED",
    "fashion_mnist_search_dirs", "load_dataset", "read_idx",
]
