"""How the quantization ranges of q and k, the operands of q·kᵀ, are chosen.

Every method starts from the ranges the activation observer picked for each operand on the
calibration split and may refine them with samples of q and k (``(images, heads, tokens,
head_dim)``, q already scaled by ``head_dim ** -0.5``) taken from the same split.

- ``observer``: keep the observer's ranges, like every other layer input.
- ``ranking``: ranking-aware calibration (Liu et al., "Post-Training Quantization for Vision
  Transformer", NeurIPS 2021). What attention needs from q·kᵀ is mostly the *order* of the
  scores in each row (softmax turns it into which tokens are attended), so the ranges are
  chosen to minimise the scores' squared error (relative to their variance) plus a pairwise
  ranking loss: for every pair of keys (i, j) in a row, ``max(0, -(Ŝᵢ - Ŝⱼ)·sign(Sᵢ - Sⱼ))``
  (relative to the scores' standard deviation), the hinge of the paper with margin 0: it is
  positive exactly when quantization flips the order of a pair. Like the paper, it searches each
  operand's scale over multiples ``[0.5, 1.2]`` of the starting one, alternating between q and k.

Methods register in :data:`QK_CALIBRATIONS` and pass one contract test (tests/test_attention.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from mpsearch.quant.primitives import QParams, fake_quantize
from mpsearch.registry import Registry

__all__ = ["QK_CALIBRATIONS", "QKCalibration", "ObserverQK", "RankingAwareQK", "score_losses", "rescale"]

QK_CALIBRATIONS: Registry[type[QKCalibration]] = Registry("attention calibration method")


class QKCalibration(ABC):
    """Chooses the qparams of q and k for one attention module and one pair of bit widths."""

    name: ClassVar[str]
    needs_samples: ClassVar[bool] = False  # whether calibration must keep q/k samples for it

    @abstractmethod
    def choose(
        self, q: torch.Tensor | None, k: torch.Tensor | None, q_start: QParams, k_start: QParams
    ) -> tuple[QParams, QParams]:
        """The qparams for q and k, given samples (when ``needs_samples``) and the observer's."""


@QK_CALIBRATIONS.register("observer")
class ObserverQK(QKCalibration):
    name = "observer"

    def choose(self, q, k, q_start, k_start):
        return q_start, k_start


def rescale(qp: QParams, factor: float) -> QParams:
    """``qp`` with its step ``factor`` times larger, covering the same zero point (per tensor)."""
    return QParams(scale=qp.scale * factor, zero_point=qp.zero_point, qmin=qp.qmin, qmax=qp.qmax, axis=qp.axis)


def score_losses(reference: torch.Tensor, approx: torch.Tensor) -> tuple[float, float]:
    """(relative squared error, ranking hinge) of ``approx`` scores against ``reference``.

    Both ``(..., tokens, keys)``; pairs are the key pairs within each row. The squared error is
    divided by the variance of the reference, the hinge by its standard deviation.
    """
    ref, app = reference.float(), approx.float()
    std = float(ref.double().std()) or 1.0
    mse = float((app.double() - ref.double()).pow(2).mean()) / std**2
    order = torch.sign(ref.unsqueeze(-1) - ref.unsqueeze(-2))  # (..., tokens, keys, keys)
    kept = (app.unsqueeze(-1) - app.unsqueeze(-2)).mul_(order)
    hinge = float(torch.relu_(kept.neg_()).double().mean()) / std
    return mse, hinge


@QK_CALIBRATIONS.register("ranking")
class RankingAwareQK(QKCalibration):
    name = "ranking"
    needs_samples = True

    def __init__(self, low: float = 0.5, high: float = 1.2, candidates: int = 15, rounds: int = 2,
                 ranking_weight: float = 1.0) -> None:
        self.factors = torch.linspace(low, high, candidates).tolist()
        if 1.0 not in self.factors:  # the observer's own choice is always a candidate
            self.factors = sorted([*self.factors, 1.0])
        self.rounds = rounds
        self.ranking_weight = ranking_weight
        self.last_loss: tuple[float, float] | None = None  # (at the observer's ranges, at the chosen ones)

    def _loss(self, scores: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_qp: QParams, k_qp: QParams) -> float:
        approx = fake_quantize(q, q_qp) @ fake_quantize(k, k_qp).transpose(-2, -1)
        mse, hinge = score_losses(scores, approx)
        return mse + self.ranking_weight * hinge

    @torch.no_grad()
    def choose(self, q, k, q_start, k_start):
        if q is None or k is None:
            raise RuntimeError("ranking-aware calibration needs q/k samples from calibrate()")
        if q_start.axis is not None or k_start.axis is not None:
            raise ValueError("ranking-aware calibration chooses per-tensor scales")
        q, k = q.float(), k.float()
        scores = q @ k.transpose(-2, -1)
        fq = fk = 1.0
        start = best = self._loss(scores, q, k, q_start, k_start)
        for _ in range(self.rounds):
            for operand in ("q", "k"):
                for f in self.factors:
                    trial = (f, fk) if operand == "q" else (fq, f)
                    loss = self._loss(scores, q, k, rescale(q_start, trial[0]), rescale(k_start, trial[1]))
                    if loss < best - 1e-12:  # ties keep the earlier (smaller-change) choice
                        best, (fq, fk) = loss, trial
        self.last_loss = (start, best)
        return rescale(q_start, fq), rescale(k_start, fk)
