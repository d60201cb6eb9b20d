"""The data set loaders: where each data set comes from and how it is divided into its splits.

Every data set is split into four fixed, deterministic parts (:class:`DataSplits`):

* ``train`` -- baseline training.
* ``calibration`` -- ``calibration_size`` images drawn without replacement from ``train``
  by a generator seeded with ``calibration_seed`` (indices sorted).
* ``val`` -- held out from the original training set and never trained on; searches
  evaluate here so that the final ``test`` numbers stay honest.
* ``test`` -- the official test set, for final reports only.

Held-out parts come from ``torch.randperm`` under a generator seeded with the fixed,
not user-facing ``SPLIT_SEED``; every part keeps its items in original index order.

* ``fashion-mnist``: the last 5000 of the permutation of the 60000 training images are
  ``val`` (a tenth for smaller files), the other 55000 ``train``; the 10000 t10k images
  are ``test``. Files are searched in :func:`fashion_mnist_search_dirs` order, then
  downloaded into the cache.
* ``cifar10`` / ``cifar100``: like fashion-mnist (val 5000 of the 50000 training images).
* ``digits``: scikit-learn's bundled 8x8 digits; permutation of all 1797: first 360 test,
  next 180 val, the rest train.
* ``imagefolder:PATH``: a torchvision ImageFolder. With ``PATH/train`` and ``PATH/val``,
  ``val/`` is ``test`` and 5% (at most 10000) of ``train/`` is held out as ``val``;
  otherwise one folder whose permutation gives test (first 10%), val (next 10%), train.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpsearch.data.splits import DatasetInfo, DataSplits, FolderSplit, Split, TensorSplit
from mpsearch.errors import UserError
from mpsearch.host.files import atomic_write
from mpsearch.host.paths import cache_root
from mpsearch.registry import Registry

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_URL",
    "IMAGEFOLDER_PREFIX",
    "SPLIT_SEED",
    "fashion_mnist_search_dirs",
    "load_dataset",
    "read_idx",
]

SPLIT_SEED = 0  # fixed seed of every held-out split; changing it changes all val/test numbers
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # apt: dataset-fashion-mnist
IMAGEFOLDER_PREFIX = "imagefolder:"
_IDX_IMAGES, _IDX_LABELS = 2051, 2049  # idx magic numbers: ubyte with 3 dims / 1 dim
_VAL_SIZE = 5000
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class _Loaded:
    """What a loader returns; load_dataset adds the calibration split."""

    info: DatasetInfo
    train: Split
    val: Split
    test: Split
    source: str


_Loader = Callable[[str, Path | None, bool, int | None], _Loaded]  # (argument after ':', data_dir, download, image size)
_LOADERS: Registry[_Loader] = Registry("dataset")
# A name ending in ':' takes an argument (``imagefolder:PATH``).
_register = _LOADERS.register


# ---------------------------------------------------------------------------- helpers


def _perm(n: int) -> torch.Tensor:
    """The fixed permutation of ``n`` items that all held-out splits come from."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))


