"""The commands' side of export: a zoo model's policy to a model file (ONNX or PT2E, see
:mod:`mpsearch.export.formats`), that file measured against the fake-quantized model it came from,
and timed next to the fp32 model of the same baseline in the same runtime (``mpsearch export``,
``mpsearch evaluate --onnx/--pt2e``, ``mpsearch latency``)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mpsearch.errors import UserError
from mpsearch.evaluation.metrics import wilson_interval
from mpsearch.export.dispatch import exported_metadata, open_exported, save_exported
from mpsearch.export.formats import check_output, format_of
from mpsearch.export.latency import LatencyResult, check_timing, measure_latency
from mpsearch.policy import Policy

if TYPE_CHECKING:
    from mpsearch.models.zoo import Baseline

__all__ = ["export_policy", "compare_exported", "ExportComparison", "export_float", "latency_report", "LatencyRow"]


def export_policy(model: str, dataset: str, policy: str | Path | Policy, output: str | Path, *, fmt: str = "onnx",
                  quant: Mapping[str, Any] | None = None, calibration_size: int | None = None, seed: int | None = None,
                  checkpoint: str | None = None, data_dir: str | None = None, image_size: int | None = None,
                  pretrained: bool = False, progress: bool = False) -> tuple[Path, Policy]:
    """Quantize ``model``'s baseline with ``policy`` and write it to ``output`` as ``fmt``
    (``onnx`` or ``pt2e``).

    The file's metadata names the model, data set, baseline and the resolved policy, so that
    :func:`compare_exported` can rebuild the same fake-quantized model. Returns (path, policy).
    """
    from mpsearch.evaluation.prepared import prepare_measurement

    check_output(output, fmt)
    if fmt == "pt2e":
        from mpsearch.export.pt2e import require_torchao

        require_torchao()
    prepared = prepare_measurement(model, dataset, policy, quant, calibration_size=calibration_size, seed=seed,
                                   checkpoint=checkpoint, data_dir=data_dir, image_size=image_size, pretrained=pretrained,
                                   progress=progress)
    evaluator, resolved = prepared.evaluator, prepared.policy
    evaluator.calibrate()
    evaluator.qmodel.apply(resolved)
    example = next(iter(evaluator.data.calibration.batches(2)))[0]
    metadata = {"model": model, "dataset": dataset, "image_size": image_size, "checkpoint": checkpoint,
                "baseline_sha256": evaluator.baseline.sha256, "policy": resolved.to_dict()}
    path = save_exported(evaluator.qmodel.module, example, output, fmt, metadata={k: v for k, v in metadata.items() if v is not None},
                         calibration=(x for x, _ in evaluator.data.calibration.batches(128)))
    return path, resolved


def _named_subject(path: str | Path, model: str | None, dataset: str | None) -> tuple[str, str]:
    """(model, dataset) a model file is measured on: given, or from its metadata."""
    if not model or not dataset:
        field = format_of(path)
        raise UserError(f"{field}: {path} does not say which model and data set it is (not written by mpsearch export); "
                        "pass --model and --dataset", fields=(field,))
    return model, dataset


def _check_same_baseline(path: str | Path, meta: Mapping[str, Any], baseline: Baseline) -> None:
    """Refuse a baseline other than the one the file was exported from (its weights would differ)."""
    if meta.get("baseline_sha256") and meta["baseline_sha256"] != baseline.sha256:
        field = format_of(path)
        raise UserError(f"{field}: {path} was exported from another baseline of {baseline.name} (sha256 "
                        f"{meta['baseline_sha256'][:12]}, this one {baseline.sha256[:12]}); pass the checkpoint it came from "
                        "with --checkpoint", fields=(field,))


@dataclass(frozen=True)
class ExportComparison:
    """A model file in its runtime and the fake-quantized model of the same policy, on the same images."""

    path: str
    runtime: str  # onnxruntime or torch.compile
    model: str
    dataset: str
    split: str
    images: int
    policy: str  # summary, e.g. "W4-8 A8"
    exported_accuracy: float
    exported_ci95: tuple[float, float]
    fake_quant_accuracy: float
    fake_quant_ci95: tuple[float, float]
    agreement: float  # share of images on which both predict the same class
    exported_seconds: float
    threads: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_exported(path: str | Path, *, split: str = "test", limit: int | None = None, model: str | None = None,
                     dataset: str | None = None, policy: str | Path | None = None, checkpoint: str | None = None,
                     data_dir: str | None = None, image_size: int | None = None, threads: int | None = None,
                     batch_size: int = 256, progress: bool = False) -> ExportComparison:
    """Run the model file ``path`` (ONNX in onnxruntime, ``.pt2`` in ``torch.compile``) on ``split``
    and the fake-quantized model of its policy (from the file's metadata, or ``policy``: a
    fine-tuned policy's file brings its weights) in PyTorch on the same images; accuracy of both
    with 95 % CIs and their agreement. ``exported_seconds`` includes ``torch.compile``'s compilation."""
    from mpsearch.evaluation.prepared import check_limit, prepare_measurement

    check_limit(limit)
    field = format_of(path)
    meta = exported_metadata(path)
    model, dataset = _named_subject(path, model or meta.get("model"), dataset or meta.get("dataset"))
    if policy is None:
        if "policy" not in meta:
            raise UserError(f"{field}: {path} carries no policy; pass the policy it was exported from with --policy", fields=(field,))
        # A file exported from Python (mpsearch.export_onnx) names no data set in its policy, and
        # its model by class name: the policy is measured on the model and data set given here.
        policy = Policy.from_dict({**meta["policy"], "model": model, "dataset": dataset})
        if "finetune" in policy.provenance:
            raise UserError("policy: the file was exported from a fine-tuned policy; pass that policy's JSON file with --policy "
                            "so its fine-tuned weights are loaded", fields=("policy",))
    prepared = prepare_measurement(model, dataset, policy, None, calibration_size=None, seed=None,
                                   checkpoint=checkpoint or meta.get("checkpoint"), data_dir=data_dir,
                                   image_size=image_size or meta.get("image_size"), pretrained=False, progress=progress)
    evaluator, resolved = prepared.evaluator, prepared.policy
    _check_same_baseline(path, meta, evaluator.baseline)
    part = evaluator.data.split(split).subset(limit)
    evaluator.calibrate()
    evaluator.qmodel.apply(resolved)
    labels, fake = [], []
    with torch.inference_mode():
        for x, y in part.batches(batch_size):
            fake.append(evaluator.qmodel.module(x.contiguous(memory_format=torch.channels_last)).argmax(dim=1))
            labels.append(y)
    classifier = open_exported(path, threads=threads)
    start = time.perf_counter()
    exported_pred = classifier.predict(x for x, _ in part.batches(batch_size))
    exported_seconds = time.perf_counter() - start
    y, fake_pred = torch.cat(labels), torch.cat(fake)
    n = len(y)
    exported_right, fake_right = int((exported_pred == y).sum()), int((fake_pred == y).sum())
    return ExportComparison(
        path=str(path), runtime=classifier.runtime, model=model, dataset=dataset, split=split, images=n, policy=resolved.summary(),
        exported_accuracy=exported_right / n, exported_ci95=wilson_interval(exported_right, n),
        fake_quant_accuracy=fake_right / n, fake_quant_ci95=wilson_interval(fake_right, n),
        agreement=float((exported_pred == fake_pred).float().mean()), exported_seconds=exported_seconds, threads=threads,
    )


def _subject(path: str | Path, checkpoint: str | None, data_dir: str | None) -> tuple[Any, Any, dict[str, Any]]:
    """(baseline, data, metadata) of the model file ``path``, the baseline checked against the file's."""
    from mpsearch.evaluation.prepared import load_baseline

    meta = exported_metadata(path)
    model, dataset = _named_subject(path, meta.get("model"), meta.get("dataset"))
    baseline, data = load_baseline(model, dataset, data_dir=data_dir, image_size=meta.get("image_size"),
                                   checkpoint=checkpoint or meta.get("checkpoint"), progress=False)
    _check_same_baseline(path, meta, baseline)
    return baseline, data, meta


def export_float(path: str | Path, output: str | Path, *, checkpoint: str | None = None, data_dir: str | None = None) -> Path:
    """The fp32 baseline that the mpsearch model file ``path`` was quantized from, at ``output`` in the same format."""
    baseline, data, meta = _subject(path, checkpoint, data_dir)
    example = next(iter(data.calibration.batches(2)))[0]
    keep = {k: meta[k] for k in ("model", "dataset", "image_size", "checkpoint", "baseline_sha256") if k in meta}
    return save_exported(baseline.model, example, output, format_of(path), metadata=keep)


@dataclass(frozen=True)
class LatencyRow:
    label: str  # "fp32" or the file's name and policy
    latency: LatencyResult
    speedup: float | None  # fp32 median / this median at the same batch size

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, **self.latency.to_dict(), "speedup_vs_fp32": self.speedup}


