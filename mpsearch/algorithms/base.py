"""The contract every search algorithm keeps: batch ask/tell over a bound space's integer vectors.

The study driver owns evaluation (serial or on Ray) and the persistent record; an algorithm only
proposes. The driver calls :meth:`SearchAlgorithm.setup` once, then repeatedly :meth:`~SearchAlgorithm.ask`
for a batch, evaluates it and :meth:`~SearchAlgorithm.tell` s the results in the same order. All
objectives are minimized (the driver negates accuracy); a row of ``inf`` (or any non-finite value)
marks a failed evaluation. Given the seed and the told results, every algorithm is deterministic,
so a study resumes by replaying its record.

New algorithms subclass :class:`SearchAlgorithm`, implement ``_setup``/``_ask``/``_tell`` and
register with :func:`register_algorithm`; the shared contract test then covers them.

Planning algorithms (the HAWQ-V3 ILP, the greedy bit lowering) build a finite list of policies
from sensitivity scores and exact costs rather than breeding a population. They declare
``needs_context`` (the driver passes a :class:`SearchContext`), may ask for smaller batches
(``fixed_batch = False``) and say when their plan is used up (:attr:`~SearchAlgorithm.exhausted`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np

from mpsearch.algorithms.space import BoundSpace
from mpsearch.registry import Registry

__all__ = [
    "SearchAlgorithm",
    "SearchContext",
    "ALGORITHMS",
    "register_algorithm",
    "create_algorithm",
    "initial_batch",
    "random_vectors",
    "fill",
    "json_floats",
]

A = TypeVar("A", bound="type[SearchAlgorithm]")


@dataclass(frozen=True)
class SearchContext:
    """What planning algorithms know beyond the space: exact costs and per-layer sensitivity.

    ``costs(x)`` returns the cost objectives of vector ``x`` (relative energy, size ...: the
    objectives after accuracy, in order); they are computed, not measured, and exact.
    ``weight_scores`` maps (layer, weight bits) to the sensitivity score of quantizing that
    layer's weights to that width (HAWQ's perturbation: Hessian trace x squared weight error);
    ``None`` when the study computed no sensitivity. ``budget`` is how many evaluations the
    algorithm may propose in all, initial vectors included. ``gap_plans``: how many vectors of
    each batch a population search may give to ILP solutions placed in the widest gaps of its
    measured front (NSGA-II; 0: none).
    """

    costs: Callable[[np.ndarray], np.ndarray]
    weight_scores: Mapping[tuple[str, int], float] | None
    budget: int
    gap_plans: int = 0


class SearchAlgorithm(ABC):
    """Proposes batches of integer vectors (indices into each gene's choices) and learns from results.

    Called by the study driver: :meth:`setup` once, then repeatedly :meth:`ask` a batch, evaluate
    it, :meth:`tell` its results in the same order. Every batch holds exactly ``population_size``
    vectors (so a driver's loop always advances; a batch repeats points only where the space has
    too few distinct ones); the first holds the ``initial`` vectors (duplicates dropped, order
    kept) followed by the algorithm's own start.
    """

    name: ClassVar[str]
    needs_context: ClassVar[bool] = False  # setup() requires a SearchContext
    fixed_batch: ClassVar[bool] = True  # every batch holds exactly population_size vectors
    # The driver's first batch carries the sensitivity-guided seeds (the ILP's solutions) beside
    # the uniform policies; baselines that must not see them (random search) and planners that
    # make their own plan say False.
    sensitivity_seeded: ClassVar[bool] = True
    # More initial vectors than one batch holds: the first batch takes population_size of them,
    # the following batches the rest (before the algorithm's own proposals). Others refuse them.
    extra_seeds: ClassVar[bool] = False
    # Whether told constraint violations (the accuracy floor) steer what it proposes next.
    constrained: ClassVar[bool] = False

    def __init__(self) -> None:
        self._space: BoundSpace | None = None
        self._pending: list[np.ndarray] | None = None
        self.n_batches = 0  # batches told so far

    @property
    def space(self) -> BoundSpace:
        if self._space is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before ask()/tell()")
        return self._space

    def setup(
        self,
        space: BoundSpace,
        *,
        n_objectives: int,
        seed: int,
        initial: Sequence[np.ndarray] = (),
        population_size: int = 20,
        context: SearchContext | None = None,
    ) -> None:
        """Start a fresh search over ``space``; ``initial`` vectors (uniform, sensitivity-guided) come first."""
        if self.needs_context and context is None:
            raise ValueError(f"{type(self).__name__} plans from sensitivity and costs: pass a SearchContext")
        if isinstance(n_objectives, bool) or not isinstance(n_objectives, int) or n_objectives < 1:
            raise ValueError(f"n_objectives must be a positive integer, got {n_objectives!r}")
        if isinstance(population_size, bool) or not isinstance(population_size, int) or population_size < 2:
            raise ValueError(f"population_size must be an integer >= 2 (NSGA-II breeds pairs), got {population_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        unique = _unique_rows(space.validate(x) for x in initial)
        if len(unique) > population_size and not self.extra_seeds:
            raise ValueError(
                f"{len(unique)} distinct initial vectors do not fit the first batch of population_size={population_size}; "
                "raise population_size or pass fewer"
            )
        self._space = space
        self.n_objectives = n_objectives
        self.seed = int(seed)
        self.population_size = population_size
        self._pending = None
        self.n_batches = 0
        self.context = context
        self.seed_batches = max(1, -(-len(unique) // population_size))  # batches that carry initial vectors
        self._setup(unique)

    @property
    def exhausted(self) -> bool:
        """True when the algorithm has nothing left to propose (planning algorithms); the driver stops."""
        return False

    def ask(self) -> list[np.ndarray]:
        """The next batch of int64 vectors within ``[xl, xu]``; tell its results before asking again."""
        space = self.space
        if self._pending is not None:
            raise RuntimeError(f"{type(self).__name__}: tell() the results of the last batch before asking again")
        if self.exhausted:
            raise RuntimeError(f"{type(self).__name__}: its plan is used up; check exhausted before ask()")
        xs = self._ask()
        if not self.fixed_batch and 1 <= len(xs) <= self.population_size:
            pass
        elif len(xs) != self.population_size:
            raise RuntimeError(f"{type(self).__name__} proposed {len(xs)} vectors, not population_size={self.population_size}")
        batch = []
        for x in xs:
            try:
                batch.append(space.validate(x))
            except ValueError as exc:  # the algorithm's bug, not the user's
                raise RuntimeError(f"{type(self).__name__} proposed an invalid vector: {exc}") from None
        self._pending = [x.copy() for x in batch]
        return batch

    def tell(self, xs: Sequence[np.ndarray], objectives: np.ndarray, violation: Sequence[float] | None = None) -> None:
        """Results of the last batch, in its order: ``objectives`` has shape ``(len(xs), n_objectives)``.

        ``violation`` (one value >= 0 per vector; None: all 0) says how far each measured
        candidate lies outside the study's constraint (the accuracy floor): 0 is feasible.
        Algorithms with ``constrained`` prefer feasible candidates and, among infeasible ones,
        smaller violations; baselines ignore it.
        """
        if self._pending is None:
            raise RuntimeError(f"{type(self).__name__}: tell() without a pending batch; ask() first")
        if len(xs) != len(self._pending) or any(not np.array_equal(a, b) for a, b in zip(xs, self._pending)):
            raise ValueError("tell() must receive the vectors of the last ask(), in the same order")
        F = np.array(objectives, dtype=float)
        if F.shape != (len(xs), self.n_objectives):
            raise ValueError(f"objectives must have shape ({len(xs)}, {self.n_objectives}), got {np.shape(objectives)}")
        failed = ~np.isfinite(F).all(axis=1)
        F[failed] = np.inf  # one meaning for a failed evaluation, whatever the driver wrote (nan, one inf ...)
        V = np.zeros(len(xs)) if violation is None else np.array(violation, dtype=float)
        if V.shape != (len(xs),) or not (np.isfinite(V) & (V >= 0)).all():
            raise ValueError(f"violation must hold {len(xs)} finite values >= 0, got {violation!r}")
        V[failed] = 0.0  # a failed evaluation has no accuracy to hold against the floor
        self._tell(self._pending, F, failed, V)
        self._pending = None
        self.n_batches += 1

    def state(self) -> dict[str, Any]:
        """A JSON-able snapshot of everything the next :meth:`ask` depends on; call it after :meth:`tell`.

        The study driver checkpoints it (as a digest) after every generation. A resumed study
        rebuilds the algorithm by replaying its recorded generations through ask/tell, which the
        determinism of every algorithm makes exact, and checks each replayed snapshot against the
        checkpoint before it runs anything new.
        """
        return {"algorithm": self.name, "seed": self.seed, "batches": self.n_batches, **self._state()}

    def _state(self) -> dict[str, Any]:
        """Algorithm-specific part of :meth:`state` (population, random generator state ...)."""
        return {}

    @abstractmethod
    def _setup(self, initial: list[np.ndarray]) -> None:
        """Build the algorithm's state; ``initial`` is validated and de-duplicated."""

    @abstractmethod
    def _ask(self) -> list[np.ndarray]:
        """The next batch."""

    @abstractmethod
    def _tell(self, xs: list[np.ndarray], F: np.ndarray, failed: np.ndarray, violation: np.ndarray) -> None:
        """Results of the batch; failed rows are all ``inf`` and flagged in ``failed``; ``violation``
        is 0 for feasible (and failed) rows."""


ALGORITHMS: Registry[type[SearchAlgorithm]] = Registry("search algorithm")


def register_algorithm(name: str) -> Callable[[A], A]:
    """Class decorator: register under ``name`` (a duplicate is an error) and set ``cls.name``."""

    def decorate(cls: A) -> A:
        cls.name = name
        return ALGORITHMS.register(name)(cls)

    return decorate


def create_algorithm(name: str) -> SearchAlgorithm:
    """A fresh, not yet set up, algorithm by registered name; an unknown name lists the known ones."""
    return ALGORITHMS.get(name)()


def _unique_rows(rows: Iterable[np.ndarray], seen: set[tuple[int, ...]] | None = None) -> list[np.ndarray]:
    """``rows`` without repeats, in order, as int64 arrays; ``seen`` (updated) holds keys to skip."""
    seen = set() if seen is None else seen
    out = []
    for x in rows:
        key = tuple(int(v) for v in x)
        if key not in seen:
            seen.add(key)
            out.append(np.asarray(x, dtype=np.int64))
    return out


def random_vectors(space: BoundSpace, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` uniform random vectors, shape ``(n, n_var)``."""
    return rng.integers(space.xl, space.xu + 1, size=(n, space.n_var), dtype=np.int64)


def initial_batch(
    space: BoundSpace,
    initial: Sequence[np.ndarray],
    size: int,
    rng: np.random.Generator,
    *,
    exclude: Iterable[np.ndarray] = (),
) -> np.ndarray:
    """``initial`` (distinct, in order) topped up to ``size`` with distinct random vectors not in ``exclude``.

    Fewer than ``size`` rows only when the space has fewer distinct points left; :func:`fill`
    completes such a batch.
    """
    seen = {tuple(int(v) for v in x) for x in exclude}
    rows = _unique_rows(initial, seen)
    room = space.size - len(seen)
    for _ in range(100):  # a few rounds suffice unless the space is nearly exhausted
        if len(rows) >= size or room <= 0:
            break
        for x in random_vectors(space, 2 * (size - len(rows)), rng):
            key = tuple(int(v) for v in x)
            if key not in seen and len(rows) < size:
                seen.add(key)
                rows.append(x)
                room -= 1
    return np.array(rows, dtype=np.int64).reshape(len(rows), space.n_var)


def fill(rows: np.ndarray, size: int, space: BoundSpace, rng: np.random.Generator) -> np.ndarray:
    """``rows`` completed to ``size`` with random vectors, repeats allowed (a space smaller than a batch)."""
    if len(rows) >= size:
        return rows
    return np.concatenate([rows.reshape(len(rows), space.n_var), random_vectors(space, size - len(rows), rng)])


def json_floats(values: np.ndarray) -> list:
    """A float array as nested lists with ``None`` for non-finite values (JSON has no inf)."""
    return [json_floats(v) for v in values] if np.ndim(values) > 1 else [float(v) if np.isfinite(v) else None for v in values]
