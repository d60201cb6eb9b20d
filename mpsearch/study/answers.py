"""Choosing answers under noise: which front point is the cheapest within X pp of fp32.

A search ranks candidates on a few hundred validation images. The best-looking of many noisy
estimates is a lucky one (the winner's curse): picked on those images, "the cheapest point
within 0.5 pp" is typically further below fp32 than they said. The rule here chooses on
validation images the search did not use, and only as many as the question needs:

- **Evidence.** A point's drop against fp32 is a paired estimate on the same images; only the
  images where the two disagree carry information. Its lower confidence bound (Agresti and Min's
  adjusted Wald interval, :func:`mpsearch.evaluation.metrics.paired_difference_ci`, one-sided) says how far
  below fp32 the point may lie.
- **Fixed-sequence testing** (Maurer, Hothorn and Lehmacher 1995; Westfall and Krishen 2001).
  For a tolerance X, the front's points are tested in an order fixed before any of these images
  are seen, most expensive first (costs are computed, hence exact). Each test asks whether the
  point is within X at the full confidence level; the walk goes on to the next cheaper point only
  while the tests succeed, and the answer is the last point proven. No correction for the number
  of points is needed: the chance that an answer lies more than X below fp32 stays below
  ``1 - confidence``.
- **Sequential looks (racing).** A point is measured on a quarter, half and all of the fresh
  images, and its test may succeed at any look; the error rate is spent in proportion to the
  images each look adds (Bonferroni over the looks). A point surely more than X below fp32 at a
  look stops the walk there. Clear cases settle on a quarter of the images; only points near X
  get the whole split.

:class:`Race` holds the statistics and says which point needs which images next; it runs no
model, so a simulation drives it as the study does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import torch

from mpsearch.evaluation.metrics import paired_difference_ci
from mpsearch.objectives import drop_within

__all__ = ["AnswerRule", "Race", "run_race", "walk_bounds", "RULE_NAME"]

RULE_NAME = "fixed-sequence testing along the front (most expensive first), paired one-sided bounds, looks at 1/4, 1/2, all"
MIN_LOOK_IMAGES = 250  # a look on fewer images settles nothing: below this, fewer looks


@dataclass(frozen=True)
class AnswerRule:
    """The tolerances asked (percentage points below fp32) and the confidence each answer holds at."""

    tolerances: tuple[float, ...]
    confidence: float = 0.95

    def looks(self, images: int) -> list[int]:
        """Image counts of the looks on ``images`` fresh images: a quarter, a half, all (fewer
        looks where a quarter would be under :data:`MIN_LOOK_IMAGES`)."""
        if images <= 0:
            return []
        parts = 4 if images >= 4 * MIN_LOOK_IMAGES else 2 if images >= 2 * MIN_LOOK_IMAGES else 1
        fractions = {4: (0.25, 0.5, 1.0), 2: (0.5, 1.0), 1: (1.0,)}[parts]
        return sorted({max(1, round(images * f)) for f in fractions})

    def z_values(self, looks: Sequence[int]) -> list[float]:
        """One-sided normal quantile of each look: the error rate ``1 - confidence`` spent in
        proportion to the images the look adds."""
        alpha, total, out, before = 1 - self.confidence, looks[-1], [], 0
        for n in looks:
            out.append(NormalDist().inv_cdf(1 - alpha * (n - before) / total))
            before = n
        return out


def walk_bounds(bounds: Sequence[float], tolerance: float) -> int | None:
    """Position of the answer for ``tolerance`` given each point's lower bound on its drop (pp,
    negative below fp32; NaN where not measured), points ordered most expensive first: the last of
    the leading run of points proven within the tolerance; None when the first is not."""
    answer = None
    for i, bound in enumerate(bounds):
        if not (np.isfinite(bound) and drop_within(bound, tolerance)):
            break
        answer = i
    return answer


@dataclass
class _Point:
    mask: torch.Tensor  # correctness on the first len(mask) fresh images
    bounds: list[tuple[float, float]] = field(default_factory=list)  # per completed look: (low, high) of the drop in pp


class Race:
    """The rule's state over one front: each point's correctness on the fresh images so far.

    Points are numbered 0 to ``points - 1`` in the rule's fixed order, most expensive first;
    ``fp32`` is the fp32 model's correctness on every fresh image; ``full`` names points measured
    on every look whatever the answers need (the knee, so that its figures rest on the whole split).
    """

    def __init__(self, rule: AnswerRule, fp32: torch.Tensor, points: int, *, full: Sequence[int] = ()) -> None:
        self.rule = rule
        self.fp32 = fp32
        self.look_sizes = rule.looks(len(fp32))
        self.z = rule.z_values(self.look_sizes) if self.look_sizes else []
        self.points = [_Point(torch.zeros(0, dtype=torch.bool)) for _ in range(points)]
        self.full = [int(i) for i in full]

    def add(self, point: int, mask: torch.Tensor) -> None:
        """Correctness of ``point`` on the fresh images that follow those it was measured on."""
        p = self.points[point]
        p.mask = torch.cat([p.mask, mask.bool()])
        for k in range(len(p.bounds), len(self.look_sizes)):
            n = self.look_sizes[k]
            if len(p.mask) < n:
                break
            _, low, high = paired_difference_ci(self.fp32[:n], p.mask[:n], z=self.z[k])
            p.bounds.append((100 * low, 100 * high))

    def images(self, point: int) -> int:
        return len(self.points[point].mask)

    def bound(self, point: int) -> float:
        """The point's best lower bound on its drop over its looks (pp; NaN before its first look)."""
        bounds = self.points[point].bounds
        return max(low for low, _ in bounds) if bounds else float("nan")

    def _status(self, point: int, tolerance: float) -> str:
        """``proven`` within the tolerance, ``failed`` (surely beyond it, or every look spent), or ``open``."""
        p = self.points[point]
        if p.bounds and drop_within(self.bound(point), tolerance):
            return "proven"
        if p.bounds and not drop_within(p.bounds[-1][1], tolerance):
            return "failed"  # even the upper bound lies beyond the tolerance
        return "failed" if len(p.bounds) == len(self.look_sizes) else "open"

    def wanted(self) -> dict[int, int]:
        """Points that need more images, and up to which image count (the next look)."""
        out: dict[int, int] = {}
        for point in self.full:
            done = len(self.points[point].bounds)
            if done < len(self.look_sizes):
                out[point] = self.look_sizes[-1]  # measured to the end in one pass
        for tolerance in self.rule.tolerances:
            for point in range(len(self.points)):
                status = self._status(point, tolerance)
                if status == "proven":
                    continue
                if status == "open":
                    out[point] = max(out.get(point, 0), self.look_sizes[len(self.points[point].bounds)])
                break
        return out

    def answers(self) -> dict[float, int | None]:
        """Per tolerance, the point the rule answers with (None: no point proven within it)."""
        bounds = [self.bound(i) for i in range(len(self.points))]
        return {tolerance: walk_bounds(bounds, tolerance) for tolerance in self.rule.tolerances}


def run_race(race: Race, measure: Callable[[Mapping[int, tuple[int, int]]], Mapping[int, torch.Tensor]]) -> Race:
    """Measure until no point needs more images; ``measure`` takes {point: (first image, end)}
    on the fresh images and returns each point's correctness on them (all requests of a round at
    once, so that a pool of workers shares them)."""
    if not race.look_sizes:
        return race
    while wanted := race.wanted():
        masks = measure({point: (race.images(point), end) for point, end in wanted.items()})
        for point in wanted:
            race.add(point, masks[point])
    return race
