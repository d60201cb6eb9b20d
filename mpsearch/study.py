"""Run a search study: every evaluation is a trial of one Optuna study; outputs under studies/<name>/.

The driver owns the loop: the algorithm proposes a batch of integer vectors, the search space
turns them into policies, the executor measures them (in order, on any number of workers), and
each result is recorded as a trial of the study in its storage (SQLite by default) before the
algorithm is told. Parallel workers never talk to the storage, so the study is the same for any
number of workers. At the end the measured Pareto set is re-measured on the full validation split
and on the test split (95 % CIs) and written with plots, tables, a report and one policy per point.

Resuming: running the same study again continues it. The algorithm is rebuilt by replaying the
recorded generations through ask/tell (every algorithm is deterministic given its seed and what
it was told), checked generation by generation against the digests in ``search_state.json``;
recorded trials are reused, and only slots without a finished trial are evaluated. Trials are
recorded in slot order as they finish, so a kill -9 at any moment loses at most the evaluations
in flight, and the resumed study ends with the same trials, numbers included, as an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mpsearch.config import QuantConfig, StudyConfig, objective_profiles, objective_spec
from mpsearch.errors import UserError
from mpsearch.files import atomic_write, atomic_write_text

__all__ = [
    "Method", "StudyResult", "full_fidelity", "optimize", "parse_methods", "study_dir", "storage_url", "load_trials",
    "PARETO_FILE", "CHECKPOINT_FILE", "RESUMABLE_FIELDS", "hypervolume_reference",
    "reference_text",
]

PARETO_FILE = "pareto.csv"
CHECKPOINT_FILE = "search_state.json"
# Settings a resumed study may change: they decide how much to run and where, not what a trial
# measures. Every other field must match the study's stored config.
RESUMABLE_FIELDS = ("budget", "workers", "ray_address", "remeasure_points", "data_dir", "out_root", "storage", "checkpoint",
                    "finetune_front", "finetune_steps")
UNIFORM_SHORTHANDS = ((8, 8), (6, 6), (4, 8), (4, 4), (2, 8))
MF_SUFFIX = "+mf"  # "nsga2+mf": the method measures candidates with multi-fidelity promotions


@dataclass
class StudyResult:
    name: str
    out_dir: Path
    trials: Any  # pandas.DataFrame
    pareto: Any  # pandas.DataFrame; None when the front was not re-measured
    hypervolume: float
    wall_s: float
    ref_point: tuple[float, ...]  # the hypervolume reference: see hypervolume_reference()


@dataclass(frozen=True)
class Method:
    """One search method of a study: a registered algorithm, optionally with multi-fidelity
    evaluation (``nsga2+mf``). Its ``name`` tags the trials it ran (user attribute ``run``)."""

    name: str
    algorithm: str
    multi_fidelity: bool


def parse_methods(spec: str) -> list[Method]:
    """``--algorithm`` text (``nsga2``, ``nsga2+mf``, or several comma-separated) as methods.

    Several methods run one after the other into the same study, each with the full budget and
    the same first population, their trials tagged by method.
    """
    from mpsearch.search.base import ALGORITHMS

    methods: list[Method] = []
    for part in (p.strip() for p in spec.split(",")):
        algorithm, mf = (part[: -len(MF_SUFFIX)], True) if part.endswith(MF_SUFFIX) else (part, False)
        cls = ALGORITHMS.get(algorithm)  # unknown: one line listing the registered names
        if mf and not cls.fixed_batch:
            raise UserError(f"--algorithm {part}: multi-fidelity applies to population searches "
                            f"(nsga2, optuna-nsga2, optuna-tpe, random), not to the {algorithm} plan")
        if any(m.name == part for m in methods):
            raise UserError(f"--algorithm lists {part!r} twice; name each method once")
        methods.append(Method(part, algorithm, mf))
    return methods


def study_dir(config: StudyConfig) -> Path:
    return Path(config.out_root) / config.study_name


def storage_url(config: StudyConfig) -> str:
    if config.storage:
        return config.storage
    return f"sqlite:///{(study_dir(config) / 'study.db').resolve()}"


def _objective_vector(metrics: dict[str, float] | None, objectives: tuple[str, ...]) -> np.ndarray:
    """What the algorithms minimise: 1 - accuracy and the relative costs; inf for failures."""
    if metrics is None:
        return np.full(len(objectives), np.inf)
    out = []
    for name in objectives:
        direction, key = objective_spec(name)
        value = metrics[key]
        out.append(1.0 - value if direction == "maximize" else value)
    return np.asarray(out, dtype=float)


def _study_values(metrics: dict[str, float], objectives: tuple[str, ...]) -> list[float]:
    return [metrics[objective_spec(name)[1]] for name in objectives]


def _versions() -> dict[str, str]:
    import optuna
    import pymoo
    import timm
    import torch

    try:
        import ray

        ray_version = ray.__version__
    except Exception:  # noqa: BLE001 - ray is optional for --workers 0
        ray_version = "unavailable"
    return {
        "python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
        "optuna": optuna.__version__, "pymoo": pymoo.__version__, "ray": ray_version, "numpy": np.__version__,
    }


def optimize(
    config: StudyConfig, *, progress: bool = True, log: Callable[[str], None] = print, remeasure: bool = True
) -> StudyResult:
    """Run ``config``'s study to its budget and write every output; see the module docstring.

    ``remeasure=False`` stops after the search (config, trials and the study itself are written;
    no Pareto re-measurement, plots or report): benchmarks that compare search algorithms on the
    search split use it.
    """
    import optuna

    from mpsearch.locking import StudyLock
    from mpsearch.search.base import ALGORITHMS
    from mpsearch.search.space import SearchSpace, default_space_for

    start = time.perf_counter()
    name = config.study_name
    out = study_dir(config)
    from mpsearch.quant.ptq import get_ptq
    from mpsearch.zoo import resolve_model_name

    methods = parse_methods(config.algorithm)  # unknown names fail before any work
    planners = [m.name for m in methods if ALGORITHMS.get(m.algorithm).needs_context]
    if planners and config.sensitivity == "none":
        raise UserError(f"--algorithm {planners[0]} allocates bits from sensitivity scores; "
                        "use --sensitivity hessian (or empirical), not none")
    get_ptq(config.ptq)
    resolve_model_name(config.model)
    space_def = SearchSpace.load(config.space or default_space_for(config.model))
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write study outputs to {out} ({exc.strerror}); choose a writable --out-root") from None

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    lock = StudyLock(storage_url(config), name)
    lock.acquire_file()  # before the storage is opened: a second driver stops here, the study untouched
    try:
        return _optimize_locked(config, lock, out, methods, space_def, start, progress=progress, log=log, remeasure=remeasure)
    except KeyboardInterrupt:
        log(f"interrupted: every finished trial of study {name!r} is recorded; run the same command again to resume it")
        raise
    finally:
        lock.release()


def _optimize_locked(config: StudyConfig, lock, out: Path, methods: list[Method], space_def, start: float, *, progress: bool,
                     log: Callable[[str], None], remeasure: bool) -> StudyResult:
    import torch
    import yaml

    from mpsearch.data import load_dataset
    from mpsearch.evaluate import DEFAULT_PROFILES, Evaluator, policy_costs
    from mpsearch.machine import describe_machine
    from mpsearch.policy import Policy
    from mpsearch.runtime import WorkerSpec, create_executor, default_workers
    from mpsearch.search.base import SearchContext, create_algorithm
    from mpsearch.search.pareto import hypervolume
    from mpsearch.search.space import BoundSpace
    from mpsearch.zoo import get_baseline

    name = config.study_name
    study, recorded = _existing_study(config, space_def)  # checks only: a refused run writes nothing
    if study is not None:
        lock.acquire_lease(study)

    torch.set_num_threads(config.torch_threads)
    data = load_dataset(config.dataset, data_dir=config.data_dir, calibration_size=config.calibration_size,
                        calibration_seed=config.seed)
    baseline = get_baseline(config.model, data, seed=config.seed, checkpoint=config.checkpoint, log=log)
    known_sha = study.user_attrs.get("baseline_sha256") if study is not None else None
    if recorded and known_sha and baseline.sha256 != known_sha:
        raise UserError(f"study {name!r} was measured on a baseline with sha256 {known_sha[:12]}..., not {str(baseline.sha256)[:12]}... "
                        "(--checkpoint); resume it with the same checkpoint, or start another study with --name")
    if recorded:
        log(f"resuming study {name!r}: {recorded} of {config.budget} trials recorded in {storage_url(config)}")
    checkpoint = baseline.checkpoint
    if checkpoint is None:  # hub weights: workers need a file
        checkpoint = atomic_write(out / "baseline.pt", lambda f: torch.save(baseline.model.state_dict(), f), binary=True,
                                  what="baseline")
    quant = QuantConfig(weight_observer=config.weight_observer, act_observer=config.act_observer, seed=config.seed,
                        ptq=config.ptq, bias_correction=config.bias_correction, smoothquant_alpha=config.smoothquant_alpha,
                        attention_calibration=config.attention_calibration)
    profiles = tuple(dict.fromkeys((config.energy_profile, *objective_profiles(config.objectives), *DEFAULT_PROFILES)))
    evaluator = Evaluator(baseline, data, quant=quant, profiles=profiles)
    evaluator.calibrate()
    space = BoundSpace(space_def, evaluator.policy_layers)
    if study is None:
        study = _create_study(config)
        lock.acquire_lease(study)
    _record_settings(study, config, space_def, baseline.sha256)

    def to_policy(x: np.ndarray, **provenance: Any) -> Policy:
        return Policy(model=config.model, dataset=data.info.name, layers=space.decode(x),
                      checkpoint_sha256=baseline.sha256, provenance=provenance)

    def costs_of(x: np.ndarray) -> np.ndarray:
        """The cost objectives of ``x`` (computed, exact): what planning algorithms budget with."""
        metrics = {f"rel_{k}": v for k, v in policy_costs(evaluator.cost_table, to_policy(x), profiles).relative().items()}
        metrics["rel_energy"] = metrics[f"rel_energy:{profiles[0]}"]
        return _objective_vector({"accuracy": 1.0, **metrics}, config.objectives)[1:]

    # -- initial vectors: the uniform policies for every method; for the population searches also
    # the HAWQ-V3 ILP's solutions at evenly spaced budgets (sensitivity seeds the search) --
    uniform: list[np.ndarray] = []
    tags: list[str] = []
    for w, a in UNIFORM_SHORTHANDS:
        x = space.uniform(w, a)
        if x is not None and not any(np.array_equal(x, y) for y in uniform):
            uniform.append(x)
            tags.append(f"uniform:w{w}a{a}")
    weight_scores = None
    seeded = list(uniform)
    if config.sensitivity != "none":
        weight_scores = _weight_scores(config, evaluator, space, quant, log, progress)
        if config.ilp_seeds:
            for x, tag in _ilp_seeds(space, SearchContext(costs_of, weight_scores, config.budget), config.ilp_seeds):
                if not any(np.array_equal(x, y) for y in seeded):
                    seeded.append(x)
                    tags.append(tag)
    uniform = uniform[: config.population_size]
    ref = hypervolume_reference(space, costs_of)
    seed_tags = {tuple(int(v) for v in x): t for x, t in zip(seeded, tags)}

    workers = default_workers(config.torch_threads) if config.workers == -1 else config.workers
    spec = WorkerSpec(model=config.model, dataset=config.dataset, checkpoint=str(checkpoint), data_dir=config.data_dir,
                      calibration_size=config.calibration_size, seed=config.seed, quant=quant.to_dict(),
                      profiles=profiles, torch_threads=config.torch_threads)
    records = _records_by_slot(study, default_run=methods[0].name)
    with create_executor(spec, workers, address=config.ray_address, evaluator=evaluator) as executor:
        for method in methods:
            algorithm = create_algorithm(method.algorithm)
            context = SearchContext(costs_of, weight_scores, config.budget, gap_plans=config.ilp_gap_plans)
            initial = seeded if algorithm.sensitivity_seeded else uniform
            if len(initial) > config.population_size and not algorithm.extra_seeds:
                # the first generation holds them; uniform ones first
                log(f"{method.name}: keeping {config.population_size} of {len(initial)} seed policies (population size)")
                initial = initial[: config.population_size]
            algorithm.setup(space, n_objectives=len(config.objectives), seed=config.seed, initial=initial,
                            population_size=config.population_size, context=context)
            _search_run(method, algorithm, config=config, study=study, space=space, executor=executor, to_policy=to_policy,
                        records=records, seed_tags=seed_tags, out=out, single=len(methods) == 1, progress=progress, log=log,
                        full=min(config.eval_images, len(data.val)), ref=ref)
        if getattr(executor, "replaced", 0):
            log(f"{executor.replaced} worker(s) died during the search and were replaced; their evaluations were retried")
        search_s = time.perf_counter() - start
        trials = load_trials(study)
        pareto = _remeasure_front(config, evaluator, executor, space, trials, to_policy, out, log, progress) if remeasure else None
    if pareto is not None and config.finetune_front:
        pareto = _finetune_front(config, baseline, data, quant, profiles, pareto, out, log, progress)
    hv = hypervolume(_front_matrix(trials, config.objectives), ref)
    wall = time.perf_counter() - start

    resolved = dict(config.to_dict(), storage=storage_url(config), workers=workers, study_name=name,
                    space_resolved=space_def.to_dict(), hypervolume_reference=ref.tolist())
    atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False), what="study config")
    atomic_write(out / "trials.csv", lambda f: trials.to_csv(f, index=False), what="trial table")
    atomic_write(out / "trials.parquet", lambda f: trials.to_parquet(f, index=False), binary=True, what="trial table")
    if len(methods) > 1:
        from mpsearch.compare import write_comparison

        write_comparison(out, trials, config, ref, machine=describe_machine())
    if pareto is None:
        log(f"study {name}: {len(trials)} trials, hypervolume {hv:.4f} on the search split, {wall / 60:.1f} min; "
            f"front not re-measured; outputs in {out}")
        return StudyResult(name, out, trials, None, hv, wall, tuple(ref.tolist()))
    atomic_write(out / PARETO_FILE, lambda f: pareto.to_csv(f, index=False), what="Pareto table")
    from mpsearch.compare import proxy_kendall
    from mpsearch.report import plot_front, write_report

    plot_front(trials, pareto, config, out)
    proxy = {config.sensitivity: proxy_kendall(full_fidelity(trials), weight_scores)} if weight_scores else {}
    write_report(
        out, config=config, trials=trials, pareto=pareto, hypervolume=hv, ref_point=ref.tolist(), proxies=proxy,
        wall_s=wall, search_s=search_s, machine=describe_machine(), versions=_versions(), workers=workers,
        storage=storage_url(config), baseline=baseline.meta, platform_=platform.platform(),
    )
    log(f"study {name}: {len(trials)} trials, front of {len(pareto)} points, hypervolume {hv:.4f}, "
        f"{wall / 60:.1f} min; outputs in {out}")
    return StudyResult(name, out, trials, pareto, hv, wall, tuple(ref.tolist()))


def hypervolume_reference(space, costs_of: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """A study's hypervolume reference point: error 1 (0 % accuracy) and, for each cost
    objective, the costliest policy its search space holds (every gene at its widest choice, or
    at its narrowest where a cost model charges narrow widths more).

    Why not fp32, (1, 1) in relative costs: fp32 is outside the space, and every front then also
    scores its best accuracy times the empty stretch of cost between the space's costliest policy
    and fp32 (on ResNet-18's default space 79 % of the energy axis), so that volume says little
    beyond a front's best accuracy. The space's nadir weighs the trade-off the space offers and
    nothing outside it. It depends on the space and the cost model only, never on what a search
    measured, so every method and every seed of a study share it."""
    return np.concatenate([[1.0], np.maximum(costs_of(space.xu), costs_of(space.xl))])


def reference_text(ref_point) -> str:
    """:func:`hypervolume_reference`'s point as reports print it."""
    return f"({', '.join(f'{v:.4g}' for v in ref_point)}): 0 % accuracy at the costliest policy of the search space"


def _search_run(method: Method, algorithm, *, config: StudyConfig, study, space, executor, to_policy, records, seed_tags,
                out: Path, single: bool, progress: bool, log: Callable[[str], None], full: int, ref: np.ndarray) -> None:
    """Run one method to its budget (counted in full evaluations of ``full`` images) and record its trials.

    Without multi-fidelity every candidate is measured on ``eval_images`` validation images and
    recorded as soon as every earlier slot is. With it, a generation's candidates climb the
    rungs of :func:`mpsearch.fidelity.rungs` (promotions: :class:`mpsearch.fidelity.Archive`) and
    are recorded when the generation is done, each with the images it was measured on.
    """
    import optuna
    from tqdm.auto import tqdm

    from mpsearch.fidelity import Archive, pack_mask, rungs, unpack_mask
    from mpsearch.runtime import EvalTask
    from mpsearch.search.pareto import hypervolume, non_dominated

    sizes = rungs(min(config.multi_fidelity_images, full), full) if method.multi_fidelity else [full]
    seed_batches = algorithm.seed_batches  # the batches that carry seed vectors (tagged by kind)
    distributions = space.distributions()
    state_file = out / (CHECKPOINT_FILE if single else f"search_state.{method.name.replace('+', '-')}.json")
    checkpoint = _SearchCheckpoint(state_file, fresh=not any(key[0] == method.name for key in records), log=log)
    archive = Archive()
    front_F = np.zeros((0, len(config.objectives)))
    spent = 0.0  # full-evaluation equivalents
    generation = 0
    label = config.study_name if single else f"{config.study_name} [{method.name}]"
    bar = tqdm(total=config.budget, desc=label, unit="eval", disable=not progress)
    while config.budget - spent > 1e-9 and not algorithm.exhausted:
        xs = algorithm.ask()
        affordable = int((config.budget - spent) * full / sizes[0] + 1e-9)  # every candidate pays the first rung
        batch = xs[:affordable]
        if not batch:
            break
        stored = {slot: records.get((method.name, generation, slot)) for slot in range(len(batch))}
        for slot, trial in stored.items():
            if trial is not None and space.x_from_params(trial.params).tolist() != batch[slot].tolist():
                raise UserError(
                    f"cannot resume study {config.study_name!r}: trial {trial.number} ({method.name}, generation {generation}, "
                    f"slot {slot}) holds another policy than the replayed search proposes (made by another mpsearch version or "
                    "settings); start a new study with --name"
                )
        todo = [slot for slot, trial in stored.items() if trial is None]
        policies = {slot: to_policy(batch[slot]) for slot in todo}  # decoded once, for the task and the record

        def record(slot: int, outcome, mask=None, generation=generation, batch=batch, policies=policies) -> None:
            x, policy = batch[slot], policies[slot]
            key = tuple(int(v) for v in x)
            attrs = {
                "method": seed_tags.get(key, method.name) if generation < seed_batches else method.name, "run": method.name,
                "generation": generation, "slot": slot, "policy": policy.summary(), "wall_s": outcome.wall_s,
                "worker": outcome.worker, "images": outcome.images, "correct": outcome.correct,
                "fidelity": outcome.images / full if outcome.ok else 1.0,
                "layers": json.dumps({n: [p.weight_bits, p.act_bits] for n, p in policy.layers.items()}),
                **{k.replace(":", "_"): v for k, v in outcome.metrics.items()},
            }
            if mask is not None:
                attrs["mask"] = pack_mask(mask)
            if outcome.ok:
                trial = optuna.trial.create_trial(params=space.params(x), distributions=distributions,
                                                  values=_study_values(outcome.metrics, config.objectives), user_attrs=attrs)
            else:
                trial = optuna.trial.create_trial(params=space.params(x), distributions=distributions,
                                                  user_attrs={**attrs, "error": outcome.error}, state=optuna.trial.TrialState.FAIL)
            study.add_trial(trial)
            records[method.name, generation, slot] = trial

        if method.multi_fidelity:
            outcomes, masks = _climb_rungs(todo, policies, sizes, executor, archive, config, budget_left=config.budget - spent,
                                           on_images=lambda n: bar.update(n / full), full=full)
            for slot in todo:
                record(slot, outcomes[slot], masks.get(slot))
        else:
            # every trial keeps which images it got right: fronts of different methods compare paired
            recorder = _InOrderRecorder(todo, lambda slot, outcome: (
                record(slot, outcome, outcome.mask() if outcome.ok else None), bar.update(1)))
            tasks = [EvalTask(slot, policies[slot].to_dict(), split="val", limit=full, keep_mask=True) for slot in todo]
            outcomes = {o.index: o for o in executor.map(tasks, on_done=recorder.done)}
        F = np.zeros((len(batch), len(config.objectives)))
        for slot in range(len(batch)):
            trial = records[method.name, generation, slot]
            F[slot] = _objective_from_trial(trial, config.objectives)
            fidelity = float(trial.user_attrs.get("fidelity", 1.0))  # failures count as a full evaluation
            spent += fidelity
            if slot not in todo:
                bar.update(fidelity)
            if method.multi_fidelity and trial.state.name == "COMPLETE" and fidelity >= 1.0:
                archive.add(F[slot][1:], unpack_mask(trial.user_attrs["mask"], full))
        if len(batch) == len(xs):
            algorithm.tell(list(batch), F)
            checkpoint.record(generation, algorithm.state(), config.study_name)
        generation += 1
        full_F = np.array([F[s] for s in range(len(batch))
                           if float(records[method.name, generation - 1, s].user_attrs.get("fidelity", 1.0)) >= 1.0])
        finite = np.vstack([front_F, full_F[np.isfinite(full_F).all(axis=1)]]) if len(full_F) else front_F
        front_F = finite[non_dominated(finite)] if len(finite) else finite
        bar.set_postfix(front=len(front_F), hv=f"{hypervolume(front_F, ref):.4f}")
    bar.close()


def _climb_rungs(todo: list[int], policies, sizes: list[int], executor, archive, config: StudyConfig, *, budget_left: float,
                 on_images: Callable[[int], None], full: int) -> tuple[dict[int, Any], dict[int, Any]]:
    """Measure ``todo``'s candidates rung by rung; (final outcome, per-image mask) per slot.

    Every candidate pays the first rung; promotions are taken in slot order while the budget
    lasts. A final outcome carries the accuracy over every image the candidate was measured on.
    """
    from dataclasses import replace

    import torch

    from mpsearch.runtime import EvalTask

    budget_left -= len(todo) * sizes[0] / full
    outcomes: dict[int, Any] = {}
    masks: dict[int, Any] = {}
    walls: dict[int, float] = dict.fromkeys(todo, 0.0)
    active = list(todo)
    for r, size in enumerate(sizes):
        first = sizes[r - 1] if r else 0
        tasks = [EvalTask(slot, policies[slot].to_dict(), split="val", limit=size, start=first, keep_mask=True) for slot in active]
        for outcome in executor.map(tasks, on_done=lambda o, n=size - first: on_images(n)):
            slot = outcome.index
            walls[slot] += outcome.wall_s
            if not outcome.ok:
                outcomes[slot] = outcome
                masks.pop(slot, None)
                continue
            mask = outcome.mask() if slot not in masks else torch.cat([masks[slot], outcome.mask()])
            masks[slot] = mask
            metrics = dict(outcome.metrics, accuracy=float(mask.float().mean()))
            outcomes[slot] = replace(outcome, metrics=metrics, images=len(mask), correct=int(mask.sum()),
                                     wall_s=walls[slot], packed_mask=None)
        if r == len(sizes) - 1:
            break
        step = (sizes[r + 1] - size) / full
        promoted = []
        for slot in active:
            if not outcomes[slot].ok:
                continue
            costs = _objective_vector(outcomes[slot].metrics, config.objectives)[1:]
            if archive.surely_dominated(costs, masks[slot]) or budget_left < step - 1e-9:
                continue
            budget_left -= step
            promoted.append(slot)
        active = promoted
        if not active:
            break
    return outcomes, masks


_FLAGS = {"population_size": "--population", "eval_images": "--eval-images", "torch_threads": "--threads",
          "energy_profile": "--energy-profile", "calibration_size": "--calibration-size", "weight_observer": "--weight-observer",
          "act_observer": "--act-observer", "ilp_seeds": "ilp_seeds (StudyConfig)",
          "ilp_gap_plans": "ilp_gap_plans (StudyConfig)"}


def _config_conflict(stored: StudyConfig, config: StudyConfig) -> str | None:
    """The first setting that differs between a study's stored config and this run, or None."""
    old, new = stored.to_dict(), config.to_dict()
    for key in new:
        if key in RESUMABLE_FIELDS or key in ("name", "version") or old.get(key) == new[key]:
            continue
        flag = _FLAGS.get(key, "--" + key.replace("_", "-"))
        return f"{flag} is {old.get(key)!r} in the study, {new[key]!r} now"
    return None


def _existing_study(config: StudyConfig, space_def) -> tuple[Any, int]:
    """The study to resume and how many trials it holds, or ``(None, 0)`` for a new one.

    Everything that could refuse a resume is checked here, before anything is written, so a
    refused run leaves the study as it was. A study without trials counts as new.
    """
    import optuna

    name, url = config.study_name, storage_url(config)
    try:
        study = optuna.load_study(study_name=name, storage=url)
    except KeyError:  # no such study in this storage
        return None, 0
    except Exception as exc:  # noqa: BLE001 - bad URLs raise many types (ArgumentError, ImportError, OperationalError)
        raise _storage_error(url, exc) from None
    recorded = len(study.trials)
    directions = [objective_spec(o)[0] for o in config.objectives]
    if not recorded:
        if [d.name.lower() for d in study.directions] != directions:
            raise UserError(f"study {name!r} exists in {url} with other objectives; choose another --name")
        return study, 0
    stored = study.user_attrs.get("config")
    try:
        stored_config = StudyConfig.from_dict(stored) if isinstance(stored, dict) else None
    except UserError:
        stored_config = None
    if stored_config is None:
        raise UserError(f"study {name!r} in {url} holds {recorded} trials that mpsearch did not make (no readable config); "
                        "choose another --name")
    if not any("slot" in t.user_attrs for t in study.trials):
        raise UserError(f"study {name!r} was made by an mpsearch without resume support (its trials carry no slot); "
                        "start a new study with --name")
    conflict = _config_conflict(stored_config, config)
    if conflict is None and study.user_attrs.get("space", space_def.to_dict()) != space_def.to_dict():
        conflict = f"the search space file {config.space or 'default'} changed"
    if conflict:
        raise UserError(f"study {name!r} exists with other settings ({conflict}); rerun with the study's settings to resume it "
                        f"(only {', '.join('--' + f.replace('_', '-') for f in RESUMABLE_FIELDS)} may change), "
                        "or start another study with --name")
    used: dict[str, float] = {}  # full-evaluation equivalents per method
    for t in study.trials:
        run = str(t.user_attrs.get("run", config.algorithm))
        used[run] = used.get(run, 0.0) + float(t.user_attrs.get("fidelity", 1.0))
    most = max(used.values(), default=0.0)
    if config.budget < most - 1e-9:
        raise UserError(f"study {name!r} already used {most:g} evaluations; pass --budget {int(np.ceil(most - 1e-9))} or more to resume it")
    return study, recorded


def _create_study(config: StudyConfig) -> Any:
    import optuna

    directions = [objective_spec(o)[0] for o in config.objectives]
    try:
        return optuna.create_study(study_name=config.study_name, storage=storage_url(config), directions=directions,
                                   load_if_exists=True)
    except Exception as exc:  # noqa: BLE001 - bad URLs raise many types (ArgumentError, ImportError, OperationalError)
        raise _storage_error(storage_url(config), exc) from None


def _storage_error(url: str, exc: Exception) -> UserError:
    return UserError(f"cannot open study storage {url!r} ({type(exc).__name__}); pass a valid Optuna storage URL with --storage")


def _record_settings(study, config: StudyConfig, space_def, baseline_sha256: str | None) -> None:
    """What a resume is checked against: the config, the resolved search space, the baseline's sha256."""
    import optuna

    with warnings.catch_warnings():  # experimental since optuna 3.2, stable in practice
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(config.objectives))
    study.set_user_attr("config", config.to_dict())
    study.set_user_attr("space", space_def.to_dict())
    study.set_user_attr("baseline_sha256", baseline_sha256)


