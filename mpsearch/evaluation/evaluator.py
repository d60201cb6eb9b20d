"""Measure a policy: run the quantized model for real and price it with the cost model.

An :class:`Evaluator` holds one baseline, its data, a calibrated :class:`QuantizedModel` and the
model's cost table; :meth:`Evaluator.evaluate` measures any number of policies against it. The
fp32 model runs on the same images, so the accuracy drop comes with a paired confidence interval.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpsearch.config import QuantConfig
from mpsearch.cost import CostTable, bops, count_costs, energy, fp32_energy, load_profile, size_bytes
from mpsearch.data import DataSplits
from mpsearch.errors import UserError
from mpsearch.evaluation.metrics import correct_mask, paired_difference_ci, wilson_interval
from mpsearch.evaluation.prefix_cache import PrefixCache
from mpsearch.models.zoo import Baseline
from mpsearch.policy import Policy, is_shorthand, uniform_policy
from mpsearch.quant import QuantizedModel, quantizable_layers, quantizable_matmuls
from mpsearch.quant.backends import BACKENDS, resolve_backend

__all__ = ["DEFAULT_PROFILES", "PolicyCosts", "EvaluationResult", "Evaluator", "policy_costs", "policy_layers",
           "architecture_fingerprint"]

DEFAULT_PROFILES = ("horowitz45nm", "seed-lab4")


@dataclass(frozen=True)
class PolicyCosts:
    """Modeled cost of a policy and of the fp32 model, per input sample."""

    size_bytes: float
    fp32_size_bytes: float
    bops: float
    fp32_bops: float
    energy: dict[str, float]  # profile -> total
    fp32_energy: dict[str, float]
    energy_units: dict[str, str]

    def relative(self) -> dict[str, float]:
        """Each objective as a fraction of its fp32 value."""
        out = {"size": self.size_bytes / self.fp32_size_bytes, "bops": self.bops / self.fp32_bops}
        for name, value in self.energy.items():
            out[f"energy_{name}"] = value / self.fp32_energy[name]
        return out


def policy_costs(table: CostTable, policy: Policy, profiles: tuple[str, ...] = DEFAULT_PROFILES) -> PolicyCosts:
    bits = policy.bits()
    loaded = [load_profile(p) for p in profiles]
    return PolicyCosts(
        size_bytes=size_bytes(table, bits),
        fp32_size_bytes=size_bytes(table, {}),
        bops=bops(table, bits),
        fp32_bops=bops(table, {}),
        energy={p.name: energy(table, bits, p).total for p in loaded},
        fp32_energy={p.name: fp32_energy(table, p).total for p in loaded},
        energy_units={p.name: p.units for p in loaded},
    )


def policy_layers(model: nn.Module, table: CostTable) -> list[str]:
    """Every layer a policy can address, in the order the traced forward pass runs them, so
    that "first" and "last" layer mean what they say for any architecture."""
    wrappable = set(quantizable_layers(model)) | set(quantizable_matmuls(model))
    return [name for name in table.names if name in wrappable]


def architecture_fingerprint(model: nn.Module, layers: list[str]) -> str:
    """sha256 of the policy layers' names, kinds and weight shapes: what a policy depends on."""
    modules = dict(model.named_modules())
    described = []
    for name in layers:
        module = modules.get(name)
        weight = getattr(module, "weight", None)
        shape = list(weight.shape) if isinstance(weight, torch.Tensor) else None
        described.append([name, type(module).__name__ if module is not None else "matmul", shape])
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()


@dataclass(frozen=True)
class EvaluationResult:
    """One measured policy: accuracy with 95 % CIs (Wilson; paired for the drop) and costs."""

    model: str
    dataset: str
    split: str
    policy: str
    images: int
    correct: int
    accuracy: float
    accuracy_ci95: tuple[float, float]
    fp32_accuracy: float | None
    drop: float | None  # accuracy - fp32 accuracy on the same images
    drop_ci95: tuple[float, float] | None
    costs: PolicyCosts
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["relative_to_fp32"] = self.costs.relative()
        return d


