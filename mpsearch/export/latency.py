"""End-to-end latency of an exported model (ONNX in onnxruntime, ``.pt2`` in ``torch.compile``):
the whole network, timed as a user runs it.

Each batch size gets its own warm-up runs (sessions allocate and pack on the first calls;
``torch.compile`` compiles for the batch size), then ``runs`` timed calls on one fixed random
batch; the median and the interquartile range are reported, with the thread count it ran on.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mpsearch.config import timing_problem
from mpsearch.errors import UserError
from mpsearch.export.dispatch import open_exported

__all__ = ["LatencyResult", "measure_latency", "check_timing"]


@dataclass(frozen=True)
class LatencyResult:
    """One file at one batch size."""

    path: str
    runtime: str  # onnxruntime or torch.compile
    batch_size: int
    runs: int
    threads: int | None  # None: onnxruntime's default (every core)
    median_ms: float
    q1_ms: float
    q3_ms: float

    @property
    def images_per_s(self) -> float:
        return self.batch_size / (self.median_ms / 1e3)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": self.images_per_s}


def check_timing(*, batch_sizes: Sequence[int], runs: int, warmup: int, threads: int | None) -> None:
    """Refuse timing settings that cannot give a meaningful median (before anything is loaded)."""
    problem = timing_problem(batch_sizes=batch_sizes, runs=runs, warmup=warmup, threads=threads)
    if problem:
        raise UserError(f"{problem[0]}: {problem[1]}", fields=(problem[0],))


def measure_latency(path: str | Path, *, batch_sizes: Sequence[int] = (1, 64), runs: int = 50, warmup: int = 10,
                    threads: int | None = None, seed: int = 0) -> list[LatencyResult]:
    """Time ``path`` on the CPU at each batch size (see the module doc)."""
    check_timing(batch_sizes=batch_sizes, runs=runs, warmup=warmup, threads=threads)
    classifier = open_exported(path, threads=threads)
    generator = torch.Generator().manual_seed(seed)
    results = []
    for batch in batch_sizes:
        x = torch.randn((batch, *classifier.input_shape), generator=generator)
        for _ in range(warmup):
            classifier.logits(x)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            classifier.logits(x)
            times.append((time.perf_counter() - start) * 1e3)
        q1, median, q3 = statistics.quantiles(times, n=4)
        results.append(LatencyResult(str(path), classifier.runtime, batch, runs, threads, median, q1, q3))
    return results
