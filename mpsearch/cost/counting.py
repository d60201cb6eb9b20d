"""Count per-layer MACs, parameters and activation traffic of a PyTorch model.

The counts are the bit-width-independent half of every cost objective: :mod:`mpsearch.cost.energy`
multiplies them by per-layer bit widths. They come from one traced forward pass, so spatial and
sequence sizes are the true ones (a linear layer on a ``(B, N, C)`` token sequence costs ``N``
times a linear layer on one vector), and the attention matmuls ``q·kᵀ`` and ``attn·v`` of timm
vision transformers are counted as layers of their own, since they carry no parameters but a
large share of the arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mpsearch.errors import UserError
from mpsearch.policy import MATMUL_AV, MATMUL_QK

__all__ = ["CostTable", "LayerCost", "count_costs"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # isinstance, so timm's Conv2dSame etc. count too


@dataclass(frozen=True)
class LayerCost:
    """Bit-width-independent cost of one layer for ONE input sample.

    ``name`` is the module's fully qualified name; an attention matmul is named
    ``"<attention fqn>.matmul_qk"`` or ``"<attention fqn>.matmul_av"``. For a matmul the
    first operand (q, attn) takes the layer's activation bit width and the second (k, v) its
    weight bit width; ``input_elems`` holds both operands and ``second_operand_elems`` the
    second one, so that energy models can charge each at its own width.
    """

    name: str
    kind: str  # "conv" | "linear" | "matmul"
    macs: int
    weight_params: int
    bias_params: int
    input_elems: int
    output_elems: int
    second_operand_elems: int = 0  # matmuls only: the part of input_elems that is k or v

    @property
    def params(self) -> int:
        """Weight plus bias elements."""
        return self.weight_params + self.bias_params


@dataclass(frozen=True)
class CostTable:
    """Per-layer costs of a model in forward execution order, plus its remaining parameters.

    ``other_params`` counts every parameter that is not the weight or bias of a counted
    conv/linear layer (norm layers, position embeddings, class tokens, and layers that the
    traced forward never called); these are stored in float32.
    """

    layers: tuple[LayerCost, ...]
    other_params: int
    input_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError("CostTable layer names must be unique")

    def layer(self, name: str) -> LayerCost:
        """The layer called ``name``; KeyError lists a few known names if there is none."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        known = ", ".join(self.names[:8])
        raise KeyError(f"no layer {name!r} in the cost table (first layers: {known}, ...)")

    def __iter__(self) -> Iterator[LayerCost]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def layer_params(self) -> int:
        """Weight and bias elements of all counted layers."""
        return sum(layer.params for layer in self.layers)

    @property
    def total_params(self) -> int:
        return self.layer_params + self.other_params


def _is_attention(module: nn.Module) -> bool:
    # timm's Attention (vision_transformer, deit, beit, swin's WindowAttention ...) all expose
    # `num_heads` and a fused `qkv` projection; that is all the matmul count needs.
    return isinstance(getattr(module, "num_heads", None), int) and isinstance(
        getattr(module, "qkv", None), nn.Module
    )


def _first_tensor(inputs: Any) -> torch.Tensor:
    tensor = inputs[0] if isinstance(inputs, tuple) else inputs
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a tensor input, got {type(tensor).__name__}")
    return tensor


