"""Optuna's samplers as search algorithms: NSGA-II (Deb et al. 2002) and multi-objective TPE (Bergstra et al. 2011).

Each algorithm keeps an internal in-memory Optuna study as its state: a batch is
``population_size`` trials asked with the space's distributions (one integer index per gene, so
the samplers see the order of the bit widths), told back in order. The study driver keeps its own
persistent study as the record; this one is never stored. Both share this file because they differ
only in the sampler.

Initial vectors are enqueued (``study.enqueue_trial``) before the first ask. Optuna's
NSGAIISampler gives a trial its generation only when it samples a parameter itself, so enqueued
trials (every parameter fixed) would join no generation: they would never breed and would leave
generation 0 short, stretching it over two batches. So they are assigned to generation 0
through the sampler's public ``get_trial_generation``, the same step it takes for its own
trials; OptunaHub's NSGA-II-with-initial-trials sampler is the alternative.

The study's accuracy floor reaches both samplers as a constraint of each told trial (its
violation: percentage points below the floor, 0 within it), and the samplers rank feasible trials
first (Optuna's constrained NSGA-II and c-TPE): set with ``Trial.set_constraint`` where Optuna has
it (>= 5), else read by the samplers' ``constraints_func`` from a user attribute.

Failed evaluations are told as ``TrialState.FAIL``. Optuna's NSGA-II counts only completed trials
towards a generation, so a batch with failures leaves its generation short and the next batch
(partly) completes it; TPE simply ignores failed trials.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from mpsearch.algorithms.base import SearchAlgorithm, json_floats, register_algorithm

__all__ = ["OptunaNSGA2", "OptunaTPE"]


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Silence Optuna's per-trial INFO lines for the internal study (the driver reports progress)."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


_VIOLATION = "accuracy_floor"  # the constraint's name (a user attribute for Optuna < 5)


def _set_constraints() -> bool:
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


def _violation(trial: Any) -> tuple[float]:
    """Optuna < 5's ``constraints_func``: a told trial's violation, > 0 infeasible."""
    return (float(trial.user_attrs.get(_VIOLATION, 0.0)),)


def _constraint_args() -> dict[str, Any]:
    return {} if _set_constraints() else {"constraints_func": _violation}


class _OptunaAlgorithm(SearchAlgorithm):
    constrained = True

    def _sampler(self) -> Any:
        raise NotImplementedError

    def _setup(self, initial: list[np.ndarray]) -> None:
        import optuna

        with _quiet_optuna():
            self._study = optuna.create_study(directions=["minimize"] * self.n_objectives, sampler=self._sampler())
            for x in initial:
                self._study.enqueue_trial(self.space.params(x))
        self._n_initial = len(initial)
        self._set_constraint = _set_constraints()
        self._distributions = self.space.distributions()
        self._trials: list[Any] = []

    def _ask(self) -> list[np.ndarray]:
        with _quiet_optuna():
            self._trials = [self._study.ask(self._distributions) for _ in range(self.population_size)]
            if self.n_batches == 0:
                self._adopt_initial(self._trials[: self._n_initial])
        return [self.space.x_from_params(t.params) for t in self._trials]

    def _state(self) -> dict[str, Any]:
        # The sampler's own random state is private to Optuna; what it samples from next is the
        # record of its internal study, given here whole.
        trials = self._study.get_trials(deepcopy=False)
        return {"trials": [[t.state.name, self.space.x_from_params(t.params).tolist() if t.params else None,
                            json_floats(np.asarray(t.values)) if t.values else None] for t in trials]}

    def _adopt_initial(self, trials: list[Any]) -> None:
        """Hook for samplers that must be told about enqueued trials (NSGA-II)."""

    def _tell(self, xs: list[np.ndarray], F: np.ndarray, failed: np.ndarray, violation: np.ndarray) -> None:
        from optuna.trial import TrialState

        with _quiet_optuna():
            for trial, row, bad, excess in zip(self._trials, F, failed, violation):
                if bad:
                    self._study.tell(trial, state=TrialState.FAIL)
                else:
                    if self._set_constraint:
                        trial.set_constraint(_VIOLATION, float(excess))
                    else:
                        trial.set_user_attr(_VIOLATION, float(excess))
                    self._study.tell(trial, [float(v) for v in row])
        self._trials = []


@register_algorithm("optuna-nsga2")
class OptunaNSGA2(_OptunaAlgorithm):
    """NSGA-II (Deb et al. 2002) as Optuna's NSGAIISampler: one batch = one generation.

    Generation 0 is the initial vectors plus the sampler's random trials; later generations breed
    from the elite of the previous ones with Optuna's default uniform crossover and mutation.
    """

    def _sampler(self) -> Any:
        from optuna.samplers import NSGAIISampler

        return NSGAIISampler(population_size=self.population_size, seed=self.seed, **_constraint_args())

    def _adopt_initial(self, trials: list[Any]) -> None:
        # See the module docstring: enqueued trials join generation 0 and so the breeding population.
        by_number = {t.number: t for t in self._study.get_trials(deepcopy=False)}
        for trial in trials:
            self._study.sampler.get_trial_generation(self._study, by_number[trial.number])


@register_algorithm("optuna-tpe")
class OptunaTPE(_OptunaAlgorithm):
    """Multi-objective TPE (Bergstra et al. 2011; Ozaki et al. 2020) as Optuna's TPESampler.

    The first batch is the random start-up (``n_startup_trials = population_size``); later batches
    come from the multivariate Parzen estimators, with the constant liar so that the trials of one
    batch spread out instead of piling onto the same optimum.
    """

    def _sampler(self) -> Any:
        from optuna.exceptions import ExperimentalWarning
        from optuna.samplers import TPESampler

        with warnings.catch_warnings():  # constraints_func is experimental in Optuna 4's TPESampler
            warnings.simplefilter("ignore", ExperimentalWarning)
            return TPESampler(seed=self.seed, multivariate=True, constant_liar=True, n_startup_trials=self.population_size,
                              **_constraint_args())
