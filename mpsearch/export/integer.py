"""A fake-quantized model rewritten with integer operators, the form :mod:`mpsearch.export.onnx` exports.

Each quantized Conv2d / Linear becomes one call of a custom operator (``mpsearch::integer_conv2d``,
``mpsearch::integer_linear``) whose arguments are the layer's weights as integers on the policy's
grid (int8 containers, per-output-channel scales and zero points) and its input quantizer (scale,
zero point, integer range). Each quantized attention matmul becomes ``mpsearch::integer_matmul``.
In PyTorch the operators compute exactly what the fake-quantized layer computes (a batch norm
after a convolution folded into its scales and bias, as the int8 backend folds it); in ONNX
they become the QDQ form onnxruntime runs on integer kernels (:mod:`mpsearch.export.onnx`), a
``Clip`` keeping an input narrower than 8 bits on its own grid (a 4-bit activation stays 4-bit
inside the int8 container).

Layers whose policy quantizes only the weights keep their weights as integers behind a
``DequantizeLinear`` and run a float operator; layers quantizing only the input run a
``QuantizeLinear -> DequantizeLinear`` pair and the float layer; fp32 layers stay as they were.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mpsearch.errors import UserError
from mpsearch.quant.attention import MatmulQuantizer
from mpsearch.quant.backends import batch_norm_pairs, fold_batch_norm
from mpsearch.quant.modules import QuantConv2d, QuantLinear, QuantWrapper
from mpsearch.quant.primitives import QParams, fake_quantize

__all__ = ["IntegerInput", "to_integer_model", "integer_weight", "check_frozen", "INTEGER_OPERATORS"]

# How far a weight may sit from its grid point (relative to the step) and still be "on the grid":
# float32 rounding of q * s, nothing more.
_GRID_TOLERANCE = 1e-3
_SPREAD_MAX = 64  # the largest integer a convolution's weights are spread to (IntegerConv2d.spread)


@dataclass(frozen=True)
class IntegerInput:
    """One input quantizer as the operators take it: ``None`` scale means the input stays float."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    @classmethod
    def of(cls, qp: QParams | None) -> IntegerInput | None:
        if qp is None:
            return None
        if qp.axis is not None:
            raise UserError("export: per-channel activation quantizers have no integer kernel; use per-tensor activations")
        return cls(float(qp.scale), int(qp.zero_point), qp.qmin, qp.qmax)

    def args(self) -> tuple[float, int, int, int]:
        return self.scale, self.zero_point, self.qmin, self.qmax


_FLOAT_INPUT = (0.0, 0, 0, 0)  # the operators' encoding of "no input quantizer" (scale 0)


