"""The commands' side of export: a zoo model's policy to an ONNX file, and that file measured
against the fake-quantized model it came from (``mpsearch export``, ``mpsearch evaluate --onnx``)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mpsearch.errors import UserError
from mpsearch.export.onnx import OnnxClassifier, check_onnx_output, read_metadata, save_onnx
from mpsearch.metrics import wilson_interval
from mpsearch.policy import Policy

__all__ = ["export_policy", "compare_onnx", "OnnxComparison"]


def export_policy(model: str, dataset: str, policy: str | Path | Policy, output: str | Path, *,
                  quant: Mapping[str, Any] | None = None, calibration_size: int | None = None, seed: int | None = None,
                  checkpoint: str | None = None, data_dir: str | None = None, image_size: int | None = None,
                  pretrained: bool = False, progress: bool = False) -> tuple[Path, Policy]:
    """Quantize ``model``'s baseline with ``policy`` and write it to the ONNX file ``output``.

    The file's metadata names the model, data set, baseline and the resolved policy, so that
    :func:`compare_onnx` can rebuild the same fake-quantized model. Returns (path, policy).
    """
    from mpsearch.tasks import prepare_measurement

    check_onnx_output(output)
    prepared = prepare_measurement(model, dataset, policy, quant, calibration_size=calibration_size, seed=seed,
                                   checkpoint=checkpoint, data_dir=data_dir, image_size=image_size, pretrained=pretrained,
                                   progress=progress)
    evaluator, resolved = prepared.evaluator, prepared.policy
    evaluator.calibrate()
    evaluator.qmodel.apply(resolved)
    example = next(iter(evaluator.data.calibration.batches(2)))[0]
    metadata = {"model": model, "dataset": dataset, "image_size": image_size, "checkpoint": checkpoint,
                "baseline_sha256": evaluator.baseline.sha256, "policy": resolved.to_dict()}
    path = save_onnx(evaluator.qmodel.module, example, output, metadata={k: v for k, v in metadata.items() if v is not None})
    return path, resolved


@dataclass(frozen=True)
class OnnxComparison:
    """An ONNX file and the fake-quantized model of the same policy, on the same images."""

    path: str
    model: str
    dataset: str
    split: str
    images: int
    policy: str  # summary, e.g. "W4-8 A8"
    onnx_accuracy: float
    onnx_ci95: tuple[float, float]
    fake_quant_accuracy: float
    fake_quant_ci95: tuple[float, float]
    agreement: float  # share of images on which both predict the same class
    onnx_seconds: float
    threads: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_onnx(path: str | Path, *, split: str = "test", limit: int | None = None, model: str | None = None,
                 dataset: str | None = None, policy: str | Path | None = None, checkpoint: str | None = None,
                 data_dir: str | None = None, image_size: int | None = None, threads: int | None = None,
                 batch_size: int = 256, progress: bool = False) -> OnnxComparison:
    """Run the ONNX file ``path`` in onnxruntime on ``split`` and the fake-quantized model of its
    policy (from the file's metadata, or ``policy``: a fine-tuned policy's file brings its
    weights) in PyTorch on the same images; accuracy of both with 95 % CIs and their agreement."""
    from mpsearch.tasks import prepare_measurement

    meta = read_metadata(path)
    model = model or meta.get("model")
    dataset = dataset or meta.get("dataset")
    if not model or not dataset:
        raise UserError(f"onnx: {path} does not say which model and data set it is (not written by mpsearch export); "
                        "pass --model and --dataset", fields=("onnx",))
    if policy is None:
        if "policy" not in meta:
            raise UserError(f"onnx: {path} carries no policy; pass the policy it was exported from with --policy", fields=("onnx",))
        policy = Policy.from_dict(meta["policy"])
        if "finetune" in policy.provenance:
            raise UserError("policy: the file was exported from a fine-tuned policy; pass that policy's JSON file with --policy "
                            "so its fine-tuned weights are loaded", fields=("policy",))
    prepared = prepare_measurement(model, dataset, policy, None, calibration_size=None, seed=None,
                                   checkpoint=checkpoint or meta.get("checkpoint"), data_dir=data_dir,
                                   image_size=image_size or meta.get("image_size"), pretrained=False, progress=progress)
    evaluator, resolved = prepared.evaluator, prepared.policy
    if meta.get("baseline_sha256") and meta["baseline_sha256"] != evaluator.baseline.sha256:
        raise UserError(f"onnx: {path} was exported from another baseline of {model} (sha256 {meta['baseline_sha256'][:12]}, "
                        f"this one {evaluator.baseline.sha256[:12]}); pass the checkpoint it came from with --checkpoint",
                        fields=("onnx",))
    if limit is not None and limit < 1:
        raise UserError(f"limit: must be >= 1 image, got {limit}", fields=("limit",))
    part = evaluator.data.split(split).subset(limit)
    evaluator.calibrate()
    evaluator.qmodel.apply(resolved)
    labels, fake = [], []
    with torch.inference_mode():
        for x, y in part.batches(batch_size):
            fake.append(evaluator.qmodel.module(x.contiguous(memory_format=torch.channels_last)).argmax(dim=1))
            labels.append(y)
    session = OnnxClassifier(path, threads=threads)
    start = time.perf_counter()
    onnx_pred = session.predict(x for x, _ in part.batches(batch_size))
    onnx_seconds = time.perf_counter() - start
    y, fake_pred = torch.cat(labels), torch.cat(fake)
    n = len(y)
    onnx_right, fake_right = int((onnx_pred == y).sum()), int((fake_pred == y).sum())
    return OnnxComparison(
        path=str(path), model=model, dataset=dataset, split=split, images=n, policy=resolved.summary(),
        onnx_accuracy=onnx_right / n, onnx_ci95=wilson_interval(onnx_right, n),
        fake_quant_accuracy=fake_right / n, fake_quant_ci95=wilson_interval(fake_right, n),
        agreement=float((onnx_pred == fake_pred).float().mean()), onnx_seconds=onnx_seconds, threads=threads,
    )
