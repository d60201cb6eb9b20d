"""Per-layer quantization sensitivity: which layers can take fewer bits.

One verb, one config::

    from mpsearch.sensitivity import SensitivityConfig, compute_sensitivity
    df = compute_sensitivity(model, layers, data.calibration, SensitivityConfig(estimator="hessian"),
                             quant=QuantConfig(), checkpoint_sha256=baseline.sha256)

Estimators (registered in :data:`ESTIMATORS`): ``"hessian"`` -- HAWQ-V2 scores from
Hutchinson Hessian traces; ``"empirical"`` -- output KL / loss change with one layer's weights
quantized. Results are cached per checkpoint under ``cache_root()/sensitivity``.
"""

from __future__ import annotations

from mpsearch.sensitivity.attention_ranking import AttentionRankingEstimator, kendall_tau_rows
from mpsearch.sensitivity.base import (
    ESTIMATORS,
    METRICS,
    REQUIRED_COLUMNS,
    SensitivityConfig,
    SensitivityEstimator,
    calibration_batches,
    canonical_frame,
    weight_errors,
)
from mpsearch.sensitivity.compute import compute_sensitivity, read_sensitivity, sensitivity_cache_path
from mpsearch.sensitivity.empirical import EmpiricalEstimator
from mpsearch.sensitivity.hessian import HessianEstimator, TraceEstimate, hutchinson_trace
from mpsearch.sensitivity.report import sensitivity_table, write_sensitivity

__all__ = [
    "ESTIMATORS",
    "METRICS",
    "REQUIRED_COLUMNS",
    "SensitivityConfig",
    "SensitivityEstimator",
    "HessianEstimator",
    "EmpiricalEstimator",
    "AttentionRankingEstimator",
    "kendall_tau_rows",
    "TraceEstimate",
    "hutchinson_trace",
    "calibration_batches",
    "canonical_frame",
    "weight_errors",
    "compute_sensitivity",
    "sensitivity_cache_path",
    "read_sensitivity",
    "sensitivity_table",
    "write_sensitivity",
]
