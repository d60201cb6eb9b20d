"""The search loop: one method of a study run to its budget, every evaluation recorded as a trial.

The algorithm proposes a batch of integer vectors, the search space turns them into policies,
the executor measures them (on any number of workers) and each result is recorded as a trial
before the algorithm is told. Trials are recorded in slot order as they finish, so trial numbers
do not depend on the number of workers, and a kill -9 loses at most the evaluations in flight.
On a resumed study the loop replays the recorded generations: slots with a finished trial are
told its recorded result, only the others are measured.

Each trial records its accuracy drop against the fp32 model on the same validation images; with
an accuracy floor (``search.max_drop``) how far it lies below the floor is told to the algorithm
as a constraint violation and recorded as the trial's Optuna constraint (the dashboard shows
which trials are feasible).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpsearch.algorithms.base import SearchAlgorithm
from mpsearch.algorithms.methods import Method
from mpsearch.algorithms.pareto import hypervolume, non_dominated
from mpsearch.algorithms.space import BoundSpace
from mpsearch.config import StudyConfig
from mpsearch.errors import UserError
from mpsearch.evaluation.executors import EvalOutcome, EvalTask, Executor
from mpsearch.evaluation.multi_fidelity import Archive, climb_rungs, pack_mask, rungs, unpack_mask
from mpsearch.objectives import DROP_ATTR, floor_violation, objective_values
from mpsearch.policy import Policy
from mpsearch.study.checkpoint import SearchCheckpoint
from mpsearch.study.seeding import Seeds
from mpsearch.study.storage import told_objectives

__all__ = ["StudyRun", "SearchLoop"]


@dataclass
class StudyRun:
    """What every method of one study shares while it searches."""

    config: StudyConfig
    study: Any  # optuna.Study
    space: BoundSpace
    executor: Executor
    to_policy: Callable[[np.ndarray], Policy]
    costs: Callable[[np.ndarray], np.ndarray]  # the exact cost objectives of a vector (planners budget with them)
    records: dict[tuple[str, int, int], Any]  # (method, generation, slot) -> recorded trial
    seeds: Seeds
    full: int  # images of a full evaluation
    ref: np.ndarray  # hypervolume reference, for the progress bar
    progress: bool
    fp32_correct: Any = None  # the fp32 model's per-image correctness on the first `full` validation images


class _InOrderRecorder:
    """Records outcomes in slot order, each as soon as every earlier slot is recorded."""

    def __init__(self, slots: list[int], record: Callable[[int, EvalOutcome], None]) -> None:
        self._order = list(slots)
        self._next = 0
        self._waiting: dict[int, EvalOutcome] = {}
        self._record = record

    def done(self, outcome: EvalOutcome) -> None:
        self._waiting[outcome.index] = outcome
        while self._next < len(self._order) and self._order[self._next] in self._waiting:
            slot = self._order[self._next]
            self._record(slot, self._waiting.pop(slot))
            self._next += 1


class SearchLoop:
    """Runs ``method`` (its ``algorithm`` already set up) to the study's budget: exactly that many
    trials, fewer only when a planning algorithm's plan runs out.

    Without multi-fidelity every candidate is measured on the search subset and recorded as soon
    as every earlier slot is; with it, a generation's candidates climb the rungs of
    :func:`mpsearch.evaluation.multi_fidelity.rungs` and are recorded when the generation is done, each with the
    images it was measured on. The last generation may be cut to the trials left; the algorithm
    is told every whole generation before it is asked again, and nothing after a cut one.
    """

    def __init__(self, run: StudyRun, method: Method, algorithm: SearchAlgorithm, checkpoint: SearchCheckpoint, *,
                 label: str) -> None:
        self.run_ = run
        self.method = method
        self.algorithm = algorithm
        self.checkpoint = checkpoint
        self.label = label
        search = run.config.search
        self.sizes = rungs(min(search.multi_fidelity_images, run.full), run.full) if method.multi_fidelity else [run.full]
        self.archive = Archive()  # full-fidelity results promotions compare with
        self.trials = 0
        self.generation = 0
        self.front = np.zeros((0, len(search.objectives)))  # for the progress bar

    def run(self) -> None:
        from tqdm.auto import tqdm

        budget = self.run_.config.search.budget
        self.bar = tqdm(total=budget, desc=self.label, unit="trial", disable=not self.run_.progress)
        try:
            while self.trials < budget and not self.algorithm.exhausted:
                xs = self.algorithm.ask()
                batch = xs[: budget - self.trials]
                self._generation(batch)
                if len(batch) < len(xs):
                    break  # the budget is spent: the cut generation is recorded, never told
                F = np.array([self._told(slot) for slot in range(len(batch))])
                self.algorithm.tell(list(batch), F, [self._violation(slot) for slot in range(len(batch))])
                self.checkpoint.record(self.generation, self.algorithm.state(), self.run_.config.study_name)
                self.generation += 1
        finally:
            self.bar.close()

    def _trial(self, slot: int) -> Any:
        return self.run_.records[self.method.name, self.generation, slot]

    def _told(self, slot: int) -> np.ndarray:
        return told_objectives(self._trial(slot), self.run_.config.search.objectives)

    def _violation(self, slot: int) -> float:
        """Percentage points below the study's floor (0 within it, failed or recorded without a drop)."""
        drop = self._trial(slot).user_attrs.get(DROP_ATTR)
        return 0.0 if drop is None else floor_violation(float(drop), self.run_.config.search.max_drop)

    def _floor(self) -> tuple[Any, float] | None:
        """What multi-fidelity promotions hold candidates against: fp32's correctness and the floor."""
        max_drop = self.run_.config.search.max_drop
        return None if max_drop is None or self.run_.fp32_correct is None else (self.run_.fp32_correct, max_drop)

    def _drop_pp(self, outcome: EvalOutcome) -> float | None:
        """Accuracy minus the fp32 model's on the same images, in percentage points."""
        fp32 = self.run_.fp32_correct
        if not outcome.ok or fp32 is None or not 0 < outcome.images <= len(fp32):
            return None
        return 100.0 * (outcome.metrics["accuracy"] - int(fp32[: outcome.images].sum()) / outcome.images)

    def _generation(self, batch: list[np.ndarray]) -> None:
        """Measure the slots of ``batch`` without a recorded trial, record them, account for all."""
        run, name = self.run_, self.method.name
        stored = {slot: run.records.get((name, self.generation, slot)) for slot in range(len(batch))}
        for slot, trial in stored.items():
            if trial is not None and run.space.x_from_params(trial.params).tolist() != batch[slot].tolist():
                raise UserError(
                    f"cannot resume study {run.config.study_name!r}: trial {trial.number} ({name}, generation {self.generation}, "
                    f"slot {slot}) holds another policy than the replayed search proposes (made by another mpsearch version or "
                    "settings); start a new study under another name"
                )
        todo = [slot for slot, trial in stored.items() if trial is None]
        policies = {slot: run.to_policy(batch[slot]) for slot in todo}  # decoded once, for the task and the record
        if self.method.multi_fidelity:
            outcomes, masks = climb_rungs(todo, policies, self.sizes, run.executor, self.archive, run.config.search.objectives,
                                          on_done=lambda slot: self.bar.update(1), floor=self._floor())
            for slot in todo:
                self._record(slot, batch[slot], policies[slot], outcomes[slot], masks.get(slot))
        else:
            # every trial keeps which images it got right: fronts of different methods compare paired
            def record(slot: int, outcome: EvalOutcome) -> None:
                self._record(slot, batch[slot], policies[slot], outcome, outcome.mask() if outcome.ok else None)
                self.bar.update(1)

            recorder = _InOrderRecorder(todo, record)
            tasks = [EvalTask(slot, policies[slot].to_dict(), split="val", limit=run.full, keep_mask=True) for slot in todo]
            run.executor.map(tasks, on_done=recorder.done)
        self.trials += len(batch)
        self.bar.update(len(batch) - len(todo))  # recorded in an earlier run of the study
        full_rows = []
        for slot in range(len(batch)):
            trial = self._trial(slot)
            if float(trial.user_attrs.get("fidelity", 1.0)) >= 1.0:  # failures count as full
                told = self._told(slot)
                if self._violation(slot) <= 0:  # the bar shows the front within the floor
                    full_rows.append(told)
                if self.method.multi_fidelity and trial.state.name == "COMPLETE":
                    self.archive.add(told[1:], unpack_mask(trial.user_attrs["mask"], run.full))
        self._show_front(full_rows)

    def _record(self, slot: int, x: np.ndarray, policy: Policy, outcome: EvalOutcome, mask: Any) -> None:
        """Add the measured candidate in ``slot`` to the study as a trial (complete or failed)."""
        import optuna

        run = self.run_
        tag = run.seeds.tag(x) if self.generation < self.algorithm.seed_batches else None
        attrs = {
            "method": tag or self.method.name, "run": self.method.name,
            "generation": self.generation, "slot": slot, "policy": policy.summary(), "wall_s": outcome.wall_s,
            "worker": outcome.worker, "backend": outcome.backend, "images": outcome.images, "correct": outcome.correct,
            "fidelity": outcome.images / run.full if outcome.ok else 1.0,
            "layers": json.dumps({n: [p.weight_bits, p.act_bits] for n, p in policy.layers.items()}),
            **outcome.metrics,
        }
        if mask is not None:
            attrs["mask"] = pack_mask(mask)
        drop, max_drop = self._drop_pp(outcome), run.config.search.max_drop
        system = {}
        if drop is not None:
            attrs[DROP_ATTR] = drop
            if max_drop is not None:  # Optuna's constraint convention: <= 0 feasible
                system["constraints"] = [-drop - max_drop]
        params, distributions = run.space.params(x), run.space.distributions()
        if outcome.ok:
            trial = optuna.trial.create_trial(params=params, distributions=distributions, user_attrs=attrs, system_attrs=system,
                                              values=objective_values(outcome.metrics, run.config.search.objectives))
        else:
            trial = optuna.trial.create_trial(params=params, distributions=distributions,
                                              user_attrs={**attrs, "error": outcome.error}, state=optuna.trial.TrialState.FAIL)
        run.study.add_trial(trial)
        run.records[self.method.name, self.generation, slot] = trial

    def _show_front(self, rows: list[np.ndarray]) -> None:
        """The progress bar's front size and hypervolume after this generation."""
        if rows:
            F = np.vstack([self.front, *[r[None] for r in rows if np.isfinite(r).all()]])
            self.front = F[non_dominated(F)] if len(F) else F
        self.bar.set_postfix(front=len(self.front), hv=f"{hypervolume(self.front, self.run_.ref):.4f}")
