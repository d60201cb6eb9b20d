"""Attention-ranking sensitivity: how much quantizing one layer reorders the attention maps.

For vision transformers what a layer's quantization error does to attention is what matters
downstream: softmax turns the order of the scores in each row into which tokens a query
attends to (the premise of ranking-aware calibration, Liu et al., NeurIPS 2021). For each layer
and bit width ``b`` only that layer's weight is quantized to ``b`` bits (per-channel
symmetric, inputs float, like the empirical estimator), the calibration batches run, and every
attention module's probability map is compared with the fp32 one row by row with Kendall's τ
(τ-b over all key pairs of a row), on up to 512 (head, query) rows per module and calibration
batch, drawn once with ``config.seed``. The score is ``1 - mean τ`` over modules and rows: 0 when
no row changes order, up to 2 when every row is reversed.

A layer after the last attention module (the last block's MLP, the head) reorders no attention
map and scores 0: rank those with ``hessian`` or ``empirical``. Needs a model with timm
attention modules; a CNN gets one clear error.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from mpsearch.config import QuantConfig
from mpsearch.data import Split
from mpsearch.errors import UserError
from mpsearch.policy import LayerPrecision
from mpsearch.quant import QuantizedModel
from mpsearch.quant.attention import QuantAttention
from mpsearch.sensitivity.base import (
    ESTIMATORS,
    SensitivityConfig,
    SensitivityEstimator,
    calibration_batches,
    layer_weights,
    probe_model,
    probe_policy,
    probing,
    weight_errors,
)

__all__ = ["AttentionRankingEstimator", "kendall_tau_rows"]

_ROWS_PER_CHUNK = 1024  # rows compared at once: 1024 x N x N pair signs (10 MB at N = 50)
# Query rows compared per attention module and calibration batch, drawn once (seeded) and reused
# for every probe: comparing all of them (B x heads x N rows, each N^2 pairs) would cost several
# times the forward pass, and a few hundred rows already pin the mean tau closely.
_ROWS_PER_MAP = 512


def _pair_signs(rows: torch.Tensor, rel_tol: float) -> torch.Tensor:
    """sign(row[i] - row[j]) for every pair, 0 where the two are within the tolerance."""
    diff = rows.unsqueeze(-1) - rows.unsqueeze(-2)
    tol = rel_tol * rows.abs().amax(dim=-1, keepdim=True).unsqueeze(-1)
    return torch.where(diff.abs() <= tol, 0.0, torch.sign(diff))


def kendall_tau_rows(reference: torch.Tensor, other: torch.Tensor, rel_tol: float = 1e-6) -> torch.Tensor:
    """Kendall's τ-b between matching rows (last dimension) of two tensors, one value per row.

    τ-b = (concordant - discordant pairs) / sqrt(pairs untied in ``reference`` x pairs untied in
    ``other``), so a row compared with itself scores 1 even with ties (identical tokens, e.g.
    blank patches, get equal attention probabilities); a row tied throughout in both scores 1,
    in one only 0. Entries closer than ``rel_tol`` times the row's largest magnitude count as
    tied: their order is float rounding, not ranking.
    """
    if reference.shape != other.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(other.shape)}")
    n = reference.shape[-1]
    if n < 2:
        raise ValueError("Kendall's tau needs rows of at least 2 entries")
    ref, oth = reference.reshape(-1, n).float(), other.reshape(-1, n).float()
    out = torch.empty(ref.shape[0], dtype=torch.float64)
    for start in range(0, ref.shape[0], _ROWS_PER_CHUNK):
        r, o = _pair_signs(ref[start:start + _ROWS_PER_CHUNK], rel_tol), _pair_signs(oth[start:start + _ROWS_PER_CHUNK], rel_tol)
        agree = (r * o).sum(dim=(-1, -2)).double()
        untied = (r.abs().sum(dim=(-1, -2)).double() * o.abs().sum(dim=(-1, -2)).double()).sqrt()
        both_tied = (r == 0).all(dim=-1).all(dim=-1) & (o == 0).all(dim=-1).all(dim=-1)
        tau = torch.where(untied > 0, agree / untied.clamp(min=1), torch.zeros_like(agree))
        out[start:start + _ROWS_PER_CHUNK] = torch.where(both_tied, torch.ones_like(tau), tau)
    return out


@ESTIMATORS.register("attention-ranking")
class AttentionRankingEstimator(SensitivityEstimator):
    """``1 - Kendall τ`` of the attention maps with one layer's weight quantized (module doc).

    Columns: ``layer, bits, score, kendall_tau, weight_error, params``.
    """

    needs_attention = True

    def estimate(
        self,
        model: nn.Module,
        layers: list[str],
        calibration: Split,
        config: SensitivityConfig,
        *,
        quant: QuantConfig,
        qmodel: QuantizedModel | None = None,
        progress: bool = False,
    ) -> pd.DataFrame:
        weights = layer_weights(model, layers)
        errors = weight_errors(model, layers, config.bits, observer=quant.weight_observer)
        qm = probe_model(model, layers, quant, qmodel)
        attentions = _attention_modules(qm)
        device = next(iter(weights.values())).device
        batches = [x.to(device) for x, _ in calibration_batches(calibration, config)]
        attention_maps = _AttentionRows(qm, attentions, batches, seed=config.seed)

        rows = []
        bar = tqdm(total=len(layers) * len(config.bits), desc="attention-ranking sensitivity", unit="run",
                   disable=not progress, leave=False)
        with bar, probing(qm), torch.no_grad():
            qm.apply(probe_policy({}))
            reference = attention_maps()
            for name in layers:
                for b in config.bits:
                    qm.apply(probe_policy({name: LayerPrecision(weight_bits=b, act_bits=None)}))
                    tau = _mean_tau(reference, attention_maps())
                    rows.append({
                        "layer": name,
                        "bits": b,
                        "score": max(0.0, 1.0 - tau),  # rounding can put tau a hair above 1
                        "kendall_tau": tau,
                        "weight_error": errors[(name, b)],
                        "params": weights[name].numel(),
                    })
                    bar.update(1)
        return pd.DataFrame(rows)


def _attention_modules(qm: QuantizedModel) -> list[QuantAttention]:
    """The attention modules of ``qm``, in module order; a model without any is the user's error."""
    attentions = [m for m in qm.module.modules() if isinstance(m, QuantAttention)]
    if not attentions:
        raise UserError("attention-ranking sensitivity needs a model with attention (a timm ViT/DeiT); "
                        "use search.sensitivity hessian or empirical for this model", fields=("search.sensitivity",))
    return attentions