def latency_report(path: str | Path, *, compare_fp32: bool = True, batch_sizes: Sequence[int] = (1, 64), runs: int = 50,
                   warmup: int = 10, threads: int | None = None, checkpoint: str | None = None,
                   data_dir: str | None = None) -> list[LatencyRow]:
    """End-to-end latency of the model file ``path`` in its runtime (and of its fp32 baseline,
    exported to a temporary file of the same format and timed in the same run, unless
    ``compare_fp32`` is false) at each batch size."""
    check_timing(batch_sizes=batch_sizes, runs=runs, warmup=warmup, threads=threads)
    meta = exported_metadata(path)
    policy = Policy.from_dict(meta["policy"]).summary() if meta.get("policy") else "?"
    label = f"{Path(path).name} ({policy})"
    timed = measure_latency(path, batch_sizes=batch_sizes, runs=runs, warmup=warmup, threads=threads)
    if not compare_fp32:
        return [LatencyRow(label, t, None) for t in timed]
    with tempfile.TemporaryDirectory(prefix="mpsearch-fp32-") as tmp:
        fp32_path = export_float(path, Path(tmp) / f"fp32{Path(path).suffix}", checkpoint=checkpoint, data_dir=data_dir)
        reference = measure_latency(fp32_path, batch_sizes=batch_sizes, runs=runs, warmup=warmup, threads=threads)
    rows = [LatencyRow("fp32 (same baseline)", r, 1.0) for r in reference]
    rows += [LatencyRow(label, t, r.median_ms / t.median_ms) for t, r in zip(timed, reference)]
    return rows
