"""Objectives, fronts and hypervolume references: what every part of a study agrees on.

An objective is a name (``accuracy``, ``energy``, ``size``, ``bops``, ``energy@PROFILE``) with a
direction and the trial metric it reads. Algorithms minimise: 1 - accuracy and the costs relative
to fp32 (1.0 = fp32). A trial table (one row per Optuna trial, columns ``value_<objective>``,
``attr_<user attribute>``, ``param_<gene>``) becomes the matrix of minimised objectives here,
and its front is scored against :func:`hypervolume_reference`. Nothing in this module runs a model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "OBJECTIVES", "ENERGY_UNDER", "objective_spec", "objective_profiles", "is_objective", "objective_vector",
    "objective_values", "profile_name_ok", "objective_matrix", "full_fidelity", "front_trials", "front_matrix", "hypervolume_reference",
    "reference_text", "front_hypervolume", "DROP_ATTR", "DROP_TOLERANCE_PP", "drop_within", "floor_violation", "within_floor", "floor_text",
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
        return "minimize", "rel_energy_" + name[len(ENERGY_UNDER):]
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


# The trial attribute that holds a candidate's accuracy minus the fp32 model's on the same
# validation images, in percentage points (negative: below fp32); the accuracy floor reads it.
DROP_ATTR = "val_drop_pp"
# Drops are multiples of 100/n pp (n images), and recorded ones may carry float32 rounding
# (~1e-5 pp): a drop counts as at a bound when it is this close to it.
DROP_TOLERANCE_PP = 1e-4


def drop_within(drop_pp: Any, limit_pp: float) -> Any:
    """Whether a drop (percentage points against fp32, negative below it; a number or an array)
    lies within ``limit_pp`` of fp32, a drop at the bound counting as within: the one test of the
    accuracy floor, of the answers' "within 0.5/1/2 pp" and of ``drop<=`` picks."""
    return -drop_pp <= limit_pp + DROP_TOLERANCE_PP


def floor_violation(drop_pp: float, max_drop: float | None) -> float:
    """How far (percentage points) a candidate with ``drop_pp`` lies below the floor ``max_drop``;
    0.0 within it or without a floor. Algorithms get it as a constraint violation."""
    if max_drop is None or not np.isfinite(drop_pp):
        return 0.0
    return 0.0 if drop_within(drop_pp, max_drop) else -drop_pp - max_drop


def within_floor(trials: pd.DataFrame, max_drop: float | None) -> Any:
    """Boolean Series: which trial rows lie within the floor (rows recorded without a drop, and
    every row when there is no floor, count as within)."""
    import pandas as pd

    column = f"attr_{DROP_ATTR}"
    if max_drop is None or column not in trials:
        return pd.Series(True, index=trials.index)
    drop = pd.to_numeric(trials[column], errors="coerce")
    return drop.isna() | drop_within(drop, max_drop)


def floor_text(max_drop: float | None) -> str:
    """The floor as reports state it."""
    if max_drop is None:
        return "no accuracy floor"
    return f"accuracy floor {max_drop:g} pp below fp32 (on the same validation images)"


def full_fidelity(trials: pd.DataFrame) -> Any:
    """The completed trials measured on the whole search subset (multi-fidelity runs also record
    candidates that stopped at a lower rung: noisier, and surely dominated when they stopped)."""
    ok = trials[trials["state"] == "COMPLETE"]
    if "attr_fidelity" in ok:
        ok = ok[ok["attr_fidelity"].isna() | (ok["attr_fidelity"].astype(float) >= 1.0)]
    return ok


def front_trials(trials: pd.DataFrame, max_drop: float | None = None) -> Any:
    """The trials a front is made of: full fidelity and within the floor ``max_drop``."""
    ok = full_fidelity(trials)
    return ok[within_floor(ok, max_drop)]


def front_matrix(trials: pd.DataFrame, objectives: tuple[str, ...], max_drop: float | None = None) -> np.ndarray:
    """The minimised objectives of a study's full-fidelity trials within the floor ``max_drop``."""
    return objective_matrix(front_trials(trials, max_drop), objectives)


def front_hypervolume(trials: pd.DataFrame, objectives: tuple[str, ...], ref_point: np.ndarray, max_drop: float | None = None) -> float:
    """Hypervolume of the measured front of ``trials`` (full fidelity, within the floor
    ``max_drop``) against ``ref_point`` (dominated points add nothing to it)."""
    from mpsearch.algorithms.pareto import hypervolume  # lazy: configs import this module, pymoo is not free

    return hypervolume(front_matrix(trials, objectives, max_drop), ref_point)


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
