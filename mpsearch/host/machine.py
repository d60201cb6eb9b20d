"""The machine a number was measured on (one line, recorded with every measurement), and what its
arithmetic runs natively."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator

__all__ = ["available_cores", "describe_machine", "native_bf16", "torch_threads"]


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS says, else every core)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads, then restore the previous count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def describe_machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads){gpu}"


def native_bf16(device_type: str = "cpu") -> str | None:
    """``None`` if ``device_type`` ("cpu" or "cuda") runs bf16 arithmetic in hardware, else why not.

    On a CPU, oneDNN needs AVX512-BF16 or AMX: without them bf16 is emulated, far slower than
    fp32 (docs/design.md)."""
    import torch

    if device_type == "cuda":
        return None if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "this GPU has no bf16 arithmetic"
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if supported is None or not supported():
        return "this CPU has no bf16 instructions oneDNN uses (AVX512-BF16/AMX); bf16 would be emulated"
    return None
