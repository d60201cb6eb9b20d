"""The only code that changes a model: wrap layers, calibrate once, switch policies cheaply.

``QuantizedModel(model)`` deep-copies ``model`` (the original is left untouched) and replaces each
quantizable layer, addressed by fully qualified name, with a wrapper from
:mod:`mpsearch.quant.modules`. ``calibrate(batches)`` runs the calibration split through the
float copy once and keeps per-layer input statistics. ``apply(policy)`` installs quantizers:
weights are quantized (rounded by the configured PTQ method, :mod:`mpsearch.quant.ptq`) once per
(layer, bits, granularity, symmetry) and cached, activation
ranges once per (layer, bits, symmetry), so trying many policies costs only forward passes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from mpsearch.config import QuantConfig
from mpsearch.errors import UserError
from mpsearch.policy import LayerPrecision, Policy
from mpsearch.quant.modules import QuantWrapper, wrapper_for
from mpsearch.quant.observers import ActivationStats, get_observer
from mpsearch.quant.primitives import QParams, fake_quantize, qparams_from_range
from mpsearch.quant.ptq import get_ptq, input_columns

__all__ = ["QuantizedModel", "quantizable_layers", "quantize_weight", "weight_qparams", "apply_policy"]


def quantizable_layers(model: nn.Module) -> list[str]:
    """Fully qualified names of every layer a wrapper exists for, in registration order."""
    return [name for name, m in model.named_modules() if name and wrapper_for(m) is not None]


def weight_qparams(weight: torch.Tensor, bits: int, *, per_channel: bool, symmetric: bool, observer: str) -> QParams:
    """The grid of a weight tensor (output channels on axis 0) from ``observer``'s range."""
    rows = weight.detach().reshape(weight.shape[0], -1) if per_channel else weight.detach().reshape(1, -1)
    lo, hi = get_observer(observer)(rows, bits, True, symmetric)
    if per_channel:
        return qparams_from_range(lo, hi, bits, symmetric=symmetric, signed=True, axis=0)
    return qparams_from_range(lo[0], hi[0], bits, symmetric=symmetric, signed=True)


def quantize_weight(
    weight: torch.Tensor, bits: int, *, per_channel: bool, symmetric: bool, observer: str
) -> tuple[QParams, torch.Tensor]:
    """Round-to-nearest quantization of a weight tensor; returns its qparams and the result."""
    qp = weight_qparams(weight, bits, per_channel=per_channel, symmetric=symmetric, observer=observer)
    with torch.no_grad():
        return qp, fake_quantize(weight.detach(), qp)


