"""Rule-based baselines measured in the same study as the search: HAWQ-V3's integer linear program
and AIMET-style greedy bit lowering.

Both reason over *units*: a weight gene together with the activation genes of the same layers.
A unit's options are its weight widths; the layer inputs follow the weight width (the smallest
activation choice at or above it, the widest for float weights), as in HAWQ-V3, where a layer's
weights and inputs share one precision. Genes outside every unit (activation genes of layers
whose weights are pinned, attention matmuls) stay at their widest choice. Unit costs are exact:
energy, size and BOPs add up over layers and units cover disjoint layers, so a unit's cost is the
change of the vector's cost when only its genes move away from the all-widest vector.

- ``ilp`` (Yao et al., HAWQ-V3, ICML 2021): minimise the summed Hessian perturbation
  (:class:`SearchContext` ``weight_scores``) subject to the first cost objective (energy) staying
  under a budget, at evenly spaced budgets between the cheapest and the widest policy; one
  ``scipy.optimize.milp`` solve per budget; every distinct solution is measured.
- ``greedy`` (AIMET's automatic mixed precision): measure each unit's accuracy drop at its
  lower widths with everything else at the widest (phase 1), then walk from the widest policy
  lowering, one step at a time, the unit whose next width costs the least measured accuracy per
  unit of energy saved; the policies along the walk are measured.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import numpy as np

from mpsearch.algorithms.base import SearchAlgorithm, register_algorithm
from mpsearch.algorithms.space import BoundSpace
from mpsearch.errors import UserError

__all__ = ["Unit", "plan_units", "unit_costs", "ilp_plans", "IntegerLinearProgram", "GreedyLowering"]


@dataclass(frozen=True)
class Unit:
    """A weight gene and the activation genes that follow its width; ``settings[k]`` is the
    (gene index -> choice index) assignment of the unit's ``k``-th weight width (widest last)."""

    weight_gene: int
    layers: tuple[str, ...]
    bits: tuple[int | None, ...]  # the weight width of each option, narrowest first
    settings: tuple[dict[int, int], ...]


def _order(bits: int | None) -> int:
    return 33 if bits is None else bits  # float (None) is the widest


def plan_units(space: BoundSpace) -> tuple[list[Unit], np.ndarray]:
    """The space's units and the all-widest vector they move away from."""
    widest = np.array([max(range(len(g.choices)), key=lambda i: _order(g.choices[i])) for g in space.genes], dtype=np.int64)
    units = []
    for k, gene in enumerate(space.genes):
        if gene.operand != "weight":
            continue
        followers = [j for j, g in enumerate(space.genes) if g.operand == "act" and set(g.layers) <= set(gene.layers)]
        options = sorted(range(len(gene.choices)), key=lambda i: _order(gene.choices[i]))
        settings = []
        for i in options:
            bits = gene.choices[i]
            setting = {k: i}
            for j in followers:
                acts = space.genes[j].choices
                fits = [c for c in range(len(acts)) if bits is not None and acts[c] is not None and acts[c] >= bits]
                setting[j] = min(fits, key=lambda c: acts[c]) if fits else int(widest[j])
            settings.append(setting)
        units.append(Unit(k, gene.layers, tuple(gene.choices[i] for i in options), tuple(settings)))
    return units, widest


def _apply(x: np.ndarray, unit: Unit, option: int) -> np.ndarray:
    y = x.copy()
    for j, c in unit.settings[option].items():
        y[j] = c
    return y