class Evaluator:
    """Quantize-and-measure machinery for one baseline on one data set."""

    def __init__(
        self,
        baseline: Baseline,
        data: DataSplits,
        *,
        quant: QuantConfig | None = None,
        profiles: tuple[str, ...] = DEFAULT_PROFILES,
        batch_size: int = 256,
        prefix_cache: bool = True,
    ) -> None:
        self.baseline = baseline
        self.data = data
        self.quant = quant or QuantConfig()
        self.profiles = tuple(profiles)
        for p in self.profiles:
            load_profile(p)  # fail on a bad profile name before any model runs
        self.batch_size = batch_size
        info = data.info
        self.cost_table = count_costs(baseline.model, (info.in_chans, info.image_size, info.image_size))
        executed = policy_layers(baseline.model, self.cost_table)
        self.architecture = architecture_fingerprint(baseline.model, executed)
        self.qmodel = QuantizedModel(baseline.model, config=self.quant, layers=executed)
        # What runs the quantized layers (mpsearch.quant.backends); ``auto`` resolved for this machine.
        self.backend = BACKENDS.get(resolve_backend(self.quant.backend))()
        self.integer_layers = 0  # layers the last applied policy runs on integer kernels
        # Layer inputs of an identically quantized prefix are reused between evaluations (see
        # mpsearch.evaluation.prefix_cache); not with block reconstruction, whose weights depend on neighbours.
        self.prefix_cache = PrefixCache(self.qmodel.module, self.qmodel.policy_layers) if prefix_cache else None
        self._fp32_masks: dict[tuple[str, int], torch.Tensor] = {}
        self._calibration_s: float | None = None

    @property
    def layer_names(self) -> list[str]:
        """The layers with weights (what sensitivity scores), in execution order."""
        return self.qmodel.layer_names

    @property
    def policy_layers(self) -> list[str]:
        """Every layer a policy can address (attention matmuls included), in execution order."""
        return self.qmodel.policy_layers

    def calibrate(self) -> float:
        """Observe activations on the calibration split (once); returns seconds spent."""
        if self._calibration_s is None:
            start = time.perf_counter()
            self.qmodel.calibrate(x for x, _ in self.data.calibration.batches(self.quant.calibration_batch_size))
            self._calibration_s = time.perf_counter() - start
        return self._calibration_s

    def resolve_policy(self, spec: str | Path | Policy) -> Policy:
        """A policy from a shorthand (``w4a8``), a JSON path, or an object; validated for this model."""
        if isinstance(spec, Policy):
            policy = spec
        elif isinstance(spec, str) and is_shorthand(spec):
            policy = uniform_policy(
                spec,
                model=self.baseline.name,
                dataset=self.data.info.name,
                layers=self.policy_layers,
                checkpoint_sha256=self.baseline.sha256,
                architecture=self.architecture,
            )
        else:
            path = Path(spec)
            if not path.exists():
                raise UserError(
                    f"policy {str(spec)!r} is neither a shorthand (w8a8, w4a8, w4a4, fp32, ...) nor an existing file"
                )
            policy = Policy.load(path)
        policy.validate_for(model=self.baseline.name, layers=self.policy_layers, checkpoint_sha256=self.baseline.sha256,
                            architecture=self.architecture)
        if policy.dataset != self.data.info.name:
            raise UserError(
                f"policy.dataset: policy was made on {policy.dataset!r}, this run uses {self.data.info.name!r}; "
                f"measure it on {policy.dataset}"
            )
        return policy

    def _split(self, split: str, limit: int | None, start: int = 0):
        if limit is not None and limit < 1:
            raise UserError(f"limit must be >= 1 image, got {limit}")
        part = self.data.split(split).subset(limit)
        if start:  # images start..limit: a multi-fidelity promotion measures only the images it adds
            part = part.select(torch.arange(start, len(part)))
        if len(part) == 0:
            raise UserError(f"the {split} split of {self.data.info.name} is empty; nothing to evaluate")
        return part

    def fp32_mask(self, split: str = "val", limit: int | None = None, progress: bool = False) -> torch.Tensor:
        key = (split, limit)
        if key not in self._fp32_masks:
            self._fp32_masks[key] = correct_mask(
                self.baseline.model, self._split(split, limit), batch_size=self.batch_size,
                progress="fp32" if progress else None,
            )
        return self._fp32_masks[key]

    def apply(self, policy: Policy) -> None:
        """Install ``policy``'s quantizers (calibrating first if needed) and the backend's kernels for them."""
        self.calibrate()
        self.qmodel.apply(policy)
        self.integer_layers = self.backend.install(self.qmodel)

    def quantized_mask(
        self, policy: Policy, split: str = "val", limit: int | None = None, progress: bool = False, start: int = 0
    ) -> torch.Tensor:
        """Per-image correctness of ``policy`` on images ``start`` to ``limit`` of ``split``."""
        self.apply(policy)
        part = self._split(split, limit, start)
        cache = self.prefix_cache
        if cache is not None and not self.qmodel.blocks and not progress:
            batches = ((x.contiguous(memory_format=torch.channels_last), y) for x, y in part.batches(self.batch_size))
            with torch.inference_mode():
                first = next(iter(part.batches(min(self.batch_size, 32))))[0].contiguous(memory_format=torch.channels_last)
                if cache.check(first):
                    out = []
                    for logits, y in cache.logits((split, start, limit), policy.precision, batches):
                        if not torch.isfinite(logits).all():
                            raise UserError(f"policy {policy.summary()}: the model produced NaN/inf outputs; "
                                            "raise the bit widths of the offending layers")
                        out.append(logits.argmax(dim=1) == y)
                    return torch.cat(out)
        try:
            return correct_mask(
                self.qmodel.module, part, batch_size=self.batch_size,
                progress=policy.summary() if progress else None,
            )
        except FloatingPointError as exc:
            raise UserError(f"policy {policy.summary()}: {exc}; raise the bit widths of the offending layers") from None

    def evaluate(
        self,
        policy: Policy | str | Path,
        *,
        split: str = "val",
        limit: int | None = None,
        compare_fp32: bool = True,
        progress: bool = False,
    ) -> EvaluationResult:
        """Measure ``policy`` (a :class:`Policy`, a shorthand such as ``"w4a8"`` or a policy
        JSON path) on ``split`` (its first ``limit`` images)."""
        start = time.perf_counter()
        policy = self.resolve_policy(policy)
        mask = self.quantized_mask(policy, split, limit, progress)
        ref = self.fp32_mask(split, limit, progress) if compare_fp32 else None
        return self.summarize(policy, mask, split=split, fp32_mask=ref, start=start)

    def summarize(
        self,
        policy: Policy,
        mask: torch.Tensor,
        *,
        split: str,
        fp32_mask: torch.Tensor | None = None,
        start: float | None = None,
    ) -> EvaluationResult:
        """The result for a measured correctness ``mask`` (paired with ``fp32_mask`` when given)."""
        n, k = mask.numel(), int(mask.sum())
        fp32_acc = drop = drop_ci = None
        if fp32_mask is not None:
            fp32_acc = int(fp32_mask.sum()) / fp32_mask.numel()  # exact, like the quantized accuracy
            drop, lo, hi = paired_difference_ci(fp32_mask, mask)
            drop_ci = (lo, hi)
        return EvaluationResult(
            model=self.baseline.name,
            dataset=self.data.info.name,
            split=split,
            policy=policy.summary(),
            images=n,
            correct=k,
            accuracy=k / n,
            accuracy_ci95=wilson_interval(k, n),
            fp32_accuracy=fp32_acc,
            drop=drop,
            drop_ci95=drop_ci,
            costs=policy_costs(self.cost_table, policy, self.profiles),
            wall_s=time.perf_counter() - start if start is not None else 0.0,
            extra={"backend": self.backend.name, "integer_layers": self.integer_layers},
        )
