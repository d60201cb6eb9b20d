"""Evaluation backends: what runs a quantized layer when a candidate is measured.

``fake`` runs every layer in float32 on fake-quantized weights and inputs (the reference the
quantizers are defined by). ``int8`` runs each Conv2d / Linear whose weight and input are both
quantized on the CPU's integer kernels, oneDNN's ``qconv_pointwise`` / ``qlinear_pointwise``
(VNNI or AMX dot products): the input is quantized to its policy grid in a uint8 container, the
weight's integers (int8, zero point 0, per-channel scales) are packed once per (layer, weight
grid, input grid) and reused by every later candidate, and the kernel accumulates in int32 and
returns float32 (scales and bias applied), so the rest of the network runs as before. A layer
whose grids an int8 kernel cannot hold (asymmetric 8-bit weights, learned quantizers,
SmoothQuant divisors are fine) and the attention matmuls stay on fake quantization; the count of
integer layers is reported with every evaluation.

The integer products are exact, so the two backends differ only by float32 rounding of the
accumulated sums (the order differs): predictions agree on all but images at a near tie
(``tests/test_backends.py``; docs/backends.md measures ResNet-18 and DeiT-Tiny).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from mpsearch.errors import UserError
from mpsearch.quant.modules import QuantConv2d, QuantLinear, QuantWrapper
from mpsearch.quant.primitives import QParams
from mpsearch.registry import Registry

if TYPE_CHECKING:
    from mpsearch.quant.apply import QuantizedModel

__all__ = ["BACKENDS", "EvalBackend", "register_backend", "resolve_backend", "int8_unavailable", "batch_norm_pairs", "fold_batch_norm"]


class EvalBackend:
    """One way to run a quantized model. ``unavailable()`` is None where this machine runs it;
    ``install(qmodel)`` prepares the model for the policy just applied and returns how many
    layers run on integer kernels."""

    name: ClassVar[str]

    def unavailable(self) -> str | None:
        raise NotImplementedError

    def install(self, qmodel: QuantizedModel) -> int:
        raise NotImplementedError


BACKENDS: Registry[type[EvalBackend]] = Registry("evaluation backend")


def register_backend(name: str) -> Callable[[type[EvalBackend]], type[EvalBackend]]:
    def decorate(cls: type[EvalBackend]) -> type[EvalBackend]:
        cls.name = name
        return BACKENDS.register(name)(cls)

    return decorate


def int8_unavailable() -> str | None:
    """None if this CPU has int8 dot-product instructions and PyTorch has oneDNN's int8 kernels."""
    if not hasattr(torch.ops.onednn, "qconv_pointwise") or "onednn" not in torch.backends.quantized.supported_engines:
        return f"this PyTorch build ({torch.__version__}) has no oneDNN int8 kernels"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    if not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags):
        return "this CPU has no int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX)"
    return None


def resolve_backend(name: str) -> str:
    """``auto`` as this machine resolves it (``int8`` where :func:`int8_unavailable` allows,
    else ``fake``); any other name checked against the registry and this machine."""
    if name == "auto":
        return "int8" if int8_unavailable() is None else "fake"
    problem = BACKENDS.get(name)().unavailable()
    if problem:
        raise UserError(f"backend {name!r} cannot run here: {problem}; use --backend fake")
    return name


@register_backend("fake")
class FakeQuant(EvalBackend):
    """Every layer in float32 on fake-quantized values."""

    def unavailable(self) -> str | None:
        return None

    def install(self, qmodel: QuantizedModel) -> int:
        for wrapper in qmodel.wrappers.values():
            wrapper.kernel = None
        return 0


class _FoldableBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that passes its input through while the int8 kernel of the convolution that
    feeds it has folded it in (the kernel's scales and bias apply the normalization); otherwise,
    and whenever that layer runs in float, it normalizes as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        source = self.__dict__.get("_folded_into")  # the conv's wrapper; kept out of the module tree
        if source is not None and source.kernel is not None and source.stats is None and not source.training:
            if source.kernel.batch_norm is self:
                return x
        return super().forward(x)


def batch_norm_pairs(module: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """Convolution wrappers whose output feeds one BatchNorm2d and nothing else, from a symbolic
    trace of ``module`` (wrappers and batch norms as leaves); {} where the model does not trace."""
    from torch import fx

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, name: str) -> bool:
            return isinstance(m, (QuantWrapper, nn.BatchNorm2d)) or super().is_leaf_module(m, name)

    try:
        graph = Tracer().trace(module)
    except Exception:  # noqa: BLE001 - data-dependent control flow and the like: no folding, same numbers
        return {}
    modules = dict(module.named_modules())
    pairs = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), QuantConv2d) and len(node.users) == 1:
            user = next(iter(node.users))
            bn = modules.get(user.target) if user.op == "call_module" else None
            if type(bn) in (nn.BatchNorm2d, _FoldableBatchNorm2d) and bn.track_running_stats and len(user.args) == 1:
                pairs[node.target] = bn
    return pairs