def _records_by_slot(study, default_run: str) -> dict[tuple[str, int, int], Any]:
    """The study's finished search trials keyed by (method, generation, slot in the generation's
    batch); trials of studies made before methods were tagged belong to ``default_run``."""
    from optuna.trial import TrialState

    out: dict[tuple[str, int, int], Any] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        attrs = trial.user_attrs
        if "generation" in attrs and "slot" in attrs:
            out.setdefault((str(attrs.get("run", default_run)), int(attrs["generation"]), int(attrs["slot"])), trial)
    return out


def _objective_from_trial(trial, objectives: tuple[str, ...]) -> np.ndarray:
    """What the algorithm was told for a recorded trial (the same floats: values are stored exactly)."""
    if trial.state.name != "COMPLETE":
        return _objective_vector(None, objectives)
    return _objective_vector({objective_spec(o)[1]: v for o, v in zip(objectives, trial.values)}, objectives)


class _InOrderRecorder:
    """Records outcomes in slot order, each as soon as every earlier slot is recorded.

    Workers finish in any order; recording in slot order keeps trial numbers the same for any
    number of workers and after a resume, and a kill loses at most the outcomes still waiting
    for an earlier slot (they are re-run on resume).
    """

    def __init__(self, slots: list[int], record: Callable[[int, Any], None]) -> None:
        self._order = list(slots)
        self._next = 0
        self._waiting: dict[int, Any] = {}
        self._record = record

    def done(self, outcome) -> None:
        self._waiting[outcome.index] = outcome
        while self._next < len(self._order) and self._order[self._next] in self._waiting:
            slot = self._order[self._next]
            self._record(slot, self._waiting.pop(slot))
            self._next += 1


