"""Kernel precisions: the registered ways to run one conv or linear layer alone on the hardware.

A *kernel precision* is a registered way to run one layer: ``fp32``, ``bf16`` and ``int8`` on
the CPU (int8 through PyTorch's x86/oneDNN quantized conv and linear: per-channel int8 weights,
per-tensor uint8 inputs on 7 bits, requantized uint8 outputs), ``fp32``, ``fp16``, ``bf16`` and ``int8``
on CUDA (int8 as the layer's integer GEMM, ``torch._int_mm`` on the im2col form; the im2col
itself and the requantization are not timed). A precision the device cannot run is skipped
with the reason, never emulated: a bf16 convolution emulated in software would time the
emulation, not the hardware.

The measured table these precisions fill lives in :mod:`mpsearch.cost.kernel_table`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from mpsearch.host.machine import native_bf16
from mpsearch.registry import Registry

__all__ = [
    "KERNELS",
    "KernelPrecision",
    "register_kernel",
]

class KernelPrecision:
    """One way to run a layer. ``skip_reason(device)`` is None where the device really runs it;
    ``build(module, x)`` returns a zero-argument callable that runs the layer once on ``x``."""

    name: ClassVar[str]

    def skip_reason(self, device: torch.device) -> str | None:
        raise NotImplementedError

    def build(self, module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
        raise NotImplementedError


KERNELS: Registry[type[KernelPrecision]] = Registry("kernel precision")


def register_kernel(name: str) -> Callable[[type[KernelPrecision]], type[KernelPrecision]]:
    def decorate(cls: type[KernelPrecision]) -> type[KernelPrecision]:
        cls.name = name
        return KERNELS.register(name)(cls)

    return decorate


def _layout(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if isinstance(module, nn.Conv2d) else x


def _float_kernel(module: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> Callable[[], object]:
    layer = _copy_layer(module).to(device=x.device, dtype=dtype)
    if isinstance(layer, nn.Conv2d):
        layer = layer.to(memory_format=torch.channels_last)
    inp = _layout(module, x.to(dtype))

    def run() -> object:
        with torch.inference_mode():
            return layer(inp)

    return run


def _copy_layer(module: nn.Module) -> nn.Module:
    """A fresh conv/linear with ``module``'s hyper-parameters and weights (the model stays untouched)."""
    if isinstance(module, nn.Conv2d):
        copy: nn.Module = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                    module.padding, module.dilation, module.groups, module.bias is not None,
                                    module.padding_mode)
    elif isinstance(module, nn.Linear):
        copy = nn.Linear(module.in_features, module.out_features, module.bias is not None)
    else:
        raise TypeError(f"kernel tables profile Conv2d and Linear layers, not {type(module).__name__}")
    copy.load_state_dict(module.state_dict())
    return copy.eval()


@register_kernel("fp32")
class Float32(KernelPrecision):
    def skip_reason(self, device: torch.device) -> str | None:
        return None

    def build(self, module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
        return _float_kernel(module, x, torch.float32)


@register_kernel("bf16")
class BFloat16(KernelPrecision):
    def skip_reason(self, device: torch.device) -> str | None:
        return native_bf16(device.type)

    def build(self, module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
        return _float_kernel(module, x, torch.bfloat16)


@register_kernel("fp16")
class Float16(KernelPrecision):
    def skip_reason(self, device: torch.device) -> str | None:
        return None if device.type == "cuda" else "fp16 convolutions on the CPU are not a deployment kernel (bf16 is)"

    def build(self, module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
        return _float_kernel(module, x, torch.float16)


def _per_channel_int8(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach().float().cpu()
    scales = (w.abs().flatten(1).amax(dim=1) / 127).clamp_min(1e-8).double()
    return torch.quantize_per_channel(w, scales, torch.zeros(len(scales), dtype=torch.long), 0, torch.qint8)


@register_kernel("int8")
class Int8(KernelPrecision):
    """CPU: PyTorch's quantized conv/linear on the x86 engine (oneDNN + FBGEMM). CUDA: the
    integer GEMM of the layer (``torch._int_mm``), operands padded to multiples of 8 as its
    kernels require."""

    def skip_reason(self, device: torch.device) -> str | None:
        if device.type == "cuda":
            return None if hasattr(torch, "_int_mm") else f"torch {torch.__version__} has no torch._int_mm"
        engines = torch.backends.quantized.supported_engines
        if "x86" not in engines and "fbgemm" not in engines and "onednn" not in engines:
            return f"this PyTorch build has no x86 quantized engine (engines: {', '.join(engines)})"
        return None

    def build(self, module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
        if x.device.type == "cuda":
            return self._cuda_gemm(module, x)
        engines = torch.backends.quantized.supported_engines
        torch.backends.quantized.engine = next(e for e in ("x86", "onednn", "fbgemm") if e in engines)
        from torch.ao.nn import quantized as nnq

        bias = module.bias.detach().float() if module.bias is not None else None
        with warnings.catch_warnings():  # torch 2.14 deprecates quantized tensors; they are still the CPU's int8 kernels
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            if isinstance(module, nn.Conv2d):
                layer: nn.Module = nnq.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                              module.padding, module.dilation, module.groups, module.bias is not None)
            else:
                layer = nnq.Linear(module.in_features, module.out_features, module.bias is not None)
            layer.set_weight_bias(_per_channel_int8(module.weight), bias)
            # Inputs on 7 bits (0..127), PyTorch's reduce_range for its x86/fbgemm qconfigs: without
            # VNNI, FBGEMM's AVX2 kernels add pairs of uint8 x int8 products in int16, which
            # saturates on full-range inputs (the layer's output was then off by up to 0.5 here).
            qx = torch.quantize_per_tensor(_layout(module, x).float(), 0.1, 64, torch.quint8)
        layer.scale, layer.zero_point = 0.05, 128  # a requantized uint8 output, as in a deployed int8 net

        def run() -> object:
            with torch.inference_mode():
                return layer(qx)

        return run

    @staticmethod
    def _cuda_gemm(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                raise _Skip("grouped convolutions have no single integer GEMM")
            cols = nn.functional.unfold(x.float(), module.kernel_size, module.dilation, module.padding, module.stride)
            a = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (batch * output pixels, in * kh * kw)
        else:
            a = x.reshape(-1, module.in_features).float()
        b = module.weight.detach().reshape(module.weight.shape[0], -1).t().float().to(x.device)

        def pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
            return nn.functional.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))

        def up8(n: int) -> int:
            return max(-(-n // 8) * 8, 8)

        m, k, n = a.shape[0], a.shape[1], b.shape[1]
        a8 = pad(a.clamp(-127, 127).round(), max(up8(m), 24), up8(k)).to(torch.int8).contiguous()
        b8 = pad(b.clamp(-127, 127).round(), up8(k), up8(n)).to(torch.int8).t().contiguous().t()  # column-major

        def run() -> object:
            return torch._int_mm(a8, b8)

        return run


class _Skip(Exception):
    """A precision cannot run this particular layer (the row is left out, with the reason)."""
