"""Measured latency and energy of a callable: wall clock, CPU RAPL counters, NVIDIA NVML counters.

A meter that cannot measure says so: :meth:`Meter.check` and :meth:`Meter.measure` raise
:class:`MeterUnavailable` with one line naming what is missing and how to fix it. A meter never
guesses: no counter, an unreadable counter or one that did not move is an error, never 0 J.

Energy meters read a cumulative hardware counter before and after a timed window of calls, and
first over an idle window of ``time.sleep`` so that the idle (static) power of the package or
board can be reported apart from the energy the calls add (see
:attr:`Measurement.active_energy_j_per_call`).
"""

from __future__ import annotations

import importlib
import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Generic, TypeVar

from mpsearch.errors import UserError
from mpsearch.registry import Registry

__all__ = [
    "METERS",
    "Measurement",
    "Meter",
    "MeterUnavailable",
    "NvmlMeter",
    "RaplMeter",
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
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        if idle_s < 0:
            raise ValueError(f"idle_s must be >= 0, got {idle_s}")
        self.check()
        wait = sync or self._default_sync() or (lambda: None)
        with self._open() as counter:
            idle_power = None
            if counter is not None and idle_s > 0:
                wait()  # work the caller queued before measure() must not land in the idle window
                before, start = counter.read(), time.perf_counter()
                time.sleep(idle_s)
                elapsed, after = time.perf_counter() - start, counter.read()
                idle_power = self._advanced(counter, before, after, elapsed, "idle") / elapsed

            for _ in range(warmup):
                fn()
            wait()
            start = time.perf_counter()
            fn()
            wait()
            one_call = time.perf_counter() - start

            before = counter.read() if counter is not None else None
            start = time.perf_counter()
            calls, batch = 0, max(1, math.ceil(window_s / max(one_call, _MIN_CALL_S)))
            while True:
                for _ in range(batch):
                    fn()
                calls += batch
                wait()
                elapsed = time.perf_counter() - start
                if elapsed >= window_s:
                    break
                # The one-call estimate was too high (e.g. a slow first call): top up with a
                # batch sized from this window so far, still inside the same counter reads.
                per_call = max(elapsed / calls, _MIN_CALL_S)
                batch = max(1, math.ceil((window_s - elapsed) / per_call))
            after = counter.read() if counter is not None else None

        energy = None
        if counter is not None:
            energy = self._advanced(counter, before, after, elapsed, "timed") / calls
        return Measurement(self.name, calls, elapsed, elapsed / calls, energy, idle_power)

    def _advanced(self, counter: _Counter[Any], before: Any, after: Any, seconds: float, what: str) -> float:
        joules = counter.joules(before, after)
        if not joules > 0:
            raise MeterUnavailable(
                f"{self.name}: energy counter did not advance over a {seconds:.3g} s {what} window: cannot measure "
                "(counter frozen or updated too rarely; try a longer window)"
            )
        return joules


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


_RAPL_PACKAGE = re.compile(r"intel-rapl:\d+")


@dataclass(frozen=True)
class _RaplZone:
    energy: Path
    max_range_uj: int


class _RaplCounter(_Counter[tuple[int, ...]]):
    def __init__(self, meter: RaplMeter, zones: list[_RaplZone]) -> None:
        self.meter, self.zones = meter, zones

    def read(self) -> tuple[int, ...]:
        return tuple(self.meter._read_file(zone.energy) for zone in self.zones)

    def joules(self, before: tuple[int, ...], after: tuple[int, ...]) -> float:
        total_uj = 0
        for zone, b, a in zip(self.zones, before, after):
            # A zone counter wraps to 0 after max_energy_range_uj; one wrap per window is
            # recoverable (at 250 W a 2^38 uJ range wraps every ~18 min), a larger jump is not.
            delta = a - b if a >= b else a + zone.max_range_uj - b
            if delta < 0 or delta > zone.max_range_uj:
                raise MeterUnavailable(
                    f"rapl: {zone.energy} went from {b} to {a} uJ, which no single wraparound of "
                    f"{zone.max_range_uj} uJ explains: cannot measure"
                )
            total_uj += delta
        return total_uj * 1e-6


@register_meter("rapl")
class RaplMeter(Meter):
    """CPU package energy from the Linux powercap RAPL counters (Intel; AMD Zen since Linux 5.8).

    Sums the package zones ``intel-rapl:N`` directly under ``root`` (one per socket). Subzones
    (``intel-rapl:N:M``: core, uncore, DRAM) are left out because core and uncore are already
    inside the package. The counters cover the whole package, not this process: other work on
    the machine lands in the measurement, which is why idle power is reported apart.
    """

    name = "rapl"

    def __init__(self, root: str | Path = "/sys/class/powercap") -> None:
        self.root = Path(root)

    @classmethod
    def applies_to(cls, device: str) -> bool:
        return device == "cpu"

    def check(self) -> None:
        counter = _RaplCounter(self, self._zones())
        counter.read()

    @contextmanager
    def _open(self) -> Iterator[_Counter[Any] | None]:
        yield _RaplCounter(self, self._zones())

    def _zones(self) -> list[_RaplZone]:
        if not self.root.is_dir():
            raise MeterUnavailable(
                f"rapl: {self.root} does not exist: no RAPL powercap interface on this kernel/machine "
                "(Intel: modprobe intel_rapl_msr; AMD needs Linux >= 5.8; VMs and containers usually hide it)"
            )
        packages = sorted(p for p in self.root.iterdir() if _RAPL_PACKAGE.fullmatch(p.name))
        if not packages:
            raise MeterUnavailable(
                f"rapl: no package zone (intel-rapl:N) under {self.root}; load the RAPL driver (modprobe intel_rapl_msr)"
            )
        zones = []
        for package in packages:
            max_range = self._read_file(package / "max_energy_range_uj")
            if max_range <= 0:
                raise MeterUnavailable(f"rapl: {package / 'max_energy_range_uj'} is {max_range}; cannot handle wraparound")
            zones.append(_RaplZone(package / "energy_uj", max_range))
        return zones

    def _read_file(self, path: Path) -> int:
        """A counter file's value; every way it can fail becomes a MeterUnavailable naming it."""
        try:
            return self._read_uj(path)
        except PermissionError:
            raise MeterUnavailable(
                f"rapl: {path} is not readable (root-only since Linux 5.10); run as root or make it readable "
                f"(sudo chmod a+r {path}, until reboot)"
            ) from None
        except FileNotFoundError:
            raise MeterUnavailable(f"rapl: {path} does not exist; this RAPL zone exposes no counter") from None
        except OSError as exc:
            raise MeterUnavailable(f"rapl: cannot read {path} ({exc.strerror or exc})") from None
        except ValueError:
            raise MeterUnavailable(f"rapl: {path} does not hold an integer count of microjoules") from None

    @staticmethod
    def _read_uj(path: Path) -> int:
        """The raw read; the one place that touches the file (tests replace it)."""
        return int(path.read_text().strip())


class _NvmlCounter(_Counter[int]):
    def __init__(self, nvml: ModuleType, handle: Any, index: int) -> None:
        self.nvml, self.handle, self.index = nvml, handle, index

    def read(self) -> int:
        try:
            return int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))
        except Exception as exc:  # pynvml.NVMLError_NotSupported before Volta, among others
            raise MeterUnavailable(
                f"nvml: GPU {self.index} does not report its total energy ({exc}); "
                "nvmlDeviceGetTotalEnergyConsumption needs a Volta or newer GPU"
            ) from None

    def joules(self, before: int, after: int) -> float:
        # Millijoules since the driver loaded, 64 bits: it does not wrap, it only restarts.
        if after < before:
            raise MeterUnavailable(
                f"nvml: GPU {self.index} energy counter went backwards ({before} -> {after} mJ; driver reloaded?): cannot measure"
            )
        return (after - before) * 1e-3


