"""Flags the commands share, defined once, and which config field each one sets.

A library error names config fields (``search.budget``); the command line says the flag that
sets the field instead (``--budget``), when the running command has that flag.
"""

from __future__ import annotations

import argparse

__all__ = ["FIELD_FLAGS", "add_image_size", "add_subject",
           "add_quant", "quant_overrides", "add_output", "add_out_dir", "add_progress", "add_json", "int_list", "float_list"]

# config field -> the flag that sets it (in the commands that have the flag)
FIELD_FLAGS = {
    "model": "--model", "dataset": "--dataset", "data_dir": "--data-dir", "seed": "--seed", "checkpoint": "--checkpoint",
    "allow_weak_baseline": "--allow-weak-baseline", "image_size": "--image-size",
    "calibration_size": "--calibration-size", "limit": "--limit", "output": "--output", "device": "--device",
    "window": "--window", "batch_size": "--batch-size", "energy_meter": "--energy-meter", "target": "--target",
    "float_kernel": "--float-kernel", "policies": "--policies", "name": "--name", "onnx": "--onnx", "runs": "--runs",
    "warmup": "--warmup", "batch_sizes": "--batch-sizes", "threads": "--threads",
    "search.algorithm": "--algorithm", "search.budget": "--budget", "search.population_size": "--population",
    "search.objectives": "--objectives", "search.space": "--space", "search.energy_profile": "--energy-profile",
    "search.sensitivity": "--sensitivity", "search.eval_images": "--eval-images", "search.max_drop": "--max-drop",
    "search.confidence": "--confidence", "search.tolerances": "--tolerances",
    "run.workers": "--workers", "run.torch_threads": "--threads", "run.ray_address": "--ray-address",
    "run.cpus_per_worker": "--cpus-per-worker", "run.ray_dashboard": "--ray-dashboard",
    "run.storage": "--storage", "run.out_dir": "--out-dir",
    "quant.ptq": "--ptq", "quant.weight_observer": "--weight-observer", "quant.act_observer": "--act-observer",
    "quant.smoothquant_alpha": "--smoothquant", "quant.attention_calibration": "--attention-calibration",
    "quant.bias_correction": "--bias-correction", "quant.backend": "--backend",
    "recipe.epochs": "--epochs", "recipe.batch_size": "--batch-size", "recipe.lr": "--lr", "recipe.keep_fraction": "--keep-fraction",
    "finetune.steps": "--steps", "finetune.lr": "--lr", "finetune.batch_size": "--batch-size",
    "finetune.temperature": "--temperature", "finetune.label_weight": "--label-weight",
}


def add_subject(p: argparse.ArgumentParser, *, pretrained: bool = True, file_default: str = "") -> None:
    """--model, --dataset, --data-dir, --seed, --checkpoint (and --pretrained): the baseline a command quantizes.

    ``file_default`` names a file the command reads model and data set from when the flags are
    not given (they default to None then, and the command falls back to resnet18 / fashion-mnist)."""
    model_default, dataset_default = ("resnet18", "fashion-mnist") if not file_default else (None, None)
    suffix = f"; default: {file_default}'s" if file_default else ""
    p.add_argument("--model", default=model_default,
                   help=f"timm model name or alias (resnet18, deit_tiny, test_resnet, ...{suffix})")
    p.add_argument("--dataset", default=dataset_default,
                   help=f"fashion-mnist (default{suffix}), digits, cifar10, cifar100 or imagefolder:PATH")
    p.add_argument("--data-dir", default=None,
                   help="folder holding the data set files (else $MPSEARCH_DATA, the cache, system paths)")
    add_image_size(p)
    p.add_argument("--seed", type=int, default=None, help="seed of baseline training and calibration (default 0)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None, help="fp32 state dict to quantize instead of the cached/trained baseline")
    if pretrained:
        src.add_argument("--pretrained", action="store_true", help="use timm hub weights (needs internet)")


def add_image_size(p: argparse.ArgumentParser) -> None:
    """--image-size: an image folder's images resized to this size instead of ImageNet's 224."""
    p.add_argument("--image-size", type=int, default=None,
                   help="imagefolder: resize images to this many pixels, normalized by the folder's own mean/std "
                        "(default 224 with the ImageNet transform)")


def add_quant(p: argparse.ArgumentParser) -> None:
    """How a policy is measured. Unset: from the policy's provenance when it has one, else the defaults."""
    p.add_argument("--calibration-size", type=int, default=None, help="calibration images drawn from train (default 512)")
    p.add_argument("--weight-observer", default=None, help="weight range observer: minmax (default), percentile, mse")
    p.add_argument("--act-observer", default=None, help="activation range observer: mse (default), percentile, minmax")
    p.add_argument("--ptq", default=None, help="how weights are rounded: rtn (default), gptq, adaround, brecq")
    p.add_argument("--bias-correction", action="store_true", default=None,
                   help="shift each quantized layer's bias by its mean output error on the calibration split")
    p.add_argument("--smoothquant", type=float, nargs="?", const=0.5, default=None, metavar="ALPHA",
                   help="SmoothQuant smoothing of layers quantized on both sides, strength ALPHA (default 0.5)")
    p.add_argument("--attention-calibration", default=None, metavar="METHOD",
                   help="ranges of q and k (inputs of attention's q.k^T): observer (default) or ranking (ranking-aware)")
    p.add_argument("--backend", default=None, choices=("auto", "fake", "int8"),
                   help="what runs the quantized model: int8 kernels (VNNI/AMX), fake quantization in float32, or auto "
                        "(default: the policy's, else int8 where the CPU has int8 dot products)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the policy's, else all cores)")
    p.add_argument("--profiles", default="horowitz45nm,seed-lab4", help="energy profiles (names or .toml paths), comma separated")


def quant_overrides(args: argparse.Namespace) -> dict:
    """The quantizer fields given on the command line (the rest come from the policy or the defaults)."""
    given = {"weight_observer": args.weight_observer, "act_observer": args.act_observer, "ptq": args.ptq,
             "bias_correction": args.bias_correction, "smoothquant_alpha": args.smoothquant,
             "attention_calibration": args.attention_calibration, "backend": args.backend}
    return {k: v for k, v in given.items() if v is not None}


def add_output(p: argparse.ArgumentParser, help: str, *, required: bool = False) -> None:
    """-o/--output: the file a command writes."""
    p.add_argument("-o", "--output", default=None, required=required, help=help)


def add_out_dir(p: argparse.ArgumentParser, help: str) -> None:
    """--out-dir: the folder a command writes into."""
    p.add_argument("--out-dir", default=None, help=help)


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_json(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as one JSON object")


def int_list(text: str, flag: str) -> tuple[int, ...]:
    return _number_list(text, flag, int, "integers")


def float_list(text: str, flag: str) -> tuple[float, ...]:
    return _number_list(text, flag, float, "numbers")


def _number_list(text: str, flag: str, kind: type, what: str) -> tuple:
    from mpsearch.errors import UserError

    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag} must be comma-separated {what}, got {text!r}") from None
    if not values:
        raise UserError(f"{flag} is empty")
    return values
