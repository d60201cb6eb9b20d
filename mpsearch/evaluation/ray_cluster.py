"""Where Ray runs mpsearch's workers: a running cluster joined, or a private instance on loopback."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mpsearch.errors import UserError

__all__ = ["RayPlacement", "join_cluster", "start_private_ray", "check_capacity", "ship_code_by_value", "deferred_interrupt"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayPlacement:
    """Where Ray workers run and what each reserves (``run.*`` fields of the same names).

    ``address`` joins a running cluster; without it ``RAY_ADDRESS`` in the environment does
    (how ``ray job submit`` and cluster launchers pass it). Otherwise a private instance starts
    on the loopback address, with Ray's authentication as Ray sets it.
    """

    address: str | None = None
    cpus_per_worker: float | None = None  # None: the worker's torch threads
    gpus_per_worker: float = 0.0
    dashboard: bool = False

    @property
    def joins_cluster(self) -> bool:
        return bool(self.address or os.environ.get("RAY_ADDRESS"))


def join_cluster(address: str | None) -> None:
    """Connect to a running cluster (``address``, else ``RAY_ADDRESS``) and say which, in one line."""
    import ray

    where = address or os.environ.get("RAY_ADDRESS")
    try:
        # Resources belong to the cluster: ray.init refuses num_cpus when it joins one.
        context = ray.init(address=address, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot join the Ray cluster at {where!r} ({first[:200]}); check run.ray_address / RAY_ADDRESS and "
                        "`ray status` on the head node; a cluster with token authentication needs its token here "
                        "(RAY_AUTH_TOKEN or ~/.ray/auth_token) and RAY_AUTH_MODE=token", fields=("run.ray_address",)) from None
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    dashboard = getattr(context, "dashboard_url", None)
    logger.info(f"joined the Ray cluster at {ray.get_runtime_context().gcs_address} ({where}): {len(nodes)} node(s), "
                f"{total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs" + (f"; dashboard http://{dashboard}" if dashboard else ""))


def start_private_ray(workers: int, cpus: float, placement: RayPlacement) -> None:
    """A Ray instance for this run only, every port on 127.0.0.1.

    Ray advertises a node's network address, and its servers listen on every interface, unless
    its no-cluster mode is on (what it does on macOS and Windows); this private instance takes
    that mode while it starts, so nothing outside this machine can reach it.
    """
    import ray
    from ray._private import ray_constants

    if placement.dashboard:
        try:
            import aiohttp  # noqa: F401 - Ray's dashboard needs ray[default]
        except ImportError:
            raise UserError("run.ray_dashboard needs Ray's dashboard: pip install 'mpsearch[cluster]' (ray[default])",
                            fields=("run.ray_dashboard",)) from None
    previous = getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        context = ray.init(num_cpus=max(1, math.ceil(workers * cpus)), num_gpus=math.ceil(workers * placement.gpus_per_worker),
                           include_dashboard=placement.dashboard, dashboard_host="127.0.0.1", log_to_driver=False)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous
    address = ray.get_runtime_context().gcs_address
    if not address.startswith(("127.", "[::1]", "localhost")):
        logger.warning(f"the private Ray instance listens on {address}, not only on loopback (this Ray version "
                       "ignores its no-cluster mode); keep Ray's authentication on")
    if placement.dashboard:
        logger.info(f"Ray dashboard on http://{context.dashboard_url}")


def check_capacity(workers: int, cpus: float, gpus: float) -> None:
    """Actors the cluster cannot place would wait forever: refuse them in one line instead."""
    import ray

    total = ray.cluster_resources()
    for name, each, knob in (("CPU", cpus, "run.cpus_per_worker"), ("GPU", gpus, "run.gpus_per_worker")):
        if each and workers * each > total.get(name, 0) + 1e-9:
            raise UserError(f"{workers} workers at {each:g} {name}(s) each need {workers * each:g} {name}s; the Ray cluster "
                            f"has {total.get(name, 0):g}: lower run.workers or {knob}", fields=("run.workers", knob))


def ship_code_by_value(source: Any) -> None:
    """Let workers unpickle the user's own classes (a model defined in a notebook, a test or a
    script, a Dataset subclass): their modules travel with the objects unless workers can import
    them (installed packages and the standard library)."""
    import site
    import sys
    import sysconfig

    from ray import cloudpickle

    if not hasattr(source, "baseline"):  # a NamedSource: workers load it by name
        return
    installed = tuple(str(p) for p in (*site.getsitepackages(), sysconfig.get_paths()["stdlib"]))
    objects = [*source.baseline.model.modules()]
    objects += [getattr(split, "dataset", None) for split in (source.data.train, source.data.calibration, source.data.val,
                                                               source.data.test)]
    for name in {type(o).__module__ for o in objects if o is not None}:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if module is None or name == "__main__" or path is None or name.split(".")[0] == "mpsearch" or path.startswith(installed):
            continue
        cloudpickle.register_pickle_by_value(module)


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[threading.Event]:
    """While waiting on Ray, Ctrl-C only sets an event that the wait loop turns into KeyboardInterrupt.

    A SIGINT that lands inside Ray's own calls can be lost there; the event cannot. A second
    Ctrl-C interrupts at once. Outside the main thread (where signals cannot be handled) nothing
    changes.
    """
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def handler(signum: int, frame: object) -> None:
        if event.is_set():
            raise KeyboardInterrupt
        event.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)
