"""Measured latency and energy of a callable: the meter contract, the meter registry and the
wall-clock meter. The hardware energy meters register themselves from their own modules
(:mod:`mpsearch.cost.rapl`, :mod:`mpsearch.cost.nvml`), which :mod:`mpsearch.cost` imports.

A meter that cannot measure says so: :meth:`Meter.check` and :meth:`Meter.measure` raise
:class:`MeterUnavailable` with one line naming what is missing and how to fix it. A meter never
guesses: no counter, an unreadable counter or one that did not move is an error, never 0 J.

Energy meters read a cumulative hardware counter before and after a timed window of calls, and
first over an idle window of ``time.sleep`` so that the idle (static) power of the package or
board can be reported apart from the energy the calls add (see
:attr:`Measurement.active_energy_j_per_call`).
"""

from __future__ import annotations

import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Generic, TypeVar

from mpsearch.errors import UserError
from mpsearch.registry import Registry

__all__ = [
    "METERS",
    "Measurement",
    "Meter",
    "MeterUnavailable",
    "WallClockMeter",
    "available_meters",
    "create_meter",
    "list_meters",
    "register_meter",
]

# Floor on the one-call time estimate: keeps the first batch finite for a call that is faster
# than the clock can tell; the window loop tops the batch up if it falls short.
_MIN_CALL_S = 1e-6


class MeterUnavailable(UserError):
    """This meter cannot measure on this machine; the message says what is missing and the fix
    (a UserError: the CLI prints it as one line and exits 2)."""


@dataclass(frozen=True)
class Measurement:
    """One timed window of ``calls`` calls.

    ``idle_power_w`` is the power over an idle window measured just before, so that
    ``energy_j_per_call`` (everything the counter saw) and the part the calls added can both be
    reported. Energy fields are ``None`` for a meter without an energy counter.
    """

    meter: str
    calls: int
    window_s: float
    seconds_per_call: float
    energy_j_per_call: float | None
    idle_power_w: float | None

    @property
    def active_energy_j_per_call(self) -> float | None:
        """Energy per call above idle: total minus idle power over the call's duration."""
        if self.energy_j_per_call is None or self.idle_power_w is None:
            return None
        return self.energy_j_per_call - self.idle_power_w * self.seconds_per_call

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "active_energy_j_per_call": self.active_energy_j_per_call}


R = TypeVar("R")


class _Counter(ABC, Generic[R]):
    """A cumulative energy counter, open for the duration of one measurement."""

    @abstractmethod
    def read(self) -> R:
        """The raw counter value now."""

    @abstractmethod
    def joules(self, before: R, after: R) -> float:
        """Energy between two reads; raises MeterUnavailable if the counter went backwards."""


class Meter(ABC):
    """Measures seconds (and joules, for energy meters) per call of a function.

    Subclasses implement :meth:`check` and, for energy, :meth:`_open`; the window logic lives
    here so every meter times calls the same way.
    """

    name: ClassVar[str]

    @abstractmethod
    def check(self) -> None:
        """Raise :class:`MeterUnavailable` if this meter cannot measure here. Cheap: no timing."""

    @classmethod
    def applies_to(cls, device: str) -> bool:
        """Whether this meter measures something about ``device`` ("cpu", "cuda", "cuda:N")."""
        return True

    @classmethod
    def for_device(cls, device: str) -> Meter:
        """The meter instance that measures ``device`` (used by :func:`available_meters`)."""
        return cls()

    @contextmanager
    def _open(self) -> Iterator[_Counter[Any] | None]:
        """The energy counter for one measurement; ``None`` for a meter that only times."""
        yield None

    def _default_sync(self) -> Callable[[], None] | None:
        """What to wait on when the caller passes no ``sync``; ``None``: nothing."""
        return None

    def measure(
        self,
        fn: Callable[[], object],
        *,
        window_s: float = 1.0,
        warmup: int = 3,
        sync: Callable[[], None] | None = None,
        idle_s: float = 1.0,
    ) -> Measurement:
        """Time ``fn`` over a window of at least ``window_s`` seconds after ``warmup`` calls.

        ``sync`` waits for queued device work (``torch.cuda.synchronize`` on GPU); it runs after
        the warm-up, after the estimating call and at the end of the window, so asynchronous work
        is inside the window. Energy meters first read their counter over ``idle_s`` seconds of
        sleep (``idle_s=0`` skips it: ``idle_power_w`` is then ``None``).
        """
        _check_window(window_s, warmup, idle_s)
        self.check()
        wait = sync or self._default_sync() or (lambda: None)
        with self._open() as counter:
            idle_power = self._idle_power(counter, idle_s, wait) if counter is not None and idle_s > 0 else None
            one_call = _one_call_s(fn, warmup, wait)
            before = counter.read() if counter is not None else None
            calls, elapsed = _timed_window(fn, window_s, one_call, wait)
            after = counter.read() if counter is not None else None

        energy = None
        if counter is not None:
            energy = self._advanced(counter, before, after, elapsed, "timed") / calls
        return Measurement(self.name, calls, elapsed, elapsed / calls, energy, idle_power)

    def _idle_power(self, counter: _Counter[Any], idle_s: float, wait: Callable[[], None]) -> float:
        """Watts the counter sees over ``idle_s`` seconds of sleep."""
        wait()  # work the caller queued before measure() must not land in the idle window
        before, start = counter.read(), time.perf_counter()
        time.sleep(idle_s)
        elapsed, after = time.perf_counter() - start, counter.read()
        return self._advanced(counter, before, after, elapsed, "idle") / elapsed

    def _advanced(self, counter: _Counter[Any], before: Any, after: Any, seconds: float, what: str) -> float:
        joules = counter.joules(before, after)
        if not joules > 0:
            raise MeterUnavailable(
                f"{self.name}: energy counter did not advance over a {seconds:.3g} s {what} window: cannot measure "
                "(counter frozen or updated too rarely; try a longer window)"
            )
        return joules


