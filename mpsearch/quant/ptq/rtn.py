"""Round-to-nearest: each weight to its closest grid point (the baseline every method must beat)."""

from __future__ import annotations

import torch
from torch import nn

from mpsearch.quant.primitives import QParams, fake_quantize
from mpsearch.quant.ptq.base import WeightRounding, register_ptq


@register_ptq("rtn")
class RoundToNearest(WeightRounding):
    """Nearest grid point, ties to even: the smallest weight error, blind to the inputs."""

    needs_inputs = False

    def quantize(self, layer: nn.Module, qp: QParams, columns: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            return fake_quantize(layer.weight.detach(), qp)
