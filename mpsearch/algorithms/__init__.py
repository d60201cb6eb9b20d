"""Multi-objective search over per-layer bit widths: spaces, algorithms, Pareto tools.

- :mod:`~mpsearch.algorithms.space_file` / :mod:`~mpsearch.algorithms.space`: search spaces (YAML data) and their integer-vector encoding;
- :mod:`~mpsearch.algorithms.base`: the ask/tell contract and the algorithm registry;
- ``nsga2`` (pymoo), ``optuna-nsga2``, ``optuna-tpe`` (Optuna samplers), ``random``;
- :mod:`~mpsearch.algorithms.pareto`: fronts, hypervolume, knee points.

The search never touches models or quantizers: it proposes vectors, the study driver turns them
into policies (:meth:`BoundSpace.decode`) and measures them. pymoo and Optuna are imported only
when an algorithm is set up.
"""

from __future__ import annotations

# Importing the algorithm modules registers them (their heavy imports are deferred to setup()).
from mpsearch.algorithms import nsga2, optuna_samplers, planning, random_search  # noqa: F401
from mpsearch.algorithms.base import ALGORITHMS, SearchAlgorithm, create_algorithm, register_algorithm
from mpsearch.algorithms.pareto import dominates, hypervolume, knee_point, non_dominated
from mpsearch.algorithms.space import BoundSpace, Gene, SearchSpace, available_spaces, default_space_for

__all__ = [
    "ALGORITHMS",
    "SearchAlgorithm",
    "create_algorithm",
    "register_algorithm",
    "SearchSpace",
    "BoundSpace",
    "Gene",
    "available_spaces",
    "default_space_for",
    "non_dominated",
    "hypervolume",
    "knee_point",
    "dominates",
]
