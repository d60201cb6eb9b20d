"""Quantizable attention: timm's ``Attention`` with fake-quantized inputs to both matmuls.

timm computes attention with one fused ``scaled_dot_product_attention`` call, which leaves no
place to quantize ``q``, ``k``, the attention probabilities or ``v``. :class:`QuantAttention`
takes over an ``Attention`` module's submodules (so every fully qualified name stays what it was:
``blocks.0.attn.qkv`` is still ``blocks.0.attn.qkv``) and adds two :class:`MatmulQuantizer`
children, ``matmul_qk`` and ``matmul_av``, the policy layers of the two matmuls. While neither
quantizes, observes nor records anything it runs timm's fused kernel, so swapping costs nothing;
otherwise it runs the same computation explicitly with the operands fake-quantized (the fp32
outputs of the two paths agree to float rounding, tested).

What stays float32: LayerNorm, softmax, GELU, the residual additions and the q/k scaling by
``head_dim ** -0.5`` (folded into q before it is quantized, so it costs no extra rounding). The
matmul operands are quantized per tensor, with static ranges calibrated once like every other
layer input; ``q`` and the probabilities take a matmul's ``act_bits``, ``k`` and ``v`` its
``weight_bits`` (see :mod:`mpsearch.policy`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import Attention, maybe_add_mask, resolve_self_attn_mask
from torch import nn

from mpsearch.policy import MATMUL_AV, MATMUL_QK
from mpsearch.quant.observers import ActivationStats
from mpsearch.quant.primitives import QParams, fake_quantize

__all__ = ["MatmulQuantizer", "QuantAttention", "swap_attention", "attention_modules"]

# (first operand, second operand) of a matmul, as a hook sees them.
OperandHook = Callable[[torch.Tensor, torch.Tensor], None]


class MatmulQuantizer(nn.Module):
    """Fake-quantizes the two operands of one matmul; observes them during calibration.

    ``first``/``second`` are the operands' qparams (``None``: float32). ``stats`` holds an
    :class:`ActivationStats` per operand while calibration runs; ``hooks`` are called with the
    float operands (used to keep samples of q and k for ranking-aware calibration).
    """

    def __init__(self) -> None:
        super().__init__()
        self.first: QParams | None = None
        self.second: QParams | None = None
        self.stats: tuple[ActivationStats, ActivationStats] | None = None
        self.hooks: list[OperandHook] = []

    @property
    def active(self) -> bool:
        """Whether this matmul needs its operands in hand (quantizing, observing or hooked)."""
        return self.first is not None or self.second is not None or self.stats is not None or bool(self.hooks)

    def set_quantizers(self, first: QParams | None, second: QParams | None) -> None:
        self.first, self.second = first, second

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stats is not None:
            self.stats[0].update(a)
            self.stats[1].update(b)
        for hook in self.hooks:
            hook(a, b)
        if self.first is not None:
            a = fake_quantize(a, self.first)
        if self.second is not None:
            b = fake_quantize(b, self.second)
        return a, b

    def multiply(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The matmul itself, on the operands :meth:`forward` returned (``b`` transposed where the
        attention needs it). Exported models replace this module by one that runs it on integers."""
        return a @ b

    def extra_repr(self) -> str:
        bits = lambda qp: "fp32" if qp is None else qp.bits  # noqa: E731
        return f"first={bits(self.first)}, second={bits(self.second)}"


class QuantAttention(nn.Module):
    """timm ``Attention`` whose two matmuls can run on fake-quantized operands (module doc)."""

    def __init__(self, attention: Attention) -> None:
        super().__init__()
        if type(attention) is not Attention:
            raise TypeError(f"QuantAttention takes timm's Attention, got {type(attention).__name__}")
        self.num_heads = attention.num_heads
        self.head_dim = attention.head_dim
        self.attn_dim = attention.attn_dim
        self.scale = attention.scale
        self.fused_attn = attention.fused_attn
        # Registration order = execution order, so named_modules() lists the matmuls between
        # qkv and proj, where they run.
        self.qkv = attention.qkv
        self.q_norm = attention.q_norm
        self.k_norm = attention.k_norm
        setattr(self, MATMUL_QK, MatmulQuantizer())
        self.attn_drop = attention.attn_drop
        setattr(self, MATMUL_AV, MatmulQuantizer())
        self.norm = attention.norm
        self.gate = attention.gate
        self.proj = attention.proj
        self.proj_drop = attention.proj_drop
        # A list to append each forward's attention probabilities (B, heads, N, N) to, detached;
        # None: not recorded. Attention-ranking sensitivity compares these maps.
        self.record: list[torch.Tensor] | None = None
        self.train(attention.training)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        qk, av = getattr(self, MATMUL_QK), getattr(self, MATMUL_AV)
        if self.fused_attn and not (qk.active or av.active or self.record is not None):
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0, is_causal=is_causal
            )
        else:
            q, k = qk(q * self.scale, k)
            attn = qk.multiply(q, k.transpose(-2, -1))
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
            attn = attn.softmax(dim=-1)
            if self.record is not None:
                self.record.append(attn.detach())
            attn = self.attn_drop(attn)
            attn, v = av(attn, v)
            x = av.multiply(attn, v)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        return self.proj_drop(x)


def attention_modules(model: nn.Module) -> list[str]:
    """Names of the attention modules of ``model`` whose matmuls mpsearch can quantize."""
    return [name for name, m in model.named_modules() if name and type(m) in (Attention, QuantAttention)]


def swap_attention(model: nn.Module) -> dict[str, QuantAttention]:
    """Replace every timm ``Attention`` in ``model`` (in place) by a :class:`QuantAttention`."""
    swapped: dict[str, QuantAttention] = {}
    for name in attention_modules(model):
        module = model.get_submodule(name)
        if isinstance(module, QuantAttention):
            swapped[name] = module
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        quantizable = QuantAttention(module)  # type: ignore[arg-type]
        setattr(parent, child, quantizable)
        swapped[name] = quantizable
    return swapped
