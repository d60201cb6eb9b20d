"""The front door: search a model's per-layer bit widths, apply a policy, measure it.

    import mpsearch
    data = mpsearch.make_data(val=(x_val, y_val), test=(x_test, y_test), calibration=x_train[:256])
    result = mpsearch.search(my_model, data, budget=200)        # any nn.Module, or a timm name
    policy = result.pick("knee")                                 # or "accuracy>=0.91", "energy<=0.1", a trial
    qmodel = mpsearch.quantize(my_model, policy, data)           # a fake-quantized copy; my_model untouched

Everything here is a thin layer over :mod:`mpsearch.study` (the search), :mod:`mpsearch.quant`
(applying a policy) and :mod:`mpsearch.evaluate` (measuring one); the ``mpsearch`` command
calls the same functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from mpsearch.config import QuantConfig, StudyConfig, with_overrides
from mpsearch.data import DataSplits, as_split
from mpsearch.errors import UserError
from mpsearch.policy import Policy, is_shorthand, uniform_policy
from mpsearch.study import SearchResult, run_study

__all__ = ["search", "quantize", "export_onnx", "export_pt2e"]


def search(
    model: nn.Module | str,
    data: DataSplits | str,
    *,
    budget: int = 200,
    objectives: Sequence[str] = ("accuracy", "energy"),
    algorithm: str = "nsga2",
    space: str | Path | None = None,
    max_drop: float | None = 5.0,
    seed: int = 0,
    workers: int | None = None,
    storage: str | None = None,
    out: str | Path | None = None,
    config: StudyConfig | None = None,
    latency: bool = True,
    progress: bool = True,
) -> SearchResult:
    """Search per-layer weight/activation bit widths of ``model``; every candidate is measured.

    Args:
        model: a trained ``nn.Module`` (left untouched; the study quantizes a copy) or a timm
            model name (``"resnet18"``: mpsearch trains a baseline on ``data`` once and caches it).
        data: a :class:`~mpsearch.data.DataSplits`, built from your own tensors, ``Dataset`` s or
            ``DataLoader`` s with :func:`mpsearch.make_data`, or a data set name
            (``"fashion-mnist"``, ``"digits"``, ``"cifar10"``, ``"imagefolder:PATH"``). The
            search measures on its validation split, the final front on its test split.
        budget: trials per search method (each measured on the first ``eval_images`` validation images).
        objectives: ``"accuracy"`` first, then costs relative to fp32: ``"energy"``, ``"size"``,
            ``"bops"``, ``"energy@PROFILE"``.
        algorithm: ``"nsga2"`` (default), ``"optuna-nsga2"``, ``"optuna-tpe"``, ``"random"``,
            ``"ilp"`` (HAWQ-V3), ``"greedy"``; ``"+mf"`` adds multi-fidelity promotions; several,
            comma separated, are compared on one study.
        space: a search space YAML path or name (default: by model family).
        max_drop: the accuracy floor, in percentage points below fp32 on the same validation
            images: candidates below it count as infeasible in the search and are never on the
            front, re-measured or picked (they stay in ``.trials``); ``None``: no floor.
        seed: seeds calibration, quantizers and the search: same seed, same result.
        workers: Ray workers measuring in parallel; ``None``: one per core; ``0``: in this process.
        storage: an Optuna storage URL to record the study in (resumable, optuna-dashboard shows it).
        out: a folder for the study's files (trials, front, policies, plots, report.md).
            Without ``storage`` and ``out`` nothing is written.
        config: every other setting (quantizers, search details, fine-tuning, how the front is
            timed); the arguments above replace its fields.
        latency: export each re-measured Pareto point to ONNX and time it in onnxruntime
            (columns ``onnx_mib``, ``latency_b1_ms``, ``speedup_b1``, ... of ``.front``);
            False skips it.
        progress: show progress bars.

    Returns:
        A :class:`~mpsearch.study.SearchResult`: ``.front`` (re-measured Pareto set, pandas),
        ``.trials`` (every evaluation), ``.pick(...)`` a policy, ``.plot()``, ``.study`` (Optuna).
    """
    model_obj, model_name = (None, model) if isinstance(model, str) else (model, _model_name(model))
    data_obj, dataset = (None, data) if isinstance(data, str) else (_splits(data), _splits(data).info.name)
    overrides = {
        "model": model_name, "dataset": dataset, "seed": seed, "search.budget": budget,
        "search.objectives": list(objectives), "search.algorithm": algorithm, "search.space": str(space or ""),
        "search.max_drop": max_drop,
        "run.workers": -1 if workers is None else workers, "run.storage": storage,
        "run.out_dir": None if out is None else str(out),
    }
    if not latency:
        overrides["latency"] = None
    return run_study(with_overrides(config or StudyConfig(), overrides), model=model_obj, data=data_obj, progress=progress)


def quantize(model: nn.Module, policy: Policy | str | Path, calibration: Any, *, quant: QuantConfig | None = None) -> nn.Module:
    """A fake-quantized copy of ``model`` running ``policy``; ``model`` itself is left untouched.

    Args:
        model: any ``nn.Module`` with ``Conv2d``/``Linear`` layers (timm attention too).
        policy: a :class:`~mpsearch.policy.Policy` (e.g. ``result.pick("knee")``), a shorthand
            (``"w8a8"``, ``"w4a8"``, ``"w4a4"``: first and last layer at 8 bits; ``"w4a4:all"``)
            or a policy JSON path.
        calibration: images the activation ranges are calibrated on: a tensor ``(N, C, H, W)``,
            ``(images, labels)``, a ``Dataset``, a ``DataLoader``, a split or a
            :class:`~mpsearch.data.DataSplits` (its calibration split).
        quant: how quantizers are calibrated (default: the policy's recorded settings, else
            :class:`~mpsearch.config.QuantConfig`'s defaults).

    Returns:
        The quantized copy in eval mode: call it like ``model``.
    """
    return _quantized(model, policy, calibration, quant).module


def _quantized(model: nn.Module, policy: Policy | str | Path, calibration: Any, quant: QuantConfig | None) -> Any:
    """The calibrated :class:`~mpsearch.quant.QuantizedModel` of ``model`` with ``policy`` applied."""
    from mpsearch.cost import count_costs
    from mpsearch.evaluate import architecture_fingerprint, policy_layers
    from mpsearch.quant import QuantizedModel
    from mpsearch.zoo import Baseline

    split = _calibration_split(calibration)
    baseline = Baseline.from_module(model)
    x0 = next(iter(split.batches(1)))[0]
    layers = policy_layers(baseline.model, count_costs(baseline.model, tuple(x0.shape[1:])))
    architecture = architecture_fingerprint(baseline.model, layers)
    if isinstance(policy, str) and is_shorthand(policy):
        policy = uniform_policy(policy, model=baseline.name, dataset="", layers=layers, architecture=architecture)
    elif not isinstance(policy, Policy):
        if not Path(policy).is_file():
            raise UserError(f"policy {str(policy)!r} is neither a shorthand (w8a8, w4a8, w4a4, fp32, ...) nor an existing file")
        policy = Policy.load(policy)
    policy.validate_for(model=policy.model, layers=layers, architecture=architecture)
    settings = policy.settings()
    qmodel = QuantizedModel(baseline.model, config=quant or (settings.quant if settings else QuantConfig()), layers=layers)
    qmodel.calibrate(x for x, _ in split.batches(qmodel.config.calibration_batch_size))
    qmodel.apply(policy)
    return qmodel


def _calibration_split(calibration: Any) -> Any:
    """The images to calibrate on: a DataSplits' calibration split, or ``calibration`` as a split."""
    return calibration.calibration if isinstance(calibration, DataSplits) else as_split(calibration, "calibration")


def _model_name(model: Any) -> str:
    from mpsearch.zoo import Baseline

    if isinstance(model, Baseline):
        return model.name
    if not isinstance(model, nn.Module):
        raise UserError(f"model: expected a torch.nn.Module or a timm model name, got {type(model).__name__}")
    return type(model).__name__


def _splits(data: Any) -> DataSplits:
    if not isinstance(data, DataSplits):
        raise UserError(f"data: expected a DataSplits or a data set name, got {type(data).__name__}; build one from your "
                        "tensors, Datasets or DataLoaders with mpsearch.make_data(val=..., test=..., train=...)")
    return data


def export_onnx(model: nn.Module, policy: Policy | str | Path, calibration: Any, path: str | Path, *,
                quant: QuantConfig | None = None) -> Path:
    """Write ``model`` quantized by ``policy`` to the ONNX file ``path``, its quantized layers on
    onnxruntime's integer kernels (the QDQ form, see :mod:`mpsearch.export.onnx`); returns the path.

    Arguments as in :func:`quantize`. The file records the policy in its metadata
    (``mpsearch.policy``); onnxruntime runs it: ``mpsearch.export.OnnxClassifier(path)``.
    """
    from mpsearch.export import save_onnx

    qmodel = _quantized(model, policy, calibration, quant)
    split = _calibration_split(calibration)
    example = next(iter(split.batches(2)))[0]
    return save_onnx(qmodel.module, example, path, metadata={"policy": qmodel.policy.to_dict()},
                     calibration=(x for x, _ in split.batches(128)))


def export_pt2e(model: nn.Module, policy: Policy | str | Path, calibration: Any, path: str | Path, *,
                quant: QuantConfig | None = None) -> Path:
    """Write ``model`` quantized by ``policy`` to ``path`` (``.pt2``) as a PT2E int8 program:
    torchao's ``X86InductorQuantizer`` flow with the policy's own scales, which ``torch.compile``
    runs on oneDNN int8 kernels (see :mod:`mpsearch.export.pt2e`; needs torchao). Returns the path.

        program = torch.export.load(path)          # after import torchao
        model = torch.compile(program.module())    # with torch._inductor.config.freezing = True

    Arguments as in :func:`quantize`; ``mpsearch.export.pt2e.Pt2eClassifier(path)`` runs the file.
    """
    from mpsearch.export.dispatch import save_exported

    qmodel = _quantized(model, policy, calibration, quant)
    split = _calibration_split(calibration)
    example = next(iter(split.batches(2)))[0]
    return save_exported(qmodel.module, example, path, "pt2e", metadata={"policy": qmodel.policy.to_dict()})
