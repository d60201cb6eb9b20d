"""Objectives, fronts and hypervolume references: what every part of a study agrees on.

An objective is a name (``accuracy``, ``energy``, ``size``, ``bops``, ``energy@PROFILE``) with a
direction and the trial metric it reads. Algorithms minimise: 1 - accuracy and the costs relative
to fp32 (1.0 = fp32). A trial table (one row per Optuna trial, columns ``value_<objective>``,
``attr_<user attribute>``, ``param_<gene>``) becomes the matrix of minimised objectives here,
and its front is scored against :func:`hypervolume_reference`. Nothing in this module runs a model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "OBJECTIVES", "ENERGY_UNDER", "objective_spec", "objective_profiles", "is_objective", "objective_vector",
    "objective_values", "profile_name_ok", "objective_matrix", "full_fidelity", "front_matrix", "hypervolume_reference",
    "reference_text", "front_hypervolume",
]

# Objective name -> (direction, trial metric it reads). Accuracy is measured on the validation
# subset; energy, size and bops are modeled costs relative to the fp32 model (1.0 = fp32);
# latency is the policy's ONNX model timed in onnxruntime over the fp32 model's time
# (mpsearch.study.latency.PatternLatency).
OBJECTIVES = {
    "accuracy": ("maximize", "accuracy"),
    "energy": ("minimize", "rel_energy"),
    "size": ("minimize", "rel_size"),
    "bops": ("minimize", "rel_bops"),
    "latency": ("minimize", "rel_latency"),
}
# "energy@PROFILE": relative energy under another profile than the study's energy profile, e.g. a
# profile fitted to measured kernels (``mpsearch calibrate-energy``) searched beside the analytical one.
ENERGY_UNDER = "energy@"


def profile_name_ok(name: str) -> bool:
    """A profile *name* (studies record profiles by name so that every worker finds them)."""
    return bool(name) and not name.endswith(".toml") and all(c.isalnum() or c in "-_." for c in name)


def is_objective(name: str) -> bool:
    return name in OBJECTIVES or (name.startswith(ENERGY_UNDER) and profile_name_ok(name[len(ENERGY_UNDER):]))


def objective_spec(name: str) -> tuple[str, str]:
    """(direction, metric key) of an objective name (see :data:`OBJECTIVES`, :data:`ENERGY_UNDER`)."""
    if name.startswith(ENERGY_UNDER) and len(name) > len(ENERGY_UNDER):
        return "minimize", "rel_energy:" + name[len(ENERGY_UNDER):]
    return OBJECTIVES[name]


def objective_profiles(objectives: tuple[str, ...]) -> tuple[str, ...]:
    """The energy profiles that ``energy@PROFILE`` objectives name."""
    return tuple(o[len(ENERGY_UNDER):] for o in objectives if o.startswith(ENERGY_UNDER))


def objective_vector(metrics: Mapping[str, float] | None, objectives: tuple[str, ...]) -> np.ndarray:
    """What the algorithms minimise: 1 - accuracy and the relative costs; inf for a failed evaluation."""
    if metrics is None:
        return np.full(len(objectives), np.inf)
    out = []
    for name in objectives:
        direction, key = objective_spec(name)
        value = metrics[key]
        out.append(1.0 - value if direction == "maximize" else value)
    return np.asarray(out, dtype=float)


def objective_values(metrics: Mapping[str, float], objectives: tuple[str, ...]) -> list[float]:
    """The values an Optuna trial records, in the study's directions."""
    return [metrics[objective_spec(name)[1]] for name in objectives]


def objective_matrix(rows: Any, objectives: tuple[str, ...]) -> np.ndarray:
    """The minimised objectives of trial rows: 1 - accuracy, then the relative costs."""
    cols = []
    for name in objectives:
        values = rows[f"value_{name}"].to_numpy(dtype=float)
        cols.append(1.0 - values if objective_spec(name)[0] == "maximize" else values)
    return np.stack(cols, axis=1) if len(rows) else np.zeros((0, len(objectives)))


def full_fidelity(trials: Any) -> Any:
    """The completed trials measured on the whole search subset (multi-fidelity runs also record
    candidates that stopped at a lower rung: noisier, and surely dominated when they stopped)."""
    ok = trials[trials["state"] == "COMPLETE"]
    if "attr_fidelity" in ok:
        ok = ok[ok["attr_fidelity"].isna() | (ok["attr_fidelity"].astype(float) >= 1.0)]
    return ok


def front_matrix(trials: Any, objectives: tuple[str, ...]) -> np.ndarray:
    """The minimised objectives of a study's full-fidelity trials."""
    return objective_matrix(full_fidelity(trials), objectives)


def front_hypervolume(trials: Any, objectives: tuple[str, ...], ref_point: np.ndarray) -> float:
    """Hypervolume of the measured front of ``trials`` (full fidelity) against ``ref_point``
    (dominated points add nothing to it)."""
    from mpsearch.algorithms.pareto import hypervolume  # lazy: configs import this module, pymoo is not free

    return hypervolume(front_matrix(trials, objectives), ref_point)


def hypervolume_reference(space: Any, costs_of: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """A study's hypervolume reference point: error 1 (0 % accuracy) and, for each cost
    objective, the costliest policy its search space holds (every gene at its widest choice, or
    at its narrowest where a cost model charges narrow widths more). It depends on the space and
    the cost model only, never on what a search measured, so every method and every seed of a
    study share it (why not fp32's (1, 1): docs/design.md)."""
    return np.concatenate([[1.0], np.maximum(costs_of(space.xu), costs_of(space.xl))])


def reference_text(ref_point: Any) -> str:
    """:func:`hypervolume_reference`'s point as reports print it."""
    return f"({', '.join(f'{v:.4g}' for v in ref_point)}): 0 % accuracy at the costliest policy of the search space"