def unit_costs(costs, units: list[Unit], widest: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Cost objectives of the widest vector and, per unit, the change each of its options makes
    (``costs`` is :attr:`SearchContext.costs`)."""
    base = np.asarray(costs(widest), dtype=float)
    deltas = [np.array([np.asarray(costs(_apply(widest, u, o)), dtype=float) - base for o in range(len(u.bits))])
              for u in units]
    for unit, delta in zip(units, deltas):
        bad = np.argwhere(~np.isfinite(delta + base))
        if len(bad):
            option, objective = bad[0]
            raise UserError(f"the cost of layer {unit.layers[0]} at {unit.bits[option]} bits is not finite "
                            f"({delta[option, objective] + base[objective]} for cost objective {objective + 1}): "
                            "check the energy profile's numbers")
    return base, deltas


def _perturbation(unit: Unit, scores) -> np.ndarray:
    """The summed weight score of each of ``unit``'s options (0 for float weights)."""
    out = []
    for bits in unit.bits:
        if bits is None:
            out.append(0.0)
            continue
        missing = [layer for layer in unit.layers if (layer, bits) not in scores]
        if missing:
            raise ValueError(f"ilp: no sensitivity score for {missing[0]} at {bits} bits")
        out.append(sum(scores[layer, bits] for layer in unit.layers))
    return np.asarray(out)


@contextlib.contextmanager
def _quiet_solver_output():
    """Send file descriptor 1 to /dev/null: HiGHS 1.12 (scipy's milp) prints a debug line
    ("HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();") from C++ even
    with display off (ERGO-Code/HiGHS#2783), into the middle of a study's progress output."""
    try:
        stdout = os.dup(1)
    except OSError:  # no file descriptor 1 (an embedding host): nothing to silence
        yield
        return
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(stdout, 1)
        os.close(stdout)
        os.close(devnull)


def ilp_plans(space: BoundSpace, context, n_budgets: int) -> list[np.ndarray]:
    """HAWQ-V3's ILP solved at ``n_budgets`` evenly spaced energy budgets, widest budget first:
    per budget, the vector minimising the summed Hessian perturbation whose first cost objective
    stays within it (repeats kept; callers drop them). ``context`` is a :class:`SearchContext`
    with ``weight_scores``."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    if context.weight_scores is None:
        raise ValueError("ilp needs Hessian sensitivity scores: set search.sensitivity to hessian")
    units, widest = plan_units(space)
    if not units:
        raise ValueError("ilp: the search space has no weight gene to allocate")
    base, deltas = unit_costs(context.costs, units, widest)
    sizes = [len(u.bits) for u in units]
    n = sum(sizes)
    c = np.concatenate([_perturbation(u, context.weight_scores) for u in units])
    cost = np.concatenate([d[:, 0] for d in deltas])  # the first cost objective: energy
    one_hot = np.zeros((len(units), n))
    start = 0
    for i, size in enumerate(sizes):
        one_hot[i, start : start + size] = 1
        start += size
    cheapest = base[0] + sum(float(d[:, 0].min()) for d in deltas)
    plans = []
    for limit in np.linspace(base[0], cheapest, max(n_budgets, 2)):
        with _quiet_solver_output():
            res = milp(
                c, integrality=np.ones(n), bounds=Bounds(0, 1),
                constraints=[LinearConstraint(one_hot, 1, 1), LinearConstraint(cost[None, :], -np.inf, limit - base[0] + 1e-12)],
            )
        if res.x is None:  # infeasible only through rounding at the cheapest end
            continue
        x = widest.copy()
        start = 0
        for unit, size in zip(units, sizes):
            x = _apply(x, unit, int(np.argmax(res.x[start : start + size])))
            start += size
        plans.append(x)
    return plans


class _Planner(SearchAlgorithm):
    """A plan: the initial vectors, then the planned ones, each proposed once.

    When the plan is measured and the budget (:attr:`SearchContext.budget`) is not spent, the
    planner polishes its front: it proposes the one-step neighbours (one unit a width narrower or
    wider) of its measured Pareto points within the floor, cheapest point first, never a vector
    twice, so that a study of any budget ends with that many trials unless the space is used up.
    """

    needs_context = True
    fixed_batch = False
    sensitivity_seeded = False  # the plan is its own; the initial vectors are the uniform policies

    def _setup(self, initial: list[np.ndarray]) -> None:
        self._units, self._widest = plan_units(self.space)
        if not self._units:
            raise ValueError(f"{self.name}: the search space has no weight gene to allocate")
        self._queue = list(initial)
        self._seen = {tuple(int(v) for v in x) for x in initial}
        self._measured: list[tuple[np.ndarray, np.ndarray]] = []  # (vector, objectives) of feasible, finite results

    def _tell(self, xs: list[np.ndarray], F: np.ndarray, failed: np.ndarray, violation: np.ndarray) -> None:
        self._measured += [(x, f) for x, f, bad, v in zip(xs, F, failed, violation) if not bad and v <= 0]
        self._learn(xs, F)
        if not self._queue:
            self._polish()

    def _learn(self, xs: list[np.ndarray], F: np.ndarray) -> None:
        """What the plan takes from measurements (nothing for a plan fixed in advance)."""

    def _polish(self) -> None:
        """Queue the unseen one-step neighbours of the measured front (see the class docstring)."""
        room = self.context.budget - len(self._seen)
        if room <= 0 or not self._measured:
            return
        from mpsearch.algorithms.pareto import non_dominated

        F = np.array([f for _, f in self._measured])
        front = sorted(non_dominated(F), key=lambda i: (F[i, 1:].tolist(), i))
        rest = [i for i in range(len(F)) if i not in set(front)]
        neighbours = []
        for i in [*front, *rest]:  # the front's neighbours first; the others' when those are used up
            x = self._measured[i][0]
            for unit in self._units:
                option = self._option(x, unit)
                neighbours += [_apply(x, unit, o) for o in (option - 1, option + 1) if option is not None and 0 <= o < len(unit.bits)]
            if sum(tuple(int(v) for v in y) not in self._seen for y in neighbours) >= self.population_size:
                break
        fresh = list({tuple(int(v) for v in y): y for y in neighbours if tuple(int(v) for v in y) not in self._seen}.values())
        self._push(fresh[: min(room, self.population_size)], room)

    @staticmethod
    def _option(x: np.ndarray, unit: Unit) -> int | None:
        """Which of ``unit``'s options ``x`` takes (None: its genes match none, e.g. a uniform policy's inputs)."""
        for o, setting in enumerate(unit.settings):
            if all(int(x[j]) == c for j, c in setting.items()):
                return o
        return None

    def _push(self, xs: list[np.ndarray], limit: int) -> None:
        """Queue up to ``limit`` of ``xs`` not proposed before, evenly spread over ``xs`` when fewer fit."""
        fresh, keys = [], set()
        for x in xs:
            key = tuple(int(v) for v in x)
            if key not in self._seen and key not in keys:
                keys.add(key)
                fresh.append(x)
        if len(fresh) > limit > 0:
            keep = np.unique(np.round(np.linspace(0, len(fresh) - 1, limit)).astype(int))
            fresh = [fresh[i] for i in keep]
        fresh = fresh[: max(limit, 0)]
        self._seen.update(tuple(int(v) for v in x) for x in fresh)
        self._queue += fresh

    @property
    def exhausted(self) -> bool:
        return not self._queue

    def _ask(self) -> list[np.ndarray]:
        batch, self._queue = self._queue[: self.population_size], self._queue[self.population_size :]
        return batch

    def _unit_costs(self) -> tuple[np.ndarray, list[np.ndarray]]:
        return unit_costs(self.context.costs, self._units, self._widest)

    def _state(self) -> dict:
        return {"queued": [x.tolist() for x in self._queue]}


@register_algorithm("ilp")
class IntegerLinearProgram(_Planner):
    """HAWQ-V3's ILP on Hessian scores at evenly spaced energy budgets (see the module doc)."""

    def _setup(self, initial: list[np.ndarray]) -> None:
        super()._setup(initial)
        if self.context.weight_scores is None:
            raise ValueError("ilp needs Hessian sensitivity scores: set search.sensitivity to hessian")
        self._push(ilp_plans(self.space, self.context, self.context.budget), self.context.budget - len(initial))


