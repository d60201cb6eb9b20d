"""mpsearch: which bit width for which layer, answered with measured evidence.

The public API, imported lazily so that ``import mpsearch`` stays cheap (no torch until used)::

    from mpsearch import load_dataset, get_baseline, Evaluator
    data = load_dataset("fashion-mnist")
    baseline = get_baseline("resnet18", data)          # trains and caches on first use
    ev = Evaluator(baseline, data)
    print(ev.evaluate(ev.resolve_policy("w4a8"), split="test").accuracy)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "UserError": "mpsearch.errors",
    "TrainRecipe": "mpsearch.config",
    "QuantConfig": "mpsearch.config",
    "LayerPrecision": "mpsearch.policy",
    "Policy": "mpsearch.policy",
    "uniform_policy": "mpsearch.policy",
    "load_dataset": "mpsearch.data",
    "DataSplits": "mpsearch.data",
    "create_model": "mpsearch.zoo",
    "get_baseline": "mpsearch.zoo",
    "Baseline": "mpsearch.zoo",
    "QuantizedModel": "mpsearch.quant",
    "apply_policy": "mpsearch.quant",
    "count_costs": "mpsearch.cost",
    "load_profile": "mpsearch.cost",
    "Evaluator": "mpsearch.evaluate",
    "EvaluationResult": "mpsearch.evaluate",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mpsearch' has no attribute {name!r}")
