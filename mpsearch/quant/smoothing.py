"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models", ICML 2023): move quantization difficulty from activations to weights.

A layer computes ``W x``; for any positive per-input-channel ``s``, ``(W diag(s)) (x / s)`` is the
same product. Choosing ``s_j = max|x_j|^α / max|W_:,j|^(1-α)`` flattens input channels whose
values are outliers (one per-tensor activation scale must cover them all) at the price of larger
weights in those columns, which per-channel weight quantization absorbs. The paper applies it to
linear layers after LayerNorm; the algebra holds for any layer linear in its input channels, so
convolutions (input channel ``j`` multiplies ``W[:, j]``) are smoothed the same way. In a
deployed model ``1 / s`` is folded into the previous layer; here the wrapper divides its input.

:func:`outlier_table` reports, per layer, how uneven the input channels are (the quantity
SmoothQuant acts on) and the range of the smoothing factors.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["channel_absmax", "smoothing_scales", "scale_rows", "input_divisor", "smoothed_weight", "outlier_table"]

_MIN_SCALE = 1e-5


def channel_absmax(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` per input channel of ``layer`` (dim 1 of a conv input, the last dim of a linear one)."""
    x = x.detach().abs()
    if isinstance(layer, nn.Conv2d):
        return x.transpose(0, 1).reshape(x.shape[1], -1).amax(dim=1)
    return x.reshape(-1, x.shape[-1]).amax(dim=0)


def _weight_absmax(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().transpose(0, 1).reshape(weight.shape[1], -1).amax(dim=1)


def smoothing_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel ``s`` (channels never seen non-zero, or with zero weights, keep 1)."""
    w = _weight_absmax(weight)
    s = act_absmax.clamp_min(1e-12).pow(alpha) / w.clamp_min(1e-12).pow(1 - alpha)
    s = torch.where((act_absmax > 0) & (w > 0), s, torch.ones_like(s))
    return s.clamp_min(_MIN_SCALE)


def scale_rows(layer: nn.Module, s: torch.Tensor) -> torch.Tensor:
    """``s`` expanded to the rows of the layer's input columns (``in_channels * kh * kw`` for a conv)."""
    if isinstance(layer, nn.Conv2d):
        return s.repeat_interleave(layer.weight[0, 0].numel())
    return s


def input_divisor(layer: nn.Module, s: torch.Tensor) -> torch.Tensor:
    """``s`` shaped to divide the layer's input (channels on dim 1 of an image, last dim otherwise)."""
    return s.reshape(1, -1, 1, 1) if isinstance(layer, nn.Conv2d) else s


def smoothed_weight(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``W diag(s)``: input channel ``j`` of the weight times ``s_j``."""
    return weight.detach() * s.reshape((1, -1) + (1,) * (weight.dim() - 2))


def outlier_table(act_absmax: dict[str, torch.Tensor], layers: dict[str, nn.Module], alpha: float):
    """Per layer: input channels, the largest / median channel maximum, top channel, and the smoothing range.

    ``outlier_ratio`` is what makes per-tensor activation quantization hard (one scale for channels
    this far apart); ``smoothed_outlier_ratio`` is the same after dividing by the factors.
    """
    import pandas as pd

    rows = []
    for name, layer in layers.items():
        amax, weight = act_absmax[name], layer.weight
        s = smoothing_scales(amax, weight, alpha)
        seen = amax[amax > 0]
        median = float(seen.median()) if seen.numel() else 0.0
        smoothed = amax / s
        smoothed_seen = smoothed[amax > 0]
        rows.append({
            "layer": name, "channels": amax.numel(), "act_max": float(amax.max()), "act_median_channel_max": median,
            "outlier_ratio": float(amax.max()) / median if median > 0 else float("nan"),
            "top_channel": int(amax.argmax()),
            "smoothed_outlier_ratio": float(smoothed_seen.max() / smoothed_seen.median()) if smoothed_seen.numel() else float("nan"),
            "weight_outlier_ratio": float(_weight_absmax(weight).max() / _weight_absmax(weight).median().clamp_min(1e-12)),
            "scale_min": float(s.min()), "scale_max": float(s.max()),
        })
    return pd.DataFrame(rows)
