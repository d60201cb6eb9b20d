"""Pareto fronts, hypervolume and knee points, all objectives minimized.

Rows with a non-finite value are failed evaluations: they never belong to a front and add no
hypervolume. Results are deterministic: indices come back sorted, duplicates of a
non-dominated point are all kept, ties in :func:`knee_point` go to the lowest index.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["dominates", "non_dominated", "hypervolume", "knee_point"]

_CHUNK = 256  # rows compared at once: bounds memory at _CHUNK x n x n_objectives booleans


def _matrix(F: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    F = np.asarray(F, dtype=float)
    if F.ndim == 1 and F.size == 0:
        return F.reshape(0, 0)
    if F.ndim != 2:
        raise ValueError(f"expected a 2-D array of objective values (points x objectives), got shape {F.shape}")
    return F


def dominates(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> bool:
    """``a`` is no worse than ``b`` in every objective and better in at least one."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"points differ in shape: {a.shape} vs {b.shape}")
    return bool(np.all(a <= b) and np.any(a < b))


def non_dominated(F: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Sorted indices of the rows no other row dominates (the Pareto front); failed rows excluded."""
    F = _matrix(F)
    rows = np.flatnonzero(np.isfinite(F).all(axis=1)) if F.size else np.zeros(0, dtype=np.int64)
    G = F[rows]
    keep = np.ones(len(rows), dtype=bool)
    for start in range(0, len(rows), _CHUNK):
        block = G[start : start + _CHUNK, None, :]  # (b, 1, m) against every row (1, n, m)
        dominated = ((G[None] <= block).all(axis=-1) & (G[None] < block).any(axis=-1)).any(axis=1)
        keep[start : start + _CHUNK] = ~dominated
    return rows[keep].astype(np.int64)


def hypervolume(F: np.ndarray | Sequence[Sequence[float]], ref_point: Sequence[float] | np.ndarray) -> float:
    """Volume dominated by the points of ``F`` and bounded by ``ref_point`` (pymoo's HV).

    Points that do not strictly dominate the reference point add nothing and are dropped; no
    point left gives 0.0.
    """
    F = _matrix(F)
    ref = np.asarray(ref_point, dtype=float)
    if F.size == 0:
        return 0.0
    if ref.shape != (F.shape[1],):
        raise ValueError(f"ref_point must have {F.shape[1]} values, got shape {ref.shape}")
    inside = np.isfinite(F).all(axis=1) & (F < ref).all(axis=1)
    if not inside.any():
        return 0.0
    from pymoo.indicators.hv import HV  # lazy: pymoo's import is not free

    return float(HV(ref_point=ref)(F[inside]))


def knee_point(F: np.ndarray | Sequence[Sequence[float]]) -> int:
    """Index (into ``F``) of the front's knee, after min-max normalising the front.

    Two objectives: the point farthest from the line through the two extremes, measured towards
    the ideal point (on a concave front no point bulges towards it and an extreme is returned).
    More objectives: the point closest to the ideal point.
    """
    F = _matrix(F)
    front = non_dominated(F)
    if front.size == 0:
        raise ValueError("knee_point: no finite point")
    P = F[front]
    lo, hi = P.min(axis=0), P.max(axis=0)
    N = (P - lo) / np.where(hi > lo, hi - lo, 1.0)
    if P.shape[1] == 2:
        # On a 2-D front the extremes normalise to (0, 1) and (1, 0): the line is x + y = 1.
        score = 1.0 - N.sum(axis=1)
    else:
        score = -np.linalg.norm(N, axis=1)
    return int(front[int(np.argmax(score))])  # argmax: first (lowest index) of equal scores
