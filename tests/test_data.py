"""Tests for mpsearch.data: split sizes and disjointness, determinism, file search, idx parsing, downloads."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import mpsearch.data.datasets as data  # the loaders read the constants the tests patch from here
from mpsearch.data import (
    DATASETS,
    FASHION_MNIST_FILES,
    DataSplits,
    FolderSplit,
    TensorSplit,
    fashion_mnist_search_dirs,
    load_dataset,
    read_idx,
)
from mpsearch.errors import UserError
from mpsearch.host.paths import cache_root

HAVE_DEBIAN = all((data.DEBIAN_FASHION_MNIST_DIR / f).is_file() for f in FASHION_MNIST_FILES)
needs_debian = pytest.mark.skipif(not HAVE_DEBIAN, reason="apt package dataset-fashion-mnist not installed")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No user data dir, and a throwaway cache, for every test."""
    monkeypatch.delenv("MPSEARCH_DATA", raising=False)
    monkeypatch.setenv("MPSEARCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def fashion() -> DataSplits:
    return load_dataset("fashion-mnist", data_dir=data.DEBIAN_FASHION_MNIST_DIR)


def _idx(path: Path, magic: int, shape: tuple[int, ...], payload: bytes) -> Path:
    path.write_bytes(gzip.compress(struct.pack(f">I{len(shape)}I", magic, *shape) + payload))
    return path


def _write_fashion(folder: Path, n_train: int = 40, n_test: int = 10) -> Path:
    """Tiny valid fashion-mnist files: image i is filled with value i, label i % 10."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        pixels = np.repeat(np.arange(n, dtype=np.uint8), 28 * 28).tobytes()
        _idx(folder / f"{prefix}-images-idx3-ubyte.gz", 2051, (n, 28, 28), pixels)
        _idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 2049, (n,), bytes(i % 10 for i in range(n)))
    return folder


# ---------------------------------------------------------------------------- fashion-mnist, real files


@needs_debian
def test_fashion_mnist_split_sizes_and_disjointness(fashion: DataSplits) -> None:
    assert (len(fashion.train), len(fashion.val), len(fashion.calibration), len(fashion.test)) == (
        55000,
        5000,
        512,
        10000,
    )
    assert fashion.info == data.DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,))
    train, val, cal = fashion.train.indices, fashion.val.indices, fashion.calibration.indices
    assert not set(train.tolist()) & set(val.tolist())
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(60000))
    assert torch.equal(train, train.sort().values) and torch.equal(cal, cal.sort().values)
    assert set(cal.tolist()) <= set(train.tolist())
    assert torch.equal(fashion.test.indices, torch.arange(10000))
    assert fashion.source == str(data.DEBIAN_FASHION_MNIST_DIR)
    x, y = next(fashion.train.batches(64))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


@needs_debian
def test_fashion_mnist_two_loads_identical(fashion: DataSplits) -> None:
    again = load_dataset("fashion-mnist", data_dir=data.DEBIAN_FASHION_MNIST_DIR)
    for name in ("train", "calibration", "val", "test"):
        a, b = fashion.split(name), again.split(name)
        assert torch.equal(a.indices, b.indices)
        (xa, ya), (xb, yb) = next(a.batches(256, shuffle=True, seed=3)), next(b.batches(256, shuffle=True, seed=3))
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = load_dataset("fashion-mnist", data_dir=data.DEBIAN_FASHION_MNIST_DIR, calibration_seed=1)
    assert not torch.equal(other.calibration.indices, fashion.calibration.indices)
    assert torch.equal(other.val.indices, fashion.val.indices)  # calibration seed never moves val


@needs_debian
def test_fashion_mnist_normalization(fashion: DataSplits) -> None:
    x, _ = next(fashion.test.batches(10))
    raw = fashion.test.images[:10].float() / 255
    assert torch.allclose(x * 0.3530 + 0.2860, raw, atol=1e-6)
    assert x.mean().item() == pytest.approx((raw.mean().item() - 0.2860) / 0.3530, abs=1e-5)


# ---------------------------------------------------------------------------- TensorSplit


def _toy_split(n: int = 10) -> TensorSplit:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return TensorSplit(images, torch.arange(n), (0.5,), (0.25,))


def test_tensor_split_normalizes_known_image() -> None:
    split = TensorSplit(torch.full((1, 2, 3, 3), 255, dtype=torch.uint8), torch.zeros(1), (0.5, 0.2), (0.25, 0.4))
    x, y = next(split.batches(4))
    assert torch.allclose(x[0, 0], torch.full((3, 3), 2.0)) and torch.allclose(x[0, 1], torch.full((3, 3), 2.0))
    assert y.dtype == torch.int64


def test_tensor_split_batches_order_and_shuffle() -> None:
    split = _toy_split(10)
    labels = [y.tolist() for _, y in split.batches(4)]
    assert labels == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]

    def order(seed: int) -> list[int]:
        return torch.cat([y for _, y in split.batches(3, shuffle=True, seed=seed)]).tolist()

    assert order(1) == order(1) and sorted(order(1)) == list(range(10))
    assert order(1) != order(2)
    with pytest.raises(UserError, match="batch size"):
        next(split.batches(0))


def test_subset_first_n() -> None:
    split = _toy_split(10)
    assert split.subset(None) is split and split.subset(99) is split
    sub = split.subset(3)
    assert isinstance(sub, TensorSplit) and sub.labels.tolist() == [0, 1, 2] and sub.indices.tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------- search order, idx parsing


def test_search_dirs_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPSEARCH_DATA", str(tmp_path / "env"))
    assert fashion_mnist_search_dirs(tmp_path / "dd") == [
        tmp_path / "dd",
        tmp_path / "dd" / "fashion-mnist",
        tmp_path / "env",
        tmp_path / "env" / "fashion-mnist",
        cache_root() / "data" / "fashion-mnist",
        data.DEBIAN_FASHION_MNIST_DIR,
    ]
    monkeypatch.delenv("MPSEARCH_DATA")
    assert fashion_mnist_search_dirs(None) == [cache_root() / "data" / "fashion-mnist", data.DEBIAN_FASHION_MNIST_DIR]


def test_data_dir_wins_then_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = _write_fashion(tmp_path / "mine")
    d = load_dataset("fashion-mnist", data_dir=mine, calibration_size=8)
    assert d.source == str(mine)
    assert (len(d.train), len(d.val), len(d.calibration), len(d.test)) == (36, 4, 8, 10)
    assert torch.equal(torch.cat([d.train.indices, d.val.indices]).sort().values, torch.arange(40))
    # image i is filled with i, so pixels recover the source index
    assert torch.equal(d.train.images[:, 0, 0, 0].long(), d.train.indices)

    env = _write_fashion(tmp_path / "env" / "fashion-mnist", n_train=20)
    monkeypatch.setenv("MPSEARCH_DATA", str(tmp_path / "env"))
    assert load_dataset("fashion-mnist").source == str(env)  # subfolder form of $MPSEARCH_DATA
    assert load_dataset("fashion-mnist", data_dir=mine).source == str(mine)  # data_dir beats env


def test_read_idx_hand_made(tmp_path: Path) -> None:
    images = read_idx(_idx(tmp_path / "i.gz", 2051, (2, 2, 3), bytes(range(12))))
    assert images.shape == (2, 2, 3) and images.dtype == np.uint8
    assert images[1].tolist() == [[6, 7, 8], [9, 10, 11]]
    labels = read_idx(_idx(tmp_path / "l.gz", 2049, (3,), bytes([7, 0, 9])))
    assert labels.tolist() == [7, 0, 9]


@pytest.mark.parametrize(
    "content",
    [
        b"not gzip at all",
        gzip.compress(struct.pack(">IIII", 1234, 1, 2, 2) + bytes(4)),  # wrong magic
        gzip.compress(struct.pack(">IIII", 2051, 1, 2, 2) + bytes(3)),  # too few bytes
        gzip.compress(struct.pack(">I", 2049)),  # header cut short
    ],
)
def test_read_idx_corrupt(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "bad.gz").write_bytes(content)
    with pytest.raises(UserError, match="bad.gz"):
        read_idx(tmp_path / "bad.gz")


def test_corrupt_file_in_data_dir(tmp_path: Path) -> None:
    folder = _write_fashion(tmp_path / "d")
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset("fashion-mnist", data_dir=folder)


# ---------------------------------------------------------------------------- download


def test_download_into_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = _write_fashion(tmp_path / "server")
    monkeypatch.setattr(data, "FASHION_MNIST_URL", server.as_uri() + "/")
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    d = load_dataset("fashion-mnist", calibration_size=4)
    dest = tmp_path / "cache" / "data" / "fashion-mnist"
    assert d.source == str(dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted(FASHION_MNIST_FILES)  # no temp files left
    assert (len(d.train), len(d.val), len(d.test)) == (36, 4, 10)
    monkeypatch.setattr(data, "FASHION_MNIST_URL", "file:///nonexistent/")
    assert load_dataset("fashion-mnist").source == str(dest)  # found in the cache now, no download


def test_nothing_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "FASHION_MNIST_URL", "file:///nonexistent/")
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    with pytest.raises(UserError, match="dataset-fashion-mnist") as err:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert "file:///nonexistent/" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="download is off"):
        load_dataset("fashion-mnist", download=False)


def test_bad_download_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = _write_fashion(tmp_path / "server")
    (server / "train-images-idx3-ubyte.gz").write_bytes(b"<html>not found</html>")
    monkeypatch.setattr(data, "FASHION_MNIST_URL", server.as_uri() + "/")
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    with pytest.raises(UserError, match="train-images"):
        load_dataset("fashion-mnist")
    assert not any((tmp_path / "cache" / "data" / "fashion-mnist").iterdir())


# ---------------------------------------------------------------------------- digits


def test_digits() -> None:
    d = load_dataset("digits", calibration_size=5000)
    assert (len(d.train), len(d.val), len(d.test), len(d.calibration)) == (1257, 180, 360, 1257)
    assert d.source == "sklearn bundled digits" and d.info.image_size == 8 and d.info.in_chans == 1
    allidx = torch.cat([d.train.indices, d.val.indices, d.test.indices])
    assert torch.equal(allidx.sort().values, torch.arange(1797))
    assert d.train.images.dtype == torch.uint8
    assert int(d.train.images.min()) == 0 and int(d.train.images.max()) == 255
    # hard-coded mean/std match the train split
    pixels = d.train.images.float() / 255
    assert pixels.mean().item() == pytest.approx(d.info.mean[0], abs=1e-4)
    assert pixels.std().item() == pytest.approx(d.info.std[0], abs=1e-4)
    x, y = next(d.val.batches(32))
    assert x.shape == (32, 1, 8, 8) and y.dtype == torch.int64 and 0 <= int(y.min()) <= int(y.max()) <= 9
    assert len(load_dataset("digits", calibration_size=16).calibration) == 16


# ---------------------------------------------------------------------------- cifar


class _FakeCIFAR:
    """Stands in for torchvision's CIFAR classes: channel c of every pixel holds 10*c + (index % 5)."""

    def __init__(self, root: str, train: bool, download: bool) -> None:
        n = 60 if train else 20
        self.data = (np.arange(3, dtype=np.uint8) * 10 + (np.arange(n, dtype=np.uint8) % 5)[:, None])[
            :, None, None, :
        ].repeat(32, 1).repeat(32, 2)
        self.targets = [i % 10 for i in range(n)]


def test_cifar_with_fake_class(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torchvision

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _FakeCIFAR)
    d = load_dataset("cifar10", data_dir=tmp_path, calibration_size=10)
    assert (len(d.train), len(d.val), len(d.test), len(d.calibration)) == (54, 6, 20, 10)
    assert d.train.images.shape == (54, 3, 32, 32) and d.info.num_classes == 10 and d.source == str(tmp_path)
    assert d.test.images[7, :, 5, 5].tolist() == [2, 12, 22]  # (N,H,W,C) -> (N,C,H,W)
    x, _ = next(d.test.batches(4))
    assert x.shape == (4, 3, 32, 32)


def test_cifar_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torchvision

    def missing(root: str, train: bool, download: bool) -> None:
        raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", missing)
    with pytest.raises(UserError, match="cifar-100-python"):
        load_dataset("cifar100", data_dir=tmp_path, download=False)


# ---------------------------------------------------------------------------- imagefolder


def _png_folder(root: Path, per_class: int) -> Path:
    from PIL import Image

    for c, color in enumerate(((255, 0, 0), (0, 0, 255))):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (32, 32), color).save(root / f"class{c}" / f"{i}.png")
    return root


