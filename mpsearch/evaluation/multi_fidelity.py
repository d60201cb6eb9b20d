"""Multi-fidelity evaluation: successive halving with promotions decided by paired confidence intervals.

A candidate is first measured on the first ``rungs[0]`` validation images of the search subset;
it is promoted to the next rung (more images: only the added ones are measured) while it stays
near the front, that is unless it is *surely dominated*: some policy already measured at full
fidelity costs no more in every cost objective (costs are computed, hence exact) and is more
accurate on the same images, with the lower end of the paired 95 % interval of the accuracy
difference above zero; or *surely below the accuracy floor*: the fp32 model is more than the
floor's points more accurate on the same images, by the same paired interval. Most offspring of
a search that hit a fragile layer at 2 bits fail that test after a quarter of the images, while
the candidates the front keeps are all measured on the top rung: with a top rung above the plain
search's images (``--eval-images``), the front holds points of known accuracy that a few hundred
lucky images did not put there. Promotions compare against full-fidelity results of earlier
generations only, so a candidate's fate never depends on which batch-mates it had or in which
order workers finished: a study stays reproducible and resumable.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from mpsearch.evaluation.executors import EvalOutcome, EvalTask, Executor
from mpsearch.evaluation.metrics import paired_difference_ci
from mpsearch.objectives import objective_vector

__all__ = ["rungs", "pack_mask", "unpack_mask", "Archive", "surely_below_floor", "climb_rungs"]


def rungs(min_images: int, full_images: int) -> list[int]:
    """Image counts of the rungs: ``min_images`` doubled until ``full_images`` (always the last)."""
    if min_images < 1 or full_images < 1:
        raise ValueError("rung sizes must be >= 1 image")
    out = []
    size = min_images
    while size < full_images:
        out.append(size)
        size *= 2
    return out + [full_images]


def pack_mask(mask: torch.Tensor) -> str:
    """A correctness mask as compact text (base64 of its bits) for a trial's user attributes."""
    return base64.b64encode(np.packbits(mask.numpy().astype(bool)).tobytes()).decode("ascii")


def unpack_mask(text: str, images: int) -> torch.Tensor:
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8), count=images)
    return torch.from_numpy(bits.astype(bool))


@dataclass
class Archive:
    """Full-fidelity results a candidate is compared with: exact costs and per-image correctness."""

    costs: list[np.ndarray] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)

    def add(self, costs: Sequence[float], mask: torch.Tensor) -> None:
        self.costs.append(np.asarray(costs, dtype=float))
        self.masks.append(mask)

    def surely_dominated(self, costs: Sequence[float], mask: torch.Tensor) -> bool:
        """Whether a recorded policy costs no more and is more accurate on these images (95 %, paired)."""
        c = np.asarray(costs, dtype=float)
        n = len(mask)
        for other_costs, other_mask in zip(self.costs, self.masks):
            if len(other_mask) < n or not np.all(other_costs <= c):
                continue
            _, low, _ = paired_difference_ci(mask, other_mask[:n])  # other - this
            if low > 0:
                return True
        return False


def surely_below_floor(mask: torch.Tensor, fp32_mask: torch.Tensor, max_drop: float) -> bool:
    """Whether fp32 is more than ``max_drop`` percentage points more accurate on these images (95 %, paired)."""
    _, low, _ = paired_difference_ci(mask, fp32_mask[: len(mask)])  # fp32 - this
    return low > max_drop / 100


def climb_rungs(todo: list[int], policies: Mapping[int, Any], sizes: list[int], executor: Executor, archive: Archive,
                objectives: tuple[str, ...], *, on_done: Callable[[int], None],
                floor: tuple[torch.Tensor, float] | None = None) -> tuple[dict[int, EvalOutcome], dict[int, torch.Tensor]]:
    """Measure the candidates in slots ``todo`` rung by rung; (final outcome, per-image mask) per slot.

    Every candidate is measured on the first rung and climbs while it stays near the front: not
    surely dominated by a recorded full-fidelity point and, with ``floor`` (the fp32 model's
    per-image correctness on the top rung's images, the floor in points), not surely below the
    floor. A final outcome carries the accuracy over every image the candidate was measured on;
    ``on_done(slot)`` is called once per candidate, when it stops climbing.
    """
    outcomes: dict[int, EvalOutcome] = {}
    masks: dict[int, torch.Tensor] = {}
    walls: dict[int, float] = dict.fromkeys(todo, 0.0)
    active = list(todo)
    for r, size in enumerate(sizes):
        first = sizes[r - 1] if r else 0
        tasks = [EvalTask(slot, policies[slot].to_dict(), split="val", limit=size, start=first, keep_mask=True) for slot in active]
        for outcome in executor.map(tasks):
            slot = outcome.index
            walls[slot] += outcome.wall_s
            if not outcome.ok:
                outcomes[slot] = outcome
                masks.pop(slot, None)
                continue
            mask = outcome.mask() if slot not in masks else torch.cat([masks[slot], outcome.mask()])
            masks[slot] = mask
            metrics = dict(outcome.metrics, accuracy=float(mask.float().mean()))
            outcomes[slot] = replace(outcome, metrics=metrics, images=len(mask), correct=int(mask.sum()),
                                     wall_s=walls[slot], packed_mask=None)
        promoted = []
        for slot in active:
            last = r == len(sizes) - 1
            if not last and outcomes[slot].ok and _near_front(outcomes[slot], masks[slot], archive, objectives, floor):
                promoted.append(slot)
            else:
                on_done(slot)
        active = promoted
        if not active:
            break
    return outcomes, masks


def _near_front(outcome: EvalOutcome, mask: torch.Tensor, archive: Archive, objectives: tuple[str, ...],
                floor: tuple[torch.Tensor, float] | None) -> bool:
    """Whether a candidate measured on ``mask``'s images may still be on the front within the floor."""
    costs = objective_vector(outcome.metrics, objectives)[1:]
    if archive.surely_dominated(costs, mask):
        return False
    return floor is None or not surely_below_floor(mask, *floor)
