"""The front door: search a model's per-layer bit widths, apply a policy, measure it.

    import mpsearch
    data = mpsearch.make_data(val=(x_val, y_val), test=(x_test, y_test), calibration=x_train[:256])
    result = mpsearch.search(my_model, data, budget=200)        # any nn.Module, or a timm name
    policy = result.pick("knee")                                 # or "accuracy>=0.91", "energy<=0.1", a trial
    qmodel = mpsearch.quantize(my_model, policy, data)           # a fake-quantized copy; my_model untouched
    mpsearch.export_onnx(qmodel, "model.onnx", data)             # on onnxruntime's integer kernels

Everything here is a thin layer over :mod:`mpsearch.study` (the search), :mod:`mpsearch.quant`
(applying a policy) and :mod:`mpsearch.evaluation.evaluator` (measuring one); the ``mpsearch`` command
calls the same functions.
"""

from __future__ import annotations

import weakref
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

# The policy of each module mpsearch.quantize returned, so that exporting it needs no second
# calibration. Weak keys: an entry lives as long as the user's quantized module.
_POLICY_OF: weakref.WeakKeyDictionary[nn.Module, Policy] = weakref.WeakKeyDictionary()


def search(
    model: nn.Module | str,
    data: DataSplits | str,
    config: StudyConfig | None = None,
    *,
    budget: int | None = None,
    algorithm: str | None = None,
    objectives: Sequence[str] | None = None,
    seed: int | None = None,
    workers: int | None = None,
    out: str | Path | None = None,
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
        config: every setting of the study (:class:`~mpsearch.config.StudyConfig`: quantizers,
            search, accuracy floor, storage, fine-tuning, how the front is timed); default
            ``StudyConfig()``. The keywords below, where given, replace its fields.
        budget: trials per search method (``search.budget``).
        algorithm: ``"nsga2"``, ``"optuna-nsga2"``, ``"optuna-tpe"``, ``"random"``, ``"ilp"``
            (HAWQ-V3), ``"greedy"``; ``"+mf"`` adds multi-fidelity promotions; several, comma
            separated, are compared on one study (``search.algorithm``).
        objectives: ``"accuracy"`` first, then costs relative to fp32: ``"energy"``, ``"size"``,
            ``"bops"``, ``"latency"``, ``"energy@PROFILE"`` (``search.objectives``).
        seed: seeds calibration, quantizers and the search: same seed, same result.
        workers: Ray workers measuring in parallel; ``-1``: one per core; ``0``: in this process
            (``run.workers``).
        out: a folder for the study's files (trials, front, policies, plots, report.md)
            (``run.out_dir``). Without it and without ``config.run.storage`` nothing is written.
        progress: show progress bars.

    Returns:
        A :class:`~mpsearch.study.SearchResult`: ``.front`` (re-measured Pareto set, pandas),
        ``.trials`` (every evaluation), ``.pick(...)`` a policy, ``.plot()``, ``.study`` (Optuna).
    """
    model_obj, model_name = (None, model) if isinstance(model, str) else (model, _model_name(model))
    data_obj, dataset = (None, data) if isinstance(data, str) else (_splits(data), _splits(data).info.name)
    given = {"seed": seed, "search.budget": budget, "search.algorithm": algorithm,
             "search.objectives": None if objectives is None else list(objectives), "run.workers": workers,
             "run.out_dir": None if out is None else str(out)}
    overrides = {"model": model_name, "dataset": dataset, **{k: v for k, v in given.items() if v is not None}}
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
        The quantized copy in eval mode: call it like ``model``. :func:`export_onnx` and
        :func:`export_pt2e` write it as it is, without calibrating again.
    """
    qmodel = _quantized(model, policy, calibration, quant)
    _POLICY_OF[qmodel.module] = qmodel.policy
    return qmodel.module


def _quantized(model: nn.Module, policy: Policy | str | Path, calibration: Any, quant: QuantConfig | None) -> Any:
    """The calibrated :class:`~mpsearch.quant.QuantizedModel` of ``model`` with ``policy`` applied."""
    from mpsearch.cost import count_costs
    from mpsearch.evaluation.evaluator import architecture_fingerprint, policy_layers
    from mpsearch.models.zoo import Baseline
    from mpsearch.quant import QuantizedModel

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
    from mpsearch.models.zoo import Baseline

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


def _to_export(model: nn.Module, policy: Policy | str | Path | None, calibration: Any,
               quant: QuantConfig | None) -> tuple[nn.Module, Policy]:
    """The quantized module to write and its policy: ``model`` itself where :func:`quantize`
    returned it (no second calibration), else ``model`` quantized by ``policy``."""
    if isinstance(model, nn.Module) and model in _POLICY_OF:
        if policy is not None or quant is not None:
            raise UserError("policy: the model is already quantized (it came from mpsearch.quantize); pass it without policy= "
                            "and quant=, or pass the float model with a policy", fields=("policy",))
        return model, _POLICY_OF[model]
    from mpsearch.quant.modules import QuantWrapper

    if isinstance(model, nn.Module) and any(isinstance(m, QuantWrapper) for m in model.modules()):
        raise UserError("model: a quantized model whose policy mpsearch does not know (a copy of what mpsearch.quantize "
                        "returned?); export what quantize returned, or the float model with policy=", fields=("model",))
    if policy is None:
        raise UserError("policy: a float model needs policy= (a Policy, a shorthand such as 'w8a8', or a policy file); "
                        "or pass what mpsearch.quantize returned", fields=("policy",))
    qmodel = _quantized(model, policy, calibration, quant)
    return qmodel.module, qmodel.policy


def export_onnx(model: nn.Module, path: str | Path, calibration: Any, *, policy: Policy | str | Path | None = None,
                quant: QuantConfig | None = None) -> Path:
    """Write a quantized model to the ONNX file ``path``, its quantized layers on onnxruntime's
    integer kernels (the QDQ form, see :mod:`mpsearch.export.onnx`); returns the path.

    ``model`` is what :func:`quantize` returned (written as it is), or a float model quantized
    here by ``policy`` (arguments as in :func:`quantize`). ``calibration`` gives the example input
    and the images the output grids of the integer kernels are calibrated on. The file records
    the policy in its metadata (``mpsearch.policy``); onnxruntime runs it:
    ``mpsearch.export.OnnxClassifier(path)``.
    """
    from mpsearch.export import save_onnx

    module, resolved = _to_export(model, policy, calibration, quant)
    split = _calibration_split(calibration)
    example = next(iter(split.batches(2)))[0]
    return save_onnx(module, example, path, metadata={"policy": resolved.to_dict()}, calibration=(x for x, _ in split.batches(128)))


def export_pt2e(model: nn.Module, path: str | Path, calibration: Any, *, policy: Policy | str | Path | None = None,
                quant: QuantConfig | None = None) -> Path:
    """Write a quantized model to ``path`` (``.pt2``) as a PT2E int8 program: torchao's
    ``X86InductorQuantizer`` flow with the policy's own scales, which ``torch.compile`` runs on
    oneDNN int8 kernels (see :mod:`mpsearch.export.pt2e`; needs torchao). Returns the path.

        program = torch.export.load(path)          # after import torchao
        model = torch.compile(program.module())    # with torch._inductor.config.freezing = True

    Arguments as in :func:`export_onnx`; ``mpsearch.export.pt2e.Pt2eClassifier(path)`` runs the file.
    """
    from mpsearch.export.dispatch import save_exported

    module, resolved = _to_export(model, policy, calibration, quant)
    example = next(iter(_calibration_split(calibration).batches(2)))[0]
    return save_exported(module, example, path, "pt2e", metadata={"policy": resolved.to_dict()})
