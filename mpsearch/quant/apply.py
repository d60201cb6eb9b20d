"""The only code that changes a model: wrap layers, calibrate once, switch policies cheaply.

``QuantizedModel(model)`` deep-copies ``model`` (the original is left untouched) and replaces each
quantizable layer, addressed by fully qualified name, with a wrapper from
:mod:`mpsearch.quant.modules`. ``calibrate(batches)`` runs the calibration split through the
float copy once and keeps per-layer input statistics (:mod:`mpsearch.quant.calibration`).
``apply(policy)`` installs quantizers: weights are quantized (rounded by the configured PTQ
method, :mod:`mpsearch.quant.ptq`) once per (layer, bits, granularity, symmetry) and cached,
activation ranges once per (layer, bits, symmetry), so trying many policies costs only forward
passes.

Vision transformers' timm ``Attention`` modules are swapped for
:class:`~mpsearch.quant.attention.QuantAttention`, whose two matmuls are policy layers too
(``<attention>.matmul_qk``, ``<attention>.matmul_av``); their operands are calibrated like layer
inputs, q and k optionally ranking-aware (:mod:`mpsearch.quant.qk_calibration`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from mpsearch.config import QuantConfig
from mpsearch.errors import UserError
from mpsearch.policy import MATMUL_AV, MATMUL_QK, LayerPrecision, Policy, is_matmul
from mpsearch.quant.attention import MatmulQuantizer, attention_modules, swap_attention
from mpsearch.quant.calibration import CalibratedModel
from mpsearch.quant.modules import QuantWrapper, wrapper_for
from mpsearch.quant.observers import ActivationStats, get_observer
from mpsearch.quant.primitives import QParams, qparams_from_range
from mpsearch.quant.ptq import get_ptq
from mpsearch.quant.qk_calibration import QK_CALIBRATIONS
from mpsearch.quant.smoothing import input_divisor, scale_rows, smoothed_weight
from mpsearch.quant.weights import _corrected_bias, _with_weight, weight_qparams

__all__ = ["QuantizedModel", "quantizable_layers", "quantizable_matmuls", "apply_policy"]


def quantizable_layers(model: nn.Module) -> list[str]:
    """Fully qualified names of every layer with weights a wrapper exists for, in registration order."""
    return [name for name, m in model.named_modules() if name and wrapper_for(m) is not None]


def quantizable_matmuls(model: nn.Module) -> list[str]:
    """Policy names of the attention matmuls mpsearch can quantize (q·kᵀ, then softmax·v, per module)."""
    return [f"{name}.{suffix}" for name in attention_modules(model) for suffix in (MATMUL_QK, MATMUL_AV)]


def _find_blocks(module: nn.Module, layer_names: list[str]) -> dict[str, list[str]]:
    """Blocks for block reconstruction: the members of ``nn.Sequential`` containers (residual
    stages of a ResNet, the ``blocks`` of a ViT) that hold quantizable layers, outermost first."""
    blocks: dict[str, list[str]] = {}
    for name, m in module.named_modules():
        if not isinstance(m, nn.Sequential):
            continue
        for child_name, child in m.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, (QuantWrapper, nn.Sequential)) or any(full.startswith(b + ".") for b in blocks):
                continue
            inside = [n for n in layer_names if n.startswith(full + ".")]
            if inside:
                blocks[full] = inside
    return blocks


class QuantizedModel(CalibratedModel):
    """A quantizable copy of a model; see the module docstring."""

    def __init__(self, model: nn.Module, *, config: QuantConfig | None = None, layers: list[str] | None = None) -> None:
        self.config = config or QuantConfig()
        get_observer(self.config.weight_observer)
        get_observer(self.config.act_observer)
        self.qk_calibration = QK_CALIBRATIONS.get(self.config.attention_calibration)()
        self.module = copy.deepcopy(model).eval()
        swap_attention(self.module)
        available = quantizable_layers(self.module)
        matmuls = quantizable_matmuls(self.module)
        if layers is None:  # registration order, which puts each attention's matmuls between qkv and proj
            allowed = set(available) | set(matmuls)
            layers = [name for name, _ in self.module.named_modules() if name in allowed]
        unknown = [n for n in layers if n not in available and n not in matmuls]
        if unknown:
            raise UserError(f"layer {unknown[0]!r} is not a quantizable Conv2d/Linear or attention matmul of this model")
        # Every layer a policy can address, in the order given (execution order, for an Evaluator);
        # ``layer_names`` are those with weights, ``matmul_names`` the attention matmuls.
        self.policy_layers: list[str] = list(layers)
        self.layer_names = [n for n in layers if not is_matmul(n)]
        self.matmul_names = [n for n in layers if is_matmul(n)]
        self.matmuls: dict[str, MatmulQuantizer] = {n: self.module.get_submodule(n) for n in self.matmul_names}  # type: ignore[misc]
        self.matmul_stats: dict[str, tuple[ActivationStats, ActivationStats]] = {}
        self.qk_samples: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # matmul_qk -> (q, k) samples
        self.wrappers: dict[str, QuantWrapper] = {}
        act_buffers: dict[tuple, torch.Tensor] = {}  # shared: see QuantWrapper.act_buffers
        for name in self.layer_names:
            parent_name, _, child = name.rpartition(".")
            parent = self.module.get_submodule(parent_name) if parent_name else self.module
            layer = getattr(parent, child)
            wrapper = wrapper_for(layer)(layer)  # type: ignore[misc]
            wrapper.act_buffers = act_buffers
            setattr(parent, child, wrapper)
            self.wrappers[name] = wrapper
        self.module.eval()  # the new wrappers too: eval mode uses the cached quantized weights
        self.act_stats: dict[str, ActivationStats] = {}
        self.rounding = get_ptq(self.config.ptq, seed=self.config.seed)
        self.layer_columns: dict[str, torch.Tensor] = {}  # calibration inputs as columns, for PTQ methods
        self.mean_columns: dict[str, torch.Tensor] = {}  # E[column] over all calibration inputs (bias correction)
        # SmoothQuant: per-input-channel max |x| and smoothing factors per layer, and the statistics
        # of the smoothed inputs (used for layers a policy quantizes on both sides).
        self.channel_absmax: dict[str, torch.Tensor] = {}
        self.smooth_scales: dict[str, torch.Tensor] = {}
        self.smoothed_stats: dict[str, ActivationStats] = {}
        # Block-level PTQ (BRECQ): block -> its quantizable layers, and the blocks' float inputs on
        # (the first ``block_images``) calibration images.
        self.blocks: dict[str, list[str]] = _find_blocks(self.module, self.layer_names) if self.rounding.block_level else {}
        self.block_inputs: dict[str, torch.Tensor] = {}
        if self.blocks and self.config.smoothquant_alpha is not None:
            raise UserError(f"PTQ method {self.config.ptq!r} reconstructs blocks in float; it cannot be combined with SmoothQuant")
        self._weight_cache: dict[tuple, tuple[QParams, torch.Tensor]] = {}
        self._bias_cache: dict[tuple, torch.Tensor] = {}  # same keys: bias-corrected biases
        self._act_cache: dict[tuple, Any] = {}  # QParams per layer input, (QParams, QParams) per matmul
        # Quantizers learned by QAT, used instead of calibrated ones when a policy asks for the
        # precision they were trained at: layer -> (precision, (weight qparams, weight), act qparams).
        self._pinned: dict[str, tuple[LayerPrecision, tuple[QParams, torch.Tensor] | None, QParams | None]] = {}
        self.policy: Policy | None = None

    # -- policies ------------------------------------------------------------------------------
    def _smoothed(self, name: str, spec: LayerPrecision) -> bool:
        """SmoothQuant applies where both the weight and the input of the layer are quantized."""
        return name in self.smooth_scales and spec.weight_bits is not None and spec.act_bits is not None

    def _weight_key(self, name: str, spec: LayerPrecision, context: tuple = ()) -> tuple:
        return (name, spec.weight_bits, spec.granularity, spec.symmetric, self.config.weight_observer, self.config.ptq,
                self.config.bias_correction, self._smoothed(name, spec), context)

    def _weight(self, name: str, spec: LayerPrecision, context: tuple = ()) -> tuple[QParams, torch.Tensor] | None:
        if spec.weight_bits is None:
            return None
        key = self._weight_key(name, spec, context)
        if key not in self._weight_cache:
            if context:
                raise RuntimeError(f"block of {name!r} not reconstructed for this policy")
            layer = self.wrappers[name].layer
            columns, mean = self.layer_columns.get(name), self.mean_columns.get(name)
            if self._smoothed(name, spec):  # quantize W diag(s) against inputs x / s
                s = self.smooth_scales[name]
                layer = _with_weight(layer, smoothed_weight(layer.weight, s))
                rows = scale_rows(layer, s)
                columns = columns / rows[:, None] if columns is not None else None
                mean = mean / rows if mean is not None else None
            qp = weight_qparams(layer.weight, spec.weight_bits, per_channel=spec.granularity == "per-channel",
                                symmetric=spec.symmetric, observer=self.config.weight_observer)
            if self.rounding.needs_inputs and columns is None:
                raise RuntimeError(f"PTQ method {self.config.ptq!r} needs calibrate() first")
            self._weight_cache[key] = (qp, self.rounding.quantize(layer, qp, columns))
            if self.config.bias_correction:
                if mean is None:
                    raise RuntimeError("bias correction needs calibrate() first")
                self._bias_cache[key] = _corrected_bias(layer, self._weight_cache[key][1], mean)
        return self._weight_cache[key]

    def _activation(self, name: str, spec: LayerPrecision) -> QParams | None:
        if spec.act_bits is None:
            return None
        smoothed = self._smoothed(name, spec)
        key = (name, spec.act_bits, spec.act_symmetric, self.config.act_observer, smoothed)
        if key not in self._act_cache:
            if name not in self.act_stats:
                raise RuntimeError("activation quantization needs calibrate() first")
            stats = self.smoothed_stats[name] if smoothed else self.act_stats[name]
            self._act_cache[key] = self._range_qparams(stats, spec.act_bits, spec.act_symmetric)
        return self._act_cache[key]

    def _range_qparams(self, stats: ActivationStats, bits: int, symmetric: bool) -> QParams:
        """A per-tensor grid for observed values from the activation observer's range.

        Values that are never negative (post-ReLU inputs, softmax probabilities) get the unsigned
        grid, one more bit of resolution than a signed one; asymmetric quantizers always use the
        unsigned grid with a zero point (uint8-style)."""
        signed = symmetric and not stats.non_negative
        lo, hi = get_observer(self.config.act_observer)(stats.values(), bits, signed, symmetric)
        return qparams_from_range(lo[0], hi[0], bits, symmetric=symmetric, signed=signed)

    def _matmul(self, name: str, spec: LayerPrecision) -> tuple[QParams | None, QParams | None]:
        """The qparams of a matmul's (first, second) operand: (q or probabilities, k or v)."""
        if spec.is_float:
            return None, None
        if spec.granularity != "per-tensor":
            raise UserError(f"policy.layers.{name}.granularity: attention matmul operands are quantized per tensor; "
                            "set \"per-tensor\"")
        qk = name.endswith("." + MATMUL_QK)  # q·kᵀ: its ranges come from the q/k calibration method
        key = ("matmul", name, spec.act_bits, spec.weight_bits, spec.act_symmetric, spec.symmetric,
               self.config.act_observer, self.qk_calibration.name if qk else None)
        if key not in self._act_cache:
            if name not in self.matmul_stats:
                raise RuntimeError("matmul quantization needs calibrate() first")
            first_stats, second_stats = self.matmul_stats[name]
            first = self._range_qparams(first_stats, spec.act_bits, spec.act_symmetric) if spec.act_bits else None
            second = self._range_qparams(second_stats, spec.weight_bits, spec.symmetric) if spec.weight_bits else None
            if qk and first is not None and second is not None:
                first, second = self.qk_calibration.choose(*self.qk_samples.get(name, (None, None)), first, second)
            self._act_cache[key] = (first, second)
        return self._act_cache[key]

    def apply(self, policy: Policy) -> None:
        """Install ``policy``'s quantizers (cached where seen before); unlisted layers run fp32."""
        unknown = [n for n in policy.layers if n not in self.wrappers and n not in self.matmuls]
        if unknown:
            raise UserError(f"policy.layers.{unknown[0]}: not a quantizable layer of this model")
        matmul_qparams = {name: self._matmul(name, policy.precision(name)) for name in self.matmul_names}
        for matmul in self.matmuls.values():  # float while blocks are reconstructed below
            matmul.set_quantizers(None, None)
        contexts = self._reconstruct_blocks(policy) if self.blocks else {}
        for name, wrapper in self.wrappers.items():
            spec = policy.precision(name)
            pinned = self._pinned.get(name)
            if pinned is not None and pinned[0] == spec:
                wrapper.set_quantizers(pinned[1], pinned[2])
                wrapper.input_divisor = None
            else:
                context = contexts.get(name, ())
                weight = self._weight(name, spec, context)
                bias = self._bias_cache.get(self._weight_key(name, spec, context)) if weight is not None else None
                wrapper.set_quantizers(weight, self._activation(name, spec), bias)
                smoothed = self._smoothed(name, spec)
                wrapper.input_divisor = input_divisor(wrapper.layer, self.smooth_scales[name]) if smoothed else None
        for name, (first, second) in matmul_qparams.items():
            self.matmuls[name].set_quantizers(first, second)
        self.policy = policy

    def _reconstruct_blocks(self, policy: Policy) -> dict[str, tuple]:
        """Reconstruct (or find cached) every block's weights for ``policy``; returns each block layer's cache context.

        A block's result depends on the weight precision of all its layers, so that tuple is the
        context under which its layers' weights are cached.
        """
        contexts: dict[str, tuple] = {}
        for block, layers in self.blocks.items():
            specs = {n: policy.precision(n) for n in layers}
            quantized = [n for n in layers if specs[n].weight_bits is not None and self._pinned.get(n, (None,))[0] != specs[n]]
            if not quantized:
                continue
            context = ("block", block) + tuple((n, specs[n].weight_bits, specs[n].granularity, specs[n].symmetric) for n in quantized)
            for n in quantized:
                contexts[n] = context
            if all(self._weight_key(n, specs[n], context) in self._weight_cache for n in quantized):
                continue
            if block not in self.block_inputs:
                raise RuntimeError(f"PTQ method {self.config.ptq!r} needs calibrate() first")
            grids = {n: weight_qparams(self.wrappers[n].layer.weight, specs[n].weight_bits,
                                       per_channel=specs[n].granularity == "per-channel", symmetric=specs[n].symmetric,
                                       observer=self.config.weight_observer) for n in quantized}
            for n in layers:  # the block runs in float while its rounding is learned
                self.wrappers[n].set_quantizers(None, None)
                self.wrappers[n].input_divisor = None
            weights = self.rounding.reconstruct_block(self.module.get_submodule(block), {n: self.wrappers[n] for n in layers},
                                                      grids, self.block_inputs[block], self.layer_columns)
            for n in quantized:
                key = self._weight_key(n, specs[n], context)
                self._weight_cache[key] = (grids[n], weights[n])
                if self.config.bias_correction:
                    self._bias_cache[key] = _corrected_bias(self.wrappers[n].layer, weights[n], self.mean_columns[n])
        return contexts

    def pin(
        self, name: str, spec: LayerPrecision, weight: tuple[QParams, torch.Tensor] | None, act: QParams | None
    ) -> None:
        """Use these quantizers for layer ``name`` whenever a policy gives it precision ``spec``."""
        if name not in self.wrappers:
            raise UserError(f"quantizers for {name!r}: not a quantizable layer of this model")
        self._pinned[name] = (spec, weight, act)

    def pinned(self) -> dict[str, tuple[LayerPrecision, tuple[QParams, torch.Tensor] | None, QParams | None]]:
        return dict(self._pinned)

    def float_state_dict(self) -> dict[str, torch.Tensor]:
        """The float model's state under the original module names (no wrapper level)."""
        rename = {f"{name}.layer.": f"{name}." for name in self.wrappers}
        out = {}
        for key, value in self.module.state_dict().items():
            if "_quantizer." in key:
                continue
            for wrapped, plain in rename.items():
                if key.startswith(wrapped):
                    key = plain + key[len(wrapped):]
                    break
            out[key] = value.detach().clone()
        return out

    def load_float_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the float weights (e.g. by fine-tuned ones); quantized weights are recomputed."""
        rename = {f"{name}.": f"{name}.layer." for name in self.wrappers}
        wrapped_state = {}
        for key, value in state.items():
            for plain, wrapped in rename.items():
                if key.startswith(plain) and key.count(".") == plain.count("."):
                    key = wrapped + key[len(plain):]
                    break
            wrapped_state[key] = value
        self.module.load_state_dict(wrapped_state, strict=True)
        self.clear_weight_cache()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def clear_weight_cache(self) -> None:
        """Forget quantized weights: call after the float weights change (e.g. after training)."""
        self._weight_cache.clear()
        self._bias_cache.clear()
        if self.policy is not None:
            self.apply(self.policy)

    def cache_sizes(self) -> dict[str, int]:
        return {"weights": len(self._weight_cache), "activations": len(self._act_cache)}


def apply_policy(
    model: nn.Module,
    policy: Policy,
    calibration: Iterable[torch.Tensor],
    *,
    config: QuantConfig | None = None,
) -> nn.Module:
    """One verb: a quantized copy of ``model`` running ``policy``, calibrated on ``calibration``."""
    qm = QuantizedModel(model, config=config)
    qm.calibrate(calibration)
    qm.apply(policy)
    return qm.module
