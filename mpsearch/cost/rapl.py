"""CPU package energy meter: the Linux powercap RAPL counters, registered as meter ``rapl``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpsearch.cost.meters import Meter, MeterUnavailable, _Counter, register_meter

__all__ = ["RaplMeter"]

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
