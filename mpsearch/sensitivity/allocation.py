"""From sensitivity scores to bit widths: HAWQ-style greedy allocation under a size budget.

Following HAWQ-V2 (Dong et al., NeurIPS 2020), the total perturbation of a mixed-precision
policy is approximated by the sum of per-layer scores. :func:`hawq_allocation` starts every
layer at the widest choice and repeatedly takes the one-step reduction that adds the least score
per parameter-bit saved, until the parameter-weighted mean bit width fits the budget. The
results seed a search with sensitivity-guided policies at a few budgets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from mpsearch.errors import UserError
from mpsearch.policy import LayerPrecision, Policy

__all__ = ["hawq_allocation", "allocation_policy", "mean_bits"]


def mean_bits(allocation: Mapping[str, int], params: Mapping[str, int]) -> float:
    """Average weight bit width, weighted by each layer's parameter count."""
    total = sum(params[n] for n in allocation)
    if total <= 0:
        raise UserError("mean_bits: the layers have no parameters")
    return sum(params[n] * b for n, b in allocation.items()) / total


def hawq_allocation(
    df: pd.DataFrame,
    layers: list[str],
    params: Mapping[str, int] | None,
    budget_bits_per_weight: float,
    choices: Iterable[int] | None = None,
) -> dict[str, int]:
    """Weight bits per layer with mean bits per weight (weighted by ``params``) <= the budget.

    ``df`` is a sensitivity frame (``layer, bits, score``) holding every layer at every choice;
    ``params`` defaults to its ``params`` column; ``choices`` to the bit widths it holds.
    Deterministic: ties go to the layer listed first. A budget below the smallest choice is an
    error; one at or above the largest keeps every layer at the largest.
    """
    bits_available = sorted({int(b) for b in df["bits"]})
    options = sorted({int(b) for b in choices}) if choices is not None else bits_available
    if not options:
        raise UserError("hawq_allocation: no bit widths to choose from")
    if not layers:
        raise UserError("hawq_allocation: no layers")
    if params is None:
        if "params" not in df.columns:
            raise UserError("hawq_allocation: pass params (this frame has no 'params' column)")
        params = {str(n): int(p) for n, p in df.groupby("layer", sort=False)["params"].first().items()}
    score = {(str(n), int(b)): float(s) for n, b, s in df[["layer", "bits", "score"]].itertuples(index=False)}
    for name in layers:
        if name not in params:
            raise UserError(f"hawq_allocation: no parameter count for layer {name!r}")
        for b in options:
            if (name, b) not in score:
                raise UserError(f"hawq_allocation: no score for layer {name!r} at {b} bits; include {b} in the sensitivity bits")
    if budget_bits_per_weight < options[0]:
        raise UserError(
            f"hawq_allocation: a budget of {budget_bits_per_weight} bits per weight is below the smallest choice "
            f"({options[0]} bits); raise the budget or add a smaller bit width"
        )
    total = sum(params[n] for n in layers)
    if total <= 0:
        raise UserError("hawq_allocation: the layers have no parameters")
    alloc = {name: options[-1] for name in layers}
    used = sum(params[n] * alloc[n] for n in layers)  # integer parameter-bits: no drift from float sums
    while used > budget_bits_per_weight * total:
        best: tuple[float, str, int] | None = None
        for name in layers:
            idx = options.index(alloc[name])
            if idx == 0 or params[name] <= 0:
                continue
            lower = options[idx - 1]
            saved = params[name] * (alloc[name] - lower)
            cost = (score[(name, lower)] - score[(name, alloc[name])]) / saved
            if best is None or cost < best[0]:  # strict: ties keep the earlier layer
                best = (cost, name, lower)
        if best is None:  # unreachable given the budget check above; kept as a guard
            break
        _, name, lower = best
        used -= params[name] * (alloc[name] - lower)
        alloc[name] = lower
    return alloc


def allocation_policy(
    allocation: Mapping[str, int],
    *,
    model: str,
    dataset: str,
    act_bits: int | None = 8,
    checkpoint_sha256: str | None = None,
    provenance: dict[str, Any] | None = None,
) -> Policy:
    """A :class:`Policy` running each layer's weights at its allocated width, inputs at ``act_bits``."""
    return Policy(
        model=model,
        dataset=dataset,
        layers={name: LayerPrecision(weight_bits=b, act_bits=act_bits) for name, b in allocation.items()},
        checkpoint_sha256=checkpoint_sha256,
        provenance={"method": "hawq-greedy", **(provenance or {})},
    )