def test_imagefolder_single(tmp_path: Path) -> None:
    root = _png_folder(tmp_path / "imgs", 10)
    d = load_dataset(f"imagefolder:{root}", calibration_size=4)
    assert (len(d.train), len(d.val), len(d.test), len(d.calibration)) == (16, 2, 2, 4)
    assert d.info.name == f"imagefolder:{root.resolve()}" and d.info.num_classes == 2 and d.info.image_size == 224
    assert isinstance(d.train, FolderSplit)
    allidx = torch.cat([d.train.indices, d.val.indices, d.test.indices])
    assert torch.equal(allidx.sort().values, torch.arange(20))
    x, y = next(d.calibration.batches(4))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
    xs, ys = next(d.train.batches(16))
    assert set(ys.tolist()) == {0, 1}
    red = xs[ys == 0][:, 0]  # class0 images are pure red, normalized with the ImageNet red mean/std
    assert torch.allclose(red, torch.full_like(red, (1.0 - 0.485) / 0.229), atol=1e-5)

    def order(seed: int) -> list[int]:
        return torch.cat([yy for _, yy in d.train.batches(16, shuffle=True, seed=seed)]).tolist()

    assert order(5) == order(5)


def test_imagefolder_at_a_small_image_size_is_normalized_by_its_own_statistics(tmp_path: Path) -> None:
    root = _png_folder(tmp_path / "imgs", 10)  # half pure red, half pure blue
    d = load_dataset(f"imagefolder:{root}", calibration_size=4, image_size=8)
    assert d.info.image_size == 8 and d.info.name == f"imagefolder:{root.resolve()}@8px"
    # Red channel: 1 in half the images, 0 in the other half -> mean 0.5, std 0.5 (over the 16 training images).
    assert d.info.mean == pytest.approx((0.5, 0.0, 0.5), abs=1e-4) and d.info.std == pytest.approx((0.5, 1.0, 0.5), abs=1e-4)
    xs, ys = next(d.train.batches(16))
    assert xs.shape == (16, 3, 8, 8)
    assert torch.allclose(xs[ys == 0][:, 0], torch.ones(1)) and torch.allclose(xs[ys == 1][:, 0], -torch.ones(1))
    with pytest.raises(UserError, match="image_size applies to imagefolder:PATH data sets"):
        load_dataset("digits", image_size=16)


def test_imagefolder_train_val(tmp_path: Path) -> None:
    _png_folder(tmp_path / "imgs" / "train", 10)
    _png_folder(tmp_path / "imgs" / "val", 3)
    d = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", calibration_size=2)
    assert (len(d.train), len(d.val), len(d.test)) == (19, 1, 6)
    assert d.test.subset(2).indices.tolist() == [0, 1]


def test_imagefolder_missing(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="one subfolder of images per class"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")


# ---------------------------------------------------------------------------- names


def test_unknown_names() -> None:
    assert DATASETS == ("fashion-mnist", "digits", "cifar10", "cifar100")
    with pytest.raises(UserError, match="fashion-mnist, digits, cifar10, cifar100, imagefolder:PATH"):
        load_dataset("mnistt")
    with pytest.raises(UserError, match="train, calibration, val, test"):
        load_dataset("digits").split("holdout")
    with pytest.raises(ValueError, match="already registered"):
        data._register("digits")(lambda arg, data_dir, download: None)  # type: ignore[arg-type,return-value]
