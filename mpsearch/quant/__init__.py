"""Fake quantization: primitives, observers, layer wrappers and the code that applies a policy."""

from mpsearch.quant.apply import QuantizedModel, apply_policy, quantizable_layers, quantizable_matmuls
from mpsearch.quant.observers import OBSERVERS, ActivationStats, get_observer, register_observer
from mpsearch.quant.primitives import QParams, fake_quantize, integer_range, qparams_from_range
from mpsearch.quant.weights import quantize_weight

__all__ = [
    "QuantizedModel",
    "apply_policy",
    "quantizable_layers",
    "quantizable_matmuls",
    "quantize_weight",
    "OBSERVERS",
    "ActivationStats",
    "get_observer",
    "register_observer",
    "QParams",
    "fake_quantize",
    "integer_range",
    "qparams_from_range",
]
