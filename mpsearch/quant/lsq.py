"""LSQ: learned step size quantization (Esser et al., "Learned Step Size Quantization", ICLR 2020).

A :class:`LearnedStepQuantizer` fake-quantizes like :func:`~mpsearch.quant.primitives.fake_quantize`
but its step size (the scale) is a trainable parameter: rounding passes gradients straight
through, and the step's gradient is multiplied by ``1 / sqrt(n * qmax)`` (``n`` values per step) so
that steps and weights can share one learning rate. Zero points stay where calibration put them
(LSQ+'s learned offsets buy little for post-ReLU inputs, which are almost all we quantize).

:func:`attach_learned_quantizers` turns the fixed quantizers a :class:`QuantizedModel` holds for a
policy into learned ones, starting exactly where post-training quantization left them (the
latent weights start at the PTQ-rounded weights, so the first forward pass is the PTQ model; a
bias-corrected bias is not carried over: training fits the biases itself).
:func:`freeze_learned_quantizers` turns them back into fixed qparams and cached weights, the form
every evaluation uses.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mpsearch.quant.primitives import QParams, fake_quantize

__all__ = ["LearnedStepQuantizer", "attach_learned_quantizers", "freeze_learned_quantizers"]

_MIN_STEP = 1e-8


def _scaled_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` in the forward pass, ``factor * grad`` in the backward pass."""
    return (x - x * factor).detach() + x * factor


def _round_straight_through(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


class LearnedStepQuantizer(nn.Module):
    """A quantizer with a learned step: per tensor, or per channel along axis 0 (weights)."""

    def __init__(self, qp: QParams, values_per_step: int) -> None:
        super().__init__()
        self.step = nn.Parameter(qp.scale.detach().clone().float())
        self.register_buffer("zero_point", qp.zero_point.detach().clone().float())
        self.qmin, self.qmax, self.axis = qp.qmin, qp.qmax, qp.axis
        self.grad_factor = 1.0 / math.sqrt(max(1, values_per_step) * self.qmax)

    def _shaped(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t.reshape((-1,) + (1,) * (x.dim() - 1)) if self.axis is not None else t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = self._shaped(_scaled_gradient(self.step.abs().clamp_min(_MIN_STEP), self.grad_factor), x)
        zero = self._shaped(self.zero_point, x)
        levels = _round_straight_through(torch.clamp(x / step + zero, self.qmin, self.qmax))
        return (levels - zero) * step

    def qparams(self) -> QParams:
        """The current grid as fixed qparams (what evaluation uses after training)."""
        scale = self.step.detach().abs().clamp_min(_MIN_STEP).clone()
        return QParams(scale=scale, zero_point=self.zero_point.round().to(torch.int32), qmin=self.qmin,
                       qmax=self.qmax, axis=self.axis)

    def extra_repr(self) -> str:
        return f"levels=[{self.qmin}, {self.qmax}], per_channel={self.axis is not None}"


def attach_learned_quantizers(qmodel, sample: torch.Tensor) -> list[nn.Parameter]:
    """Give every quantized layer of ``qmodel`` (policy applied) learned quantizers.

    Each layer's float weight is overwritten by its PTQ-rounded weight (its starting point) and
    each quantizer starts at the installed scale. ``sample`` is one input batch, used to count
    activation values per image (LSQ's gradient scale). Returns the step-size parameters.
    """
    per_image: dict[str, int] = {}
    hooks = [w.register_forward_pre_hook(lambda m, a, n=n: per_image.__setitem__(n, a[0][0].numel()))
             for n, w in qmodel.wrappers.items()]
    try:
        with torch.no_grad():
            qmodel.module(sample[:1])
    finally:
        for h in hooks:
            h.remove()
    steps: list[nn.Parameter] = []
    for name, wrapper in qmodel.wrappers.items():
        if wrapper.weight_qparams is not None:
            weight = wrapper.layer.weight
            with torch.no_grad():
                weight.copy_(wrapper.quantized_weight)
            per_step = weight[0].numel() if wrapper.weight_qparams.axis is not None else weight.numel()
            wrapper.weight_quantizer = LearnedStepQuantizer(wrapper.weight_qparams, per_step)
            steps.append(wrapper.weight_quantizer.step)
        if wrapper.act_qparams is not None:
            wrapper.act_quantizer = LearnedStepQuantizer(wrapper.act_qparams, per_image.get(name, 1))
            steps.append(wrapper.act_quantizer.step)
    return steps


def freeze_learned_quantizers(qmodel) -> dict[str, tuple[tuple[QParams, torch.Tensor] | None, QParams | None]]:
    """Replace learned quantizers by fixed ones; returns ``{layer: ((weight qparams, weight), act qparams)}``."""
    frozen = {}
    for name, wrapper in qmodel.wrappers.items():
        if wrapper.weight_quantizer is None and wrapper.act_quantizer is None:
            continue
        weight = None
        if wrapper.weight_quantizer is not None:
            qp = wrapper.weight_quantizer.qparams()
            with torch.no_grad():
                weight = (qp, fake_quantize(wrapper.layer.weight.detach(), qp))
        act = wrapper.act_quantizer.qparams() if wrapper.act_quantizer is not None else None
        wrapper.weight_quantizer = wrapper.act_quantizer = None
        wrapper.set_quantizers(weight, act)
        frozen[name] = (weight, act)
    return frozen