class _SearchCheckpoint:
    """``search_state.json``: after every generation, the digest of the algorithm's state (and the latest state).

    A resumed study rebuilds its algorithm by replaying the recorded generations through ask/tell;
    each replayed state must match the digest written when that generation first ran, else the
    resume stops before running anything new. The file is data (JSON), written atomically.
    """

    def __init__(self, path: Path, *, fresh: bool, log: Callable[[str], None] = print) -> None:
        self.path = path
        self.digests: list[str] = []
        if fresh or not path.exists():
            return
        try:
            data = json.loads(path.read_text())
            digests = data["digests"]
            if not (isinstance(digests, list) and all(isinstance(d, str) for d in digests)):
                raise ValueError("digests")
            self.digests = digests
        except (OSError, ValueError, KeyError, TypeError):
            log(f"warning: {path} is unreadable; the replay rewrites it")

    def record(self, generation: int, state: dict[str, Any], study_name: str) -> None:
        digest = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
        if generation < len(self.digests):
            if self.digests[generation] != digest:
                raise UserError(
                    f"cannot resume study {study_name!r}: replaying generation {generation} gave another search state than "
                    f"its checkpoint in {self.path} (another mpsearch, pymoo or optuna version?); start a new study with --name"
                )
            return
        self.digests = self.digests[:generation] + [digest]
        doc = {"version": 1, "study": study_name, "generation": generation, "digests": self.digests, "state": state}
        atomic_write_text(self.path, json.dumps(doc), what="search checkpoint")


