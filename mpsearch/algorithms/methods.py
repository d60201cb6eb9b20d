"""Search methods: a registered algorithm, optionally measured with multi-fidelity promotions.

``nsga2`` runs NSGA-II; ``nsga2+mf`` runs it with every candidate climbing the rungs of
:mod:`mpsearch.evaluation.multi_fidelity` (any method, planners included, takes ``+mf``);
``nsga2+mf,random,ilp`` runs three methods one after the other into the same study (each
with the full budget, trials tagged by method), which is how methods are compared.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpsearch.algorithms.base import ALGORITHMS
from mpsearch.errors import UserError

__all__ = ["Method", "parse_methods", "MF_SUFFIX"]

MF_SUFFIX = "+mf"


@dataclass(frozen=True)
class Method:
    """One search method of a study. Its ``name`` tags the trials it ran (user attribute ``run``)."""

    name: str
    algorithm: str
    multi_fidelity: bool

    @property
    def needs_sensitivity(self) -> bool:
        """Planners allocate bits from sensitivity scores."""
        return ALGORITHMS.get(self.algorithm).needs_context


def parse_methods(spec: str) -> list[Method]:
    """``search.algorithm`` text (``nsga2``, ``nsga2+mf``, or several comma-separated) as methods."""
    methods: list[Method] = []
    for part in (p.strip() for p in spec.split(",")):
        algorithm, mf = (part[: -len(MF_SUFFIX)], True) if part.endswith(MF_SUFFIX) else (part, False)
        ALGORITHMS.get(algorithm)  # unknown: one line listing the registered names
        if any(m.name == part for m in methods):
            raise UserError(f"search.algorithm lists {part!r} twice; name each method once", fields=("search.algorithm",))
        methods.append(Method(part, algorithm, mf))
    return methods
