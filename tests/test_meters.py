"""Meters checked against fake counters on a fake clock, where every number is known by hand.

The fake clock advances only when the measured function "works" or the meter sleeps, and a fake
device turns that time into energy at a set power; so seconds, joules and idle watts come out
exactly. One test uses real time to check the wall-clock meter end to end.
"""

from __future__ import annotations

import os
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import mpsearch.cost.meters as meters
from mpsearch.cost.meters import (
    Measurement,
    MeterUnavailable,
    WallClockMeter,
    available_meters,
    create_meter,
    list_meters,
)
from mpsearch.cost.nvml import NvmlMeter
from mpsearch.cost.rapl import RaplMeter
from mpsearch.errors import UserError

DT = 0.0625  # seconds per fake call: a power of two, so the fake clock adds without rounding
IDLE_W, BUSY_W = 8.0, 32.0


class FakeTime:
    """Stands in for the ``time`` module inside meters: virtual seconds, energy at set powers."""

    def __init__(self, on_energy: Callable[[float], None] = lambda joules: None) -> None:
        self.now = 1000.0
        self.on_energy = on_energy

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.on_energy(IDLE_W * seconds)

    def work(self, seconds: float = DT) -> None:
        self.now += seconds
        self.on_energy(BUSY_W * seconds)


def fake_time(monkeypatch: pytest.MonkeyPatch, on_energy: Callable[[float], None] = lambda joules: None) -> FakeTime:
    clock = FakeTime(on_energy)
    monkeypatch.setattr(meters, "time", clock)
    return clock


# Per timed call: BUSY_W * DT = 2 J in all, IDLE_W * DT = 0.5 J of it idle.
CALL_J = BUSY_W * DT
ACTIVE_J = (BUSY_W - IDLE_W) * DT


def assert_energy(m: Measurement, calls: int = 4) -> None:
    assert m.calls == calls
    assert m.window_s == pytest.approx(calls * DT)
    assert m.seconds_per_call == pytest.approx(DT)
    assert m.energy_j_per_call == pytest.approx(CALL_J)
    assert m.idle_power_w == pytest.approx(IDLE_W)
    assert m.active_energy_j_per_call == pytest.approx(ACTIVE_J)


# --- wall clock -----------------------------------------------------------------------------


def test_wallclock_real_time_counts_warmup_and_window() -> None:
    calls = 0

    def fn() -> None:
        nonlocal calls
        calls += 1
        time.sleep(0.002)

    m = WallClockMeter().measure(fn, window_s=0.05, warmup=3)
    assert 0.002 <= m.seconds_per_call <= 0.02
    assert m.calls >= 2 and m.window_s >= 0.05
    assert m.seconds_per_call == pytest.approx(m.window_s / m.calls)
    assert calls == 3 + 1 + m.calls
    assert m.energy_j_per_call is None and m.idle_power_w is None and m.active_energy_j_per_call is None
    assert m.to_dict() == {
        "meter": "wallclock",
        "calls": m.calls,
        "window_s": m.window_s,
        "seconds_per_call": m.seconds_per_call,
        "energy_j_per_call": None,
        "idle_power_w": None,
        "active_energy_j_per_call": None,
    }


