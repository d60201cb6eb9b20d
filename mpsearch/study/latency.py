"""Measured end-to-end latency in a study: the re-measured front timed as files a user would
ship (:func:`time_front`), and the ``latency`` objective searched on (:class:`PatternLatency`).

Both export policies to ONNX (quantized layers on integer kernels) and time the whole network in
onnxruntime, next to the fp32 ONNX of the same baseline on the same threads: a measurement of
the network as deployed, not a sum of per-layer costs. :func:`time_front` gives each point its
file's size and, at each batch size, the median of ``latency.runs`` timed runs and the speed-up
over fp32; files with the same graph (:func:`~mpsearch.export.onnx.graph_signature`) share one
timing. The files are temporary: ``mpsearch export --study S --pick trial:N`` writes any point again.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpsearch.config import LatencyConfig, StudyConfig
from mpsearch.policy import Policy

if TYPE_CHECKING:
    import pandas as pd

    from mpsearch.evaluation.evaluator import Evaluator

__all__ = ["time_front", "PatternLatency", "LatencyMeteredExecutor"]

logger = logging.getLogger(__name__)

MIB = 2 ** 20


def time_front(config: StudyConfig, evaluator: Evaluator, pareto: pd.DataFrame, policies: dict[int, Policy], *, progress: bool) -> Any:
    """``pareto`` with each point's ONNX file size (``onnx_mib``), its onnxruntime latency at each
    batch size (``latency_bB_ms``, median) and speed-up over fp32 (``speedup_bB``), and the fp32
    model's (``fp32_onnx_mib``, ``fp32_latency_bB_ms``), ``latency_threads`` and ``onnxruntime``
    (version). A point that cannot be exported gets no latency, and the log says why."""
    import onnxruntime
    import pandas as pd
    from tqdm.auto import tqdm

    from mpsearch.export.onnx import graph_signature, save_onnx

    settings = config.latency
    assert settings is not None
    threads = _threads(settings)

    def timed(path: Path) -> dict[int, float]:
        return _medians(path, settings, settings.batch_sizes, config.seed)

    example = next(iter(evaluator.data.calibration.batches(2)))[0]
    logger.info(f"timing {len(pareto)} Pareto points and the fp32 model in onnxruntime {onnxruntime.__version__} "
                f"({threads} threads, batch sizes {', '.join(map(str, settings.batch_sizes))}) ...")
    with tempfile.TemporaryDirectory(prefix="mpsearch-latency-") as tmp:
        try:
            fp32_path = save_onnx(evaluator.baseline.model, example, Path(tmp) / "fp32.onnx")
        except Exception as exc:  # noqa: BLE001 - a model torch.export cannot trace: the front stands without timings
            logger.warning(f"latency: the fp32 model does not export to ONNX ({type(exc).__name__}: {str(exc)[:200]}); "
                           "the front has no latency columns")
            return pareto
        reference, fp32_mib = timed(fp32_path), fp32_path.stat().st_size / MIB
        by_graph: dict[str, dict[int, float]] = {}
        rows = []
        for trial in tqdm(pareto["trial"], desc="time front", unit="point", disable=not progress):
            evaluator.qmodel.apply(policies[int(trial)])
            try:
                path = save_onnx(evaluator.qmodel.module, example, Path(tmp) / f"trial-{int(trial):04d}.onnx")
            except Exception as exc:  # noqa: BLE001 - one point that does not export leaves the others timed
                logger.warning(f"latency: trial {int(trial)} does not export to ONNX ({type(exc).__name__}: {str(exc)[:200]})")
                rows.append({})
                continue
            signature = graph_signature(path)
            if signature not in by_graph:
                by_graph[signature] = timed(path)
            row: dict[str, float] = {"onnx_mib": path.stat().st_size / MIB}
            for batch, median in by_graph[signature].items():
                row[f"latency_b{batch}_ms"] = median
                row[f"speedup_b{batch}"] = reference[batch] / median
            rows.append(row)
            path.unlink()
    logger.info(f"timed {len(by_graph)} distinct graph(s) for {len(pareto)} points")
    fp32 = {"fp32_onnx_mib": fp32_mib, **{f"fp32_latency_b{b}_ms": ms for b, ms in reference.items()},
            "latency_threads": threads, "onnxruntime": onnxruntime.__version__}
    timings = pd.DataFrame(rows, index=pareto.index).assign(**fp32)
    return pd.concat([pareto, timings], axis=1)


def _threads(settings: LatencyConfig) -> int:
    """The threads a timing runs on: the section's, else every core."""
    return settings.threads or os.cpu_count() or 1


def _medians(path: Path, settings: LatencyConfig, batch_sizes: tuple[int, ...], seed: int) -> dict[int, float]:
    """Batch size -> median ms of the ONNX file ``path``, timed with the latency section's settings."""
    from mpsearch.export.latency import measure_latency

    results = measure_latency(path, batch_sizes=batch_sizes, runs=settings.runs, warmup=settings.warmup,
                              threads=_threads(settings), seed=seed)
    return {r.batch_size: r.median_ms for r in results}


