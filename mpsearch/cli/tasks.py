"""The command line's tasks that are not measurements: fine-tune a policy, list layers, report
outliers or sensitivity, profile kernels. Each takes a model and data set by name; the command
parses its flags, calls one of these and prints what it returns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mpsearch.config import FinetuneConfig, QuantConfig
from mpsearch.errors import UserError
from mpsearch.evaluation.prepared import DEFAULT_CALIBRATION, load_baseline, prepare_measurement
from mpsearch.policy import Policy

__all__ = ["finetune_policy", "layer_table", "outlier_report", "sensitivity_report", "profile_kernels"]


def finetune_policy(model: str, dataset: str, policy: str | Path | Policy, *, config: FinetuneConfig, output: str | Path | None = None,
                    quant: Mapping[str, Any] | None = None, calibration_size: int | None = None, torch_threads: int | None = None,
                    profiles: Sequence[str] = ("horowitz45nm", "seed-lab4"), checkpoint: str | None = None,
                    data_dir: str | None = None, image_size: int | None = None, pretrained: bool = False,
                    progress: bool = True) -> tuple[Any, Path]:
    """Fine-tune ``policy`` (LSQ + distillation from fp32) and write the fine-tuned policy JSON
    (``output``; default ``<policy>.finetuned.json`` beside a policy file, else under
    ``studies/finetuned/``) with its checkpoint beside it (``.pt``). Returns the result and the path."""
    from mpsearch.quant.finetune import finetune, write_finetuned

    if output is not None:
        path = Path(output)
    elif isinstance(policy, (str, Path)) and Path(policy).is_file():
        path = Path(policy).with_suffix(".finetuned.json")
    else:
        label = policy.summary() if isinstance(policy, Policy) else str(policy)
        path = Path("studies") / "finetuned" / f"{model}-{label.replace(':', '_').replace(' ', '_')}.json"
    if path.suffix != ".json":
        raise UserError(f"output {path}: name the policy file with a .json suffix", fields=("output",))
    prepared = prepare_measurement(model, dataset, policy, quant, calibration_size=calibration_size, torch_threads=torch_threads,
                                   seed=config.seed, profiles=profiles, checkpoint=checkpoint, data_dir=data_dir,
                                   image_size=image_size, pretrained=pretrained, progress=progress)
    if prepared.policy.provenance.get("finetune"):
        raise UserError(f"policy {policy} is already fine-tuned; fine-tune the policy it came from")
    if all(spec.is_float for spec in prepared.policy.layers.values()):
        raise UserError("the policy quantizes no layer; there is nothing to fine-tune")
    path.parent.mkdir(parents=True, exist_ok=True)
    result = finetune(prepared.evaluator, prepared.policy, config, progress=progress)
    write_finetuned(path, prepared.evaluator, result)
    return result, path


def layer_table(model: str, dataset: str, *, data_dir: str | None = None, image_size: int | None = None) -> list[dict[str, Any]]:
    """Every layer of ``model`` (built for the data set's images) with its kind, MACs, parameters
    and whether a policy can quantize it, in the order the forward pass runs them."""
    from mpsearch.cost import count_costs
    from mpsearch.data import load_dataset
    from mpsearch.evaluation.evaluator import policy_layers
    from mpsearch.models.zoo import create_model

    data = load_dataset(dataset, data_dir=data_dir, image_size=image_size)
    net = create_model(model, data.info)
    table = count_costs(net, (data.info.in_chans, data.info.image_size, data.info.image_size))
    names = set(policy_layers(net, table))
    return [{"name": layer.name, "kind": layer.kind, "macs": layer.macs, "params": layer.weight_params,
             "quantizable": layer.name in names} for layer in table.layers]


def outlier_report(model: str, dataset: str, *, alpha: float = 0.5, calibration_size: int = DEFAULT_CALIBRATION, seed: int = 0,
                   checkpoint: str | None = None, data_dir: str | None = None, image_size: int | None = None, pretrained: bool = False,
                   progress: bool = True) -> Any:
    """Per-layer activation outliers and SmoothQuant smoothing factors at ``alpha`` (a DataFrame)."""
    from mpsearch.evaluation.evaluator import Evaluator
    from mpsearch.quant.smoothing import outlier_table

    quant = QuantConfig(seed=seed, smoothquant_alpha=alpha)  # checks alpha before the model loads
    baseline, data = load_baseline(model, dataset, data_dir=data_dir, image_size=image_size, seed=seed, checkpoint=checkpoint,
                                   pretrained=pretrained,
                                   calibration_size=calibration_size, progress=progress)
    evaluator = Evaluator(baseline, data, quant=quant)
    evaluator.calibrate()
    qmodel = evaluator.qmodel
    return outlier_table(qmodel.channel_absmax, {n: w.layer for n, w in qmodel.wrappers.items() if n in qmodel.smooth_scales},
                         alpha)


def sensitivity_report(model: str, dataset: str, *, estimator: str = "hessian", bits: Sequence[int] = (2, 3, 4, 5, 6, 8),
                       seed: int = 0, out_dir: str | Path | None = None, checkpoint: str | None = None,
                       data_dir: str | None = None, image_size: int | None = None, pretrained: bool = False,
                       progress: bool = True) -> tuple[Any, dict[str, Path]]:
    """Per-layer sensitivity (cached per checkpoint) as a frame, written as CSV and a bar chart to
    ``out_dir`` (default ``studies/sensitivity-<model>-<estimator>``); returns both."""
    from mpsearch.evaluation.evaluator import Evaluator
    from mpsearch.sensitivity import SensitivityConfig, compute_sensitivity, write_sensitivity

    config = SensitivityConfig(estimator=estimator, bits=tuple(bits), seed=seed)
    baseline, data = load_baseline(model, dataset, data_dir=data_dir, image_size=image_size, seed=seed, checkpoint=checkpoint,
                                   pretrained=pretrained,
                                   progress=progress)
    evaluator = Evaluator(baseline, data, quant=QuantConfig(seed=seed))
    evaluator.calibrate()
    df = compute_sensitivity(baseline.model, evaluator.layer_names, data.calibration, config, quant=evaluator.quant,
                             checkpoint_sha256=baseline.sha256, qmodel=evaluator.qmodel, progress=progress)
    out = Path(out_dir or f"studies/sensitivity-{model}-{estimator}")
    out.mkdir(parents=True, exist_ok=True)
    return df, write_sensitivity(df, out, f"{model} on {data.info.name}: {estimator} sensitivity")



def profile_kernels(model: str, dataset: str, *, device: str = "cpu", precisions: Sequence[str] | None = None,
                    batch_size: int = 32, window_s: float = 1.0, energy_meter: str | None = "auto", threads: int | None = None,
                    seed: int = 0, out_dir: str | Path | None = None, data_dir: str | None = None, image_size: int | None = None,
                    progress: bool = True) -> tuple[Any, Path]:
    """Time (and meter, where a meter can measure) every conv/linear layer of ``model`` alone at
    each precision the device runs; writes ``table.json`` and ``table.csv`` to ``out_dir``
    (default ``studies/profile-<model>-<device>``). Returns the kernel table and that folder."""
    import torch

    from mpsearch.cost import count_costs
    from mpsearch.cost.kernel_table import profile_layers
    from mpsearch.cost.kernels import KERNELS
    from mpsearch.data import load_dataset
    from mpsearch.models.zoo import create_model, resolve_model_name

    resolve_model_name(model)
    device = device.strip().lower()
    if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise UserError(f"device {device!r}: use cpu, cuda or cuda:N", fields=("device",))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device}: torch sees no CUDA GPU here; profile on the cpu or on a GPU machine",
                        fields=("device",))
    for p in precisions or ():
        KERNELS.get(p)
    if batch_size < 1:
        raise UserError(f"batch_size: must be >= 1, got {batch_size}", fields=("batch_size",))
    if not window_s > 0:
        raise UserError(f"window: must be > 0 seconds, got {window_s}", fields=("window",))
    if energy_meter not in (None, "auto", "rapl", "nvml"):
        raise UserError(f"energy_meter {energy_meter!r}: use auto, rapl, nvml or none", fields=("energy_meter",))
    if threads is not None:
        if threads < 1:
            raise UserError(f"run.torch_threads: must be >= 1, got {threads}", fields=("run.torch_threads",))
        torch.set_num_threads(threads)
    data = load_dataset(dataset, data_dir=data_dir, image_size=image_size)
    torch.manual_seed(seed)
    net = create_model(model, data.info)
    table = count_costs(net, (data.info.in_chans, data.info.image_size, data.info.image_size))
    kernels = profile_layers(net, table, model_name=model, dataset=data.info.name, device=device,
                             precisions=list(precisions) if precisions else None, batch_size=batch_size, window_s=window_s,
                             energy_meter=energy_meter, seed=seed, progress=progress)
    out = Path(out_dir or f"studies/profile-{model}-{device.replace(':', '')}")
    out.mkdir(parents=True, exist_ok=True)
    kernels.save(out / "table.json")
    kernels.to_frame().to_csv(out / "table.csv", index=False)
    return kernels, out
