"""The weight-rounding contract, its registry, and the layer inputs methods learn from."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from mpsearch.quant.primitives import QParams
from mpsearch.registry import Registry

__all__ = ["WeightRounding", "PTQ_METHODS", "register_ptq", "get_ptq", "input_columns", "rtn_weight", "grid_of"]


class WeightRounding(ABC):
    """Puts one layer's weight on a given grid.

    :meth:`quantize` is called once per (layer, bits, granularity, symmetry) by the quantizer,
    with the grid ``qp`` (per output channel, ``axis=0``, or per tensor) and, when
    ``needs_inputs``, the layer's calibration inputs as columns (``(in_features, n)``, see
    :func:`input_columns`). It returns a tensor shaped like the weight whose every value lies on
    the grid. Results must be deterministic given the inputs and ``seed``.
    """

    name: ClassVar[str]
    needs_inputs: ClassVar[bool] = True
    # Block-level methods also implement ``reconstruct_block(block, wrappers, grids, inputs)``:
    # the quantizer hands them each block's calibration inputs and uses :meth:`quantize` only for
    # layers outside blocks (mpsearch.quant.ptq.brecq).
    block_level: ClassVar[bool] = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    @abstractmethod
    def quantize(self, layer: nn.Module, qp: QParams, columns: torch.Tensor | None) -> torch.Tensor:
        """The layer's weight on ``qp``'s grid."""


PTQ_METHODS: Registry[type[WeightRounding]] = Registry("PTQ method")
M = TypeVar("M", bound="type[WeightRounding]")


def register_ptq(name: str) -> Callable[[M], M]:
    def decorate(cls: M) -> M:
        cls.name = name
        return PTQ_METHODS.register(name)(cls)

    return decorate


def get_ptq(name: str, seed: int = 0) -> WeightRounding:
    return PTQ_METHODS.get(name)(seed=seed)


def grid_of(qp: QParams, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point of ``qp`` as ``(rows, 1)`` float columns (per-tensor broadcast)."""
    shape = (-1, 1) if qp.axis is not None else (1, 1)
    return qp.scale.float().reshape(shape).expand(rows, 1), qp.zero_point.float().reshape(shape).expand(rows, 1)


def rtn_weight(w2d: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Round-to-nearest onto the grid, rows of ``w2d`` with their own scale and zero point."""
    return (torch.clamp(torch.round(w2d / scale) + zero, qmin, qmax) - zero) * scale


def input_columns(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as the columns its weight multiplies: ``(in_features, positions)``.

    A Conv2d is a matrix product of its weight ``(out, in*kh*kw)`` with the unfolded input
    (im2col), so output errors of both layer types are ``(W - Wq) @ columns``.
    """
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        return cols.transpose(0, 1).reshape(cols.shape[1], -1)
    return x.reshape(-1, x.shape[-1]).T


def supports(layer: nn.Module) -> bool:
    """Layers the input-driven methods handle (grouped convolutions fall back to round-to-nearest)."""
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1)