def test_wallclock_sync_order_and_top_up_after_a_slow_first_call(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = fake_time(monkeypatch)
    events: list[str] = []
    durations = iter([DT, DT, 4 * DT] + [DT] * 10)  # warm-up, warm-up, a slow estimating call, ...

    def fn() -> None:
        events.append("fn")
        clock.work(next(durations))

    m = WallClockMeter().measure(fn, window_s=4 * DT, warmup=2, sync=lambda: events.append("sync"))
    # The estimate (4*DT per call) asks for one call; the window tops up with 3 more, keeping
    # all four between the same clock reads, so the window still reaches window_s.
    assert (m.calls, m.window_s, m.seconds_per_call) == (4, 4 * DT, DT)
    assert events == ["fn", "fn", "sync", "fn", "sync", "fn", "sync", "fn", "fn", "fn", "sync"]


def test_wallclock_cuda_without_cuda_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(MeterUnavailable, match="device cuda.*no CUDA device"):
            WallClockMeter(device).check()
    for bad in ("gpu", "cuda:x", "CPU", "cuda:"):
        with pytest.raises(MeterUnavailable, match="unknown device"):
            WallClockMeter(bad).check()
    WallClockMeter("cpu").check()


def test_wallclock_cuda_index_and_default_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(MeterUnavailable, match="cuda:1 requested but torch sees 1"):
        WallClockMeter("cuda:1").check()
    synced: list[object] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    clock = fake_time(monkeypatch)
    m = WallClockMeter("cuda:0").measure(clock.work, window_s=4 * DT, warmup=1)
    # Without a sync argument a CUDA window waits on its device: after warm-up, estimate, window.
    assert m.calls == 4 and synced == ["cuda:0"] * 3


def test_measure_rejects_bad_arguments() -> None:
    for kwargs in ({"window_s": 0.0}, {"warmup": -1}, {"idle_s": -1.0}):
        with pytest.raises(ValueError):
            WallClockMeter().measure(lambda: None, **kwargs)


# --- RAPL -----------------------------------------------------------------------------------


class FakeRapl:
    """A powercap tree: two packages splitting the power 3:1, and a core subzone to ignore."""

    SHARES = {"intel-rapl:0": 0.75, "intel-rapl:1": 0.25, "intel-rapl:0:0": 10.0}

    def __init__(self, root: Path, max_range_uj: int = 2**40, start_uj: int = 123_456) -> None:
        self.root, self.max_range = root, max_range_uj
        self.uj = dict.fromkeys(self.SHARES, start_uj)
        for name in self.SHARES:
            (root / name).mkdir(parents=True)
            (root / name / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
        self._write()

    def add(self, joules: float) -> None:
        for name, share in self.SHARES.items():
            self.uj[name] = (self.uj[name] + round(joules * share * 1e6)) % self.max_range
        self._write()

    def _write(self) -> None:
        for name, value in self.uj.items():
            (self.root / name / "energy_uj").write_text(f"{value}\n")


def test_rapl_missing_root_or_zones(tmp_path: Path) -> None:
    with pytest.raises(MeterUnavailable, match="no RAPL powercap interface.*Linux >= 5.8"):
        RaplMeter(tmp_path / "nope").check()
    (tmp_path / "intel-rapl").mkdir()  # the control-type directory, not a zone
    (tmp_path / "intel-rapl:0:0").mkdir()  # a subzone alone is not a package
    with pytest.raises(MeterUnavailable, match="no package zone"):
        RaplMeter(tmp_path).check()


def test_rapl_sums_packages_ignores_subzones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rapl = FakeRapl(tmp_path)
    clock = fake_time(monkeypatch, rapl.add)
    m = create_meter("rapl", root=tmp_path).measure(clock.work, window_s=4 * DT, warmup=2, idle_s=0.5)
    assert m.meter == "rapl"
    assert_energy(m)


def test_rapl_wraparound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    max_range = 10_000_000  # 10 J: package 0 wraps during the idle window and the timed one
    rapl = FakeRapl(tmp_path, max_range_uj=max_range, start_uj=max_range - 1_000_000)
    clock = fake_time(monkeypatch, rapl.add)
    seen: list[int] = []
    read = RaplMeter._read_uj

    def spy(path: Path) -> int:
        value = read(path)
        if path == tmp_path / "intel-rapl:0" / "energy_uj":
            seen.append(value)
        return value

    monkeypatch.setattr(RaplMeter, "_read_uj", staticmethod(spy))
    m = RaplMeter(tmp_path).measure(clock.work, window_s=4 * DT, warmup=2, idle_s=0.5)
    assert_energy(m)
    # reads: check, idle before/after, window before/after; both windows saw a wrap
    assert len(seen) == 5 and seen[2] < seen[1] and seen[4] < seen[3]


def test_rapl_counter_not_advancing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    FakeRapl(tmp_path)
    clock = fake_time(monkeypatch)  # time passes, the counters never move
    with pytest.raises(MeterUnavailable, match="did not advance over a 0.5 s idle window: cannot measure"):
        RaplMeter(tmp_path).measure(clock.work, window_s=4 * DT, idle_s=0.5)
    with pytest.raises(MeterUnavailable, match="did not advance over a 0.25 s timed window: cannot measure"):
        RaplMeter(tmp_path).measure(clock.work, window_s=4 * DT, idle_s=0)


def test_rapl_unreadable_or_garbled_counter_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    FakeRapl(tmp_path)
    energy = tmp_path / "intel-rapl:1" / "energy_uj"
    read = RaplMeter._read_uj

    def deny(path: Path) -> int:
        if path == energy:
            raise PermissionError(13, "Permission denied", str(path))
        return read(path)

    monkeypatch.setattr(RaplMeter, "_read_uj", staticmethod(deny))
    with pytest.raises(MeterUnavailable, match="not readable") as info:
        RaplMeter(tmp_path).check()
    assert str(energy) in str(info.value) and "root" in str(info.value)

    monkeypatch.undo()
    energy.write_text("garbage\n")
    with pytest.raises(MeterUnavailable, match="integer") as info:
        RaplMeter(tmp_path).check()
    assert str(energy) in str(info.value)

    (tmp_path / "intel-rapl:0" / "max_energy_range_uj").unlink()
    with pytest.raises(MeterUnavailable, match="max_energy_range_uj does not exist"):
        RaplMeter(tmp_path).check()


# --- NVML -----------------------------------------------------------------------------------


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):  # noqa: N801 - pynvml's name
    pass


class FakeNvml(types.ModuleType):
    """The part of pynvml the meter uses; energy in millijoules since "driver load"."""

    def __init__(self, count: int = 1, init_error: Exception | None = None, energy_error: Exception | None = None) -> None:
        super().__init__("pynvml")
        self.NVMLError = NVMLError
        self.count, self.init_error, self.energy_error = count, init_error, energy_error
        self.mj = 7_000_000
        self.inits = 0

    def add(self, joules: float) -> None:
        self.mj += round(joules * 1e3)

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.inits -= 1

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> tuple[str, int]:
        assert 0 <= index < self.count
        return ("handle", index)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: tuple[str, int]) -> int:
        if self.energy_error is not None:
            raise self.energy_error
        return self.mj

    def nvmlDeviceGetName(self, handle: tuple[str, int]) -> bytes:
        return b"Fake GPU"


