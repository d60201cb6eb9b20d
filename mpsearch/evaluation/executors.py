"""Executors: evaluate batches of policies, in this process or on a pool of Ray actors.

Both executors take the same :class:`WorkerSpec` (how a worker builds its :class:`Evaluator`:
model, data, checkpoint, quantization settings, torch threads) and return results **in task
order**, whatever order workers finish in, so the search driver tells its algorithm the same
thing for any number of workers. Every worker runs torch with ``spec.torch_threads`` threads:
the floating-point reduction order, hence every measured number, does not depend on how many
workers there are.
"""

from __future__ import annotations

import os
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mpsearch.config import QuantConfig
from mpsearch.errors import UserError
from mpsearch.evaluation.ray_cluster import RayPlacement, check_capacity, deferred_interrupt, join_cluster, ship_code_by_value, start_private_ray

__all__ = [
    "NamedSource", "ObjectSource", "WorkerSpec", "EvalTask", "EvalOutcome", "RayPlacement", "Executor", "InProcessExecutor",
    "RayExecutor", "create_executor", "default_workers",
]


@dataclass(frozen=True)
class NamedSource:
    """A model and data set by name, the baseline from a checkpoint file: what a worker on any
    machine of a cluster can load for itself."""

    model: str
    dataset: str
    checkpoint: str  # path of the fp32 state dict (the driver trains/caches it first)
    data_dir: str | None = None
    calibration_size: int = 512
    seed: int = 0
    image_size: int | None = None

    def load(self) -> tuple[Any, Any]:
        from mpsearch.data import load_dataset
        from mpsearch.models.zoo import get_baseline

        data = load_dataset(self.dataset, data_dir=self.data_dir, calibration_size=self.calibration_size,
                            calibration_seed=self.seed, image_size=self.image_size)
        return get_baseline(self.model, data, checkpoint=self.checkpoint), data


@dataclass(frozen=True)
class ObjectSource:
    """The baseline and data themselves (a model object, data from the user's tensors): they
    travel to workers by value, through Ray's object store."""

    baseline: Any  # mpsearch.models.zoo.Baseline
    data: Any  # mpsearch.data.DataSplits

    def load(self) -> tuple[Any, Any]:
        return self.baseline, self.data


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to rebuild the evaluator (plain data: it crosses processes)."""

    source: NamedSource | ObjectSource
    quant: dict[str, Any] = field(default_factory=lambda: QuantConfig().to_dict())
    profiles: tuple[str, ...] = ("horowitz45nm", "seed-lab4")
    torch_threads: int = 1
    batch_size: int = 256


@dataclass(frozen=True)
class EvalTask:
    index: int  # position in the batch (and trial order)
    policy: dict[str, Any]  # Policy.to_dict()
    split: str = "val"
    limit: int | None = None
    keep_mask: bool = False  # return which images were right (for paired comparisons in the driver)
    start: int = 0  # measure images start..limit only (multi-fidelity promotions add images)


@dataclass(frozen=True)
class EvalOutcome:
    index: int
    correct: int
    images: int
    metrics: dict[str, float]  # accuracy, size/bops/energy (absolute and relative to fp32)
    wall_s: float
    error: str | None = None  # set when the policy could not be measured (e.g. NaN outputs)
    worker: str = ""
    packed_mask: bytes | None = None  # np.packbits of the per-image correctness, when asked for
    backend: str = ""  # the evaluation backend that measured it (mpsearch.quant.backends)

    @property
    def ok(self) -> bool:
        return self.error is None

    def mask(self):
        """The per-image correctness as a bool tensor (the task must have asked with ``keep_mask``)."""
        import numpy as np
        import torch

        if self.packed_mask is None:
            raise ValueError("this outcome carries no mask; submit the task with keep_mask=True")
        bits = np.unpackbits(np.frombuffer(self.packed_mask, dtype=np.uint8), count=self.images)
        return torch.from_numpy(bits.astype(bool))


def build_evaluator(spec: WorkerSpec):
    """The evaluator a worker holds: data, baseline from the checkpoint, calibrated quantizers."""
    import torch

    from mpsearch.evaluation.evaluator import Evaluator

    torch.set_num_threads(spec.torch_threads)
    baseline, data = spec.source.load()
    evaluator = Evaluator(baseline, data, quant=QuantConfig.from_dict(dict(spec.quant)), profiles=spec.profiles,
                          batch_size=spec.batch_size)
    evaluator.calibrate()
    return evaluator


def run_task(evaluator, task: EvalTask, worker: str = "") -> EvalOutcome:
    """Measure one policy; a failure of the policy (not of the code) becomes ``error``."""
    import numpy as np

    from mpsearch.policy import Policy

    start = time.perf_counter()
    policy = Policy.from_dict(task.policy)
    try:
        mask = evaluator.quantized_mask(policy, split=task.split, limit=task.limit, start=task.start)
    except UserError as exc:  # e.g. NaN/inf outputs at very low bit widths
        return EvalOutcome(task.index, 0, 0, {}, time.perf_counter() - start, error=str(exc), worker=worker,
                           backend=evaluator.backend.name)
    result = evaluator.summarize(policy, mask, split=task.split, start=start)
    costs = result.costs
    metrics = {"accuracy": result.accuracy, "size_bytes": costs.size_bytes, "bops": costs.bops}
    metrics.update({f"energy_{k}": v for k, v in costs.energy.items()})
    relative = costs.relative()
    metrics.update({f"rel_{k}": v for k, v in relative.items()})
    metrics["rel_energy"] = relative[f"energy_{evaluator.profiles[0]}"]  # the profile the search optimises
    metrics["integer_layers"] = evaluator.integer_layers
    packed = np.packbits(mask.numpy()).tobytes() if task.keep_mask else None
    return EvalOutcome(task.index, result.correct, result.images, metrics, time.perf_counter() - start, worker=worker,
                       packed_mask=packed, backend=evaluator.backend.name)


class Executor(ABC):
    """Evaluates batches of tasks; ``map`` returns outcomes in task order."""

    workers: int

    @abstractmethod
    def map(self, tasks: list[EvalTask], on_done: Callable[[EvalOutcome], None] | None = None) -> list[EvalOutcome]:
        """Run ``tasks``; ``on_done`` is called as each finishes (progress bars)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcessExecutor(Executor):
    """Runs every task here, one after the other (``run.workers`` 0: notebooks, debugging, tests)."""

    def __init__(self, spec: WorkerSpec, evaluator=None) -> None:
        import torch

        self.workers = 0
        self._previous_threads = torch.get_num_threads()
        self.evaluator = evaluator if evaluator is not None else build_evaluator(spec)
        torch.set_num_threads(spec.torch_threads)

    def map(self, tasks: list[EvalTask], on_done: Callable[[EvalOutcome], None] | None = None) -> list[EvalOutcome]:
        outcomes = []
        for task in tasks:
            outcomes.append(run_task(self.evaluator, task, "local"))
            if on_done is not None:
                on_done(outcomes[-1])
        return outcomes

    def close(self) -> None:
        import torch

        torch.set_num_threads(self._previous_threads)


