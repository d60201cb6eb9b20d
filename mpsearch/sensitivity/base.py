"""The sensitivity contract: one config, one estimator interface, one registry.

A sensitivity estimator answers "how much does quantizing this layer's weights to ``b`` bits
hurt?" for every (layer, bits) pair, as a DataFrame with one row per pair (layers in the order
given, bit widths in ``config.bits`` order) and at least the columns ``layer``, ``bits`` and
``score`` (higher = more sensitive, finite, >= 0). Estimators add their own columns (``trace``,
``weight_error``, ``params``, ...). New estimators register in :data:`ESTIMATORS`; every one of
them passes the shared contract test in ``tests/test_sensitivity.py``.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import pandas as pd
import torch
from torch import nn

from mpsearch.config import Config, QuantConfig, config_from_dict
from mpsearch.data import Split
from mpsearch.errors import UserError
from mpsearch.policy import LayerPrecision, Policy
from mpsearch.quant import QuantizedModel, quantizable_layers, quantize_weight
from mpsearch.quant.primitives import MAX_BITS, MIN_BITS
from mpsearch.registry import Registry

__all__ = [
    "ESTIMATORS",
    "METRICS",
    "REQUIRED_COLUMNS",
    "SensitivityConfig",
    "SensitivityEstimator",
    "calibration_batches",
    "canonical_frame",
    "layer_weights",
    "probe_model",
    "probe_policy",
    "probing",
    "weight_errors",
]

METRICS = ("kl", "loss")
REQUIRED_COLUMNS = ("layer", "bits", "score")
# Integer columns keep int64 through a CSV round trip; every other numeric column is float64.
_INT_COLUMNS = ("bits", "params", "probes")

ESTIMATORS: Registry[type[SensitivityEstimator]] = Registry("sensitivity estimator")


@dataclass(frozen=True)
class SensitivityConfig(Config):
    """How per-layer sensitivity is measured; its ``key()`` names the on-disk cache entry.

    ``batches`` fixed calibration batches of ``batch_size`` images (the first ones of the
    calibration split, in order) feed every estimator. The Hessian estimator draws Rademacher
    probes until every layer's running mean trace moved by less than ``tolerance`` (relative)
    over the last ``max(1, min_probes // 2)`` probes, after at least ``min_probes`` and at most
    ``max_probes`` probes. The empirical estimator measures ``metric``: ``"kl"`` (KL(fp32 ||
    quantized) of the softmax outputs, mean over images) or ``"loss"`` (increase of the mean
    cross-entropy).
    """

    SECTION = "sensitivity"

    version: int = 1
    estimator: str = "hessian"
    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    batches: int = 4
    batch_size: int = 64
    max_probes: int = 64
    min_probes: int = 8
    tolerance: float = 0.02
    metric: str = "kl"
    seed: int = 0

    def __post_init__(self) -> None:
        ESTIMATORS.get(self.estimator)  # unknown name: one line listing the registered ones
        if not isinstance(self.bits, tuple) or not self.bits:
            raise UserError(f"sensitivity.bits: must be a non-empty list of bit widths, got {self.bits!r}")
        for b in self.bits:
            if isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS:
                raise UserError(f"sensitivity.bits: each must be an integer from {MIN_BITS} to {MAX_BITS}, got {b!r}")
        if list(self.bits) != sorted(set(self.bits)):
            raise UserError(f"sensitivity.bits: must be strictly increasing, e.g. [2, 4, 8]; got {list(self.bits)}")
        if self.batches < 1:
            raise UserError(f"sensitivity.batches: must be >= 1, got {self.batches}")
        if self.batch_size < 1:
            raise UserError(f"sensitivity.batch_size: must be >= 1, got {self.batch_size}")
        if not 1 <= self.min_probes <= self.max_probes:
            raise UserError(
                f"sensitivity: need 1 <= min_probes <= max_probes, got min_probes={self.min_probes}, "
                f"max_probes={self.max_probes}"
            )
        if not self.tolerance >= 0:
            raise UserError(f"sensitivity.tolerance: must be >= 0, got {self.tolerance}")
        if self.metric not in METRICS:
            raise UserError(f"sensitivity.metric: must be one of {list(METRICS)}, got {self.metric!r}")

    def to_dict(self) -> dict[str, Any]:
        # A list, not a tuple: the dict is meant for JSON.
        return {**asdict(self), "bits": list(self.bits)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensitivityConfig:
        if isinstance(data, dict) and isinstance(data.get("bits"), list):
            data = {**data, "bits": tuple(data["bits"])}  # JSON has no tuples
        return config_from_dict(cls, data)


class SensitivityEstimator(ABC):
    """Scores every (layer, bits) pair; stateless, so one instance may be reused.

    :meth:`estimate` is called by :func:`mpsearch.sensitivity.compute_sensitivity` on a cache
    miss. It must not change ``model`` (parameters, ``requires_grad``, ``.grad``, train/eval
    mode) and must give the same frame for the same inputs and ``config.seed``.
    """

    # Whether the estimator only works on models with attention modules (vision transformers).
    needs_attention: ClassVar[bool] = False

    @abstractmethod
    def estimate(
        self,
        model: nn.Module,
        layers: list[str],
        calibration: Split,
        config: SensitivityConfig,
        *,
        quant: QuantConfig,
        qmodel: QuantizedModel | None = None,
        progress: bool = False,
    ) -> pd.DataFrame:
        """One row per (layer, bits): ``layer``, ``bits``, ``score`` plus estimator columns.

        ``qmodel`` is an optional :class:`QuantizedModel` of ``model`` wrapping ``layers``
        (e.g. the evaluator's) that an estimator may reuse instead of building its own; its
        installed policy is restored afterwards.
        """


def probe_policy(layers: dict[str, LayerPrecision]) -> Policy:
    """An internal policy for estimators that quantize a layer or two; model and data set are
    labels only (such a policy is never saved or validated)."""
    return Policy(model="sensitivity", dataset="calibration", layers=layers)


def probe_model(model: nn.Module, layers: list[str], quant: QuantConfig, qmodel: QuantizedModel | None) -> QuantizedModel:
    """The :class:`QuantizedModel` an estimator quantizes single layers in: ``qmodel`` when
    given (checked to wrap ``layers`` with ``quant``'s weight observer), else a fresh one. Only
    weights are quantized, so it need not be calibrated."""
    if qmodel is None:
        return QuantizedModel(model, config=quant, layers=layers)
    missing = [n for n in layers if n not in qmodel.wrappers]
    if missing:
        raise UserError(f"layer {missing[0]!r} is not wrapped by the QuantizedModel passed in")
    if qmodel.config.weight_observer != quant.weight_observer:
        raise UserError(
            f"the QuantizedModel passed in uses weight observer {qmodel.config.weight_observer!r}, "
            f"the sensitivity run asks for {quant.weight_observer!r}; pass the same QuantConfig"
        )
    return qmodel


@contextmanager
def probing(qm: QuantizedModel) -> Iterator[QuantizedModel]:
    """Eval mode while an estimator probes ``qm``; afterwards its policy and train/eval mode are
    back (no policy recorded if it had none: every layer float, as after ``calibrate()``)."""
    previous, was_training = qm.policy, qm.module.training
    qm.module.eval()
    try:
        yield qm
    finally:
        if previous is not None:
            qm.apply(previous)
        else:
            qm.apply(probe_policy({}))
            qm.policy = None
        qm.module.train(was_training)


def calibration_batches(calibration: Split, config: SensitivityConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``config.batches`` batches of ``calibration`` (fewer if the split is smaller)."""
    batches = list(itertools.islice(calibration.batches(config.batch_size), config.batches))
    if not batches:
        raise UserError("sensitivity needs calibration data, but the calibration split is empty")
    return batches


def layer_weights(model: nn.Module, layers: list[str]) -> dict[str, torch.Tensor]:
    """Each named layer's weight parameter; the names must be quantizable layers of ``model``."""
    if not layers:
        raise UserError("sensitivity needs at least one layer; `mpsearch layers --model NAME` lists them")
    known = set(quantizable_layers(model))
    unknown = [n for n in layers if n not in known]
    if unknown:
        raise UserError(f"layer {unknown[0]!r} is not a quantizable Conv2d/Linear of this model")
    if len(set(layers)) != len(layers):
        raise UserError("sensitivity: a layer is listed twice; list each layer once")
    return {name: model.get_submodule(name).weight for name in layers}  # type: ignore[misc]


@torch.no_grad()
def weight_errors(
    model: nn.Module, layers: list[str], bits: tuple[int, ...], *, observer: str
) -> dict[tuple[str, int], float]:
    """``||Q_b(W) - W||^2`` per (layer, bits), with the quantizer policies use by default.

    Per-channel symmetric with ``observer``'s ranges: the same quantized weight that
    :class:`QuantizedModel` installs for ``LayerPrecision(weight_bits=b)``.
    """
    out: dict[tuple[str, int], float] = {}
    for name, weight in layer_weights(model, layers).items():
        w = weight.detach()
        for b in bits:
            _, q = quantize_weight(w, b, per_channel=True, symmetric=True, observer=observer)
            # float64: at 8 bits the error is ~1e-6 of ||W||^2, where float32 sums lose digits.
            out[(name, b)] = float((q.double() - w.double()).pow(2).sum())
    return out


def canonical_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Fixed dtypes (``layer`` str, ``bits``/``params``/``probes`` int64, others float64).

    Applied to fresh results and to cache reads alike, so a cache hit equals a fresh result.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"sensitivity frame lacks column {missing[0]!r}")
    df = df.reset_index(drop=True).copy()
    for col in df.columns:
        if col == "layer":
            df[col] = df[col].astype(str)
        elif col in _INT_COLUMNS:
            df[col] = df[col].astype("int64")
        else:
            df[col] = df[col].astype("float64")
    return df