def fold_batch_norm(qweight: torch.Tensor, w_scale: torch.Tensor, batch_norm: nn.BatchNorm2d
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """A convolution's int8 weight (zero point 0, per-channel ``w_scale``) with the batch norm that
    follows it folded in: ``bn(s_w q_w * x + b) = (s_w |k|) (sign(k) q_w) * x + (b k + shift)``.
    Returns ``(qweight, w_scale, k, shift)``, the bias becoming ``b k + shift``; None where a
    negative factor would flip a -128 (no int8 holds +128), so the batch norm stays."""
    k = (batch_norm.weight.detach() if batch_norm.affine else 1.0) / torch.sqrt(batch_norm.running_var + batch_norm.eps)
    k = torch.as_tensor(k, dtype=torch.float32).expand(w_scale.numel())
    negative = k < 0  # a negative factor flips the channel's integers, so that scales stay positive
    if negative.any():
        if bool((qweight[negative] == -128).any()):
            return None
        qweight = qweight.clone()
        qweight[negative] = -qweight[negative]
    shift = -batch_norm.running_mean * k
    if batch_norm.affine:
        shift = shift + batch_norm.bias.detach()
    return qweight, (w_scale * k.abs()).contiguous(), k, shift.float()


class _Int8Kernel:
    """One layer on oneDNN's int8 kernel: quantize the input to its grid, run, get float32 back.
    A convolution followed by a batch norm (``batch_norm``) applies it through its output scales
    and bias: ``bn(s_w s_x q_w q_x + b) = (s_w k) s_x q_w q_x + (b k + shift)``."""

    def __init__(self, wrapper: QuantWrapper, qweight: torch.Tensor, w_scale: torch.Tensor, act: QParams,
                 buffers: dict[tuple, torch.Tensor], batch_norm: nn.BatchNorm2d | None = None) -> None:
        self.buffers = buffers
        self.batch_norm, self.bn_factor, self.bn_shift = None, None, None
        folded = fold_batch_norm(qweight, w_scale, batch_norm) if batch_norm is not None else None
        if folded is not None:
            qweight, w_scale, self.bn_factor, self.bn_shift = folded
            self.batch_norm = batch_norm
        self.scale = float(act.scale)
        self.inv_scale = torch.tensor(1.0 / self.scale, dtype=torch.float32)  # what fake_quantize multiplies by
        zero_point = int(act.zero_point)
        # The grid [qmin, qmax] shifted into uint8 [0, qmax - qmin]: same levels, zero point moved.
        self.low, self.high = act.qmin - zero_point, act.qmax - zero_point
        self.zero_point = zero_point - act.qmin
        self.w_scale = w_scale
        self.w_zero_point = torch.zeros(w_scale.numel(), dtype=torch.int64)
        self.conv = isinstance(wrapper, QuantConv2d)
        if self.conv:
            layer = wrapper.layer
            self.geometry = (list(layer.stride), list(layer.padding), list(layer.dilation), layer.groups)
            self.packed = torch.ops.onednn.qconv_prepack(qweight, w_scale, self.scale, self.zero_point, *self.geometry, None)
        else:
            self.packed = torch.ops.onednn.qlinear_prepack(qweight, None)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the input grid, as uint8: fake_quantize's arithmetic (same multiplier, half-to-even
        rounding, clamp) in reused buffers, since a fresh multi-megabyte tensor per layer and batch
        costs more than the arithmetic."""
        key = (tuple(x.shape), x.stride(), torch.is_inference_mode_enabled())
        work, out = self.buffers.get(key + (torch.float32,)), self.buffers.get(key + (torch.uint8,))
        if work is None or out is None:
            work = self.buffers[key + (torch.float32,)] = torch.empty_like(x, dtype=torch.float32)
            out = self.buffers[key + (torch.uint8,)] = torch.empty_like(x, dtype=torch.uint8)
        torch.mul(x, self.inv_scale, out=work).round_().clamp_(self.low, self.high).add_(self.zero_point)
        return out.copy_(work)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.bn_factor is not None:
            bias = self.bn_shift if bias is None else bias * self.bn_factor + self.bn_shift
        if self.conv:
            x = x.contiguous(memory_format=torch.channels_last)
        q = self._quantize(x)
        if self.conv:
            stride, padding, dilation, groups = self.geometry
            return torch.ops.onednn.qconv_pointwise(q, self.scale, self.zero_point, self.packed, self.w_scale,
                                                    self.w_zero_point, bias, stride, padding, dilation, groups,
                                                    1.0, 0, torch.float32, "none", [], "")
        shape = q.shape
        out = torch.ops.onednn.qlinear_pointwise(q.reshape(-1, shape[-1]), self.scale, self.zero_point, self.packed,
                                                 self.w_scale, self.w_zero_point, bias, 1.0, 0, torch.float32,
                                                 "none", [], "")
        return out.reshape(*shape[:-1], out.shape[-1])


def _integers(weight: torch.Tensor, qp: QParams) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``weight`` (on ``qp``'s grid) as int8 integers with zero point 0 and a scale per output
    channel, or None where they do not fit int8 (asymmetric 8-bit grids)."""
    if qp.axis not in (None, 0):
        return None
    channels = weight.shape[0]
    scale = qp.scale.float().reshape(-1).expand(channels).contiguous()
    steps = torch.round(weight.detach().float() / scale.view((-1,) + (1,) * (weight.dim() - 1)))
    if weight.numel() and (float(steps.min()) < -128 or float(steps.max()) > 127):
        return None
    return steps.to(torch.int8).contiguous(), scale.clone()