class RayExecutor(Executor):
    """A pool of Ray actors, each holding its own evaluator (model, data, weight cache).

    An actor that dies (killed, out of memory, crashed) is replaced by a fresh one and its task
    is retried, up to ``max_retries`` times per task; after that the task comes back as a failed
    outcome naming the cause, so the study records a failed trial and goes on. Results do not
    depend on which actor measured them (fixed torch threads), so a retry gives the same numbers.
    """

    def __init__(self, spec: WorkerSpec, workers: int, *, placement: RayPlacement | None = None, max_retries: int = 2) -> None:
        placement = placement or RayPlacement()
        import ray

        if workers < -1 or workers == 0:
            raise UserError(f"run.workers: must be >= 1 for Ray (0 runs in-process, -1 fills the machine or cluster), got {workers}",
                            fields=("run.workers",))
        cpus = placement.cpus_per_worker or float(spec.torch_threads)
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            if placement.joins_cluster:
                join_cluster(placement.address)
            else:
                workers = default_workers(spec.torch_threads) if workers == -1 else workers
                start_private_ray(workers, cpus, placement)
        if workers == -1:  # fill the cluster
            workers = max(1, int(ray.cluster_resources().get("CPU", 0) // cpus))
        check_capacity(workers, cpus, placement.gpus_per_worker)
        # SPREAD puts the actors on as many nodes as possible: each holds a model and data set, and a
        # node that dies takes as few of them with it as it can.
        strategy = "SPREAD" if placement.joins_cluster else "DEFAULT"
        self._actor_cls = ray.remote(num_cpus=cpus, num_gpus=placement.gpus_per_worker, max_restarts=0,
                                     scheduling_strategy=strategy)(_EvalActor)
        ship_code_by_value(spec.source)
        self._spec = ray.put(spec)  # once: every actor gets a reference, not a copy of the model and data
        self.max_retries = max_retries
        self.placement_timeout_s = 600.0
        self.replaced = 0  # actors replaced after dying (reported by the study)
        self._starting: dict[Any, int] = {}  # ready() of replacement actors -> their slot
        self.actors = [self._start(i) for i in range(workers)]
        self.workers = workers
        try:
            ray.get([a.ready.remote() for a in self.actors])  # surface start-up errors here, once
        except ray.exceptions.RayActorError as exc:
            self.close()
            cause = next((line.strip() for line in str(exc).splitlines() if "because" in line), type(exc).__name__)
            hint = ("check that this driver and the cluster use the same RAY_AUTH_MODE (`ray status` works from here)"
                    if placement.joins_cluster else "rerun (a study resumes), or measure without Ray: --workers 0")
            raise UserError(f"Ray could not start mpsearch's workers ({cause[:300]}); {hint}", fields=("run.ray_address",)) from None

    def _start(self, slot: int):
        return self._actor_cls.remote(self._spec, f"worker-{slot}")

    def _replace(self, slot: int) -> None:
        """Start a fresh actor in ``slot``; it takes tasks once it is ready (see ``_starting``)."""
        import ray

        try:
            ray.kill(self.actors[slot])
        except Exception:  # noqa: BLE001 - it is usually dead already
            pass
        self.actors[slot] = self._start(slot)
        self._starting[self.actors[slot].ready.remote()] = slot
        self.replaced += 1

    def map(self, tasks: list[EvalTask], on_done: Callable[[EvalOutcome], None] | None = None) -> list[EvalOutcome]:
        # Results come as soon as any actor finishes (progress bars, in-order recording by the
        # caller); the returned list is put back in task order. A replaced actor takes tasks
        # only once it is ready: on a cluster that lost a node it may wait for room, and the
        # surviving actors carry on meanwhile.
        import ray

        queue = [(task, 0) for task in reversed(tasks)]  # a stack: pop() takes the first task
        starting = set(self._starting.values())
        idle = [slot for slot in range(len(self.actors)) if slot not in starting]
        running: dict[Any, tuple[int, EvalTask, int]] = {}
        outcomes: list[EvalOutcome] = []
        stalled_since: float | None = None
        with deferred_interrupt() as interrupted:
            while queue or running:
                while queue and idle:
                    slot = idle.pop(0)
                    task, attempt = queue.pop()
                    running[self.actors[slot].run.remote(task)] = (slot, task, attempt)
                ready, _ = ray.wait([*running, *self._starting], num_returns=1, timeout=0.2)
                if interrupted.is_set():
                    raise KeyboardInterrupt
                if ready and ready[0] in self._starting:
                    self._started(ready[0], idle)
                elif ready:
                    self._collect(ready[0], running, queue, idle, outcomes, on_done)
                stalled_since = self._check_stall(running, stalled_since)
        return sorted(outcomes, key=lambda o: o.index)

    def _started(self, ref, idle: list[int]) -> None:
        """A replacement actor finished starting (or died starting: start another)."""
        import ray
        from ray.exceptions import RayActorError

        slot = self._starting.pop(ref)
        try:
            ray.get(ref)
        except RayActorError:
            self._replace(slot)
            return
        idle.append(slot)

    def _check_stall(self, running: dict, since: float | None) -> float | None:
        """Nothing measuring and every actor still waiting to be placed: give up after ``placement_timeout_s``."""
        if running or not self._starting:
            return None
        now = time.monotonic()
        if since is None:
            return now
        if now - since > self.placement_timeout_s:
            raise UserError(f"no Ray worker could be placed for {self.placement_timeout_s:.0f} s (the cluster lost the nodes "
                            "with room for them); the study is recorded up to here: add nodes and run it again to resume")
        return since

    def _collect(self, ref, running, queue, idle, outcomes: list[EvalOutcome], on_done) -> None:
        """Take one finished evaluation: its outcome, or a replaced actor and a retry."""
        import ray
        from ray.exceptions import RayActorError  # ActorDiedError (killed, OOM, crash, lost node) and kin

        slot, task, attempt = running.pop(ref)
        try:
            outcome = ray.get(ref)
        except RayActorError as exc:
            self._replace(slot)  # the slot takes tasks again once its new actor is ready
            if attempt < self.max_retries:
                queue.append((task, attempt + 1))
                return
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            outcome = EvalOutcome(task.index, 0, 0, {}, 0.0, worker=f"worker-{slot}",
                                  error=f"worker died {attempt + 1} times on this policy ({type(exc).__name__}: {cause[:200]})")
        else:
            idle.append(slot)
        outcomes.append(outcome)
        if on_done is not None:
            on_done(outcome)

    def close(self) -> None:
        import ray

        for actor in getattr(self, "actors", []):
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if getattr(self, "_owns_ray", False) and ray.is_initialized():
            ray.shutdown()


class _EvalActor:
    """Body of a Ray actor: builds the evaluator once, then measures tasks."""

    def __init__(self, spec: WorkerSpec, name: str) -> None:
        self.name = name
        try:
            self.evaluator = build_evaluator(spec)
            self.error = None
        except Exception as exc:  # noqa: BLE001 - reported by ready()
            self.evaluator = None
            self.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"

    def ready(self) -> str:
        if self.error:
            raise RuntimeError(f"{self.name} could not start: {self.error}")
        return self.name

    def run(self, task: EvalTask) -> EvalOutcome:
        return run_task(self.evaluator, task, self.name)

    def pid(self) -> int:
        """The actor's process id (fault-injection tests kill it)."""
        return os.getpid()


def create_executor(spec: WorkerSpec, workers: int, *, placement: RayPlacement | None = None, evaluator=None) -> Executor:
    """``workers == 0``: in this process; otherwise a Ray actor pool of that size (-1: as many
    as the machine's cores, or the cluster's CPUs, hold)."""
    if workers < -1:
        raise UserError(f"run.workers: must be >= -1, got {workers}", fields=("run.workers",))
    if workers == 0:
        return InProcessExecutor(spec, evaluator)
    return RayExecutor(spec, workers, placement=placement)


def default_workers(torch_threads: int = 1) -> int:
    """As many workers as the machine has cores for at ``torch_threads`` each."""
    return max(1, (os.cpu_count() or 1) // max(1, torch_threads))


