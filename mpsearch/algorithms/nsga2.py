"""NSGA-II (Deb et al., "A fast and elitist multiobjective genetic algorithm: NSGA-II", IEEE TEC 2002) from pymoo.

pymoo 0.6.2 driven through its ask/tell interface over integer gene indices, with the integer
operators its documentation recommends: IntegerRandomSampling-like start, SBX crossover and
polynomial mutation on floats rounded back to integers, duplicates eliminated. Because the
indices follow the bit order, SBX and PM make small steps in bit width more likely than big ones.

With a :class:`SearchContext` that carries sensitivity scores and ``gap_plans > 0``, each batch
of offspring gives up to ``gap_plans`` of its places to solutions of HAWQ-V3's integer linear
program (at :data:`GAP_PLAN_BUDGETS` evenly spaced energy budgets, like the ``ilp`` baseline): the one
whose energy lies nearest the middle of each of the widest gaps of the measured front, widest
(largest rectangle between neighbouring front points in error x energy) first. Crossover and
mutation rarely land in the narrow accuracy cliff where a few layers' widths decide everything;
the ILP ranks layers there and the measurements say where to look.

pymoo never evaluates anything here: the problem only carries bounds, and its ``_evaluate``
raises. Its one inequality constraint is the study's accuracy floor: a candidate below it is told
as infeasible by how far below it lies, so survival (Deb's constrained domination) keeps feasible
candidates first and breeds the budget into the useful region. A failed evaluation (an ``inf``
row) is told as infeasible by more than any measured candidate can be, so survival ranks it last
without inventing objective values. Gap filling looks at the feasible front only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpsearch.algorithms.base import SearchAlgorithm, _unique_rows, fill, initial_batch, json_floats, register_algorithm

__all__ = ["PymooNSGA2", "GAP_PLAN_BUDGETS"]

# The ILP is solved at this many evenly spaced energy budgets for gap filling: denser than the
# ``ilp`` baseline's (one per evaluation of its budget), and fixed, not the study's
# budget, so that a study extended to a larger budget replays the same search.
GAP_PLAN_BUDGETS = 256
FAILED_VIOLATION = 1e3  # a failed evaluation's constraint violation: above any floor's (at most 100 pp)


def _problem(n_var: int, n_obj: int, xl: np.ndarray, xu: np.ndarray) -> Any:
    from pymoo.core.problem import Problem

    class _IndexProblem(Problem):
        """Bounds only; objectives come from the study driver through tell()."""

        def _evaluate(self, x: Any, out: Any, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("pymoo tried to evaluate the search problem; results must come through tell()")

    # n_ieq_constr=1: the accuracy floor, failed evaluations beyond it (see the module docstring).
    return _IndexProblem(n_var=n_var, n_obj=n_obj, n_ieq_constr=1, xl=xl, xu=xu, vtype=int)


@register_algorithm("nsga2")
class PymooNSGA2(SearchAlgorithm):
    """NSGA-II (Deb et al. 2002), pymoo's implementation: one batch = one generation of offspring.

    The first batch is the initial population: the given vectors, then distinct random ones
    (seeded) up to ``population_size``. Initial vectors beyond one batch (``extra_seeds``) come
    in the next batches, topped up with offspring, and join the population through NSGA-II's
    survival like offspring do. Later batches are ``population_size`` offspring, distinct
    from each other and from the surviving population (a point discarded earlier may come back:
    the driver's cache answers it); if duplicate elimination leaves fewer (a small or converged
    space), the batch is topped up with distinct random vectors, and with repeats only when the
    space has no distinct point left.
    """

    extra_seeds = True
    constrained = True

    def _setup(self, initial: list[np.ndarray]) -> None:
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.termination import NoTermination
        from pymoo.operators.crossover.sbx import SBX
        from pymoo.operators.mutation.pm import PM
        from pymoo.operators.repair.rounding import RoundingRepair

        space = self.space
        # The start is an explicit array (pymoo accepts one as `sampling`) so the initial vectors
        # lead; the top-up is seeded from `seed` like everything else (np.random.seed is ignored).
        start = initial_batch(space, initial[: self.population_size], self.population_size, np.random.default_rng(self.seed))
        self._extra = [np.asarray(x, dtype=np.int64) for x in initial[self.population_size :]]
        self._algorithm = NSGA2(
            pop_size=self.population_size,
            sampling=start,
            crossover=SBX(vtype=float, repair=RoundingRepair()),
            mutation=PM(vtype=float, repair=RoundingRepair()),
            eliminate_duplicates=True,
        )
        problem = _problem(space.n_var, self.n_objectives, space.xl.astype(float), space.xu.astype(float))
        # NSGA2.__init__ installs a default termination; the driver decides when to stop, so never.
        self._algorithm.setup(problem, seed=self.seed, termination=NoTermination(), verbose=False)
        self._batch: Any = None
        self._plans = self._gap_candidates()
        self._per_batch = min(self.context.gap_plans, self.population_size // 2) if self._plans else 0
        self._proposed = {tuple(int(v) for v in x) for x in initial}
        self._measured = np.zeros((0, 2))  # (error, first cost) of every finite result told

    def _gap_candidates(self) -> list[tuple[float, np.ndarray]]:
        """(energy, vector) of the distinct ILP solutions, cheapest first; none without scores."""
        context = self.context
        if context is None or context.weight_scores is None or context.gap_plans <= 0 or self.n_objectives < 2:
            return []
        from mpsearch.algorithms.planning import ilp_plans

        try:
            plans = _unique_rows(ilp_plans(self.space, context, GAP_PLAN_BUDGETS))
        except ValueError:  # no weight gene to allocate, or a layer without a score: plain NSGA-II
            return []
        return sorted(((float(context.costs(x)[0]), x) for x in plans), key=lambda p: p[0])

    def _gap_fillers(self, n: int, exclude: set[tuple[int, ...]]) -> list[np.ndarray]:
        """Up to ``n`` ILP solutions not proposed before, one per gap of the measured front,
        widest gap first, each the one whose energy lies nearest the middle of its gap."""
        from mpsearch.algorithms.pareto import non_dominated

        if n <= 0 or len(self._measured) < 2:
            return []
        front = self._measured[non_dominated(self._measured)]
        front = front[np.argsort(front[:, 1], kind="stable")]
        gaps = [((b[1] - a[1]) * (a[0] - b[0]), a[1], b[1]) for a, b in zip(front[:-1], front[1:])]
        chosen: list[np.ndarray] = []
        for _, low, high in sorted(gaps, key=lambda g: -g[0]):
            middle = (low + high) / 2
            inside = [(abs(cost - middle), i) for i, (cost, x) in enumerate(self._plans)
                      if low < cost < high and tuple(int(v) for v in x) not in exclude]
            if inside:
                x = self._plans[min(inside)[1]][1]
                exclude.add(tuple(int(v) for v in x))
                chosen.append(x)
                if len(chosen) == n:
                    break
        return chosen

    def _ask(self) -> list[np.ndarray]:
        from pymoo.core.population import Population

        algorithm = self._algorithm
        initialized = algorithm.is_initialized  # the first ask() returns the initial population
        pop = algorithm.ask()
        if pop is None:  # mating produced no new vector at all; pymoo flags termination, we go on
            algorithm.termination.force_termination = False
            pop = Population.empty()
        if initialized and self._extra:  # initial vectors that did not fit the first batch, then offspring
            seeds, self._extra = self._extra[: self.population_size], self._extra[self.population_size :]
            pop = Population.merge(Population.new(X=np.array(seeds, dtype=float)), pop[: self.population_size - len(seeds)])
        X = np.array([np.asarray(ind.X).round() for ind in pop], dtype=np.int64).reshape(len(pop), self.space.n_var)
        X = np.clip(X, self.space.xl, self.space.xu)  # SBX/PM respect bounds; clip guards against rounding drift
        if initialized and self._per_batch and not self._extra:
            fillers = self._gap_fillers(self._per_batch, self._proposed | {tuple(int(v) for v in x) for x in X})
            if fillers:  # they take the last offspring's places
                X = np.concatenate([X[: len(X) - len(fillers)], np.array(fillers, dtype=np.int64)])
        if len(X) < self.population_size:
            current = list(X) + ([np.asarray(ind.X, dtype=np.int64) for ind in algorithm.pop] if algorithm.is_initialized else [])
            extra = initial_batch(self.space, [], self.population_size - len(X), algorithm.random_state, exclude=current)
            extra = fill(extra, self.population_size - len(X), self.space, algorithm.random_state)
            pop = Population.merge(pop, Population.new(X=extra))
            X = np.concatenate([X, extra])
        pop.set("X", X)
        self._batch = pop
        return list(X)

    def _state(self) -> dict[str, Any]:
        algorithm = self._algorithm
        pop = algorithm.pop if algorithm.is_initialized else []
        X = np.array([np.asarray(ind.X, dtype=np.int64) for ind in pop]).reshape(len(pop), self.space.n_var)
        F = np.array([np.asarray(ind.F, dtype=float) for ind in pop]).reshape(len(pop), self.n_objectives)
        return {"population": X.tolist(), "objectives": json_floats(F), "n_gen": algorithm.n_gen,
                "rng": algorithm.random_state.bit_generator.state, "seeds_left": len(self._extra),
                "gap_plans_left": sum(tuple(int(v) for v in x) not in self._proposed for _, x in self._plans)}

    def _tell(self, xs: list[np.ndarray], F: np.ndarray, failed: np.ndarray, violation: np.ndarray) -> None:
        self._proposed.update(tuple(int(v) for v in x) for x in xs)
        feasible = ~failed & (violation <= 0)
        if self.n_objectives >= 2 and feasible.any():
            self._measured = np.vstack([self._measured, F[feasible][:, :2]])
        pop = self._batch
        cv = np.where(failed, FAILED_VIOLATION, violation)[:, None]
        pop.set("F", F)
        pop.set("G", cv)
        pop.set("CV", cv)  # set explicitly: pymoo caches CV once computed
        self._algorithm.tell(infills=pop)
        self._batch = None