def _check_window(window_s: float, warmup: int, idle_s: float) -> None:
    if not window_s > 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if idle_s < 0:
        raise ValueError(f"idle_s must be >= 0, got {idle_s}")


def _one_call_s(fn: Callable[[], object], warmup: int, wait: Callable[[], None]) -> float:
    """Seconds of one call of ``fn``, timed after ``warmup`` calls: what sizes the window's first batch."""
    for _ in range(warmup):
        fn()
    wait()
    start = time.perf_counter()
    fn()
    wait()
    return time.perf_counter() - start


def _timed_window(fn: Callable[[], object], window_s: float, one_call: float, wait: Callable[[], None]) -> tuple[int, float]:
    """Call ``fn`` in batches until at least ``window_s`` seconds have passed: the calls and the seconds."""
    start = time.perf_counter()
    calls, batch = 0, max(1, math.ceil(window_s / max(one_call, _MIN_CALL_S)))
    while True:
        for _ in range(batch):
            fn()
        calls += batch
        wait()
        elapsed = time.perf_counter() - start
        if elapsed >= window_s:
            return calls, elapsed
        # The one-call estimate was too high (e.g. a slow first call): top up with a
        # batch sized from this window so far, still inside the same counter reads.
        per_call = max(elapsed / calls, _MIN_CALL_S)
        batch = max(1, math.ceil((window_s - elapsed) / per_call))


METERS: Registry[type[Meter]] = Registry("meter")
register_meter = METERS.register


def create_meter(name: str, **kwargs: Any) -> Meter:
    """The registered meter ``name`` built with ``kwargs``; unknown names are a UserError."""
    return METERS.get(name)(**kwargs)


def list_meters() -> list[str]:
    return sorted(METERS.names())


_DEVICE = re.compile(r"cpu|cuda(?::(\d+))?")


def _is_cuda(device: str) -> bool:
    return device != "cpu" and _DEVICE.fullmatch(device) is not None


@register_meter("wallclock")
class WallClockMeter(Meter):
    """Seconds per call from ``time.perf_counter``; no energy."""

    name = "wallclock"

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    @classmethod
    def for_device(cls, device: str) -> Meter:
        return cls(device)

    def check(self) -> None:
        match = _DEVICE.fullmatch(self.device)
        if match is None:
            raise MeterUnavailable(f"wallclock: unknown device {self.device!r}; use cpu, cuda or cuda:N")
        if self.device == "cpu":
            return
        import torch  # lazily: importing the cost package must not pull in CUDA initialisation

        if not torch.cuda.is_available():
            raise MeterUnavailable(
                f"wallclock: device {self.device} requested but torch sees no CUDA device "
                "(CPU-only torch build, no driver, or CUDA_VISIBLE_DEVICES empty); use device cpu"
            )
        count = torch.cuda.device_count()
        if match.group(1) is not None and int(match.group(1)) >= count:
            raise MeterUnavailable(f"wallclock: device {self.device} requested but torch sees {count} CUDA device(s)")

    def _default_sync(self) -> Callable[[], None] | None:
        # Without a sync a CUDA window times kernel launches, not kernels: wait on our device.
        if not _is_cuda(self.device):
            return None
        import torch

        return lambda: torch.cuda.synchronize(self.device)


def available_meters(device: str) -> dict[str, str | None]:
    """For each registered meter that applies to ``device``: ``None`` if it can measure, else why not."""
    out: dict[str, str | None] = {}
    for name in list_meters():
        cls = METERS.get(name)
        if not cls.applies_to(device):
            continue
        try:
            cls.for_device(device).check()
            out[name] = None
        except MeterUnavailable as exc:
            out[name] = str(exc)
    return out
