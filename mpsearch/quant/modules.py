"""Wrappers that run one Conv2d / Linear with a quantized weight and a quantized input.

A wrapper holds the original layer (parameters shared, nothing copied) and whatever quantizers
:mod:`mpsearch.quant.apply` installed: ``weight_qparams`` plus the cached quantized weight, and
``act_qparams`` for its input. With no quantizers it computes exactly what the layer computes.
In eval mode the cached weight is used as is (switching policies re-quantizes nothing); in train
mode the weight is fake-quantized on the fly so gradients flow through the straight-through
estimator. Quantization-aware training (:mod:`mpsearch.quant.lsq`) sets ``weight_quantizer`` and
``act_quantizer``, modules with learned step sizes that take precedence over the fixed qparams.
"""

from __future__ import annotations

from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from torch import nn

from mpsearch.quant.observers import ActivationStats
from mpsearch.quant.primitives import QParams, fake_quantize

__all__ = ["QuantWrapper", "QuantConv2d", "QuantLinear", "WRAPPERS", "register_wrapper", "wrapper_for"]


class QuantWrapper(nn.Module):
    """Base wrapper: input fake quantization, weight selection, calibration hook."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.weight_qparams: QParams | None = None
        self.quantized_weight: torch.Tensor | None = None
        # Bias to use with the cached quantized weight (bias correction shifts it); None: the layer's.
        self.quantized_bias: torch.Tensor | None = None
        self.act_qparams: QParams | None = None
        self.stats: ActivationStats | None = None  # set only during calibration
        # Output buffers for the input quantizer, keyed by shape, shared by every wrapper of a
        # QuantizedModel (None: allocate per call). Reusing them spares the allocator a fresh,
        # zero-filled multi-megabyte block per layer and batch; safe because a layer consumes its
        # quantized input before the next layer runs. Only used without autograd.
        self.act_buffers: dict[tuple, torch.Tensor] | None = None
        # SmoothQuant: the input is divided by this (per input channel) and the weight was
        # multiplied by it before quantization (mpsearch.quant.smoothing); None: no smoothing.
        self.input_divisor: torch.Tensor | None = None
        # Learned quantizers (QAT): modules mapping a tensor to its fake-quantized value.
        self.weight_quantizer: nn.Module | None = None
        self.act_quantizer: nn.Module | None = None
        # An integer kernel computing this layer for the installed quantizers (set by an
        # evaluation backend, mpsearch.quant.backends): called with the input and the bias in
        # eval mode; None: fake quantization in float32.
        self.kernel: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None

    def set_quantizers(
        self, weight: tuple[QParams, torch.Tensor] | None, act: QParams | None, bias: torch.Tensor | None = None
    ) -> None:
        self.weight_qparams, self.quantized_weight = weight if weight is not None else (None, None)
        self.quantized_bias = bias if weight is not None else None
        self.act_qparams = act
        self.kernel = None  # made for the previous quantizers; a backend installs the new one

    def current_bias(self) -> torch.Tensor | None:
        if self.quantized_bias is not None and not self.training and self.weight_quantizer is None:
            return self.quantized_bias
        return self.layer.bias

    def current_weight(self) -> torch.Tensor:
        if self.weight_quantizer is not None:
            return self.weight_quantizer(self.layer.weight)
        if self.weight_qparams is None:
            return self.layer.weight
        if self.training or self.quantized_weight is None:
            weight = self.layer.weight
            if self.input_divisor is not None:  # smoothed: W diag(s) (the divisor broadcasts over W's input dim)
                weight = weight * self.input_divisor
            return fake_quantize(weight, self.weight_qparams)
        return self.quantized_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_divisor is not None:
            x = x / self.input_divisor
        if self.stats is not None:
            self.stats.update(x)
        elif self.kernel is not None and not self.training:
            return self.kernel(x, self.current_bias())
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        elif self.act_qparams is not None:
            if self.act_buffers is not None and not (torch.is_grad_enabled() and x.requires_grad):
                # Tensors made under inference_mode cannot be written outside it: separate buffers.
                key = (tuple(x.shape), x.dtype, x.stride(), torch.is_inference_mode_enabled())
                x = self.act_buffers[key] = fake_quantize(x, self.act_qparams, out=self.act_buffers.get(key))
            else:
                x = fake_quantize(x, self.act_qparams)
        return self.compute(x, self.current_weight())

    def compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        w = self.weight_qparams.bits if self.weight_qparams is not None else "fp32"
        a = self.act_qparams.bits if self.act_qparams is not None else "fp32"
        return f"w={w}, a={a}"


WRAPPERS: dict[type[nn.Module], type[QuantWrapper]] = {}


def register_wrapper(layer_type: type[nn.Module]) -> Callable[[type[QuantWrapper]], type[QuantWrapper]]:
    """Register the wrapper class for a layer type; one wrapper per type."""

    def wrap(cls: type[QuantWrapper]) -> type[QuantWrapper]:
        if layer_type in WRAPPERS:
            raise ValueError(f"a wrapper for {layer_type.__name__} is already registered")
        WRAPPERS[layer_type] = cls
        return cls

    return wrap


def wrapper_for(module: nn.Module) -> type[QuantWrapper] | None:
    """The wrapper class for ``module``'s exact type (subclasses may compute differently)."""
    return WRAPPERS.get(type(module))


@register_wrapper(nn.Conv2d)
class QuantConv2d(QuantWrapper):
    def compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.layer._conv_forward(x, weight, self.current_bias())


@register_wrapper(nn.Linear)
class QuantLinear(QuantWrapper):
    def compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.current_bias())


# timm's Linear (MobileNetV3, EfficientNet and others' classifiers) is nn.Linear that casts its
# weight to the input's dtype for TorchScript: in float32 it computes exactly what nn.Linear does.
register_wrapper(timm.layers.Linear)(QuantLinear)
