"""Measurements prepared by model and data set name: load (or train) the baseline, resolve a
policy's measurement settings, build the evaluator, measure a policy. The command line, the
export and scripts compose these; the CLI-only tasks live in :mod:`mpsearch.cli.tasks`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mpsearch.config import QuantConfig, TrainConfig
from mpsearch.errors import UserError
from mpsearch.policy import MeasurementSettings, Policy, parse_shorthand

__all__ = ["load_baseline", "measurement_settings", "prepare_measurement", "PreparedMeasurement", "check_limit", "measure_policy",
           "DEFAULT_CALIBRATION"]

logger = logging.getLogger(__name__)
DEFAULT_CALIBRATION = 512  # calibration images drawn from the training split


def load_baseline(model: str, dataset: str, *, data_dir: str | None = None, image_size: int | None = None, seed: int = 0,
                  checkpoint: str | None = None,
                  pretrained: bool = False, recipe: TrainConfig | None = None, calibration_size: int = DEFAULT_CALIBRATION,
                  progress: bool = True, recipe_changes: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
    """(baseline, data): the data set's splits and the fp32 model (checkpoint, hub weights, cache,
    or trained now with ``recipe``, else the model's default recipe for this data set with
    ``recipe_changes`` made to it)."""
    from mpsearch.data import load_dataset
    from mpsearch.models.zoo import default_recipe, get_baseline, resolve_model_name

    resolve_model_name(model)  # fail on a typo before loading data
    if calibration_size < 1:
        raise UserError(f"calibration_size: must be >= 1, got {calibration_size}", fields=("calibration_size",))
    data = load_dataset(dataset, data_dir=data_dir, calibration_size=calibration_size, calibration_seed=seed,
                        image_size=image_size)
    if recipe is None and recipe_changes:
        recipe = replace(default_recipe(model, train_images=len(data.train)), **recipe_changes)
    baseline = get_baseline(model, data, recipe=recipe, seed=seed, checkpoint=checkpoint, pretrained=pretrained,
                            progress=progress)
    return baseline, data


def _as_policy(policy: str | Path | Policy) -> Policy | str:
    """A policy file loaded, a shorthand checked (both before any model loads)."""
    if isinstance(policy, Policy):
        return policy
    if Path(policy).is_file():
        return Policy.load(policy)
    parse_shorthand(str(policy))
    return str(policy)


def measurement_settings(policy: Policy | str, quant: Mapping[str, Any] | None = None, *, calibration_size: int | None = None,
                         torch_threads: int | None = None, seed: int | None = None) -> MeasurementSettings:
    """How to measure ``policy``: what its provenance recorded (else the defaults), with ``quant``
    fields, ``calibration_size``, ``torch_threads`` and ``seed`` replaced where given. A policy
    re-measured with its own settings gives the numbers it was exported with."""
    recorded = policy.settings() if isinstance(policy, Policy) else None
    base = recorded or MeasurementSettings(QuantConfig())
    if seed is None:
        seed = int(policy.provenance.get("seed", base.quant.seed)) if isinstance(policy, Policy) else base.quant.seed
    config = QuantConfig.from_dict({**base.quant.to_dict(), **dict(quant or {}), "seed": seed})
    threads = torch_threads or base.torch_threads
    if threads is not None and threads < 1:
        raise UserError(f"run.torch_threads: must be >= 1, got {threads}", fields=("run.torch_threads",))
    return MeasurementSettings(config, calibration_size or base.calibration_size, threads)


def _check_registries(quant: QuantConfig, profiles: Sequence[str]) -> None:
    """Observer, PTQ, attention-calibration and profile names, before any model loads."""
    from mpsearch.cost import load_profile
    from mpsearch.quant import get_observer
    from mpsearch.quant.ptq import get_ptq
    from mpsearch.quant.qk_calibration import QK_CALIBRATIONS

    if not profiles:
        raise UserError("profiles: name at least one energy profile (see `mpsearch profiles`)")
    for p in profiles:
        load_profile(p)
    get_observer(quant.weight_observer)
    get_observer(quant.act_observer)
    get_ptq(quant.ptq)
    QK_CALIBRATIONS.get(quant.attention_calibration)


@dataclass
class PreparedMeasurement:
    """A baseline's evaluator and a policy resolved for it: what measuring or exporting a policy starts from."""

    evaluator: Any  # mpsearch.evaluation.evaluator.Evaluator, fine-tuned weights attached where the policy has them
    policy: Policy  # resolved and validated for the evaluator's model


def prepare_measurement(model: str, dataset: str, policy: str | Path | Policy, quant: Mapping[str, Any] | None, *,
                        calibration_size: int | None, seed: int | None, checkpoint: str | None, data_dir: str | None,
                        image_size: int | None, pretrained: bool, progress: bool, torch_threads: int | None = None,
                        profiles: Sequence[str] = ("horowitz45nm", "seed-lab4")) -> PreparedMeasurement:
    """Load ``model``'s baseline on ``dataset`` and resolve ``policy`` (file, shorthand or object)
    for it, with the measurement settings the policy records unless overridden."""
    import torch

    from mpsearch.evaluation.evaluator import Evaluator
    from mpsearch.quant.finetune import attach_finetuned

    given = _as_policy(policy)
    settings = measurement_settings(given, quant, calibration_size=calibration_size, torch_threads=torch_threads, seed=seed)
    _check_registries(settings.quant, profiles)
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    baseline, data = load_baseline(model, dataset, data_dir=data_dir, image_size=image_size, seed=settings.quant.seed, checkpoint=checkpoint,
                                   pretrained=pretrained, calibration_size=settings.calibration_size, progress=progress)
    evaluator = Evaluator(baseline, data, quant=settings.quant, profiles=tuple(profiles))
    resolved = evaluator.resolve_policy(given)
    if isinstance(policy, (str, Path)) and Path(policy).is_file() and attach_finetuned(evaluator, resolved, Path(policy).parent):
        logger.info(f"using the fine-tuned weights and quantizers of {resolved.provenance['finetune']['checkpoint']}")
    return PreparedMeasurement(evaluator, resolved)


def check_limit(limit: int | None) -> None:
    """Refuse an image limit below one before anything is loaded."""
    if limit is not None and limit < 1:
        raise UserError(f"limit: must be >= 1 image, got {limit}", fields=("limit",))


def measure_policy(model: str, dataset: str, policy: str | Path | Policy, *, split: str = "val", limit: int | None = None,
                   quant: Mapping[str, Any] | None = None, calibration_size: int | None = None, torch_threads: int | None = None,
                   seed: int | None = None, profiles: Sequence[str] = ("horowitz45nm", "seed-lab4"),
                   checkpoint: str | None = None, data_dir: str | None = None, image_size: int | None = None, pretrained: bool = False,
                   save_policy: str | Path | None = None, progress: bool = False) -> Any:
    """Measure ``policy`` (file, shorthand or object) on ``split`` of the data set: accuracy with
    95 % CIs against fp32 on the same images, and modeled costs. Settings not given come from the
    policy's provenance (see :func:`measurement_settings`); ``save_policy`` writes the resolved policy."""
    check_limit(limit)
    prepared = prepare_measurement(model, dataset, policy, quant, calibration_size=calibration_size, torch_threads=torch_threads,
                                   seed=seed, profiles=profiles, checkpoint=checkpoint, data_dir=data_dir, image_size=image_size,
                                   pretrained=pretrained, progress=progress)
    if save_policy:
        prepared.policy.save(save_policy)
    prepared.evaluator.calibrate()
    return prepared.evaluator.evaluate(prepared.policy, split=split, limit=limit, progress=progress)
