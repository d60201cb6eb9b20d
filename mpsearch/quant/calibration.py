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
        for i, name in enumerate(self.layer_names):
            stats = ActivationStats(max_samples=self.config.act_samples, seed=self.config.seed + i)
            self.wrappers[name].stats = stats
            self.act_stats[name] = stats
        self.matmul_stats = {}
        qk_samples: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for i, name in enumerate(self.matmul_names):
            seed = self.config.seed + 10_000 + 2 * i
            pair = (ActivationStats(max_samples=self.config.act_samples, seed=seed),
                    ActivationStats(max_samples=self.config.act_samples, seed=seed + 1))
            self.matmuls[name].set_quantizers(None, None)
            self.matmuls[name].stats = self.matmul_stats[name] = pair
            if self.qk_calibration.needs_samples and name.endswith("." + MATMUL_QK):
                store = qk_samples[name] = []
                self.matmuls[name].hooks.append(self._keep_qk(store))
        self._act_cache.clear()
        self._weight_cache.clear()
        self._bias_cache.clear()
        captured: dict[str, list[torch.Tensor]] = {name: [] for name in self.layer_names}
        input_sums: dict[str, list] = {name: [0.0, 0] for name in self.layer_names}
        self.channel_absmax, self.smooth_scales, self.smoothed_stats = {}, {}, {}
        hooks = []
        if self.config.smoothquant_alpha is not None:
            batches = list(batches)  # two passes: channel maxima decide the factors, then statistics
            self.channel_absmax = self._channel_absmax(batches)
            for i, name in enumerate(self.layer_names):
                layer = self.wrappers[name].layer
                if isinstance(layer, nn.Conv2d) and layer.groups != 1:
                    continue  # a grouped conv's weight columns are not its input channels
                self.smooth_scales[name] = smoothing_scales(self.channel_absmax[name], layer.weight, self.config.smoothquant_alpha)
                stats = ActivationStats(max_samples=self.config.act_samples, seed=self.config.seed + i)
                self.smoothed_stats[name] = stats
                divisor = input_divisor(layer, self.smooth_scales[name])
                hooks.append(self.wrappers[name].register_forward_pre_hook(
                    lambda m, a, stats=stats, divisor=divisor: stats.update(a[0] / divisor)))
        if self.rounding.needs_inputs:
            for i, name in enumerate(self.layer_names):
                hooks.append(self.wrappers[name].register_forward_pre_hook(self._capture(name, i, captured[name])))
        if self.config.bias_correction:
            for name in self.layer_names:
                hooks.append(self.wrappers[name].register_forward_pre_hook(self._sum_inputs(input_sums[name])))
        block_inputs: dict[str, list[torch.Tensor]] = {block: [] for block in self.blocks}
        for block, store in block_inputs.items():
            hooks.append(self.module.get_submodule(block).register_forward_pre_hook(
                lambda m, a, store=store: store.append(a[0].detach().clone())
                if sum(len(t) for t in store) < self.config.block_images else None))
        try:
            seen = 0
            for x in batches:
                self.module(x)
                seen += 1
        finally:
            for w in self.wrappers.values():
                w.stats = None
            for m in self.matmuls.values():
                m.stats = None
                m.hooks.clear()
            for h in hooks:
                h.remove()
        if not seen:
            raise UserError("calibration got no data: the calibration split is empty")
        self.qk_samples = {
            name: (torch.cat([q for q, _ in store])[: self.config.qk_images], torch.cat([k for _, k in store])[: self.config.qk_images])
            for name, store in qk_samples.items() if store
        }
        self.layer_columns = {
            name: self._sample_columns(captured[name], i) for i, name in enumerate(self.layer_names) if captured[name]
        }
        self.block_inputs = {block: torch.cat(store)[: self.config.block_images] for block, store in block_inputs.items() if store}
        self.mean_columns = {}
        for name, (total, count) in input_sums.items():
            if count:
                # Columns are linear in the input, so the mean column is the columns of the mean input.
                layer = self.wrappers[name].layer
                self.mean_columns[name] = input_columns(layer, (total / count).unsqueeze(0)).mean(dim=1)
        self.policy = None

    def _channel_absmax(self, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-input-channel ``max |x|`` of every wrapped layer over ``batches`` (float model)."""
        amax: dict[str, torch.Tensor] = {}

        def hook_for(name: str, layer: nn.Module):
            def hook(module: nn.Module, args: tuple) -> None:
                m = channel_absmax(layer, args[0])
                amax[name] = m if name not in amax else torch.maximum(amax[name], m)

            return hook

        hooks = [self.wrappers[n].register_forward_pre_hook(hook_for(n, self.wrappers[n].layer)) for n in self.layer_names]
        try:
            for x in batches:
                self.module(x)
        finally:
            for h in hooks:
                h.remove()
        return amax

    def _keep_qk(self, store: list[tuple[torch.Tensor, torch.Tensor]]):
        """A matmul hook keeping q and k of the first ``qk_images`` calibration images."""

        def hook(q: torch.Tensor, k: torch.Tensor) -> None:
            if sum(len(a) for a, _ in store) < self.config.qk_images:
                store.append((q.detach().clone(), k.detach().clone()))

        return hook

    @staticmethod
    def _sum_inputs(acc: list):
        """A pre-hook adding up a layer's inputs over the batch dimension (for their mean)."""

        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            acc[0] = acc[0] + x.sum(dim=0)
            acc[1] += x.shape[0]

        return hook

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
