"""Calibration: one pass of the calibration split through the float model and the per-layer
statistics it collects.

:class:`CalibratedModel` is the calibration half of :class:`~mpsearch.quant.apply.QuantizedModel`
(its base class). ``calibrate(batches)`` resets every quantizer to float and observes each wrapped
layer's input (activation ranges; SmoothQuant channel maxima and factors; input columns for PTQ
methods; mean inputs for bias correction; block inputs for block reconstruction) and each attention
matmul's operands (ranges; q and k samples for ranking-aware calibration). The policy code of
:mod:`mpsearch.quant.apply` turns these statistics into quantizers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mpsearch.config import QuantConfig
from mpsearch.errors import UserError
from mpsearch.policy import MATMUL_QK, Policy
from mpsearch.quant.attention import MatmulQuantizer
from mpsearch.quant.modules import QuantWrapper
from mpsearch.quant.observers import ActivationStats
from mpsearch.quant.primitives import QParams
from mpsearch.quant.ptq import WeightRounding, input_columns
from mpsearch.quant.qk_calibration import QKCalibration
from mpsearch.quant.smoothing import channel_absmax, input_divisor, smoothing_scales

__all__ = ["CalibratedModel"]


def _some_columns(columns: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` of the columns, drawn without replacement by ``gen`` and kept in order (all if fewer)."""
    if columns.shape[1] <= n:
        return columns
    return columns[:, torch.randperm(columns.shape[1], generator=gen)[:n].sort().values]


# One collector per calibration feature: each registers the hooks of its feature (``attach``) and
# turns what they saw into that feature's statistics once the calibration pass is over.


