"""The re-measured front as files a user would ship: each point exported to ONNX (its quantized
layers on integer kernels) and timed end to end in onnxruntime, next to the fp32 model.

This is a measurement of the whole network as deployed, not a sum of per-layer costs: the
file's size and, at each batch size, the median of ``latency.runs`` timed runs and the speed-up
over the fp32 ONNX of the same baseline, timed in the same run on the same threads. Files with
the same graph (:func:`~mpsearch.export.onnx.graph_signature`) share one timing. The files are
temporary: ``mpsearch export --study S --pick trial:N`` writes any point again.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from mpsearch.config import StudyConfig
from mpsearch.policy import Policy

__all__ = ["time_front"]

logger = logging.getLogger(__name__)

MIB = 2 ** 20


def time_front(config: StudyConfig, evaluator: Any, pareto: Any, policies: dict[int, Policy], *, progress: bool) -> Any:
    """``pareto`` with each point's ONNX file size (``onnx_mib``), its onnxruntime latency at each
    batch size (``latency_bB_ms``, median) and speed-up over fp32 (``speedup_bB``), and the fp32
    model's (``fp32_onnx_mib``, ``fp32_latency_bB_ms``), ``latency_threads`` and ``onnxruntime``
    (version). A point that cannot be exported gets no latency, and the log says why."""
    import onnxruntime
    import pandas as pd
    from tqdm.auto import tqdm

    from mpsearch.export.latency import measure_latency
    from mpsearch.export.onnx import graph_signature, save_onnx

    settings = config.latency
    assert settings is not None
    threads = settings.threads or os.cpu_count() or 1

    def timed(path: Path) -> dict[int, float]:
        results = measure_latency(path, batch_sizes=settings.batch_sizes, runs=settings.runs, warmup=settings.warmup,
                                  threads=threads, seed=config.seed)
        return {r.batch_size: r.median_ms for r in results}

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
