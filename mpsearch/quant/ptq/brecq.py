"""BRECQ-style block reconstruction (Li et al., "BRECQ: Pushing the Limit of Post-Training
Quantization by Block Reconstruction", ICLR 2021).

AdaRound learns each layer's rounding to reproduce that layer's output; BRECQ learns the rounding
of all layers of one block (a residual block, a transformer block) jointly to reproduce the
*block's* output, so errors of one layer can be compensated by the next one inside the block.
Here: the rectified-sigmoid rounding variables of AdaRound for every weight of the block, Adam on
the block-output MSE over calibration images (fp32 block inputs and outputs), the same annealed
regulariser, then hard rounding. With only hundreds of (not the paper's 20,000) noisy minibatch
steps affordable on a CPU, learning from scratch loses to layer-wise AdaRound's exact full-batch
objective, so the block starts from each layer's AdaRound rounding (held at h = 0.95 / 0.05,
where gradients still flow) and is refined from there; of the refined, the layer-wise and the
round-to-nearest rounding, the one with the smallest block-output error on the calibration
images is kept. Activations stay in float during reconstruction (the paper's weights-only
setting, with unweighted MSE instead of its Fisher weighting, and float instead of quantized
block inputs). Layers outside any block (stem, classifier) get layer-wise AdaRound through
:meth:`BRECQ.quantize`.

The quantizer (:mod:`mpsearch.quant.apply`) finds the blocks, keeps their calibration inputs,
and caches each block's result per bit widths of all its layers.
"""

from __future__ import annotations

import torch
from torch import nn

from mpsearch.quant.primitives import QParams
from mpsearch.quant.ptq.adaround import _GAMMA, _ZETA, AdaRound
from mpsearch.quant.ptq.base import grid_of, register_ptq, rtn_weight

# V where the rectified sigmoid is 0.95 (and -V: 0.05): close to the start, still able to move.
_V_UP = float(torch.logit(torch.tensor((0.95 - _GAMMA) / (_ZETA - _GAMMA))))


class _SoftRounding(nn.Module):
    """A layer's weight with learnable rounding: ``s * (clamp(floor(W/s) + h(V) + z) - z)``."""

    def __init__(self, weight: torch.Tensor, qp: QParams, start: torch.Tensor) -> None:
        """``start``: a rounding of ``weight`` on the grid (floor or ceiling of each value) to begin at."""
        super().__init__()
        W = weight.detach().reshape(weight.shape[0], -1).float()
        scale, zero = grid_of(qp, W.shape[0])
        self.shape, self.qmin, self.qmax = weight.shape, qp.qmin, qp.qmax
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("floor", torch.floor(W / scale))
        up = start.detach().reshape(W.shape).float() / scale > self.floor + 0.5
        self.V = nn.Parameter(torch.where(up, _V_UP, -_V_UP))
        self.hard = False

    def h(self) -> torch.Tensor:
        if self.hard:
            return (self.V >= 0).float()
        return torch.clamp(torch.sigmoid(self.V) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:  # the layer's own weight is ignored
        q = torch.clamp(self.floor + self.h() + self.zero, self.qmin, self.qmax)
        return ((q - self.zero) * self.scale).reshape(self.shape)

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


@register_ptq("brecq")
class BRECQ(AdaRound):
    """Block reconstruction: ``block_iters`` Adam steps (lr ``block_lr``) on batches of ``batch`` calibration
    images, from layer-wise AdaRound (its settings in ``adaround``)."""

    block_level = True

    def __init__(self, seed: int = 0, *, block_iters: int = 500, block_lr: float = 1e-2, batch: int = 32, **adaround) -> None:
        super().__init__(seed, **adaround)
        self.block_iters, self.block_lr, self.batch = block_iters, block_lr, batch

    def reconstruct_block(
        self,
        block: nn.Module,
        wrappers: dict[str, nn.Module],
        grids: dict[str, QParams],
        inputs: torch.Tensor,
        columns: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Hard-rounded weights of the layers in ``grids`` (wrappers inside ``block``), on their grids.

        ``inputs`` are the block's float inputs on calibration images, ``columns`` each layer's
        sampled input columns (for the layer-wise start); every wrapper of the block must run
        unquantized (no quantizers installed) when this is called.
        """
        gen = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            target = torch.cat([block(inputs[i : i + 64]) for i in range(0, len(inputs), 64)])
        layerwise = {name: super(BRECQ, self).quantize(wrappers[name].layer, qp, columns.get(name)) for name, qp in grids.items()}
        soft = {name: _SoftRounding(wrappers[name].layer.weight, qp, layerwise[name]) for name, qp in grids.items()}
        params = [m.V for m in soft.values()]
        count = sum(p.numel() for p in params)
        norm = target.pow(2).mean().clamp_min(1e-12)
        opt = torch.optim.Adam(params, lr=self.block_lr)
        warm = int(self.warmup * self.block_iters)
        try:
            for name, module in soft.items():
                wrappers[name].weight_quantizer = module
            with torch.enable_grad():
                for step in range(self.block_iters):
                    idx = torch.randint(0, len(inputs), (min(self.batch, len(inputs)),), generator=gen)
                    loss = (block(inputs[idx]) - target[idx]).pow(2).mean() / norm
                    if step >= warm:
                        beta = 20 - (20 - 2) * (step - warm) / max(1, self.block_iters - warm)
                        loss = loss + self.reg * sum(m.regularizer(beta) for m in soft.values()) / count
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            with torch.no_grad():
                for m in soft.values():
                    m.hard = True
                candidates = {"block": {name: m(None).detach().clone() for name, m in soft.items()}, "layer-wise": layerwise}
                nearest = {}
                for name, qp in grids.items():
                    W = wrappers[name].layer.weight.detach()
                    scale, zero = grid_of(qp, W.shape[0])
                    nearest[name] = rtn_weight(W.reshape(W.shape[0], -1).float(), scale, zero, qp.qmin, qp.qmax).reshape(W.shape)
                candidates["nearest"] = nearest
                errors = {}
                for label, weights in candidates.items():  # measured through the same path
                    for name in soft:
                        wrappers[name].weight_quantizer = _Fixed(weights[name])
                    errors[label] = self._block_error(block, inputs, target)
        finally:
            for name in soft:
                wrappers[name].weight_quantizer = None
        chosen = candidates[min(errors, key=errors.get)]
        self.last_errors = errors
        return {name: w.to(wrappers[name].layer.weight.dtype) for name, w in chosen.items()}

    @staticmethod
    def _block_error(block: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> float:  # summed squared error
        return float(sum((block(inputs[i : i + 64]) - target[i : i + 64]).pow(2).sum() for i in range(0, len(inputs), 64)))


class _Fixed(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.weight
