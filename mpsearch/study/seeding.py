"""Where a search starts: the uniform policies for every method and, for population searches,
the HAWQ-V3 ILP's solutions at evenly spaced energy budgets (sensitivity seeds the search)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mpsearch.algorithms.base import SearchContext
from mpsearch.algorithms.space import BoundSpace
from mpsearch.config import StudyConfig
from mpsearch.errors import UserError
from mpsearch.host.machine import available_cores, torch_threads

if TYPE_CHECKING:
    from mpsearch.evaluation.evaluator import Evaluator

__all__ = ["UNIFORM_SHORTHANDS", "Seeds", "study_seeds", "weight_scores"]

UNIFORM_SHORTHANDS = ((8, 8), (6, 6), (4, 8), (4, 4), (2, 8))
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Seeds:
    """The initial vectors of a study's methods and what they are (trial attribute ``method``)."""

    uniform: list[np.ndarray]  # every method starts here (at most one population of them)
    seeded: list[np.ndarray]  # the uniform ones and the ILP's solutions: where population searches start
    tags: dict[tuple[int, ...], str]  # "uniform:w8a8", "ilp:0.0812" (its cost)
    weight_scores: dict[tuple[str, int], float] | None  # per-layer sensitivity; None without estimator

    def tag(self, x: np.ndarray) -> str | None:
        return self.tags.get(tuple(int(v) for v in x))


def weight_scores(config: StudyConfig, evaluator: Evaluator, space: BoundSpace, *, progress: bool) -> dict[tuple[str, int], float] | None:
    """Per-layer sensitivity of the layers whose weight width is searched: {(layer, bits): score}
    (HAWQ-V2's Hessian trace x squared weight error, or the empirical estimator's measured drop);
    None when the space searches no weight width. Seeds and planning algorithms rank layers by
    it, which needs far fewer probes than precise traces (``search.sensitivity_probes``)."""

    from mpsearch.sensitivity import SensitivityConfig, compute_sensitivity

    weight_genes = [g for g in space.genes if g.operand == "weight"]
    free = [layer for g in weight_genes for layer in g.layers]
    choices = sorted({b for g in weight_genes for b in g.choices if b is not None})
    if not free or not choices:
        return None
    search = config.search
    scfg = SensitivityConfig(estimator=search.sensitivity, bits=tuple(choices), seed=config.seed,
                             batches=search.sensitivity_batches, max_probes=search.sensitivity_probes,
                             min_probes=min(SensitivityConfig.min_probes, search.sensitivity_probes))
    logger.info(f"sensitivity ({search.sensitivity}) of {len(free)} searched layers (cached per checkpoint) ...")
    # Once per checkpoint and settings, cached on disk, so the driver lends it every core;
    # evaluations keep their fixed thread count.
    with torch_threads(available_cores()):
        df = compute_sensitivity(
            evaluator.baseline.model, free, evaluator.data.calibration, scfg, quant=evaluator.quant,
            checkpoint_sha256=evaluator.baseline.sha256, qmodel=evaluator.qmodel, progress=progress,
        )
    _check_finite(df, search.sensitivity)
    return {(str(n), int(b)): float(v) for n, b, v in df[["layer", "bits", "score"]].itertuples(index=False)}


def _check_finite(df: Any, estimator: str) -> None:
    """Refuse, naming the layer and the cause, sensitivity scores that are NaN or infinite: the
    ILP and the samplers would rank by them silently."""
    import math

    for row in df.to_dict("records"):
        if math.isfinite(row["score"]):
            continue
        parts = [f"{column} {value}" for column, value in row.items()
                 if column != "score" and isinstance(value, float) and not math.isfinite(value)]
        cause = ", ".join(parts) or f"score {row['score']}"
        raise UserError(f"sensitivity ({estimator}) of layer {row['layer']} at {row['bits']} bits is not finite ({cause}): "
                        "the baseline's loss or weights are not finite on the calibration images; retrain it "
                        "(mpsearch train) or use search.sensitivity none", fields=("search.sensitivity",))


def _ilp_seeds(space: BoundSpace, context: SearchContext, n_seeds: int) -> list[tuple[np.ndarray, str]]:
    """The distinct solutions of the HAWQ-V3 ILP at ``n_seeds`` evenly spaced budgets of the
    first cost objective, cheapest first, each tagged with its cost: the search starts along the
    front the rule would pick and breeds from there (pinned layers keep their pins)."""
    from mpsearch.algorithms.planning import ilp_plans

    seeds: list[tuple[np.ndarray, str]] = []
    for x in reversed(ilp_plans(space, context, n_seeds)):
        if not any(np.array_equal(x, y) for y, _ in seeds):
            seeds.append((x, f"ilp:{float(context.costs(x)[0]):.4f}"))
    return seeds


def study_seeds(config: StudyConfig, evaluator: Evaluator, space: BoundSpace, costs_of: Callable[[np.ndarray], np.ndarray], *,
                progress: bool) -> Seeds:
    """The uniform policies the space holds (distinct, in :data:`UNIFORM_SHORTHANDS` order), then
    the ILP's solutions unless ``search.sensitivity`` is none or ``search.ilp_seeds`` 0."""
    uniform: list[np.ndarray] = []
    tags: list[str] = []
    for w, a in UNIFORM_SHORTHANDS:
        x = space.uniform(w, a)
        if x is not None and not any(np.array_equal(x, y) for y in uniform):
            uniform.append(x)
            tags.append(f"uniform:w{w}a{a}")
    scores = None
    seeded = list(uniform)
    if config.search.sensitivity != "none":
        scores = weight_scores(config, evaluator, space, progress=progress)
        if config.search.ilp_seeds:
            for x, tag in _ilp_seeds(space, SearchContext(costs_of, scores, config.search.budget), config.search.ilp_seeds):
                if not any(np.array_equal(x, y) for y in seeded):
                    seeded.append(x)
                    tags.append(tag)
    return Seeds(uniform=uniform[: config.search.population_size], seeded=seeded,
                 tags={tuple(int(v) for v in x): t for x, t in zip(seeded, tags)}, weight_scores=scores)
