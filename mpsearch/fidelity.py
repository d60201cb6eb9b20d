"""Multi-fidelity evaluation: successive halving with promotions decided by paired confidence intervals.

A candidate is first measured on the first ``rungs[0]`` validation images of the search subset;
it is promoted to the next rung (more images: only the added ones are measured) unless it is
*surely dominated*: some policy already measured at full fidelity costs no more in every cost
objective (costs are computed, hence exact) and is more accurate on the same images, with the
lower end of the paired 95 % interval of the accuracy difference above zero. Most offspring of a
search that hit a fragile layer at 2 bits fail that test after a quarter of the images, so a
budget counted in full evaluations buys more candidates. Promotions compare against full-fidelity
results of earlier generations only, so a candidate's fate never depends on which batch-mates it
had or in which order workers finished: a study stays reproducible and resumable.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mpsearch.metrics import paired_difference_ci

__all__ = ["rungs", "pack_mask", "unpack_mask", "Archive"]


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
