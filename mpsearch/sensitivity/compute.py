"""One verb: :func:`compute_sensitivity`, with an on-disk cache keyed by everything that matters.

Cache entries live in ``cache_root()/sensitivity/<checkpoint sha256>/`` and are named
``<estimator>-<config key[:12]>-<quant key[:12]>-<inputs[:12]>.csv``; ``inputs`` hashes the layer
list and the calibration images and labels actually used, so another layer selection or another
calibration split never reuses a stale entry. Without a checkpoint hash (e.g. timm hub weights)
nothing identifies the model, so nothing is cached.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pandas as pd
from torch import nn

from mpsearch.config import QuantConfig
from mpsearch.data import Split, digest_batches
from mpsearch.errors import UserError
from mpsearch.host.files import atomic_write
from mpsearch.host.paths import cache_root
from mpsearch.quant import QuantizedModel
from mpsearch.sensitivity.base import (
    ESTIMATORS,
    SensitivityConfig,
    calibration_batches,
    canonical_frame,
    layer_weights,
)

__all__ = ["compute_sensitivity", "sensitivity_cache_path", "read_sensitivity", "write_csv_atomic"]


def _inputs_key(layers: list[str], calibration: Split, config: SensitivityConfig) -> str:
    h = hashlib.sha256(json.dumps(list(layers)).encode())
    return digest_batches(h, calibration_batches(calibration, config)).hexdigest()


def sensitivity_cache_path(
    checkpoint_sha256: str, layers: list[str], calibration: Split, config: SensitivityConfig, quant: QuantConfig
) -> Path:
    """Where :func:`compute_sensitivity` keeps this result (see the module docstring)."""
    name = f"{config.estimator}-{config.key()[:12]}-{quant.key()[:12]}-{_inputs_key(layers, calibration, config)[:12]}.csv"
    return cache_root() / "sensitivity" / checkpoint_sha256 / name


def read_sensitivity(path: str | Path) -> pd.DataFrame:
    """A sensitivity CSV back as the frame that was written (same dtypes, exact floats)."""
    # Floats are written as their shortest repr; pandas >= 3 parses them back bit-equal by default,
    # older pandas only with the (since deprecated) round_trip parser.
    exact = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
    return canonical_frame(pd.read_csv(path, **exact))


def write_csv_atomic(df: pd.DataFrame, path: Path) -> None:
    """Write ``df`` to ``path`` via a temp file in the same folder and a rename.

    A reader (or a concurrent worker computing the same entry) never sees half a file.
    """
    atomic_write(path, lambda f: df.to_csv(f, index=False), what="sensitivity table")


def compute_sensitivity(
    model: nn.Module,
    layers: list[str],
    calibration: Split,
    config: SensitivityConfig,
    *,
    quant: QuantConfig,
    checkpoint_sha256: str | None,
    qmodel: QuantizedModel | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Per-(layer, bits) sensitivity of ``model`` by ``config.estimator``, cached on disk.

    One row per layer (in ``layers`` order) and bit width (in ``config.bits`` order), columns
    ``layer, bits, score`` and the estimator's own. A cache hit returns a frame equal to the
    fresh one, dtypes and order included. ``qmodel`` (a :class:`QuantizedModel` of ``model``,
    e.g. an evaluator's) saves building another one.
    """
    layer_weights(model, layers)  # a bad layer name fails before any work or cache lookup
    estimator = ESTIMATORS.get(config.estimator)()
    path = None
    if checkpoint_sha256:
        if not re.fullmatch(r"[0-9a-fA-F]{8,128}", checkpoint_sha256):  # it becomes a folder name
            raise UserError(f"checkpoint_sha256: expected hex digits, got {checkpoint_sha256!r}")
        path = sensitivity_cache_path(checkpoint_sha256, layers, calibration, config, quant)
        if path.exists():
            try:
                return read_sensitivity(path)
            except (OSError, ValueError, pd.errors.ParserError):
                pass  # a damaged entry is recomputed and overwritten
    df = canonical_frame(
        estimator.estimate(model, layers, calibration, config, quant=quant, qmodel=qmodel, progress=progress)
    )
    expected = [(name, b) for name in layers for b in config.bits]
    if list(zip(df["layer"], df["bits"])) != expected:
        raise RuntimeError(f"estimator {config.estimator!r} broke the contract: rows must be layers x bits in order")
    if path is not None:
        try:
            write_csv_atomic(df, path)
        except OSError as exc:
            raise UserError(f"cannot write the sensitivity cache {path}: {exc.strerror}; check $MPSEARCH_CACHE") from None
    return df

