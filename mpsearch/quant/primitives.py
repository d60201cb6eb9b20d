"""Uniform affine fake quantization: the math, and nothing else.

A tensor ``x`` is mapped to ``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` on an integer grid
of ``2**bits`` levels. Where gradients flow, PyTorch's fused ``fake_quantize_per_{tensor,channel}_affine``
kernels give a straight-through estimator (gradient 1 inside the clipping range, 0 outside), so
fine-tuning trains through the quantizers; evaluation takes a vectorized path with the same
values. Rounding is half-to-even, as in ``torch.round``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MIN_BITS", "MAX_BITS", "QParams", "integer_range", "qparams_from_range", "fake_quantize"]

MIN_BITS = 2
MAX_BITS = 8
_EPS = 1e-12  # smallest scale: a constant-zero channel must not divide by zero


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
    """The integer grid of a ``bits``-wide quantizer: signed ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of one quantizer; ``axis`` is the channel axis, ``None`` for per-tensor."""

    scale: torch.Tensor  # float32, shape () or (channels,)
    zero_point: torch.Tensor  # int32, same shape
    qmin: int
    qmax: int
    axis: int | None = None

    @property
    def bits(self) -> int:
        return int(self.qmax - self.qmin + 1).bit_length() - 1


def qparams_from_range(
    lo: torch.Tensor,
    hi: torch.Tensor,
    bits: int,
    *,
    symmetric: bool,
    signed: bool,
    axis: int | None = None,
) -> QParams:
    """Scale and zero point that map the real range ``[lo, hi]`` onto the grid.

    Symmetric quantizers have zero point 0: on a signed grid the scale maps ``max(|lo|, |hi|)``
    to the largest positive level ``2^(b-1)-1`` (the extra negative level ``-2^(b-1)`` is reached
    only by values clipped below ``-max``); on an unsigned grid (non-negative inputs, e.g. after ReLU) ``hi`` uses every level,
    rather than wasting the sign bit. Asymmetric quantizers spread ``[lo, hi]`` (widened
    to include 0, so that zero is exact) over the whole grid with a zero point.
    """
    qmin, qmax = integer_range(bits, signed)
    lo = torch.as_tensor(lo, dtype=torch.float32)
    hi = torch.as_tensor(hi, dtype=torch.float32)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        if signed:
            scale = torch.maximum(-lo, hi) / qmax
        else:
            scale = hi / qmax
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = (hi - lo) / (qmax - qmin)
        scale = torch.clamp(scale, min=_EPS)
        zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int32)
    scale = torch.clamp(scale, min=_EPS)
    return QParams(scale=scale, zero_point=zero_point, qmin=qmin, qmax=qmax, axis=axis)


def fake_quantize(x: torch.Tensor, qp: QParams, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize and dequantize ``x`` (differentiable through the straight-through estimator).

    ``out`` (per-tensor, without autograd only) is a tensor to write the result into when it
    has ``x``'s shape, dtype and layout; a fresh one is allocated otherwise.
    """
    if qp.axis is None:
        scale, zero_point = float(qp.scale), int(qp.zero_point)
        if torch.is_grad_enabled() and x.requires_grad:
            return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qp.qmin, qp.qmax)
        # Evaluation's hot path: every quantized layer's input, every batch. PyTorch's CPU
        # fake-quant kernel is scalar and also writes a gradient mask; these four vectorized
        # passes (one allocation) run faster and give bit-identical values: the same
        # float32 ``x * (1/scale)``, half-to-even rounding, and clamping ``q`` to
        # ``[qmin - z, qmax - z]`` is clamping ``q + z`` to ``[qmin, qmax]`` (integers are exact).
        # (1/scale in float64 rounded to float32 equals the float32 division PyTorch does.)
        if out is None or out.shape != x.shape or out.dtype != x.dtype or out.stride() != x.stride():
            out = torch.empty_like(x)
        torch.mul(x, torch.tensor(1.0 / scale, dtype=x.dtype), out=out).round_()
        return out.clamp_(qp.qmin - zero_point, qp.qmax - zero_point).mul_(scale)
    return torch.fake_quantize_per_channel_affine(
        x, qp.scale.to(x.device), qp.zero_point.to(x.device), qp.axis, qp.qmin, qp.qmax
    )