def test_nvml_missing_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(MeterUnavailable, match="pip install nvidia-ml-py"):
        NvmlMeter().check()


@pytest.mark.parametrize(
    ("fake", "match"),
    [
        (FakeNvml(init_error=NVMLError("Driver Not Loaded")), "nvmlInit failed \\(Driver Not Loaded\\).*driver"),
        (FakeNvml(count=0), "GPU index 0 requested but NVML sees 0 GPU"),
        (FakeNvml(energy_error=NVMLError_NotSupported("Not Supported")), "does not report its total energy \\(Not Supported\\)"),
    ],
    ids=["init-fails", "no-gpu", "energy-not-supported"],
)
def test_nvml_unavailable(monkeypatch: pytest.MonkeyPatch, fake: FakeNvml, match: str) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with pytest.raises(MeterUnavailable, match=match):
        NvmlMeter().check()
    assert fake.inits == 0  # every successful init was shut down


def test_nvml_index_beyond_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(count=2))
    NvmlMeter(1).check()
    with pytest.raises(MeterUnavailable, match="GPU index 2 requested but NVML sees 2"):
        NvmlMeter(2).check()


def test_nvml_measures_energy(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    clock = fake_time(monkeypatch, fake.add)
    meter = create_meter("nvml", index=0)
    assert isinstance(meter, NvmlMeter) and meter.device_name() == "Fake GPU"
    m = meter.measure(clock.work, window_s=4 * DT, warmup=2, idle_s=0.5)
    assert m.meter == "nvml"
    assert_energy(m)
    assert fake.inits == 0


def test_nvml_counter_going_backwards(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    clock = fake_time(monkeypatch, lambda joules: setattr(fake, "mj", fake.mj - 1000))
    with pytest.raises(MeterUnavailable, match="went backwards"):
        NvmlMeter().measure(clock.work, window_s=4 * DT, idle_s=0.5)
    assert fake.inits == 0


# --- registry -------------------------------------------------------------------------------


def test_registry() -> None:
    assert list_meters() == ["nvml", "rapl", "wallclock"]
    with pytest.raises(UserError, match="unknown meter 'nope'; choose one of .*wallclock"):
        create_meter("nope")
    assert isinstance(create_meter("wallclock", device="cpu"), WallClockMeter)


def test_available_meters(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = available_meters("cpu")
    assert set(cpu) == {"rapl", "wallclock"} and cpu["wallclock"] is None
    if not os.path.exists("/sys/class/powercap"):
        assert isinstance(cpu["rapl"], str) and "no RAPL powercap interface" in cpu["rapl"]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(count=1))
    gpu = available_meters("cuda:1")  # nvml is asked for the same index
    assert set(gpu) == {"nvml", "wallclock"}
    assert "no CUDA device" in gpu["wallclock"] and "GPU index 1 requested" in gpu["nvml"]
    assert available_meters("cuda")["nvml"] is None

    assert set(available_meters("tpu")) == {"wallclock"}