def layer_pattern(policy: Policy, layers: tuple[str, ...]) -> str:
    """Which kernel each layer runs on, in order: ``i`` integer (weights and input quantized), ``w``
    weights only, ``a`` input only, ``f`` float. Widths <= 8 share the int8 kernels, so two
    policies with one pattern have one graph and one latency."""
    kinds = []
    for name in layers:
        p = policy.layers.get(name)
        weight, act = (p.weight_bits, p.act_bits) if p is not None else (None, None)
        kinds.append("i" if weight and act else "w" if weight else "a" if act else "f")
    return "".join(kinds)


class PatternLatency:
    """The ``latency`` objective: a policy's ONNX model timed in onnxruntime at the first of
    ``latency.batch_sizes`` (median of ``latency.runs`` after ``latency.warmup``), over the fp32
    ONNX model's time, measured once per :func:`layer_pattern`.

    Timings run in the driver before a batch of candidates goes to the workers, so they do not
    share the cores with evaluations. They are kept in ``latency_objective.json`` in the study's
    folder: a resumed study reads its candidates' values back rather than timing them again, so
    its trials repeat; a fresh study times afresh, and its values (and so its search) move with
    the machine's timing noise, unlike the modeled costs.
    """

    FILE = "latency_objective.json"

    def __init__(self, config: StudyConfig, evaluator: Evaluator, folder: Path | None) -> None:
        settings = config.latency
        assert settings is not None
        self.settings = settings
        self.batch = settings.batch_sizes[0]
        self.threads = _threads(settings)
        self.evaluator = evaluator
        self.example = next(iter(evaluator.data.calibration.batches(2)))[0]
        self.layers = tuple(evaluator.policy_layers)
        self.fp32_pattern = "f" * len(self.layers)
        self.seed = config.seed
        self.path = folder / self.FILE if folder is not None else None
        self.key = {"batch_size": self.batch, "runs": settings.runs, "warmup": settings.warmup, "threads": self.threads,
                    "baseline_sha256": evaluator.baseline.sha256}
        self.ms: dict[str, float] = {}
        if self.path is not None and self.path.is_file():
            stored = json.loads(self.path.read_text())
            if stored.get("settings") == self.key:
                self.ms = {k: float(v) for k, v in stored["patterns"].items()}
            else:
                logger.info(f"latency objective: {self.path} was timed with other settings; timing again")
        self.timed = 0  # patterns timed by this run (the rest came from the file)

    def _time(self, model: Any, tmp: str, label: str) -> float:
        from mpsearch.export.onnx import save_onnx

        path = save_onnx(model, self.example, Path(tmp) / f"{label}.onnx")
        return _medians(path, self.settings, (self.batch,), self.seed)[self.batch]

    def milliseconds(self, policy: Policy) -> float:
        """The policy's median latency in ms (timed now unless its pattern already was)."""
        pattern = layer_pattern(policy, self.layers)
        if pattern in self.ms:
            return self.ms[pattern]
        with tempfile.TemporaryDirectory(prefix="mpsearch-latency-") as tmp:
            if self.fp32_pattern not in self.ms:
                self.ms[self.fp32_pattern] = self._time(self.evaluator.baseline.model, tmp, "fp32")
                self.timed += 1
            if pattern != self.fp32_pattern:
                self.evaluator.qmodel.apply(policy)
                self.ms[pattern] = self._time(self.evaluator.qmodel.module, tmp, "candidate")
                self.timed += 1
        if self.path is not None:
            self.path.write_text(json.dumps({"settings": self.key, "patterns": self.ms}, indent=1, sort_keys=True))
        return self.ms[pattern]

    def relative(self, policy: Policy) -> float:
        """The policy's latency over the fp32 model's (1.0 = fp32), what the search minimises."""
        ms = self.milliseconds(policy)
        return ms / self.ms[self.fp32_pattern]


class LatencyMeteredExecutor:
    """An executor whose outcomes carry ``rel_latency`` (:class:`PatternLatency`) beside the
    worker's metrics. A batch's new patterns are timed before the batch is handed to the workers."""

    def __init__(self, inner: Any, latency: PatternLatency) -> None:
        self.inner = inner
        self.latency = latency

    def __getattr__(self, name: str) -> Any:  # workers, replaced, ... of the executor it wraps
        return getattr(self.inner, name)

    def map(self, tasks: list[Any], on_done: Any = None) -> list[Any]:
        relative = {task.index: self.latency.relative(Policy.from_dict(task.policy)) for task in tasks}

        def metered(outcome: Any) -> Any:
            return replace(outcome, metrics={**outcome.metrics, "rel_latency": relative[outcome.index]}) if outcome.ok else outcome

        outcomes = self.inner.map(tasks, on_done=(lambda outcome: on_done(metered(outcome))) if on_done else None)
        return [metered(outcome) for outcome in outcomes]
