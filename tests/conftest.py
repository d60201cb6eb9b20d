"""Shared fixtures: an isolated cache, small data, and tiny trained baselines (trained once)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test shares one throwaway cache: nothing lands in the user's ~/.cache."""
    path = tmp_path_factory.mktemp("mpsearch-cache")
    old = os.environ.get("MPSEARCH_CACHE")
    os.environ["MPSEARCH_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MPSEARCH_CACHE", None)
    else:
        os.environ["MPSEARCH_CACHE"] = old


@pytest.fixture(scope="session")
def digits(cache_dir):
    from mpsearch.data import load_dataset

    return load_dataset("digits", calibration_size=256)


@pytest.fixture(scope="session")
def digits_recipe():
    from mpsearch.config import SIX_EPOCH_SCALES, TrainConfig

    # Pinned to the size table and full epochs it had before selective epochs became the default.
    return TrainConfig(epochs=12, batch_size=64, lr=0.05, label_smoothing=0.0, crop_padding=1, hflip=False,
                       bf16=False, channels_last=False, image_scales=SIX_EPOCH_SCALES, keep_fraction=1.0)


@pytest.fixture(scope="session")
def digits_baseline(digits, digits_recipe):
    """timm's test_resnet trained on digits (~2 s); cached in the session cache."""
    from mpsearch.models.zoo import get_baseline

    return get_baseline("test_resnet", digits, recipe=digits_recipe, seed=0, progress=False)


@pytest.fixture(scope="session")
def digits_vit_baseline(digits):
    """timm's test_vit trained on digits with the AdamW ViT recipe, shortened (~10 s; ~88 % val)."""
    from mpsearch.models.zoo import VIT_RECIPE, get_baseline

    # No crop: shifting 8x8 digits by a pixel is too strong for a ViT this small to learn quickly.
    recipe = replace(VIT_RECIPE, epochs=20, batch_size=64, crop_padding=0, hflip=False, label_smoothing=0.0,
                     bf16=False, channels_last=False)
    return get_baseline("test_vit", digits, recipe=recipe, seed=0, progress=False)


@pytest.fixture(scope="session")
def fmnist_small(cache_dir):
    """Fashion-MNIST with the first 12800 training images (train on fewer, measure on many)."""
    from mpsearch.data import DEBIAN_FASHION_MNIST_DIR, load_dataset

    if not DEBIAN_FASHION_MNIST_DIR.exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    data = load_dataset("fashion-mnist", download=False)
    return replace(data, train=data.train.subset(12800))


@pytest.fixture(scope="session")
def fmnist_baseline(fmnist_small):
    """test_resnet after one epoch on 6400 Fashion-MNIST images (about 8 s on 2 cores)."""
    from mpsearch.config import TrainConfig
    from mpsearch.models.zoo import get_baseline

    return get_baseline("test_resnet", replace(fmnist_small, train=fmnist_small.train.subset(6400)), recipe=TrainConfig(epochs=1),
                        seed=0, progress=False)


@pytest.fixture(scope="session")
def reference_study(tmp_path_factory, digits_baseline) -> Path:
    """The folder of tests/study_checks.py's small study run uninterrupted in this process
    (--workers 0, SQLite): what every interrupted, resumed or moved run of it must equal."""
    from study_checks import study_config

    from mpsearch.study import run_study

    return run_study(study_config(tmp_path_factory.mktemp("reference"), "ref", digits_baseline), progress=False).out_dir


@pytest.fixture
def messages():
    """What mpsearch logs during the test, one string per message."""
    import logging

    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect()
    logger = logging.getLogger("mpsearch")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


@pytest.fixture(scope="session")
def cli_cmd() -> list[str]:
    """How to start the ``mpsearch`` command in a subprocess (the installed script, else the module)."""
    import sys

    script = Path(sys.executable).with_name("mpsearch")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mpsearch.cli"]