@register_meter("nvml")
class NvmlMeter(Meter):
    """NVIDIA board energy from NVML's total-energy counter (``nvidia-ml-py``, Volta or newer).

    ``index`` is NVML's numbering, which ignores ``CUDA_VISIBLE_DEVICES`` and follows PCI bus
    order; CUDA numbers the same GPUs in PCI order only with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``.
    :meth:`device_name` helps confirm the pairing. Pass ``sync=torch.cuda.synchronize`` to
    :meth:`measure`: this meter cannot tell which torch device to wait on. The counter covers the whole board: other
    processes on the GPU land in the measurement. NVML is initialised per check/measurement and
    shut down after (NVML counts inits, so this nests with other users in the process).
    """

    name = "nvml"

    def __init__(self, index: int = 0) -> None:
        self.index = index

    @classmethod
    def applies_to(cls, device: str) -> bool:
        return _is_cuda(device)

    @classmethod
    def for_device(cls, device: str) -> Meter:
        _, _, index = device.partition(":")  # applies_to() has checked it is "cuda" or "cuda:N"
        return cls(int(index or 0))

    def check(self) -> None:
        with self._open() as counter:
            counter.read()

    def device_name(self) -> str:
        with self._session() as (nvml, handle):
            name = nvml.nvmlDeviceGetName(handle)
        return name.decode() if isinstance(name, bytes) else str(name)  # bytes before nvidia-ml-py 11.515

    @contextmanager
    def _open(self) -> Iterator[_NvmlCounter]:
        with self._session() as (nvml, handle):
            yield _NvmlCounter(nvml, handle, self.index)

    @contextmanager
    def _session(self) -> Iterator[tuple[ModuleType, Any]]:
        try:
            nvml = importlib.import_module("pynvml")  # lazily: an optional dependency
        except ImportError:
            raise MeterUnavailable("nvml: the pynvml module is missing; pip install nvidia-ml-py") from None
        try:
            nvml.nvmlInit()
        except Exception as exc:  # pynvml.NVMLError_LibraryNotFound, _DriverNotLoaded, ...
            raise MeterUnavailable(f"nvml: nvmlInit failed ({exc}); no NVIDIA driver? check that nvidia-smi works") from None
        try:
            try:
                count = nvml.nvmlDeviceGetCount()
                handle = nvml.nvmlDeviceGetHandleByIndex(self.index) if 0 <= self.index < count else None
            except Exception as exc:
                raise MeterUnavailable(f"nvml: cannot open GPU {self.index} ({exc})") from None
            if handle is None:
                raise MeterUnavailable(f"nvml: GPU index {self.index} requested but NVML sees {count} GPU(s)")
            yield nvml, handle
        finally:
            nvml.nvmlShutdown()


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