@register_algorithm("greedy")
class GreedyLowering(_Planner):
    """AIMET-style: measured per-unit drops, then sensitivity-ordered bit lowering (see the module doc)."""

    def _setup(self, initial: list[np.ndarray]) -> None:
        super()._setup(initial)
        room = self.context.budget - len(initial)
        lower = sum(len(u.bits) - 1 for u in self._units)
        # Phase 1 measures every lower width if that leaves half the budget for the walk, else
        # only each unit's narrowest width (drops in between are interpolated linearly in bits).
        self._every_width = lower + 1 <= room // 2
        self._probes = [self._widest.copy()]
        for u in self._units:
            options = range(len(u.bits) - 1) if self._every_width else [0]
            self._probes += [_apply(self._widest, u, o) for o in options]
        self._phase = 1
        self._results: dict[tuple[int, ...], float] = {}
        self._push(self._probes, len(self._probes))  # a probe equal to an initial vector is measured once

    def _learn(self, xs: list[np.ndarray], F: np.ndarray) -> None:
        for x, f in zip(xs, F):
            self._results[tuple(int(v) for v in x)] = float(f[0])  # error (1 - accuracy); inf if failed
        if not self._queue and self._phase == 1:  # phase 1 measured: plan the walk
            self._phase = 2
            self._push(self._walk(), self.context.budget - len(self._seen))

    def _drops(self, unit: Unit) -> np.ndarray:
        """Measured accuracy drop of each option of ``unit`` (widest = 0), made monotone in width."""
        ref = self._results[tuple(int(v) for v in self._widest)]
        widths = np.array([_order(b) for b in unit.bits], dtype=float)
        measured = {}
        for o in range(len(unit.bits) - 1):
            key = tuple(int(v) for v in _apply(self._widest, unit, o))
            if key in self._results:
                measured[o] = self._results[key] - ref
        measured[len(unit.bits) - 1] = 0.0
        known = sorted(measured)
        drops = np.interp(widths, widths[known], [measured[o] for o in known])
        drops = np.where(np.isfinite(drops), drops, 1.0)  # a failed probe: as bad as chance
        return np.maximum.accumulate(drops[::-1])[::-1]  # narrower never looks better than wider

    def _walk(self) -> list[np.ndarray]:
        base, deltas = self._unit_costs()
        drops = [self._drops(u) for u in self._units]
        option = [len(u.bits) - 1 for u in self._units]
        x = self._widest.copy()
        path = []
        while True:
            best = None
            for i, unit in enumerate(self._units):
                o = option[i]
                if o == 0:
                    continue
                saved = deltas[i][o, 0] - deltas[i][o - 1, 0]
                ratio = (drops[i][o - 1] - drops[i][o]) / saved if saved > 0 else np.inf
                if best is None or ratio < best[0]:  # strict: ties keep the earlier unit
                    best = (ratio, i)
            if best is None:
                break
            i = best[1]
            option[i] -= 1
            x = _apply(x, self._units[i], option[i])
            path.append(x)
        return path

    def _state(self) -> dict:
        return {**super()._state(), "phase": self._phase, "measured": len(self._results)}
