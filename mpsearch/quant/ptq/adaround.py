"""AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020).

Learns, per weight, whether to round down or up: ``Wq = s * (clamp(floor(W/s) + h(V) + z) - z)``
with the rectified sigmoid ``h`` and a regulariser that pushes ``h`` to 0 or 1 (its exponent
``beta`` annealed from 20 to 2), minimising the layer's output error ``||(W - Wq) X||²`` on
calibration inputs (layer-wise, as in the paper's main results). At the end ``h`` is rounded to
{0, 1}, so every weight is the floor or the ceiling of its scaled value; if that rounding has a
larger output error than round-to-nearest (seen on layers with a handful of inputs at 2 bits),
round-to-nearest is kept.
"""

from __future__ import annotations

import torch
from torch import nn

from mpsearch.quant.primitives import QParams
from mpsearch.quant.ptq.base import WeightRounding, grid_of, register_ptq, rtn_weight, supports

_ZETA, _GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid (the paper's values)


@register_ptq("adaround")
class AdaRound(WeightRounding):
    """Layer-wise AdaRound: ``iters`` Adam steps (lr ``lr``) on all calibration columns at once."""

    def __init__(self, seed: int = 0, *, iters: int = 1500, lr: float = 3e-2, reg: float = 0.01, warmup: float = 0.2) -> None:
        super().__init__(seed)
        self.iters, self.lr, self.reg, self.warmup = iters, lr, reg, warmup

    def quantize(self, layer: nn.Module, qp: QParams, columns: torch.Tensor | None) -> torch.Tensor:
        weight = layer.weight.detach()
        W = weight.reshape(weight.shape[0], -1).float()
        scale, zero = grid_of(qp, W.shape[0])
        if columns is None or not supports(layer):
            return rtn_weight(W, scale, zero, qp.qmin, qp.qmax).reshape(weight.shape)
        X = columns.float()
        # ||E X||² = tr(E (X Xᵀ) Eᵀ): with fewer input features than columns the Gram matrix is the
        # smaller operand (the error is the same, each step cheaper).
        if X.shape[0] < X.shape[1]:
            X = torch.linalg.cholesky(X @ X.T + 1e-8 * torch.eye(X.shape[0])).contiguous()
        floor = torch.floor(W / scale)
        rest = (W / scale - floor).clamp(1e-4, 1 - 1e-4)
        # Start at h(V) = rest, i.e. the unrounded weight; V is the inverse rectified sigmoid.
        V = (-torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1)).requires_grad_(True)
        opt = torch.optim.Adam([V], lr=self.lr)
        target = W @ X
        norm = target.pow(2).mean().clamp_min(1e-12)
        warm = int(self.warmup * self.iters)
        with torch.enable_grad():
            for step in range(self.iters):
                h = torch.clamp(torch.sigmoid(V) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)
                Wq = (torch.clamp(floor + h + zero, qp.qmin, qp.qmax) - zero) * scale
                loss = (target - Wq @ X).pow(2).mean() / norm
                if step >= warm:  # anneal beta 20 -> 2 after a warm-up without the regulariser
                    beta = 20 - (20 - 2) * (step - warm) / max(1, self.iters - warm)
                    loss = loss + self.reg * (1 - (2 * h - 1).abs().pow(beta)).sum() / h.numel()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            h = (V >= 0).float()  # h(V) >= 0.5 exactly when V >= 0
            Wq = (torch.clamp(floor + h + zero, qp.qmin, qp.qmax) - zero) * scale
            nearest = rtn_weight(W, scale, zero, qp.qmin, qp.qmax)
            # Hard rounding can land above round-to-nearest on tiny layers (a few inputs, 2 bits):
            # keep whichever has the smaller output error on the calibration inputs.
            if ((W - Wq) @ X).pow(2).sum() > ((W - nearest) @ X).pow(2).sum():
                Wq = nearest
        return Wq.to(weight.dtype).reshape(weight.shape)
