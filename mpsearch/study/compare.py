"""Methods compared on one study: each method's measured front, its hypervolume, what it cost.

Every method of a study (``mpsearch compare``, or ``optimize --algorithm a,b``) tags its trials
with its name (user attribute ``run``). A method is scored only on what it measured at full
search fidelity: the hypervolume of its non-dominated (1 - accuracy, costs) points against one
reference point shared by all methods, the evaluations it used (full-evaluation equivalents),
and whether its front strictly dominates each uniform policy it measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mpsearch.algorithms.pareto import dominates, hypervolume, non_dominated
from mpsearch.config import StudyConfig
from mpsearch.host.files import atomic_write, atomic_write_text
from mpsearch.objectives import floor_text, full_fidelity, objective_matrix, reference_text, within_floor

__all__ = ["method_scores", "plot_methods", "comparison_markdown", "proxy_kendall", "write_comparison",
           "paired_hypervolume_difference", "seed_summary"]


def _runs(trials) -> list[str]:
    if "attr_run" not in trials:
        return []
    return list(dict.fromkeys(trials["attr_run"].dropna().astype(str)))


def method_scores(trials, objectives: tuple[str, ...], ref_point: float | np.ndarray = 1.0,
                  max_drop: float | None = None) -> Any:
    """One row per method: hypervolume, front size, trials, evaluations (images measured over a full
    evaluation's), best accuracy, uniform dominance.

    ``ref_point`` is the hypervolume reference: one number for every objective, or one per
    objective. Fronts and hypervolumes hold the trials within the floor ``max_drop`` only."""
    import pandas as pd

    rows = []
    for run in _runs(trials):
        mine = trials[trials["attr_run"].astype(str) == run]
        ok = full_fidelity(mine)
        F = objective_matrix(ok, objectives)
        floored = F[within_floor(ok, max_drop).to_numpy()]
        front = floored[non_dominated(floored)] if len(floored) else floored
        methods = ok["attr_method"].astype(str).to_numpy()
        uniform = {m.split(":", 1)[1].upper(): F[i] for i, m in enumerate(methods) if m.startswith("uniform:")}
        used = mine["attr_fidelity"].fillna(1.0).astype(float).sum() if "attr_fidelity" in mine else float(len(mine))
        rows.append({
            "method": run,
            "hypervolume": hypervolume(front, np.broadcast_to(np.asarray(ref_point, dtype=float), (len(objectives),))),
            "front": len(front),
            "candidates": len(mine),
            "evaluations": float(used),
            "best_accuracy": float(ok["value_accuracy"].max()) if len(ok) else float("nan"),
            **{f"dominates_{name}": bool(any(dominates(f, u) for f in front)) for name, u in uniform.items()},
        })
    return pd.DataFrame(rows)


def paired_hypervolume_difference(trials, first: str, second: str, objectives: tuple[str, ...],
                                  ref_point: float | np.ndarray = 1.0, *, resamples: int = 2000, seed: int = 0,
                                  level: float = 0.95) -> tuple[float, float, float]:
    """HV(``first``) - HV(``second``) of the methods' measured fronts, with a percentile bootstrap
    interval over the images: each resample draws the search subset's images with replacement,
    the same draw for every trial of both methods, recomputes every trial's accuracy on it and
    both fronts. A few hundred images leave a policy's accuracy uncertain by more than a
    percentage point, and a front's best accuracy alone decides a large part of the hypervolume,
    so whether a difference of fronts is more than the draw of images needs this test. Needs the per-image
    masks trials keep (attribute ``mask``); returns (difference, low, high)."""
    from mpsearch.evaluation.multi_fidelity import unpack_mask

    ok = full_fidelity(trials)
    ref = np.broadcast_to(np.asarray(ref_point, dtype=float), (len(objectives),))
    groups = []
    for run in (first, second):
        rows = ok[ok["attr_run"].astype(str) == run]
        if not len(rows) or "attr_mask" not in rows or rows["attr_mask"].isna().any():
            raise ValueError(f"method {run!r} has no full-fidelity trials with per-image masks (studies before masks were kept)")
        masks = np.stack([unpack_mask(text, int(n)).numpy() for text, n in zip(rows["attr_mask"], rows["attr_images"])])
        groups.append((masks.astype(float), objective_matrix(rows, objectives)[:, 1:]))
    if groups[0][0].shape[1] != groups[1][0].shape[1]:
        raise ValueError("the two methods were measured on different numbers of images")
    n = groups[0][0].shape[1]

    def difference(weights: np.ndarray) -> float:
        volumes = []
        for masks, costs in groups:
            F = np.column_stack([1.0 - masks @ weights / weights.sum(), costs])
            volumes.append(hypervolume(F[non_dominated(F)], ref))
        return volumes[0] - volumes[1]

    rng = np.random.default_rng(seed)
    draws = [difference(rng.multinomial(n, np.full(n, 1.0 / n)).astype(float)) for _ in range(resamples)]
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return difference(np.ones(n)), float(low), float(high)


def comparison_markdown(scores, *, caption: str) -> str:
    """The per-method table as Markdown."""
    uniform = [c for c in scores.columns if c.startswith("dominates_")]
    head = ["method", "hypervolume", "front size", "candidates", "evaluations", "best accuracy"] + [
        f"dominates {c.split('_', 1)[1]}" for c in uniform]
    lines = [caption, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in scores.iterrows():
        marks = ["yes" if r[c] else "no" for c in uniform]
        lines.append(f"| {r['method']} | {r['hypervolume']:.4f} | {r['front']} | {r['candidates']} | {r['evaluations']:.0f} | "
                     f"{100 * r['best_accuracy']:.2f}% | " + " | ".join(marks) + " |")
    return "\n".join(lines) + "\n"


def plot_methods(trials, config: StudyConfig, path: Path, *, title: str | None = None) -> None:
    """One plot, every method's measured front as a staircase (search split, full fidelity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = config.search.objectives
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for run in _runs(trials):
        ok = full_fidelity(trials[trials["attr_run"].astype(str) == run])
        F = objective_matrix(ok, objectives)
        if not len(F):
            continue
        front = F[non_dominated(F)]
        front = front[np.argsort(front[:, 1], kind="stable")]
        ax.step(front[:, 1], 100 * (1 - front[:, 0]), where="post", marker="o", ms=3, label=f"{run} ({len(front)} points)")
    uniform = full_fidelity(trials)
    uniform = uniform[uniform["attr_method"].astype(str).str.startswith("uniform:")].drop_duplicates("attr_method")
    for _, row in uniform.iterrows():
        x, y = row[f"value_{objectives[1]}"], 100 * row["value_accuracy"]
        ax.scatter(x, y, marker="s", s=36, edgecolor="black", facecolor="none", zorder=5)
        ax.annotate(str(row["attr_method"]).split(":")[1].upper(), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    profile = f" ({config.search.energy_profile})" if objectives[1] == "energy" else ""
    ax.set_xlabel(f"{objectives[1]} relative to fp32{profile}")
    ax.set_ylabel("top-1 accuracy on the search subset (%)")
    ax.set_title(title or f"{config.model} on {config.dataset}: budget {config.search.budget}, seed {config.seed}", fontsize=9)
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"), binary=True, what="plot")
    plt.close(fig)


def write_comparison(out: Path, trials, config: StudyConfig, ref_point: np.ndarray, *, machine: str) -> Any:
    """compare.md and compare.png in the study folder; returns the score table. ``ref_point`` is
    the study's hypervolume reference (:func:`mpsearch.objectives.hypervolume_reference`)."""
    search = config.search
    scores = method_scores(trials, search.objectives, ref_point, search.max_drop)
    caption = (f"{config.model} on {config.dataset}, seed {config.seed}: budget {search.budget} trials per method "
               f"({search.eval_images} validation images each; `evaluations`: images measured over {search.eval_images}), "
               f"objectives 1 - accuracy and {', '.join(search.objectives[1:])} "
               f"relative to fp32, hypervolume reference point {reference_text(ref_point)}; "
               f"{floor_text(search.max_drop)}. Measured on {machine}.")
    atomic_write_text(out / "compare.md", comparison_markdown(scores, caption=caption), what="comparison table")
    plot_methods(trials, config, out / "compare.png")
    return scores


def proxy_kendall(trials, scores: dict[tuple[str, int], float]) -> tuple[float, float, int]:
    """Kendall tau-b (and its p-value, and the number of trials) between a sensitivity proxy's
    prediction for each trial (minus the summed scores of its layers' weight widths; float
    layers score 0) and the trial's measured accuracy."""
    import json

    from scipy.stats import kendalltau

    predicted, measured = [], []
    for _, row in trials.iterrows():
        layers = json.loads(row["attr_layers"])
        total = 0.0
        for name, (weight_bits, _) in layers.items():
            if weight_bits is not None and (name, int(weight_bits)) in scores:
                total += scores[name, int(weight_bits)]
        predicted.append(-total)
        measured.append(float(row["value_accuracy"]))
    if len(measured) < 3:
        return float("nan"), float("nan"), len(measured)
    result = kendalltau(predicted, measured)
    return float(result.statistic), float(result.pvalue), len(measured)


def seed_summary(results: list[Any]) -> Any:
    """How much a study's answer depends on its seed: mean and standard deviation over studies
    that differ only in seed (:class:`~mpsearch.study.SearchResult` s) of the hypervolume, of
    each method's hypervolume when they compare methods, and of the knee policy's test accuracy,
    drop and cost."""
    import statistics

    import pandas as pd

    values: dict[str, list[float]] = {"hypervolume": [r.hypervolume for r in results]}
    for r in results:
        objectives = r.config.search.objectives
        if r.trials["attr_run"].nunique() > 1:
            for _, row in method_scores(r.trials, objectives, r.ref_point, r.config.search.max_drop).iterrows():
                values.setdefault(f"hypervolume {row['method']}", []).append(float(row["hypervolume"]))
        if r.front is not None and len(r.front):
            knee = r.front[r.front["trial"] == r.pick("knee").provenance["trial"]].iloc[0]
            values.setdefault("knee test accuracy (%)", []).append(100 * knee["test_accuracy"])
            values.setdefault("knee test drop (pp)", []).append(knee["test_drop_pp"])
            values.setdefault(f"knee {r.cost_column} (% of fp32)", []).append(100 * knee[r.cost_column])
    return pd.DataFrame([{"quantity": k, "mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                          "seeds": len(v)} for k, v in values.items()])