def _holdout_last(n: int, n_val: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) sorted indices: val is the last ``n_val`` of the fixed permutation."""
    perm = _perm(n)
    return perm[: n - n_val].sort().values, perm[n - n_val :].sort().values


def _tensor_splits(
    images: np.ndarray, labels: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray, info: DatasetInfo
) -> tuple[TensorSplit, TensorSplit, TensorSplit]:
    """(train, val, test) TensorSplits; val is min(5000, n/10) held out of the training images."""
    full = TensorSplit(torch.from_numpy(images), torch.from_numpy(labels).long(), info.mean, info.std)
    test = TensorSplit(torch.from_numpy(test_images), torch.from_numpy(test_labels).long(), info.mean, info.std)
    train_idx, val_idx = _holdout_last(len(full), min(_VAL_SIZE, len(full) // 10))
    return full.select(train_idx), full.select(val_idx), test


# ---------------------------------------------------------------------------- fashion-mnist


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse a gzipped idx file of unsigned bytes (images: magic 2051, labels: magic 2049)."""
    path = Path(path)
    hint = "delete it or replace it with an intact copy"
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path} is not a readable gzip idx file ({e}); {hint}") from e
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else -1
    ndim = {_IDX_IMAGES: 3, _IDX_LABELS: 1}.get(magic)
    if ndim is None:
        raise UserError(f"{path} has idx magic {magic}, expected {_IDX_IMAGES} or {_IDX_LABELS}; {hint}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path} is truncated inside its idx header; {hint}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(shape)):
        raise UserError(
            f"{path} holds {len(raw) - header} data bytes but its header {shape} says {int(np.prod(shape))}; {hint}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()  # writable


def fashion_mnist_search_dirs(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    """Folders searched for the four files, first hit wins: data_dir, $MPSEARCH_DATA, cache, Debian."""
    dirs: list[Path] = []
    for base in (data_dir, os.environ.get("MPSEARCH_DATA") or None):
        if base is not None:
            dirs += [Path(base).expanduser(), Path(base).expanduser() / "fashion-mnist"]
    dirs += [cache_root() / "data" / "fashion-mnist", DEBIAN_FASHION_MNIST_DIR]
    return list(dict.fromkeys(dirs))


def _read_fashion_mnist(folder: Path) -> tuple[np.ndarray, ...]:
    """(train images N,1,28,28, train labels, test images, test labels) from one folder."""
    arrays = [read_idx(folder / f) for f in FASHION_MNIST_FILES]
    for (images, labels), kind in ((arrays[:2], "train"), (arrays[2:], "t10k")):
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(
                f"{folder}: {kind} files hold images {images.shape} and labels {labels.shape}, expected "
                "(N, 28, 28) and (N,); replace them with the official fashion-mnist files"
            )
        if labels.size and int(labels.max()) > 9:
            raise UserError(f"{folder}: {kind} labels go up to {int(labels.max())}, expected 0..9; replace them")
    return arrays[0][:, None], arrays[1], arrays[2][:, None], arrays[3]


def _download_fashion_mnist(dest: Path) -> None:
    """Fetch the four files from FASHION_MNIST_URL into ``dest``, each written atomically."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        with urllib.request.urlopen(FASHION_MNIST_URL + name, timeout=30) as src:
            atomic_write(dest / name, lambda out: shutil.copyfileobj(src, out), binary=True, what="download")


@_register("fashion-mnist")
def _load_fashion_mnist(arg: str, data_dir: Path | None, download: bool, image_size: int | None) -> _Loaded:
    dirs = fashion_mnist_search_dirs(data_dir)
    folder = next((d for d in dirs if all((d / f).is_file() for f in FASHION_MNIST_FILES)), None)
    if folder is None:
        fix = (
            "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
            "or put the four idx.gz files in data_dir / $MPSEARCH_DATA"
        )
        where = ", ".join(map(str, dirs))
        if not download:
            raise UserError(f"fashion-mnist not found in {where} and download is off; {fix}")
        folder = cache_root() / "data" / "fashion-mnist"
        try:
            _download_fashion_mnist(folder)
        except (OSError, ValueError, UserError) as e:  # URLError is an OSError, a bad URL a ValueError, a failed write a UserError
            raise UserError(
                f"fashion-mnist not found in {where} and download from {FASHION_MNIST_URL} failed ({e}); {fix}"
            ) from e
        try:
            arrays = _read_fashion_mnist(folder)
        except UserError:
            for f in FASHION_MNIST_FILES:  # do not leave a bad download to be found next time
                (folder / f).unlink(missing_ok=True)
            raise
    else:
        arrays = _read_fashion_mnist(folder)
    info = DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,))
    return _Loaded(info, *_tensor_splits(*arrays, info=info), source=str(folder))


# ---------------------------------------------------------------------------- digits


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: (images of 0-16 as float, n x 8 x 8; labels). Read from the
    file scikit-learn ships, found without importing it: ``sklearn.datasets`` takes about a second
    to import, which every command on digits would pay."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.exists():
            with gzip.open(path, "rt") as file:
                table = np.loadtxt(file, delimiter=",")
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # a scikit-learn that keeps the file elsewhere

    digits = load_digits()
    return digits.images, digits.target.astype(np.int64)


@_register("digits")
def _load_digits(arg: str, data_dir: Path | None, download: bool, image_size: int | None) -> _Loaded:
    pixels, labels = _sklearn_digits()
    images = torch.from_numpy(np.rint(pixels * (255.0 / 16.0)).astype(np.uint8)[:, None])
    # mean/std: over all pixels (/255) of the 1257-image train split below, rounded to 4 decimals.
    info = DatasetInfo("digits", 10, 1, 8, (0.3060,), (0.3762,))
    full = TensorSplit(images, torch.from_numpy(labels).long(), info.mean, info.std)
    perm = _perm(len(full))
    test, val, train = (perm[:360].sort().values, perm[360:540].sort().values, perm[540:].sort().values)
    return _Loaded(info, full.select(train), full.select(val), full.select(test), "sklearn bundled digits")


# ---------------------------------------------------------------------------- cifar


def _load_cifar(name: str, data_dir: Path | None, download: bool) -> _Loaded:
    import torchvision

    cls, folder = {
        "cifar10": (torchvision.datasets.CIFAR10, "cifar-10-batches-py"),
        "cifar100": (torchvision.datasets.CIFAR100, "cifar-100-python"),
    }[name]
    root = Path(data_dir).expanduser() if data_dir is not None else cache_root() / "data" / name
    try:
        train_set, test_set = (cls(root=str(root), train=t, download=download) for t in (True, False))
    except (RuntimeError, OSError, ValueError) as e:
        raise UserError(
            f"{name} not found under {root} and not downloadable ({e}); point data_dir at a folder "
            f"holding {folder}/ (or allow the download with network access)", fields=("data_dir",)
        ) from e
    if name == "cifar10":
        info = DatasetInfo(name, 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    else:
        info = DatasetInfo(name, 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    arrays = []
    for ds in (train_set, test_set):
        arrays += [np.ascontiguousarray(np.asarray(ds.data, dtype=np.uint8).transpose(0, 3, 1, 2))]
        arrays += [np.asarray(ds.targets, dtype=np.int64)]
    return _Loaded(info, *_tensor_splits(*arrays, info=info), source=str(root))


@_register("cifar10")
def _load_cifar10(arg: str, data_dir: Path | None, download: bool, image_size: int | None) -> _Loaded:
    return _load_cifar("cifar10", data_dir, download)


@_register("cifar100")
def _load_cifar100(arg: str, data_dir: Path | None, download: bool, image_size: int | None) -> _Loaded:
    return _load_cifar("cifar100", data_dir, download)


# ---------------------------------------------------------------------------- imagefolder


def _image_folder(path: Path, image_size: int | None = None, mean: tuple[float, ...] = _IMAGENET_MEAN,
                  std: tuple[float, ...] = _IMAGENET_STD) -> Any:
    """A torchvision ImageFolder, or a UserError: the ImageNet eval transform (resize to 256, crop
    224) without ``image_size``, else resized and center-cropped to ``image_size``, normalized
    by ``mean``/``std``."""
    import torchvision
    from torchvision import transforms as T

    size = [T.Resize(256), T.CenterCrop(224)] if image_size is None else [T.Resize(image_size), T.CenterCrop(image_size)]
    transform = T.Compose([*size, T.ToTensor(), T.Normalize(mean, std)])
    try:
        ds = torchvision.datasets.ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"cannot read image folder {path} ({e}); it needs one subfolder of images per class") from e
    if len(ds) < 2:
        raise UserError(f"image folder {path} holds {len(ds)} images; it needs at least 2 (one subfolder per class)")
    return ds


_STATS_IMAGES = 2000  # training images the mean/std of a resized image folder come from


def _channel_stats(split: Split) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of (up to :data:`_STATS_IMAGES` seeded) images of ``split``, as
    loaded; a channel that never varies gets std 1."""
    sample = split.select(_perm(len(split))[:_STATS_IMAGES].sort().values)
    total = total_sq = count = 0
    for x, _ in sample.batches(256):
        total = total + x.sum(dim=(0, 2, 3))
        total_sq = total_sq + (x.double() ** 2).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total.double() / count
    std = (total_sq / count - mean**2).clamp_min(0).sqrt()
    std = torch.where(std < 1e-3, torch.ones_like(std), std)  # a constant channel: nothing to scale
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)


@_register(IMAGEFOLDER_PREFIX)
def _load_imagefolder(arg: str, data_dir: Path | None, download: bool, image_size: int | None) -> _Loaded:
    """``image_size``: resize and crop to it, normalized by the training split's own mean/std
    (small images are not blown up to 224 px); without it, the ImageNet transform (hub models)."""
    if image_size is None:
        return _imagefolder_splits(arg, None, _IMAGENET_MEAN, _IMAGENET_STD)
    unnormalized = _imagefolder_splits(arg, image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    mean, std = _channel_stats(unnormalized.train)
    return _imagefolder_splits(arg, image_size, mean, std)


def _imagefolder_splits(arg: str, image_size: int | None, mean: tuple[float, ...], std: tuple[float, ...]) -> _Loaded:
    if not arg:
        raise UserError("imagefolder needs a path; write it as imagefolder:/path/to/images")
    path = Path(arg).expanduser().resolve()
    if not path.is_dir():
        raise UserError(f"image folder {path} does not exist; pass imagefolder:PATH with an existing folder")
    if (path / "train").is_dir() and (path / "val").is_dir():
        train_ds, test_ds = _image_folder(path / "train", image_size, mean, std), _image_folder(path / "val", image_size, mean, std)
        if train_ds.classes != test_ds.classes:
            raise UserError(f"{path}/train and {path}/val have different class subfolders; make them match")
        n = len(train_ds)
        train_idx, val_idx = _holdout_last(n, min(10000, max(1, round(0.05 * n))))
        train, val = FolderSplit(train_ds, train_idx), FolderSplit(train_ds, val_idx)
        test = FolderSplit(test_ds, torch.arange(len(test_ds)))
    else:
        train_ds = _image_folder(path, image_size, mean, std)
        perm, k = _perm(len(train_ds)), len(train_ds) // 10
        test = FolderSplit(train_ds, perm[:k].sort().values)
        val = FolderSplit(train_ds, perm[k : 2 * k].sort().values)
        train = FolderSplit(train_ds, perm[2 * k :].sort().values)
    info = DatasetInfo(f"{IMAGEFOLDER_PREFIX}{path}" + (f"@{image_size}px" if image_size else ""), len(train_ds.classes), 3,
                       image_size or 224, mean, std)
    return _Loaded(info, train, val, test, source=str(path))


# ---------------------------------------------------------------------------- entry point

DATASETS: tuple[str, ...] = tuple(k for k in _LOADERS.names() if not k.endswith(":"))  # plus "imagefolder:PATH"


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    calibration_size: int = 512,
    calibration_seed: int = 0,
    download: bool = True,
    image_size: int | None = None,
) -> DataSplits:
    """Load data set ``name`` (one of DATASETS or ``imagefolder:PATH``) into its four fixed splits.
    ``image_size`` (image folders only) resizes the images to that many pixels instead of 224."""
    key, arg = name.strip().lower(), ""
    if key.startswith(IMAGEFOLDER_PREFIX):
        key, arg = IMAGEFOLDER_PREFIX, name.strip()[len(IMAGEFOLDER_PREFIX) :]
    if key not in _LOADERS:
        known = ", ".join((*DATASETS, f"{IMAGEFOLDER_PREFIX}PATH"))
        raise UserError(f"unknown dataset {name!r}; use one of {known}")
    if calibration_size < 0:
        raise UserError(f"calibration size must be >= 0, got {calibration_size}; pass a non-negative count")
    if image_size is not None and key != IMAGEFOLDER_PREFIX:
        raise UserError(f"image_size applies to imagefolder:PATH data sets; {name} has a fixed image size",
                        fields=("image_size",))
    if image_size is not None and not 1 <= image_size <= 4096:
        raise UserError(f"image_size: must be 1 to 4096 pixels, got {image_size}", fields=("image_size",))
    loaded = _LOADERS.get(key)(arg, Path(data_dir) if data_dir is not None else None, download, image_size)
    n_cal = min(calibration_size, len(loaded.train))
    gen = torch.Generator().manual_seed(calibration_seed)
    calibration = loaded.train.select(torch.randperm(len(loaded.train), generator=gen)[:n_cal].sort().values)
    return DataSplits(loaded.info, loaded.train, calibration, loaded.val, loaded.test, loaded.source)