class _QKSamples:
    """Ranking-aware calibration: q and k of the first ``qk_images`` calibration images at every q·k matmul."""

    def __init__(self, model: CalibratedModel) -> None:
        self.model = model
        self.stores: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def attach(self) -> None:
        """Adds a sample-keeping hook to every q·k matmul (when the QK calibration needs samples)."""
        for name in self.model.matmul_names:
            if self.model.qk_calibration.needs_samples and name.endswith("." + MATMUL_QK):
                store = self.stores[name] = []
                self.model.matmuls[name].hooks.append(self._keep_qk(store))

    def _keep_qk(self, store: list[tuple[torch.Tensor, torch.Tensor]]):
        """A matmul hook keeping q and k of the first ``qk_images`` calibration images."""

        def hook(q: torch.Tensor, k: torch.Tensor) -> None:
            if sum(len(a) for a, _ in store) < self.model.config.qk_images:
                store.append((q.detach().clone(), k.detach().clone()))

        return hook

    def samples(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """q·k matmul -> (q, k) of the first ``qk_images`` images, for the matmuls that saw any."""
        n = self.model.config.qk_images
        return {
            name: (torch.cat([q for q, _ in store])[:n], torch.cat([k for _, k in store])[:n])
            for name, store in self.stores.items() if store
        }


class _Smoothing:
    """SmoothQuant: per-input-channel maxima (a first pass over the batches), the smoothing factors
    they give, and the statistics of the smoothed inputs (during the calibration pass)."""

    def __init__(self, model: CalibratedModel) -> None:
        self.model = model
        self.channel_absmax: dict[str, torch.Tensor] = {}
        self.scales: dict[str, torch.Tensor] = {}
        self.stats: dict[str, ActivationStats] = {}

    def attach(self, batches: list[torch.Tensor]) -> list[RemovableHandle]:
        """Runs the first pass over ``batches``, then hooks the smoothed-input statistics on every layer smoothing applies to."""
        model, config = self.model, self.model.config
        self.channel_absmax.update(self._measure(batches))
        hooks = []
        for i, name in enumerate(model.layer_names):
            layer = model.wrappers[name].layer
            if isinstance(layer, nn.Conv2d) and layer.groups != 1:
                continue  # a grouped conv's weight columns are not its input channels
            self.scales[name] = smoothing_scales(self.channel_absmax[name], layer.weight, config.smoothquant_alpha)
            stats = ActivationStats(max_samples=config.act_samples, seed=config.seed + i)
            self.stats[name] = stats
            divisor = input_divisor(layer, self.scales[name])
            hooks.append(model.wrappers[name].register_forward_pre_hook(
                lambda m, a, stats=stats, divisor=divisor: stats.update(a[0] / divisor)))
        return hooks

    def _measure(self, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-input-channel ``max |x|`` of every wrapped layer over ``batches`` (float model)."""
        model = self.model
        amax: dict[str, torch.Tensor] = {}

        def hook_for(name: str, layer: nn.Module):
            def hook(module: nn.Module, args: tuple) -> None:
                m = channel_absmax(layer, args[0])
                amax[name] = m if name not in amax else torch.maximum(amax[name], m)

            return hook

        hooks = [model.wrappers[n].register_forward_pre_hook(hook_for(n, model.wrappers[n].layer)) for n in model.layer_names]
        try:
            for x in batches:
                model.module(x)
        finally:
            for h in hooks:
                h.remove()
        return amax


class _InputColumns:
    """PTQ methods: ``ptq_columns`` random input columns of every layer, sampled per batch and then overall."""

    def __init__(self, model: CalibratedModel) -> None:
        self.model = model
        self.captured: dict[str, list[torch.Tensor]] = {name: [] for name in model.layer_names}

    def attach(self) -> list[RemovableHandle]:
        wrappers = self.model.wrappers
        return [wrappers[name].register_forward_pre_hook(self._capture(name, i)) for i, name in enumerate(self.model.layer_names)]

    def _capture(self, name: str, index: int):
        """A pre-hook keeping ``ptq_columns`` random input columns of each calibration batch.

        Sampling per batch keeps columns from every calibration image (neighbouring positions of a
        few images would be nearly redundant) while holding only a few thousand columns per layer.
        """
        config, store = self.model.config, self.captured[name]
        layer = self.model.wrappers[name].layer
        gen = torch.Generator().manual_seed(config.seed * 1000 + index)

        def hook(module: nn.Module, args: tuple) -> None:
            store.append(_some_columns(input_columns(layer, args[0].detach()), config.ptq_columns, gen).clone())

        return hook

    def columns(self) -> dict[str, torch.Tensor]:
        """Layer -> its sampled input columns, for the layers that saw any."""
        captured = self.captured
        return {name: self._sample_columns(captured[name], i) for i, name in enumerate(self.model.layer_names) if captured[name]}

    def _sample_columns(self, inputs: list[torch.Tensor], index: int) -> torch.Tensor:
        """``ptq_columns`` columns drawn evenly from every batch's sample (seeded)."""
        config = self.model.config
        gen = torch.Generator().manual_seed(config.seed * 1000 + index + 500)
        return _some_columns(torch.cat(inputs, dim=1), config.ptq_columns, gen).contiguous()


class _MeanInputs:
    """Bias correction: every layer's mean input, as columns."""

    def __init__(self, model: CalibratedModel) -> None:
        self.model = model
        self.sums: dict[str, list] = {name: [0.0, 0] for name in model.layer_names}  # [sum over images, images]

    def attach(self) -> list[RemovableHandle]:
        return [self.model.wrappers[name].register_forward_pre_hook(self._sum_inputs(self.sums[name])) for name in self.model.layer_names]

    @staticmethod
    def _sum_inputs(acc: list):
        """A pre-hook adding up a layer's inputs over the batch dimension (for their mean)."""

        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            acc[0] = acc[0] + x.sum(dim=0)
            acc[1] += x.shape[0]

        return hook

    def columns(self) -> dict[str, torch.Tensor]:
        """Layer -> the mean of its input columns, for the layers that saw any input."""
        mean_columns = {}
        for name, (total, count) in self.sums.items():
            if count:
                # Columns are linear in the input, so the mean column is the columns of the mean input.
                layer = self.model.wrappers[name].layer
                mean_columns[name] = input_columns(layer, (total / count).unsqueeze(0)).mean(dim=1)
        return mean_columns


class _BlockInputs:
    """Block reconstruction: the inputs of the first ``block_images`` calibration images to every block."""

    def __init__(self, model: CalibratedModel) -> None:
        self.model = model
        self.stores: dict[str, list[torch.Tensor]] = {block: [] for block in model.blocks}

    def attach(self) -> list[RemovableHandle]:
        limit = self.model.config.block_images
        return [
            self.model.module.get_submodule(block).register_forward_pre_hook(
                lambda m, a, store=store: store.append(a[0].detach().clone()) if sum(len(t) for t in store) < limit else None)
            for block, store in self.stores.items()
        ]

    def inputs(self) -> dict[str, torch.Tensor]:
        """Block -> its inputs, for the blocks that saw any."""
        limit = self.model.config.block_images
        return {block: torch.cat(store)[:limit] for block, store in self.stores.items() if store}


class CalibratedModel:
    """The calibration pass of :class:`~mpsearch.quant.apply.QuantizedModel`; see the module docstring."""

    # Set up by QuantizedModel.__init__ (the wrapped model, its layers and configuration):
    config: QuantConfig
    module: nn.Module
    layer_names: list[str]
    matmul_names: list[str]
    wrappers: dict[str, QuantWrapper]
    matmuls: dict[str, MatmulQuantizer]
    qk_calibration: QKCalibration
    rounding: WeightRounding
    blocks: dict[str, list[str]]
    policy: Policy | None
    _weight_cache: dict[tuple, tuple[QParams, torch.Tensor]]
    _bias_cache: dict[tuple, torch.Tensor]
    _act_cache: dict[tuple, Any]
    # Collected by calibrate() (QuantizedModel.__init__ starts them empty, where they are described):
    act_stats: dict[str, ActivationStats]
    matmul_stats: dict[str, tuple[ActivationStats, ActivationStats]]
    qk_samples: dict[str, tuple[torch.Tensor, torch.Tensor]]
    layer_columns: dict[str, torch.Tensor]
    mean_columns: dict[str, torch.Tensor]
    channel_absmax: dict[str, torch.Tensor]
    smooth_scales: dict[str, torch.Tensor]
    smoothed_stats: dict[str, ActivationStats]
    block_inputs: dict[str, torch.Tensor]

    # -- calibration ---------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor]) -> None:
        """Observe every wrapped layer's input on ``batches`` through the float model."""
        for w in self.wrappers.values():
            w.set_quantizers(None, None)
            w.input_divisor = None
        self._observe_ranges()
        qk_samples = _QKSamples(self)
        qk_samples.attach()
        self._act_cache.clear()
        self._weight_cache.clear()
        self._bias_cache.clear()
        columns, mean_inputs, smoothing = _InputColumns(self), _MeanInputs(self), _Smoothing(self)
        # Empty without SmoothQuant; with it, smoothing.attach fills these very dicts.
        self.channel_absmax, self.smooth_scales, self.smoothed_stats = smoothing.channel_absmax, smoothing.scales, smoothing.stats
        hooks = []
        if self.config.smoothquant_alpha is not None:
            batches = list(batches)  # two passes: channel maxima decide the factors, then statistics
            hooks += smoothing.attach(batches)
        if self.rounding.needs_inputs:
            hooks += columns.attach()
        if self.config.bias_correction:
            hooks += mean_inputs.attach()
        block_inputs = _BlockInputs(self)
        hooks += block_inputs.attach()
        try:
            seen = 0
            for x in batches:
                self.module(x)
                seen += 1
        finally:
            self._stop_observing(hooks)
        if not seen:
            raise UserError("calibration got no data: the calibration split is empty")
        self.qk_samples = qk_samples.samples()
        self.layer_columns = columns.columns()
        self.block_inputs = block_inputs.inputs()
        self.mean_columns = mean_inputs.columns()
        self.policy = None

    def _observe_ranges(self) -> None:
        """Fresh range statistics on every layer's input and both operands of every attention matmul
        (the wrappers and matmuls update them as the model runs); matmuls go back to float."""
        for i, name in enumerate(self.layer_names):
            stats = ActivationStats(max_samples=self.config.act_samples, seed=self.config.seed + i)
            self.wrappers[name].stats = stats
            self.act_stats[name] = stats
        self.matmul_stats = {}
        for i, name in enumerate(self.matmul_names):
            seed = self.config.seed + 10_000 + 2 * i
            pair = (ActivationStats(max_samples=self.config.act_samples, seed=seed),
                    ActivationStats(max_samples=self.config.act_samples, seed=seed + 1))
            self.matmuls[name].set_quantizers(None, None)
            self.matmuls[name].stats = self.matmul_stats[name] = pair

    def _stop_observing(self, hooks: list[RemovableHandle]) -> None:
        """Detaches the range statistics, the matmul hooks and ``hooks``."""
        for w in self.wrappers.values():
            w.stats = None
        for m in self.matmuls.values():
            m.stats = None
            m.hooks.clear()
        for h in hooks:
            h.remove()

    @property
    def calibrated(self) -> bool:
        return bool(self.act_stats)
