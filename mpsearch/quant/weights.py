"""Weight quantization helpers: a weight tensor's grid and its round-to-nearest result, and the
layer-level pieces :class:`~mpsearch.quant.apply.QuantizedModel` quantizes weights with (a proxy
layer computing with other weights, the bias that corrects the quantized weight's mean error).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mpsearch.quant.observers import get_observer
from mpsearch.quant.primitives import QParams, fake_quantize, qparams_from_range

__all__ = ["quantize_weight", "weight_qparams"]


def weight_qparams(weight: torch.Tensor, bits: int, *, per_channel: bool, symmetric: bool, observer: str) -> QParams:
    """The grid of a weight tensor (output channels on axis 0) from ``observer``'s range."""
    rows = weight.detach().reshape(weight.shape[0], -1) if per_channel else weight.detach().reshape(1, -1)
    lo, hi = get_observer(observer)(rows, bits, True, symmetric)
    if per_channel:
        return qparams_from_range(lo, hi, bits, symmetric=symmetric, signed=True, axis=0)
    return qparams_from_range(lo[0], hi[0], bits, symmetric=symmetric, signed=True)


def quantize_weight(
    weight: torch.Tensor, bits: int, *, per_channel: bool, symmetric: bool, observer: str
) -> tuple[QParams, torch.Tensor]:
    """Round-to-nearest quantization of a weight tensor; returns its qparams and the result."""
    qp = weight_qparams(weight, bits, per_channel=per_channel, symmetric=symmetric, observer=observer)
    with torch.no_grad():
        return qp, fake_quantize(weight.detach(), qp)


def _with_weight(layer: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A shallow copy of ``layer`` computing with ``weight`` (the layer itself is not touched)."""
    proxy = copy.copy(layer)
    proxy._parameters = dict(layer._parameters)
    proxy._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
    return proxy


def _corrected_bias(layer: nn.Module, quantized: torch.Tensor, mean_column: torch.Tensor) -> torch.Tensor:
    """The bias that cancels the quantized weight's mean output error ``(W - Wq) E[x]`` on the calibration split."""
    error = (layer.weight.detach() - quantized).reshape(quantized.shape[0], -1).double()
    shift = (error @ mean_column.double()).float()
    return shift if layer.bias is None else layer.bias.detach() + shift
