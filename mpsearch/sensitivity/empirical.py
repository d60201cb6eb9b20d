"""Empirical sensitivity: quantize one layer's weights, measure how far the outputs move.

For each layer and bit width ``b``, only that layer's weight is quantized to ``b`` bits
(per-channel symmetric, as policies do by default); its input activation and every other layer
stay float32. The score thus isolates weight sensitivity, the quantity the Hessian (HAWQ-V2)
score approximates to second order, and can be compared with it directly. Measured on the fixed
calibration batches against the fp32 outputs of the same images:

* ``kl``: KL(p_fp32 || p_quantized) of the softmax outputs, mean over images;
* ``loss``: mean cross-entropy of the quantized model minus that of the fp32 model (the score
  clips a decrease to 0; the raw value is kept in ``loss_increase``).

The forward passes run through a :class:`QuantizedModel` whose weight cache makes each
(layer, bits) quantization happen once (the cost is the forward passes).
"""

from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mpsearch.config import QuantConfig
from mpsearch.data import Split
from mpsearch.policy import LayerPrecision
from mpsearch.quant import QuantizedModel
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

__all__ = ["EmpiricalEstimator"]

_METRIC_COLUMN = {"kl": "kl", "loss": "loss_increase"}


@ESTIMATORS.register("empirical")
class EmpiricalEstimator(SensitivityEstimator):
    """Output change when one layer's weight alone is quantized; see the module docstring.

    Columns: ``layer, bits, score, kl`` (or ``loss_increase``) ``, weight_error, params``.
    Activation ranges are not needed (inputs stay float), so a fresh :class:`QuantizedModel` is
    not calibrated; a passed-in ``qmodel`` gets its policy (and train/eval mode) back afterwards.
    """

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
        device = next(iter(weights.values())).device
        batches = [(x.to(device), y.to(device)) for x, y in calibration_batches(calibration, config)]
        rows = []
        bar = tqdm(total=len(layers) * len(config.bits), desc="empirical sensitivity", unit="run",
                   disable=not progress, leave=False)
        with bar, probing(qm), torch.no_grad():
            qm.apply(probe_policy({}))
            # float64 log-probabilities: at 8 bits the KL is ~1e-6, below float32's resolution
            # of log p differences.
            reference = [F.log_softmax(qm(x).double(), dim=1) for x, _ in batches]
            ref_loss = self._mean_ce(reference, batches)
            for name in layers:
                for b in config.bits:
                    qm.apply(probe_policy({name: LayerPrecision(weight_bits=b, act_bits=None)}))
                    logq = [F.log_softmax(qm(x).double(), dim=1) for x, _ in batches]
                    if config.metric == "kl":
                        kl = torch.cat([(p.exp() * (p - q)).sum(dim=1) for p, q in zip(reference, logq)])
                        # Each image's KL is >= 0; a tiny negative value is rounding.
                        value = float(kl.clamp(min=0).mean())
                        score = value
                    else:
                        value = self._mean_ce(logq, batches) - ref_loss
                        score = max(value, 0.0)
                    rows.append({
                        "layer": name,
                        "bits": b,
                        "score": score,
                        _METRIC_COLUMN[config.metric]: value,
                        "weight_error": errors[(name, b)],
                        "params": weights[name].numel(),
                    })
                    bar.update(1)
        return pd.DataFrame(rows)

    @staticmethod
    def _mean_ce(log_probs: list[torch.Tensor], batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        nll = torch.cat([-lp.gather(1, y.view(-1, 1)).squeeze(1) for lp, (_, y) in zip(log_probs, batches)])
        return float(nll.mean())