def _weight_scores(config, evaluator, space, quant, log, progress: bool) -> dict | None:
    """Per-layer sensitivity of the layers whose weight width is searched: {(layer, bits): score}
    (HAWQ-V2's Hessian trace x squared weight error, or the empirical estimator's measured drop);
    None when the space searches no weight width. Seeds and planning algorithms start from it."""
    from mpsearch.sensitivity import SensitivityConfig, compute_sensitivity

    weight_genes = [g for g in space.genes if g.operand == "weight"]
    free = [layer for g in weight_genes for layer in g.layers]
    choices = sorted({b for g in weight_genes for b in g.choices if b is not None})
    if not free or not choices:
        return None
    # Seeding and planning need a ranking of layers, not precise traces: 2 batches and at most 16
    # Hutchinson probes (about 1.5 min for ResNet-18 on 2 cores, against ~12 min for
    # `mpsearch sensitivity`'s 4 batches x 64 probes).
    scfg = SensitivityConfig(estimator=config.sensitivity, bits=tuple(choices), seed=config.seed,
                             batches=2, max_probes=16)
    log(f"sensitivity ({config.sensitivity}) of {len(free)} searched layers (cached per checkpoint) ...")
    # Once per checkpoint and settings, cached on disk, so the driver lends it every core;
    # evaluations keep their fixed thread count.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        df = compute_sensitivity(
            evaluator.baseline.model, free, evaluator.data.calibration, scfg, quant=quant,
            checkpoint_sha256=evaluator.baseline.sha256, qmodel=evaluator.qmodel, progress=progress,
        )
    finally:
        torch.set_num_threads(threads)
    return {(str(n), int(b)): float(v) for n, b, v in df[["layer", "bits", "score"]].itertuples(index=False)}


