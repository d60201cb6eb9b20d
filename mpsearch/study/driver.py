"""Run a study: every evaluation is a trial of one Optuna study; the measured front at the end.

:func:`run_study` resolves what the study measures (a timm model and data set by name, or the
user's model object and data), calibrates the quantizers once, seeds and runs each method's
:class:`~mpsearch.study.loop.SearchLoop` on an executor (in process or a pool of Ray workers:
the numbers do not depend on which), measures the Pareto points a user acts on (the answers first) on the test
split, times it end to end in onnxruntime (:mod:`mpsearch.study.latency`), and writes the study's
files when it has a folder.

Resuming: running the same study again continues it. Each algorithm is rebuilt by replaying the
recorded generations through ask/tell, checked generation by generation against
``search_state.json``; recorded trials are reused and only slots without a finished trial are
evaluated, so the resumed study ends with the same trials, numbers included, as an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mpsearch.algorithms.base import SearchContext, create_algorithm
from mpsearch.algorithms.methods import Method, parse_methods
from mpsearch.algorithms.space import BoundSpace, SearchSpace, default_space_for
from mpsearch.config import StudyConfig
from mpsearch.errors import UserError, model_stage
from mpsearch.evaluation.executors import Executor, NamedSource, ObjectSource, RayPlacement, WorkerSpec, create_executor
from mpsearch.host.machine import torch_threads
from mpsearch.objectives import front_hypervolume, hypervolume_reference, objective_profiles, objective_vector
from mpsearch.policy import MeasurementSettings, Policy
from mpsearch.study.checkpoint import SearchCheckpoint, checkpoint_file
from mpsearch.study.front import finetune_front, remeasure_front
from mpsearch.study.latency import LatencyMeteredExecutor, PatternLatency, time_front
from mpsearch.study.loop import SearchLoop, StudyRun
from mpsearch.study.outputs import write_outputs, write_policies
from mpsearch.study.report import phase_summary
from mpsearch.study.result import SearchResult
from mpsearch.study.seeding import study_seeds
from mpsearch.study.storage import create_study, existing_study, load_trials, record_settings, records_by_slot, shown_url, storage_url

if TYPE_CHECKING:
    import optuna
    import pandas as pd

    from mpsearch.data import DataSplits
    from mpsearch.evaluation.evaluator import Evaluator
    from mpsearch.models.zoo import Baseline

__all__ = ["run_study", "Subject"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subject:
    """What a study quantizes and measures, and how its workers get the same."""

    baseline: Any  # mpsearch.models.zoo.Baseline
    data: Any  # mpsearch.data.DataSplits
    source: NamedSource | ObjectSource

    @classmethod
    def resolve(cls, config: StudyConfig, model: Any = None, data: DataSplits | None = None, *, progress: bool = True) -> Subject:
        """From ``config`` (a timm model and data set by name) or from objects: ``model`` an
        ``nn.Module`` or :class:`~mpsearch.models.zoo.Baseline`, ``data`` a :class:`~mpsearch.data.DataSplits`."""
        from mpsearch.data import load_dataset
        from mpsearch.models.zoo import Baseline, get_baseline

        by_name = data is None
        if data is None:
            data = load_dataset(config.dataset, data_dir=config.data_dir, calibration_size=config.calibration_size,
                                calibration_seed=config.seed, image_size=config.image_size)
        if model is None:
            baseline = get_baseline(config.model, data, seed=config.seed, checkpoint=config.checkpoint, progress=progress)
        else:
            baseline = model if isinstance(model, Baseline) else Baseline.from_module(model, config.model)
        if by_name and baseline.checkpoint is not None:
            source: NamedSource | ObjectSource = NamedSource(
                model=config.model, dataset=config.dataset, checkpoint=str(baseline.checkpoint), data_dir=config.data_dir,
                calibration_size=config.calibration_size, seed=config.seed, image_size=config.image_size)
        else:
            source = ObjectSource(baseline, data)
        return cls(baseline, data, source)


def _check(config: StudyConfig, methods: list[Method], model: Any) -> None:
    """What can fail before any work or any write."""
    from mpsearch.models.zoo import resolve_model_name
    from mpsearch.quant import get_observer
    from mpsearch.quant.ptq import get_ptq
    from mpsearch.quant.qk_calibration import QK_CALIBRATIONS

    planners = [m.name for m in methods if m.needs_sensitivity]
    if planners and config.search.sensitivity == "none":
        raise UserError(f"search.algorithm {planners[0]} allocates bits from sensitivity scores; use search.sensitivity "
                        "hessian (or empirical), not none", fields=("search.algorithm", "search.sensitivity"))
    if config.finetune is not None and not config.run.out_dir:
        raise UserError("finetune: fine-tuned checkpoints are files; give the study a folder (run.out_dir)",
                        fields=("run.out_dir",))
    get_ptq(config.quant.ptq)
    get_observer(config.quant.weight_observer)
    get_observer(config.quant.act_observer)
    QK_CALIBRATIONS.get(config.quant.attention_calibration)
    if model is None:
        resolve_model_name(config.model)


def _cost_objectives(evaluator: Evaluator, to_policy: Callable[[np.ndarray], Policy], profiles: tuple[str, ...],
                     latency: PatternLatency | None, objectives: Sequence[str]) -> Callable[[np.ndarray], np.ndarray]:
    """``costs_of(x)``: the cost objectives of ``x``, what planning algorithms budget with (computed
    exactly; the latency objective measured, once per pattern of integer and float layers)."""
    from mpsearch.evaluation.evaluator import policy_costs

    def costs_of(x: np.ndarray) -> np.ndarray:
        policy = to_policy(x)
        relative = policy_costs(evaluator.cost_table, policy, profiles).relative()
        metrics = {f"rel_{k}": v for k, v in relative.items()}
        metrics["rel_energy"] = metrics[f"rel_energy_{profiles[0]}"]
        if latency is not None:
            metrics["rel_latency"] = latency.relative(policy)
        return objective_vector({"accuracy": 1.0, **metrics}, objectives)[1:]

    return costs_of


WEAK_BASELINE_POINTS = 10  # a baseline within this many points of chance has not learned


def _check_learned(name: str, correct: Any, num_classes: int) -> None:
    """Refuse a baseline whose validation accuracy is within :data:`WEAK_BASELINE_POINTS` of
    chance: every policy of it measures as noise, and the front would look like a result."""
    accuracy, chance = float(correct.float().mean()), 1.0 / num_classes
    if accuracy < chance + WEAK_BASELINE_POINTS / 100:
        raise UserError(
            f"baseline {name} has {accuracy:.1%} validation accuracy, within {WEAK_BASELINE_POINTS} points of chance "
            f"({chance:.1%} for {num_classes} classes): it has not learned; train it longer (mpsearch train --model "
            f"{name} --epochs N) and pass it as checkpoint, or use allow_weak_baseline to search it anyway",
            fields=("allow_weak_baseline", "checkpoint"))


def run_study(config: StudyConfig, *, model: Any = None, data: DataSplits | None = None, progress: bool = True,
              remeasure: bool = True) -> SearchResult:
    """Run ``config``'s study to its budget; see the module docstring.

    ``model``/``data`` replace the config's model and data set names with objects (the Python
    API's :func:`mpsearch.search`). ``remeasure=False`` stops after the search: no re-measured
    front, plots or report (benchmarks that compare search algorithms on the search split).
    """
    return _Driver(config, progress=progress, remeasure=remeasure).run(model, data)


class _Driver:
    """One run of one study, from the checks that can refuse it to the files it writes."""

    def __init__(self, config: StudyConfig, *, progress: bool, remeasure: bool) -> None:
        self.start = time.perf_counter()
        self.config = config
        self.progress = progress
        self.remeasure = remeasure
        self.methods = parse_methods(config.search.algorithm)  # unknown names fail before any work
        self.url = storage_url(config)
        self.out = Path(config.run.out_dir) if config.run.out_dir else None
        self.phases: dict[str, float] = {}

    def run(self, model: Any, data: DataSplits) -> SearchResult:
        import optuna

        from mpsearch.quant.backends import resolve_backend
        from mpsearch.study.locking import StudyLock

        # The study stores the backend "auto" resolves to here: a resume elsewhere must match it.
        config = self.config = replace(self.config, quant=replace(self.config.quant,
                                                                  backend=resolve_backend(self.config.quant.backend)))
        _check(config, self.methods, model)
        space_def = SearchSpace.load(config.search.space or default_space_for(config.model))
        if self.out is not None:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / ".write-test").write_text("ok")
                (self.out / ".write-test").unlink()
            except OSError as exc:
                raise UserError(f"cannot write study outputs to {self.out} ({exc.strerror}); choose a writable run.out_dir",
                                fields=("run.out_dir",)) from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.lock = StudyLock(self.url, config.study_name) if self.url else None
        if self.lock:
            self.lock.acquire_file()  # before the storage is opened: a second driver stops here, the study untouched
        try:
            study, recorded = existing_study(config, space_def.to_dict(), self.url)  # checks only: a refused run writes nothing
            if study is not None and self.lock:
                self.lock.acquire_lease(study)
            with self._phase("baseline"):
                subject = Subject.resolve(config, model, data, progress=self.progress)  # a baseline trained here trains on every core
            with torch_threads(config.run.torch_threads):  # fixed, so numbers do not depend on the machine's cores
                return self._measure(subject, space_def, study, recorded)
        except KeyboardInterrupt:
            logger.info(f"interrupted: every finished trial of study {config.study_name!r} is recorded; run it again to resume it")
            raise
        finally:
            if self.lock:
                self.lock.release()

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name`` (wall seconds, in ``self.phases``); a block that raises records nothing."""
        mark = time.perf_counter()
        yield
        self.phases[name] = time.perf_counter() - mark

    def _measure(self, subject: Subject, space_def: SearchSpace, study: optuna.Study | None, recorded: int) -> SearchResult:
        """Calibrate, seed, search with every method, re-measure the front, write the files."""
        from mpsearch.evaluation.evaluator import DEFAULT_PROFILES

        config, search, baseline = self.config, self.config.search, subject.baseline
        self._check_resumable(baseline, study, recorded)
        profiles = tuple(dict.fromkeys((search.energy_profile, *objective_profiles(search.objectives), *DEFAULT_PROFILES)))
        with self._phase("calibration"), model_stage(baseline.name, "calibrating its quantizers"):
            evaluator, full, fp32_val = self._calibrate(subject, profiles)
        space = BoundSpace(space_def, evaluator.policy_layers)
        study = self._open_study(study, space_def, baseline.sha256)
        template = Policy(model=baseline.name, dataset=subject.data.info.name, layers={}, checkpoint_sha256=baseline.sha256,
                          architecture=evaluator.architecture)

        def to_policy(x: np.ndarray) -> Policy:
            return replace(template, layers=space.decode(x))

        latency = PatternLatency(config, evaluator, self.out) if "latency" in search.objectives else None
        costs_of = _cost_objectives(evaluator, to_policy, profiles, latency, search.objectives)
        with self._phase("sensitivity"), model_stage(baseline.name, f"measuring its {search.sensitivity} sensitivity"):
            seeds = study_seeds(config, evaluator, space, costs_of, progress=self.progress)
        ref = hypervolume_reference(space, costs_of)
        # The executor outlives the search (the front is re-measured on its workers), but starting
        # its workers counts as search time.
        with ExitStack() as stack:
            with self._phase("search"):
                executor = stack.enter_context(self._executor(subject, profiles, evaluator))
                workers = executor.workers
                if latency is not None:
                    executor = LatencyMeteredExecutor(executor, latency)
                run = StudyRun(config=config, study=study, space=space, executor=executor, to_policy=to_policy, costs=costs_of,
                               records=records_by_slot(study), seeds=seeds, full=full, ref=ref, progress=self.progress,
                               fp32_correct=fp32_val)
                self._search_every_method(run)
            trials, pareto, policies, selection = self._remeasure(run, evaluator, latency)
        pareto = self._finish_front(subject, profiles, evaluator, pareto, policies)
        result = self._result(run, template, workers, trials, pareto, policies, selection)
        self._write_and_log(result, space_def, baseline, workers, run.seeds)
        return result

    def _check_resumable(self, baseline: Baseline, study: optuna.Study | None, recorded: int) -> None:
        """Refuse to resume a study measured on another baseline; say how much of it is recorded."""
        name = self.config.study_name
        known_sha = study.user_attrs.get("baseline_sha256") if study is not None else None
        if recorded and known_sha and baseline.sha256 != known_sha:
            raise UserError(f"study {name!r} was measured on a baseline with sha256 {known_sha[:12]}..., not "
                            f"{str(baseline.sha256)[:12]}...; resume it with the same checkpoint, or start another study "
                            "under another name")
        if recorded:
            logger.info(f"resuming study {name!r}: {recorded} of {self.config.search.budget} trials recorded in {shown_url(self.url)}")

    def _calibrate(self, subject: Subject, profiles: tuple[str, ...]) -> tuple[Any, int, Any]:
        """The calibrated evaluator, the images of a full evaluation and the fp32 model's correctness on them."""
        from mpsearch.evaluation.evaluator import Evaluator

        config, baseline, data = self.config, subject.baseline, subject.data
        evaluator = Evaluator(baseline, data, quant=config.quant, profiles=profiles)
        full = min(config.search.eval_images, len(data.val))
        fp32_val = evaluator.fp32_mask("val", full)  # what each trial's drop (and the accuracy floor) is measured against
        if not config.allow_weak_baseline:
            _check_learned(baseline.name, fp32_val, data.info.num_classes)
        evaluator.calibrate()
        return evaluator, full, fp32_val

    def _open_study(self, study: optuna.Study | None, space_def: SearchSpace, baseline_sha: str | None) -> Any:
        """``study``, created (and leased) on a first run, with this run's settings recorded."""
        if study is None:
            study = create_study(self.config, self.url)
            if self.lock:
                self.lock.acquire_lease(study)
        record_settings(study, self.config, space_def.to_dict(), baseline_sha)
        return study

    def _executor(self, subject: Subject, profiles: tuple[str, ...], evaluator: Evaluator) -> Executor:
        """Where the trials run: in this process (on ``evaluator``) or on a pool of Ray workers."""
        run_config = self.config.run
        spec = WorkerSpec(subject.source, quant=self.config.quant.to_dict(), profiles=profiles, torch_threads=run_config.torch_threads)
        placement = RayPlacement(address=run_config.ray_address, cpus_per_worker=run_config.cpus_per_worker,
                                 gpus_per_worker=run_config.gpus_per_worker, dashboard=run_config.ray_dashboard)
        return create_executor(spec, run_config.workers, placement=placement, evaluator=evaluator)

    def _search_every_method(self, run: StudyRun) -> None:
        """Each method's search in turn, on the same executor."""
        for method in self.methods:
            self._search(run, method)
        if getattr(run.executor, "replaced", 0):
            logger.info(f"{run.executor.replaced} worker(s) died during the search; their evaluations were retried "
                        "and replacements started where Ray had room for them")

    def _remeasure(self, run: StudyRun, evaluator: Evaluator,
                   latency: PatternLatency | None) -> tuple[Any, Any, dict[int, Policy], dict[str, Any]]:
        """The study's trials and, unless this run stops after the search, its front re-measured
        (:func:`remeasure_front`): (trials, pareto, policies, selection)."""
        if latency is not None:
            logger.info(f"latency objective: {len(latency.ms)} layer pattern(s) timed ({latency.timed} in this run) "
                        f"at batch {latency.batch} on {latency.threads} threads")
        trials = load_trials(run.study)
        if not self.remeasure:
            return trials, None, {}, {}
        with self._phase("remeasure"):
            pareto, policies, selection = remeasure_front(self.config, evaluator, run.executor, run.space, trials, run.to_policy,
                                                          progress=self.progress)
        return trials, pareto, policies, selection

    def _finish_front(self, subject: Subject, profiles: tuple[str, ...], evaluator: Evaluator, pareto: pd.DataFrame | None,
                      policies: dict[int, Policy]) -> Any:
        """The re-measured front (None: not re-measured) timed in onnxruntime, its policies written
        and its points fine-tuned, as far as the config and the study's folder ask."""
        config = self.config
        if pareto is not None and config.latency is not None:
            with self._phase("export"):
                pareto = time_front(config, evaluator, pareto, policies, progress=self.progress)
        if pareto is not None and self.out is not None:
            pareto = write_policies(self.out, pareto, policies)
            if config.finetune is not None:
                with self._phase("finetune"):
                    pareto = finetune_front(config, subject.baseline, subject.data, profiles, pareto, self.out, progress=self.progress)
        return pareto

    def _result(self, run: StudyRun, template: Policy, workers: int, trials: pd.DataFrame, pareto: pd.DataFrame | None,
                policies: dict[int, Policy],
                selection: dict[str, Any]) -> SearchResult:
        """The study's :class:`SearchResult`; the time no phase accounts for is ``other``."""
        config, search, ref = self.config, self.config.search, run.ref
        self.phases["other"] = max(0.0, time.perf_counter() - self.start - sum(self.phases.values()))
        resolved = replace(config, name=config.study_name, run=replace(config.run, storage=self.url, workers=workers))
        settings = MeasurementSettings(config.quant, config.calibration_size, config.run.torch_threads)
        return SearchResult(config=resolved, trials=trials, front=pareto, policies=policies,
                            template=template.with_settings(settings),
                            hypervolume=front_hypervolume(trials, search.objectives, ref, search.max_drop), ref_point=tuple(ref.tolist()),
                            wall_s=time.perf_counter() - self.start, out_dir=self.out, storage=self.url, phases=self.phases,
                            selection=selection, _study=run.study)

    def _write_and_log(self, result: SearchResult, space_def: SearchSpace, baseline: Baseline, workers: int, seeds: Any) -> None:
        """The study's files (when it has a folder) and its one-line summary."""
        if self.out is not None:
            write_outputs(result, space=space_def.to_dict(), baseline_meta=baseline.meta, workers=workers,
                          weight_scores=seeds.weight_scores)
        pareto, name = result.front, self.config.study_name
        front = "front not re-measured" if pareto is None else f"front of {len(pareto)} point{'s' if len(pareto) != 1 else ''}"
        logger.info(f"study {name}: {len(result.trials)} trials, {front}, hypervolume {result.hypervolume:.4f}, "
                    f"{result.wall_s / 60:.1f} min ({phase_summary(self.phases)}; {self.config.quant.backend} backend)"
                    + (f"; outputs in {self.out}" if self.out else ""))

    def _search(self, run: StudyRun, method: Method) -> None:
        """Set up ``method``'s algorithm from the study's seeds and run its loop to the budget."""
        config, seeds, single = run.config, run.seeds, len(self.methods) == 1
        algorithm = create_algorithm(method.algorithm)
        context = SearchContext(run.costs, seeds.weight_scores, config.search.budget, gap_plans=config.search.ilp_gap_plans)
        initial = seeds.seeded if algorithm.sensitivity_seeded else seeds.uniform
        population = config.search.population_size
        if len(initial) > population and not algorithm.extra_seeds:
            # the first generation holds them; uniform ones first
            logger.info(f"{method.name}: keeping {population} of {len(initial)} seed policies (population size)")
            initial = initial[:population]
        algorithm.setup(run.space, n_objectives=len(config.search.objectives), seed=config.seed, initial=initial,
                        population_size=population, context=context)
        path = checkpoint_file(self.out, method.name, single) if self.out is not None else None
        checkpoint = SearchCheckpoint(path, fresh=not any(key[0] == method.name for key in run.records))
        label = config.study_name if single else f"{config.study_name} [{method.name}]"
        SearchLoop(run, method, algorithm, checkpoint, label=label).run()