@register_backend("int8")
class Int8(EvalBackend):
    """Conv2d / Linear layers with quantized weights and inputs on oneDNN int8 kernels."""

    def __init__(self) -> None:
        # (layer, weight tensor, input grid) -> kernel; the weight tensor is QuantizedModel's cached
        # one for (layer, bits), compared by identity, so a kernel is packed once per grid pair.
        self._kernels: dict[tuple, tuple[torch.Tensor, _Int8Kernel | None]] = {}
        # Input buffers shared by every kernel, by shape: a layer consumes its quantized input
        # before the next layer quantizes its own, so one set per shape suffices.
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._folds: dict[str, nn.BatchNorm2d] | None = None  # conv -> the batch norm its kernel folds in
        self._model: nn.Module | None = None  # the model the folds were found in

    def unavailable(self) -> str | None:
        return int8_unavailable()

    def _kernel(self, name: str, wrapper: QuantWrapper) -> _Int8Kernel | None:
        weight, wq, act = wrapper.quantized_weight, wrapper.weight_qparams, wrapper.act_qparams
        if (weight is None or wq is None or act is None or act.axis is not None or act.qmax - act.qmin > 255
                or wrapper.weight_quantizer is not None or wrapper.act_quantizer is not None
                or not isinstance(wrapper, (QuantConv2d, QuantLinear))):
            return None
        if isinstance(wrapper, QuantConv2d) and (wrapper.layer.padding_mode != "zeros" or isinstance(wrapper.layer.padding, str)):
            return None
        bn = self._folds.get(name) if self._folds is not None else None
        versions = tuple(t._version for t in (*bn.parameters(), *bn.buffers())) if bn is not None else ()
        key = (name, id(weight), float(act.scale), int(act.zero_point), act.qmin, act.qmax, versions)
        cached = self._kernels.get(key)
        if cached is None or cached[0] is not weight:
            integers = _integers(weight, wq)
            kernel = _Int8Kernel(wrapper, *integers, act, self._buffers, bn) if integers is not None else None
            cached = self._kernels[key] = (weight, kernel)
        return cached[1]

    def _find_folds(self, qmodel: QuantizedModel) -> dict[str, nn.BatchNorm2d]:
        """The batch norms this model's int8 convolutions fold in, made foldable (once per model)."""
        names = {id(w): n for n, w in qmodel.wrappers.items()}
        folds = {}
        for wrapper_name, bn in batch_norm_pairs(qmodel.module).items():
            wrapper = qmodel.module.get_submodule(wrapper_name)
            if id(wrapper) in names:
                if type(bn) is nn.BatchNorm2d:
                    bn.__class__ = _FoldableBatchNorm2d  # same module, parameters and state dict keys
                bn.__dict__["_folded_into"] = wrapper
                folds[names[id(wrapper)]] = bn
        return folds

    def install(self, qmodel: QuantizedModel) -> int:
        if self._folds is None or self._model is not qmodel.module:
            self._folds, self._model = self._find_folds(qmodel), qmodel.module
        count = 0
        for name, wrapper in qmodel.wrappers.items():
            wrapper.kernel = self._kernel(name, wrapper)
            count += wrapper.kernel is not None
        return count