def _ilp_seeds(space, context, n_seeds: int) -> list[tuple[np.ndarray, str]]:
    """The distinct solutions of the HAWQ-V3 ILP (``context`` is a
    :class:`~mpsearch.search.base.SearchContext`) at ``n_seeds`` evenly spaced budgets of the
    first cost objective, cheapest first, each tagged with its cost: the search starts along the
    front the rule would pick and breeds from there (pinned layers keep their pins)."""
    from mpsearch.search.planning import ilp_plans

    seeds: list[tuple[np.ndarray, str]] = []
    for x in reversed(ilp_plans(space, context, n_seeds)):
        if not any(np.array_equal(x, y) for y, _ in seeds):
            seeds.append((x, f"ilp:{float(context.costs(x)[0]):.4f}"))
    return seeds


def load_trials(study) -> Any:
    """The study's trials as a DataFrame: number, state, params, values, every user attribute."""
    import pandas as pd

    rows = []
    for t in study.trials:
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name}
        for name, value in zip(study.metric_names or [], t.values or []):
            row[f"value_{name}"] = value
        row.update({f"attr_{k}": v for k, v in t.user_attrs.items()})
        row.update({f"param_{k}": v for k, v in t.params.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def full_fidelity(trials) -> Any:
    """The completed trials measured on the whole search subset (multi-fidelity runs also record
    candidates that stopped at a lower rung: noisier, and surely dominated when they stopped)."""
    ok = trials[trials["state"] == "COMPLETE"]
    if "attr_fidelity" in ok:
        ok = ok[ok["attr_fidelity"].isna() | (ok["attr_fidelity"].astype(float) >= 1.0)]
    return ok


def _front_matrix(trials, objectives: tuple[str, ...]) -> np.ndarray:
    """The minimised objectives of the study's full-fidelity trials."""
    from mpsearch.compare import objective_matrix

    return objective_matrix(full_fidelity(trials), objectives)


def _finetune_front(config, baseline, data, quant, profiles, pareto, out: Path, log, progress: bool):
    """Fine-tune each re-measured Pareto point (LSQ + distillation) and add its measurements.

    Each point gets a fresh quantized copy of the baseline, so points do not share weights; the
    fine-tuned policy and checkpoint go next to the point's policy. A point already fine-tuned
    with the same settings (a resumed study) is read back, not trained again.
    """
    import pandas as pd
    import torch

    from mpsearch.config import FinetuneConfig
    from mpsearch.evaluate import Evaluator
    from mpsearch.finetune import finetune, write_finetuned
    from mpsearch.policy import Policy

    ft_config = FinetuneConfig(steps=config.finetune_steps, seed=config.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # the workers are idle now: train on every core
    rows = []
    try:
        for i, row in pareto.iterrows():
            source = out / row["policy_file"]
            target = source.with_name(source.stem + ".finetuned.json")
            checkpoint = target.with_suffix(".pt")
            policy = Policy.load(source)
            tuned = Policy.load(target) if target.exists() else None
            done = (tuned is not None and checkpoint.exists()
                    and tuned.provenance.get("finetune", {}).get("config") == ft_config.to_dict()
                    and tuned.provenance["finetune"].get("sha256") == hashlib.sha256(checkpoint.read_bytes()).hexdigest())
            if done:
                metrics = tuned.provenance["metrics"]
            else:
                log(f"fine-tuning Pareto point {i + 1}/{len(pareto)}: trial {int(row['trial'])} ({policy.summary()}) ...")
                evaluator = Evaluator(baseline, data, quant=quant, profiles=profiles)
                result = finetune(evaluator, policy, ft_config, progress=progress, log=log)
                metrics = write_finetuned(target, evaluator, result).provenance["metrics"]
            rows.append({"qat_val_accuracy": metrics["val_accuracy"], "qat_test_accuracy": metrics["test_accuracy"],
                         "qat_test_drop_pp": 100 * metrics["test_drop"],
                         "qat_policy_file": str(target.relative_to(out))})
    finally:
        torch.set_num_threads(threads)
    return pd.concat([pareto.reset_index(drop=True), pd.DataFrame(rows)], axis=1)


def _remeasure_front(config, evaluator, executor, space, trials, to_policy, out: Path, log, progress: bool):
    """Re-measure the Pareto set (val subset) on the full validation split and on the test split.

    The measurements run on the executor's workers like the trials do; each returns its
    per-image correctness so the driver can pair every test measurement with one fp32 test pass.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from mpsearch.metrics import bootstrap_ci
    from mpsearch.policy import uniform_policy
    from mpsearch.runtime import EvalTask
    from mpsearch.search.pareto import non_dominated

    ok = full_fidelity(trials).reset_index(drop=True)
    if ok.empty:
        raise UserError("no trial produced a finite measurement; widen the search space (higher bit widths)")
    F = _front_matrix(trials, config.objectives)
    idx = non_dominated(F)
    # The same policy may appear twice (algorithms re-propose); measure it once.
    front = ok.iloc[idx].drop_duplicates(subset=[c for c in ok.columns if c.startswith("param_")])
    cost_col = f"value_{config.objectives[1]}"
    front = front.sort_values([cost_col, "trial"], kind="stable")
    found = len(front)
    if 0 < config.remeasure_points < found:  # evenly spread by rank along the cost axis, both ends kept
        keep = np.unique(np.round(np.linspace(0, found - 1, config.remeasure_points)).astype(int))
        front = front.iloc[keep]
    policies_dir = out / "policies"
    policies_dir.mkdir(exist_ok=True)
    points = []
    for _, row in front.iterrows():
        params = {k[len("param_"):]: int(v) for k, v in row.items() if k.startswith("param_")}
        points.append((row, to_policy(space.x_from_params(params))))
    fp32 = uniform_policy("fp32", model=evaluator.baseline.name, dataset=evaluator.data.info.name,
                          layers=evaluator.policy_layers, checkpoint_sha256=evaluator.baseline.sha256)
    tasks = [EvalTask(0, fp32.to_dict(), split="test", keep_mask=True)]
    for i, (_, policy) in enumerate(points):
        tasks.append(EvalTask(1 + 2 * i, policy.to_dict(), split="test", keep_mask=True))
        tasks.append(EvalTask(2 + 2 * i, policy.to_dict(), split="val", keep_mask=True))
    shown = f"{len(points)} Pareto points" if len(points) == found else f"{len(points)} of {found} Pareto points (spread along the front)"
    log(f"re-measuring {shown} on the full validation and test splits ...")
    bar = tqdm(total=len(tasks), desc="re-measure front", unit="eval", disable=not progress)
    outcomes = executor.map(tasks, on_done=lambda _: bar.update(1))
    bar.close()
    if not outcomes[0].ok:
        raise RuntimeError(f"the fp32 model failed on the test split: {outcomes[0].error}")
    fp32_test = outcomes[0].mask()
    rows = []
    for i, (row, policy) in enumerate(points):
        test_out, val_out = outcomes[1 + 2 * i], outcomes[2 + 2 * i]
        trial_no = int(row["trial"])
        if not (test_out.ok and val_out.ok):
            log(f"trial {trial_no} ({policy.summary()}) failed on a full split and is left out: {test_out.error or val_out.error}")
            continue
        val = evaluator.summarize(policy, val_out.mask(), split="val")
        test = evaluator.summarize(policy, test_out.mask(), split="test", fp32_mask=fp32_test)
        metrics = {
            "search_accuracy": float(row["value_accuracy"]),
            "val_accuracy": val.accuracy, "val_ci95": list(val.accuracy_ci95),
            "test_accuracy": test.accuracy, "test_ci95": list(test.accuracy_ci95),
            "test_drop": test.drop, "test_drop_ci95": list(test.drop_ci95 or ()),
            **{f"rel_{k}": v for k, v in test.costs.relative().items()},
        }
        stored = policy.with_provenance(
            study=config.study_name, trial=trial_no, seed=config.seed, metrics=metrics,
            quant={"weight_observer": config.weight_observer, "act_observer": config.act_observer, "ptq": config.ptq,
                   "bias_correction": config.bias_correction, "smoothquant_alpha": config.smoothquant_alpha,
                   "attention_calibration": config.attention_calibration,
                   "calibration_size": config.calibration_size, "torch_threads": config.torch_threads},
        )
        stored.save(policies_dir / f"trial-{trial_no:04d}.json")
        rows.append({
            "trial": trial_no, "policy": policy.summary(), "method": row.get("attr_method", ""),
            "search_accuracy": metrics["search_accuracy"],
            "val_accuracy": val.accuracy, "val_ci_low": val.accuracy_ci95[0], "val_ci_high": val.accuracy_ci95[1],
            "test_accuracy": test.accuracy, "test_ci_low": test.accuracy_ci95[0], "test_ci_high": test.accuracy_ci95[1],
            **dict(zip(("test_boot_low", "test_boot_high"), bootstrap_ci(test_out.mask(), seed=config.seed))),
            "test_drop_pp": 100 * (test.drop or 0.0),
            "fp32_test_accuracy": test.fp32_accuracy,
            **{f"rel_{k.replace(':', '_')}": v for k, v in test.costs.relative().items()},
            "policy_file": f"policies/trial-{trial_no:04d}.json",
        })
    pareto = pd.DataFrame(rows)
    energy_col = f"rel_energy_{config.energy_profile}"
    sort_col = energy_col if energy_col in pareto else pareto.columns[-2]
    return pareto.sort_values(sort_col, kind="stable").reset_index(drop=True)