def _quantize_input(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """The input on its grid, dequantized: :func:`~mpsearch.quant.primitives.fake_quantize` itself."""
    if scale == 0.0:
        return x
    return fake_quantize(x, QParams(torch.tensor(scale), torch.tensor(zero_point, dtype=torch.int32), qmin, qmax))


def _dequantize_weight(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return (weight.float() - zero_point.float().view(shape)) * scale.view(shape)


# -- the operators, in PyTorch -------------------------------------------------------------------
@torch.library.custom_op("mpsearch::integer_conv2d", mutates_args=())
def integer_conv2d(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, weight_zero_point: torch.Tensor,
    bias: torch.Tensor | None, act_scale: float, act_zero_point: int, act_qmin: int, act_qmax: int,
    stride: list[int], padding: list[int], dilation: list[int], groups: int,
) -> torch.Tensor:
    xq = _quantize_input(x, act_scale, act_zero_point, act_qmin, act_qmax)
    w = _dequantize_weight(weight, weight_scale, weight_zero_point)
    return F.conv2d(xq, w, bias, stride, padding, dilation, groups)


@integer_conv2d.register_fake
def _(x, weight, weight_scale, weight_zero_point, bias, act_scale, act_zero_point, act_qmin, act_qmax, stride, padding, dilation, groups):
    return F.conv2d(x, torch.empty(weight.shape, dtype=x.dtype, device=x.device), bias, stride, padding, dilation, groups)


@torch.library.custom_op("mpsearch::integer_linear", mutates_args=())
def integer_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, weight_zero_point: torch.Tensor,
    bias: torch.Tensor | None, act_scale: float, act_zero_point: int, act_qmin: int, act_qmax: int,
) -> torch.Tensor:
    xq = _quantize_input(x, act_scale, act_zero_point, act_qmin, act_qmax)
    return F.linear(xq, _dequantize_weight(weight, weight_scale, weight_zero_point), bias)


@integer_linear.register_fake
def _(x, weight, weight_scale, weight_zero_point, bias, act_scale, act_zero_point, act_qmin, act_qmax):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("mpsearch::integer_matmul", mutates_args=())
def integer_matmul(
    a: torch.Tensor, b: torch.Tensor, a_scale: float, a_zero_point: int, a_qmin: int, a_qmax: int,
    b_scale: float, b_zero_point: int, b_qmin: int, b_qmax: int,
) -> torch.Tensor:
    return _quantize_input(a, a_scale, a_zero_point, a_qmin, a_qmax) @ _quantize_input(b, b_scale, b_zero_point, b_qmin, b_qmax)


@integer_matmul.register_fake
def _(a, b, a_scale, a_zero_point, a_qmin, a_qmax, b_scale, b_zero_point, b_qmin, b_qmax):
    return a @ b


@torch.library.custom_op("mpsearch::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    return _quantize_input(x, scale, zero_point, qmin, qmax)


@quantize_dequantize.register_fake
def _(x, scale, zero_point, qmin, qmax):
    return torch.empty_like(x)


INTEGER_OPERATORS = {
    "integer_conv2d": torch.ops.mpsearch.integer_conv2d.default,
    "integer_linear": torch.ops.mpsearch.integer_linear.default,
    "integer_matmul": torch.ops.mpsearch.integer_matmul.default,
    "quantize_dequantize": torch.ops.mpsearch.quantize_dequantize.default,
}


# -- the modules that call them ------------------------------------------------------------------
def integer_weight(weight: torch.Tensor, qp: QParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight`` (already on ``qp``'s grid) as ``(integers, scale per output channel, zero point)``.

    The integers sit in an int8 (signed grid) or uint8 (unsigned) container; the zero point is one
    value for the whole tensor, because onnxruntime's integer kernels take no per-channel zero
    points. Per-channel asymmetric grids are shifted to zero point 0 where the shifted integers
    still fit in int8 (widths up to 7 bits); 8-bit ones cannot be stored and are refused.
    """
    if qp.axis not in (None, 0):
        raise UserError(f"export: weights quantized along axis {qp.axis} have no integer kernel (per output channel only)")
    channels = weight.shape[0]
    shape = (-1,) + (1,) * (weight.dim() - 1)
    scale = qp.scale.float().reshape(-1).expand(channels).contiguous().clone()
    zero_point = qp.zero_point.reshape(-1).expand(channels)
    steps = weight.detach().float() / scale.view(shape)
    off_grid = float((steps - torch.round(steps)).abs().max()) if weight.numel() else 0.0
    if off_grid > _GRID_TOLERANCE:
        raise UserError(f"export: a quantized weight is {off_grid:.3g} steps off its grid; it cannot be stored as integers")
    q = torch.round(steps).to(torch.int32) + zero_point.view(shape)
    q = q.clamp(qp.qmin, qp.qmax)
    if bool((zero_point == zero_point[0]).all()):
        dtype = torch.int8 if qp.qmin < 0 else torch.uint8
        return q.to(dtype).contiguous(), scale, zero_point[:1].to(dtype).clone()
    shifted = q - zero_point.view(shape)
    if int(shifted.min()) < -128 or int(shifted.max()) > 127:
        raise UserError("export: per-channel asymmetric 8-bit weights do not fit an int8 kernel; "
                        "use symmetric weights (quant.weight_symmetric) or at most 7 bits")
    return shifted.to(torch.int8).contiguous(), scale, torch.zeros(1, dtype=torch.int8)


def check_frozen(wrapper: QuantWrapper) -> None:
    """Refuse a layer still holding learned (LSQ) quantizers: an export stores fixed grids."""
    if wrapper.weight_quantizer is not None or wrapper.act_quantizer is not None:
        raise UserError("export: the model still holds learned (LSQ) quantizers; freeze them first "
                        "(mpsearch.quant.lsq.freeze_learned_quantizers)")


class _IntegerLayer(nn.Module):
    """The common part of an exported Conv2d / Linear: an optional SmoothQuant divisor, the
    input quantizer, the integer weight (or the float layer where the weight stays float)."""

    def __init__(self, wrapper: QuantWrapper) -> None:
        super().__init__()
        check_frozen(wrapper)
        self.input = IntegerInput.of(wrapper.act_qparams)
        self.input_divisor = None if wrapper.input_divisor is None else wrapper.input_divisor.detach().clone()
        self.float_layer = None
        if wrapper.weight_qparams is None:
            self.float_layer = wrapper.layer
            return
        weight = wrapper.quantized_weight if wrapper.quantized_weight is not None else wrapper.current_weight()
        q, scale, zero_point = integer_weight(weight, wrapper.weight_qparams)
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zero_point)
        bias = wrapper.current_bias()
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def _input_args(self) -> tuple[float, int, int, int]:
        return self.input.args() if self.input is not None else _FLOAT_INPUT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_divisor is not None:
            x = x / self.input_divisor
        if self.float_layer is not None:
            if self.input is not None:
                x = torch.ops.mpsearch.quantize_dequantize(x, *self.input.args())
            return self.float_layer(x)
        return self.integer_forward(x)

    def integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        weight = "fp32" if self.float_layer is not None else f"int{self.weight.dtype.itemsize * 8} grid"
        act = "fp32" if self.input is None else f"[{self.input.qmin}, {self.input.qmax}]"
        return f"weight={weight}, input={act}"


class IntegerConv2d(_IntegerLayer):
    def __init__(self, wrapper: QuantConv2d) -> None:
        super().__init__(wrapper)
        conv: nn.Conv2d = wrapper.layer
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise UserError(f"export: Conv2d with padding {conv.padding!r} ({conv.padding_mode}) has no integer kernel here; "
                            "leave the layer at fp32 in the policy")
        self.stride, self.padding, self.dilation, self.groups = list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups

    @property
    def _symmetric_int8(self) -> bool:
        """Whether the weight is integers in int8 with zero point 0 (what folding and spreading keep)."""
        return self.float_layer is None and self.weight.dtype == torch.int8 and int(self.weight_zero_point.abs().max()) == 0

    def fold(self, batch_norm: nn.BatchNorm2d) -> bool:
        """Take in the batch norm that follows this layer (its weight stays on the same integers,
        its scales and bias absorb the normalization), so that the layer's output is the batch
        norm's; False where it cannot (a float or unsigned weight, a -128 to flip)."""
        if not self._symmetric_int8:
            return False
        folded = fold_batch_norm(self.weight, self.weight_scale, batch_norm)
        if folded is None:
            return False
        self.weight, self.weight_scale, factor, shift = folded
        self.bias = shift if self.bias is None else self.bias * factor + shift
        return True

    def spread(self) -> None:
        """Multiply each output channel's integers by the largest power of two that keeps them
        within +-64, dividing its scale by the same: the weights' values stay bit for bit, but
        the accumulator's step (input scale x weight scale) shrinks, and with it the rounding of
        the float bias to the int32 bias onnxruntime's ``QLinearConv`` takes for a grouped
        convolution (16 levels of a 4-bit weight become -64..56: 8 times finer). Within +-64 no pair of uint8 x int8
        products overflows int16, which AVX2 kernels without VNNI add them in."""
        if not self._symmetric_int8:
            return
        largest = self.weight.flatten(1).abs().amax(dim=1).clamp(min=1).float()
        factor = torch.exp2(torch.floor(torch.log2(_SPREAD_MAX / largest))).clamp(min=1)
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        self.weight = (self.weight.to(torch.int32) * factor.to(torch.int32).view(shape)).to(torch.int8)
        self.weight_scale = self.weight_scale / factor

    def integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mpsearch.integer_conv2d(
            x, self.weight, self.weight_scale, self.weight_zero_point, self.bias, *self._input_args(),
            self.stride, self.padding, self.dilation, self.groups,
        )


class IntegerLinear(_IntegerLayer):
    def integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mpsearch.integer_linear(
            x, self.weight, self.weight_scale, self.weight_zero_point, self.bias, *self._input_args()
        )


class IntegerMatmul(nn.Module):
    """Stands in for a :class:`MatmulQuantizer`: passes the operands through, multiplies them on integers."""

    def __init__(self, quantizer: MatmulQuantizer) -> None:
        super().__init__()
        self.first = IntegerInput.of(quantizer.first)
        self.second = IntegerInput.of(quantizer.second)

    @property
    def active(self) -> bool:
        """Whether the attention must run its matmuls here (rather than a fused float kernel)."""
        return self.first is not None or self.second is not None

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a, b

    def multiply(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.first is None or self.second is None:  # one float operand: quantize the other, multiply in float
            if self.first is not None:
                a = torch.ops.mpsearch.quantize_dequantize(a, *self.first.args())
            if self.second is not None:
                b = torch.ops.mpsearch.quantize_dequantize(b, *self.second.args())
            return a @ b
        return torch.ops.mpsearch.integer_matmul(a, b, *self.first.args(), *self.second.args())


_INTEGER_LAYERS: dict[type[QuantWrapper], type[_IntegerLayer]] = {QuantConv2d: IntegerConv2d, QuantLinear: IntegerLinear}


def to_integer_model(quantized: nn.Module) -> nn.Module:
    """A copy of ``quantized`` (a model whose policy is applied: :func:`mpsearch.quantize`'s output
    or ``QuantizedModel.module``) with every wrapper and matmul quantizer replaced by its integer
    form, and each batch norm that only a quantized convolution feeds folded into it (as the int8
    backend folds it). Runs in PyTorch (for checks) and exports to ONNX with
    :func:`mpsearch.export.export_onnx`."""
    pairs = batch_norm_pairs(quantized)
    model = copy.deepcopy(quantized).eval()
    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantWrapper):
            integer_type = _INTEGER_LAYERS.get(type(module))
            if integer_type is None:
                raise UserError(f"export: {name} ({type(module).__name__}) has no integer form; leave it at fp32 in the policy")
            replacement: nn.Module = integer_type(module)
        elif isinstance(module, MatmulQuantizer):
            replacement = IntegerMatmul(module)
        else:
            continue
        model.set_submodule(name, replacement)
        replaced += 1
    if not replaced:
        raise UserError("export: the model holds no quantized layers; pass the output of mpsearch.quantize (a policy applied)")
    modules = dict(model.named_modules())
    for conv, batch_norm in pairs.items():
        bn_name = next(name for name, module in quantized.named_modules() if module is batch_norm)
        if isinstance(modules.get(conv), IntegerConv2d) and modules[conv].fold(modules[bn_name]):
            model.set_submodule(bn_name, nn.Identity())
    for module in model.modules():
        if isinstance(module, IntegerConv2d):
            module.spread()
    return model