def _attention_costs(name: str, module: nn.Module, x: torch.Tensor) -> tuple[LayerCost, LayerCost]:
    """Costs of ``q·kᵀ`` and ``attn·v`` for an attention input ``x`` of shape (B', N, C).

    B' is 1 for a ViT at batch 1, and the number of windows for windowed attention (Swin), so
    the counts are per sample either way. The attention width is num_heads · head_dim (timm's
    ``attn_dim``) rather than C, because blocks may set ``attn_head_dim``.
    """
    if x.dim() < 3:
        raise ValueError(f"attention {name!r}: expected a (B, N, C) input, got shape {tuple(x.shape)}")
    groups = x.shape[0]
    tokens = math.prod(x.shape[1:-1])  # (B, H, W, C) layouts flatten to N = H*W
    heads = int(getattr(module, "num_heads", 0))
    head_dim = getattr(module, "head_dim", None)
    if not isinstance(head_dim, int):
        qkv = getattr(module, "qkv", None)
        head_dim = (qkv.out_features // 3 if isinstance(qkv, nn.Linear) else x.shape[-1]) // heads
    width = heads * head_dim
    scores = heads * tokens * tokens  # elements of the attention map
    macs = groups * scores * head_dim
    qk = LayerCost(
        name=f"{name}.{MATMUL_QK}",
        kind="matmul",
        macs=macs,
        weight_params=0,
        bias_params=0,
        input_elems=groups * 2 * tokens * width,  # q and k
        output_elems=groups * scores,
        second_operand_elems=groups * tokens * width,  # k
    )
    av = LayerCost(
        name=f"{name}.{MATMUL_AV}",
        kind="matmul",
        macs=macs,
        weight_params=0,
        bias_params=0,
        input_elems=groups * (scores + tokens * width),  # attn and v
        output_elems=groups * tokens * width,
        second_operand_elems=groups * tokens * width,  # v
    )
    return qk, av


def _add(a: LayerCost, b: LayerCost) -> LayerCost:
    """Merge two calls of one module: traffic and MACs add up, parameters are stored once."""
    return replace(
        a,
        macs=a.macs + b.macs,
        input_elems=a.input_elems + b.input_elems,
        output_elems=a.output_elems + b.output_elems,
        second_operand_elems=a.second_operand_elems + b.second_operand_elems,
    )


def _check_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise UserError(
            f"input shape {shape!r} is not (channels, height, width) with positive integers; "
            "pass e.g. (3, 224, 224)"
        )
    return shape[0], shape[1], shape[2]


class _Trace:
    """The layer costs the hooks record during one forward, in the order of first calls."""

    def __init__(self) -> None:
        self.costs: dict[str, LayerCost] = {}
        self.order: list[str] = []

    def record(self, cost: LayerCost, before: str | None = None) -> None:
        if cost.name in self.costs:
            self.costs[cost.name] = _add(self.costs[cost.name], cost)
            return
        self.costs[cost.name] = cost
        # Attention matmuls run between qkv and proj, but the attention module's hook fires
        # after its whole forward; slot them in front of proj if proj has already been seen.
        self.order.insert(self.order.index(before) if before in self.order else len(self.order), cost.name)

    def layer_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            x, y = _first_tensor(inputs), _first_tensor(output)
            if isinstance(module, nn.Linear):
                kind, macs = "linear", y.numel() * module.in_features
            else:
                assert isinstance(module, _CONV_TYPES)
                per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
                kind, macs = "conv", y.numel() * per_output
            bias_params = module.bias.numel() if module.bias is not None else 0
            self.record(LayerCost(name, kind, macs, module.weight.numel(), bias_params, x.numel(), y.numel()))

        return hook

    def attention_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
            x = args[0] if args else kwargs.get("x")
            proj_name = f"{name}.proj" if isinstance(getattr(module, "proj", None), nn.Module) else None
            for cost in _attention_costs(name, module, _first_tensor(x)):
                self.record(cost, before=proj_name)

        return hook


def _hook_layers(model: nn.Module, trace: _Trace) -> tuple[dict[str, nn.Module], list[RemovableHandle]]:
    """Hook ``trace`` into every conv, linear and attention module: the counted conv/linear modules by name, and the hooks."""
    counted: dict[str, nn.Module] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, *_CONV_TYPES)):
            counted[name] = module
            handles.append(module.register_forward_hook(trace.layer_hook(name)))
        elif _is_attention(module):
            handles.append(module.register_forward_hook(trace.attention_hook(name), with_kwargs=True))
    return counted, handles


def _forward_once(model: nn.Module, handles: list[RemovableHandle], shape: tuple[int, int, int], device: torch.device,
                  dtype: torch.dtype) -> None:
    """Run ``model`` once on a zero image of ``shape`` in eval mode without gradients; afterwards,
    even on error, remove ``handles`` and restore every module's training flag."""
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *shape), device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode


def count_costs(model: nn.Module, input_shape: tuple[int, int, int]) -> CostTable:
    """Trace ``model`` on one zero image of ``input_shape`` (C, H, W) and count its layer costs.

    Every ``nn.Conv1d/2d/3d`` (MACs = output elements · in_channels/groups · kernel size) and
    ``nn.Linear`` (MACs = output elements, leading/sequence dims included, · in_features),
    subclasses included, becomes a :class:`LayerCost` named by its FQN; timm attention modules
    (``num_heads`` + ``qkv``) add their two matmuls, ordered after ``qkv`` and before ``proj``.
    A module called several times in the forward is one entry whose MACs and activation
    elements are summed over its calls (its parameters are counted once); the order is that of
    first calls. Other layer types (transposed convs, norms, activations, pooling) are not
    counted: their arithmetic is small next to convs and matmuls.

    The trace runs in eval mode under ``torch.no_grad()``; every module's training flag is
    restored and all hooks are removed afterwards, even on error.
    """
    shape = _check_shape(input_shape)
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32

    trace = _Trace()
    counted, handles = _hook_layers(model, trace)
    _forward_once(model, handles, shape, device, dtype)

    # Identity, not names: tied parameters are stored once; layers never called stay "other".
    layer_param_ids = {
        id(p)
        for name, module in counted.items()
        if name in trace.costs
        for p in (module.weight, module.bias)
        if p is not None
    }
    other = sum(p.numel() for p in model.parameters() if id(p) not in layer_param_ids)
    return CostTable(layers=tuple(trace.costs[n] for n in trace.order), other_params=other, input_shape=shape)
