"""Observers: choose the real range ``[lo, hi]`` a quantizer covers, from observed values.

An observer is a function ``(values, bits, signed, symmetric) -> (lo, hi)`` registered by name.
``values`` has shape ``(channels, n)``: one row per output channel for per-channel weights, one
row for a per-tensor quantizer. Ranges depend on the bit width (clipping pays off more at 4 bits
than at 8), so activations are *observed* once on the calibration split
(:class:`ActivationStats`) and turned into ranges per bit width on demand.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mpsearch.quant.primitives import fake_quantize, qparams_from_range
from mpsearch.registry import Registry

__all__ = ["OBSERVERS", "register_observer", "get_observer", "ActivationStats", "Observer"]

Observer = Callable[[torch.Tensor, int, bool, bool], tuple[torch.Tensor, torch.Tensor]]
OBSERVERS: Registry[Observer] = Registry("observer")
register_observer = OBSERVERS.register
get_observer = OBSERVERS.get


@register_observer("minmax")
def minmax_observer(values: torch.Tensor, bits: int, signed: bool, symmetric: bool):
    """The full observed range: no clipping error, the largest rounding error."""
    return values.amin(dim=1), values.amax(dim=1)


@register_observer("percentile")
def percentile_observer(values: torch.Tensor, bits: int, signed: bool, symmetric: bool, q: float = 0.9999):
    """Clip the ``1 - q`` most extreme values at each end (outliers cost resolution)."""
    v = values.float()
    if v.shape[1] > 2**24:  # torch.quantile's input limit
        v = v[:, :: v.shape[1] // 2**24 + 1]
    return torch.quantile(v, 1 - q, dim=1), torch.quantile(v, q, dim=1)


_MSE_RATIOS = torch.linspace(0.2, 1.0, 41)


@register_observer("mse")
def mse_observer(values: torch.Tensor, bits: int, signed: bool, symmetric: bool):
    """The shrink of the min-max range that minimises ``||Q(x) - x||^2``, per row (grid search).

    Balances clipping error against rounding error, as in e.g. Banner et al., "Post training
    4-bit quantization of convolutional networks for rapid-deployment" (NeurIPS 2019).
    """
    lo, hi = values.amin(dim=1), values.amax(dim=1)
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for ratio in _MSE_RATIOS.tolist():
        c_lo, c_hi = lo * ratio, hi * ratio
        qp = qparams_from_range(c_lo, c_hi, bits, symmetric=symmetric, signed=signed, axis=0)
        err = (fake_quantize(values, qp) - values).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, c_lo, best_lo)
        best_hi = torch.where(better, c_hi, best_hi)
    return best_lo, best_hi


class ActivationStats:
    """What the calibration pass keeps of one layer's input: exact min/max and a seeded sample.

    The sample (at most ``max_samples`` values, drawn uniformly over all values seen: each batch
    contributes in proportion to its size) lets observers that need the distribution (percentile,
    MSE) work per bit width without re-running the model. The exact extremes are kept so that
    min-max ranges are exact.
    """

    def __init__(self, max_samples: int = 2**16, seed: int = 0) -> None:
        self.max_samples = max_samples
        self.lo = float("inf")
        self.hi = float("-inf")
        self._chunks: list[tuple[torch.Tensor, int]] = []  # (uniform draw from a batch, batch size)
        self._generator = torch.Generator().manual_seed(seed)
        self._values: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        take = min(x.numel(), self.max_samples)
        idx = torch.randint(0, x.numel(), (take,), generator=self._generator)
        self._chunks.append((x.cpu()[idx], x.numel()))
        self._values = None

    @property
    def non_negative(self) -> bool:
        return self.lo >= 0.0

    def values(self) -> torch.Tensor:
        """The sample with the exact extremes appended, as one row ``(1, n)``."""
        if self._values is None:
            if not self._chunks:
                raise RuntimeError("activation statistics are empty: run calibration first")
            total = sum(n for _, n in self._chunks)
            parts = []
            for draw, n in self._chunks:  # each batch's share of the sample matches its share of the data
                take = min(draw.numel(), max(1, round(self.max_samples * n / total)))
                parts.append(draw[:take])  # draws are already uniform, so a prefix is a uniform draw
            sample = torch.cat(parts)
            self._chunks = [(sample, total)]
            self._values = torch.cat([sample, torch.tensor([self.lo, self.hi])]).unsqueeze(0)
        return self._values
