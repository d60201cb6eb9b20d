"""mpsearch: which bit width for which layer, answered with measured evidence.

The public API, imported lazily so that ``import mpsearch`` stays cheap (no torch until used)::

    import mpsearch
    result = mpsearch.search(model, data, budget=200)   # an nn.Module or a timm name; every candidate measured
    policy = result.pick("knee")                        # a per-layer Policy from the measured front
    qmodel = mpsearch.quantize(model, policy, data)     # a fake-quantized copy of the model

``make_data`` builds ``data`` from your own tensors, Datasets or DataLoaders; ``load_dataset``
loads a bundled one. Messages go through the standard ``logging`` module (logger ``mpsearch``,
quieted with ``mpsearch.set_verbosity(logging.WARNING)``).
"""

from __future__ import annotations

import importlib
from typing import Any

from mpsearch.log import set_verbosity

__version__ = "0.1.0"

# The front door: what most users need. Everything else is imported from its package
# (mpsearch.config, mpsearch.policy, mpsearch.quant, mpsearch.cost, mpsearch.models, ...).
_EXPORTS = {
    "search": "mpsearch.api",
    "quantize": "mpsearch.api",
    "export_onnx": "mpsearch.api",
    "export_pt2e": "mpsearch.api",
    "SearchResult": "mpsearch.study",
    "load_result": "mpsearch.study",
    "make_data": "mpsearch.data",
    "load_dataset": "mpsearch.data",
    "get_baseline": "mpsearch.models.zoo",
    "Evaluator": "mpsearch.evaluation.evaluator",
    "Policy": "mpsearch.policy",
    "StudyConfig": "mpsearch.config",
    "UserError": "mpsearch.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__", "set_verbosity"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mpsearch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