def _some_columns(columns: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` of the columns, drawn without replacement by ``gen`` and kept in order (all if fewer)."""
    if columns.shape[1] <= n:
        return columns
    return columns[:, torch.randperm(columns.shape[1], generator=gen)[:n].sort().values]


class QuantizedModel:
    """A quantizable copy of a model; see the module docstring."""

    def __init__(self, model: nn.Module, *, config: QuantConfig | None = None, layers: list[str] | None = None) -> None:
        self.config = config or QuantConfig()
        get_observer(self.config.weight_observer)
        get_observer(self.config.act_observer)
        self.module = copy.deepcopy(model).eval()
        available = quantizable_layers(self.module)
        self.layer_names = list(layers) if layers is not None else available
        unknown = [n for n in self.layer_names if n not in available]
        if unknown:
            raise UserError(f"layer {unknown[0]!r} is not a quantizable Conv2d/Linear of this model")
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
        self.act_stats: dict[str, ActivationStats] = {}
        self.rounding = get_ptq(self.config.ptq, seed=self.config.seed)
        self.layer_columns: dict[str, torch.Tensor] = {}  # calibration inputs as columns, for PTQ methods
        self._weight_cache: dict[tuple, tuple[QParams, torch.Tensor]] = {}
        self._act_cache: dict[tuple, QParams] = {}
        self.policy: Policy | None = None

    # -- calibration ---------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor]) -> None:
        """Observe every wrapped layer's input on ``batches`` through the float model."""
        for w in self.wrappers.values():
            w.set_quantizers(None, None)
        for i, name in enumerate(self.layer_names):
            stats = ActivationStats(max_samples=self.config.act_samples, seed=self.config.seed + i)
            self.wrappers[name].stats = stats
            self.act_stats[name] = stats
        self._act_cache.clear()
        self._weight_cache.clear()
        captured: dict[str, list[torch.Tensor]] = {name: [] for name in self.layer_names}
        hooks = []
        if self.rounding.needs_inputs:
            for i, name in enumerate(self.layer_names):
                hooks.append(self.wrappers[name].register_forward_pre_hook(self._capture(name, i, captured[name])))
        try:
            seen = 0
            for x in batches:
                self.module(x)
                seen += 1
        finally:
            for w in self.wrappers.values():
                w.stats = None
            for h in hooks:
                h.remove()
        if not seen:
            raise UserError("calibration got no data: the calibration split is empty")
        self.layer_columns = {
            name: self._sample_columns(captured[name], i) for i, name in enumerate(self.layer_names) if captured[name]
        }
        self.policy = None

    def _capture(self, name: str, index: int, store: list[torch.Tensor]):
        """A pre-hook keeping ``ptq_columns`` random input columns of each calibration batch.

        Sampling per batch keeps columns from every calibration image (neighbouring positions of a
        few images would be nearly redundant) while holding only a few thousand columns per layer.
        """
        layer = self.wrappers[name].layer
        gen = torch.Generator().manual_seed(self.config.seed * 1000 + index)

        def hook(module: nn.Module, args: tuple) -> None:
            store.append(_some_columns(input_columns(layer, args[0].detach()), self.config.ptq_columns, gen).clone())

        return hook

    def _sample_columns(self, inputs: list[torch.Tensor], index: int) -> torch.Tensor:
        """``ptq_columns`` columns drawn evenly from every batch's sample (seeded)."""
        gen = torch.Generator().manual_seed(self.config.seed * 1000 + index + 500)
        return _some_columns(torch.cat(inputs, dim=1), self.config.ptq_columns, gen).contiguous()

    @property
    def calibrated(self) -> bool:
        return bool(self.act_stats)

    # -- policies ------------------------------------------------------------------------------
    def _weight(self, name: str, spec: LayerPrecision) -> tuple[QParams, torch.Tensor] | None:
        if spec.weight_bits is None:
            return None
        key = (name, spec.weight_bits, spec.granularity, spec.symmetric, self.config.weight_observer, self.config.ptq)
        if key not in self._weight_cache:
            layer = self.wrappers[name].layer
            qp = weight_qparams(layer.weight, spec.weight_bits, per_channel=spec.granularity == "per-channel",
                                symmetric=spec.symmetric, observer=self.config.weight_observer)
            if self.rounding.needs_inputs and name not in self.layer_columns:
                raise RuntimeError(f"PTQ method {self.config.ptq!r} needs calibrate() first")
            self._weight_cache[key] = (qp, self.rounding.quantize(layer, qp, self.layer_columns.get(name)))
        return self._weight_cache[key]

    def _activation(self, name: str, spec: LayerPrecision) -> QParams | None:
        if spec.act_bits is None:
            return None
        key = (name, spec.act_bits, spec.act_symmetric, self.config.act_observer)
        if key not in self._act_cache:
            if name not in self.act_stats:
                raise RuntimeError("activation quantization needs calibrate() first")
            stats = self.act_stats[name]
            # Post-ReLU inputs get the unsigned grid (one more bit of resolution than a signed one);
            # asymmetric quantizers always use the unsigned grid with a zero point (uint8-style).
            signed = spec.act_symmetric and not stats.non_negative
            lo, hi = get_observer(self.config.act_observer)(stats.values(), spec.act_bits, signed, spec.act_symmetric)
            self._act_cache[key] = qparams_from_range(
                lo[0], hi[0], spec.act_bits, symmetric=spec.act_symmetric, signed=signed
            )
        return self._act_cache[key]

    def apply(self, policy: Policy) -> None:
        """Install ``policy``'s quantizers (cached where seen before); unlisted layers run fp32."""
        unknown = [n for n in policy.layers if n not in self.wrappers]
        if unknown:
            raise UserError(f"policy.layers.{unknown[0]}: not a quantizable layer of this model")
        for name, wrapper in self.wrappers.items():
            spec = policy.precision(name)
            wrapper.set_quantizers(self._weight(name, spec), self._activation(name, spec))
        self.policy = policy

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def clear_weight_cache(self) -> None:
        """Forget quantized weights: call after the float weights change (e.g. after training)."""
        self._weight_cache.clear()
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