def _mean_tau(reference: list[list[torch.Tensor]], maps: list[list[torch.Tensor]]) -> float:
    """Mean Kendall τ over every compared row of every attention module and batch."""
    taus = torch.cat([
        kendall_tau_rows(ref, got)
        for ref_batch, got_batch in zip(reference, maps)
        for ref, got in zip(ref_batch, got_batch)
    ])
    return float(taus.mean())


class _AttentionRows:
    """Calling it runs the calibration batches through ``qm`` and returns, per batch, every attention
    module's probability rows for the sampled queries, in module order.

    The queries of each (batch, module) are drawn on the first call (seeded) and reused by every
    later one, so each probe compares the same rows with the reference.
    """

    def __init__(self, qm: QuantizedModel, attentions: list[QuantAttention], batches: list[torch.Tensor], *, seed: int) -> None:
        self.qm = qm
        self.attentions = attentions
        self.batches = batches
        self.picked: dict[tuple[int, int], torch.Tensor] = {}  # (batch, module) -> the query rows compared
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self) -> list[list[torch.Tensor]]:
        maps = [self._batch_rows(i, x) for i, x in enumerate(self.batches)]
        for m in self.attentions:
            m.record = None
        return maps

    def _batch_rows(self, i: int, x: torch.Tensor) -> list[torch.Tensor]:
        """Every attention module's sampled probability rows on batch ``i`` (``x``)."""
        for m in self.attentions:
            m.record = []
        self.qm(x)
        rows_of = []
        for j, m in enumerate(self.attentions):
            probs = m.record[0].reshape(-1, m.record[0].shape[-1])
            if (i, j) not in self.picked:
                count = min(_ROWS_PER_MAP, probs.shape[0])
                self.picked[i, j] = torch.randperm(probs.shape[0], generator=self.gen)[:count].sort().values
            rows_of.append(probs[self.picked[i, j]])
        return rows_of
