"""NVIDIA GPU board energy meter: NVML's total-energy counter, registered as meter ``nvml``."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from mpsearch.cost.meters import Meter, MeterUnavailable, _Counter, _is_cuda, register_meter

__all__ = ["NvmlMeter"]


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
