"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023), for Linear and Conv2d weights.

Quantizes the weight one input column at a time and spreads each column's rounding error over
the columns not yet quantized, weighted by the inverse Hessian of the layer's output error,
``H = 2 X Xᵀ`` from calibration inputs (the Optimal Brain Quantizer update). Columns are processed
in blocks with lazy updates of the rest of the matrix; with ``act_order`` the columns with the
largest Hessian diagonal go first. Convolutions use their im2col columns, so the same update
applies. The grid (per-channel scale and zero point) is the observer's; GPTQ only picks grid points.
"""

from __future__ import annotations

import torch
from torch import nn

from mpsearch.quant.primitives import QParams
from mpsearch.quant.ptq.base import WeightRounding, grid_of, register_ptq, rtn_weight, supports


@register_ptq("gptq")
class GPTQ(WeightRounding):
    """GPTQ with dampening ``damp`` (fraction of the mean Hessian diagonal), block size ``block``."""

    def __init__(self, seed: int = 0, *, damp: float = 0.01, block: int = 128, act_order: bool = True) -> None:
        super().__init__(seed)
        self.damp, self.block, self.act_order = damp, block, act_order

    @torch.no_grad()
    def quantize(self, layer: nn.Module, qp: QParams, columns: torch.Tensor | None) -> torch.Tensor:
        weight = layer.weight.detach()
        W = weight.reshape(weight.shape[0], -1).double().clone()
        rows, cols = W.shape
        scale, zero = (t.double() for t in grid_of(qp, rows))
        if columns is None or not supports(layer):
            return rtn_weight(W, scale, zero, qp.qmin, qp.qmax).to(weight.dtype).reshape(weight.shape)
        X = columns.double()
        H = 2.0 * (X @ X.T) / X.shape[1]
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
        perm = torch.argsort(torch.diag(H), descending=True, stable=True) if self.act_order else torch.arange(cols)
        W, H = W[:, perm], H[perm][:, perm]
        H += torch.eye(cols, dtype=H.dtype) * self.damp * torch.mean(torch.diag(H))
        # Upper Cholesky factor of H^-1: row i holds the OBQ update for column i given columns < i done.
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        Q = torch.zeros_like(W)
        for start in range(0, cols, self.block):
            end = min(start + self.block, cols)
            W1 = W[:, start:end].clone()
            E1 = torch.zeros_like(W1)
            Hinv1 = Hinv[start:end, start:end]
            for i in range(end - start):
                w = W1[:, i : i + 1]
                q = rtn_weight(w, scale, zero, qp.qmin, qp.qmax)
                Q[:, start + i] = q[:, 0]
                err = (w - q) / Hinv1[i, i]
                W1[:, i:] -= err @ Hinv1[i : i + 1, i:]
                E1[:, i] = err[:, 0]
            W[:, end:] -= E1 @ Hinv[start:end, end:]
        Q = Q[:, torch.argsort(perm)]
        return Q.to(weight.dtype).reshape(weight.shape)
