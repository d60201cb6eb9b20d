"""Accuracy as measured: per-image correctness (for paired comparisons) and Wilson intervals."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from mpsearch.data import Split

__all__ = ["correct_mask", "wilson_interval", "paired_difference_ci"]


def correct_mask(
    model: Callable[[torch.Tensor], torch.Tensor],
    split: Split,
    *,
    batch_size: int = 256,
    progress: str | None = None,
) -> torch.Tensor:
    """Run ``model`` over ``split`` in order; bool tensor, True where the top-1 prediction is right.

    ``progress`` is the label of a progress bar (none when ``None``). Image batches are fed in
    channels_last, the layout baselines keep their parameters in (see ``mpsearch.models.zoo``): oneDNN's
    convolutions run faster in it on CPU, and every measurement shares it.
    """
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    out = []
    bar = tqdm(total=len(split), desc=progress, unit="img", disable=progress is None, leave=False)
    try:
        with torch.inference_mode():
            for x, y in split.batches(batch_size):
                if x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                logits = model(x)
                bar.update(len(y))
                if not torch.isfinite(logits).all():
                    # A NaN row would count as "wrong" silently; make it visible instead.
                    raise FloatingPointError("the model produced NaN/inf outputs")
                out.append(logits.argmax(dim=1) == y)
    finally:
        bar.close()
        if isinstance(model, nn.Module) and was_training:
            model.train()
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def wilson_interval(correct: int, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion (well-behaved near 0 and 1)."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def bootstrap_ci(mask: torch.Tensor, *, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the accuracy of a correctness mask (images resampled
    with replacement, ``resamples`` times, from a seeded generator: the same mask gives the
    same interval)."""
    n = mask.numel()
    if n == 0:
        raise ValueError("bootstrap_ci needs a non-empty correctness mask")
    gen = torch.Generator().manual_seed(seed)
    values = mask.float()
    means = torch.stack([values[torch.randint(0, n, (n,), generator=gen)].mean() for _ in range(resamples)])
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=means.dtype))
    return float(low), float(high)


def paired_difference_ci(a: torch.Tensor, b: torch.Tensor, z: float = 1.959963984540054) -> tuple[float, float, float]:
    """Accuracy difference ``mean(b) - mean(a)`` on the same images, with a 95 % CI.

    Pairing cancels the per-image difficulty both models share: only the discordant images
    (right for one model, wrong for the other) carry information. The interval is Agresti and
    Min's adjusted Wald interval (Biometrics 2005: half a pseudo-observation added to each cell of
    the 2x2 table), which stays honest when no image disagrees, where the plain Wald interval
    would collapse to a point.
    """
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError("paired comparison needs two equally long, non-empty correctness masks")
    n = a.numel()
    only_a = int((a & ~b).sum())  # a right, b wrong
    only_b = int((b & ~a).sum())
    diff = (only_b - only_a) / n
    n_adj, a_adj, b_adj = n + 2, only_a + 0.5, only_b + 0.5
    d_adj = (b_adj - a_adj) / n_adj
    var = ((a_adj + b_adj) / n_adj - d_adj**2) / n_adj
    half = z * math.sqrt(max(var, 0.0))
    return diff, max(-1.0, d_adj - half), min(1.0, d_adj + half)
