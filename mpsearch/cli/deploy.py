"""Commands that hand a model out: export (a policy as JSON, or the quantized model as ONNX or as a
PT2E program) and latency (a model file timed end to end in its runtime, next to the fp32 model)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from mpsearch.cli.flags import add_image_size, add_json, add_output, add_progress, int_list
from mpsearch.cli.study import study_folder
from mpsearch.errors import UserError

__all__ = ["register", "model_file"]

logger = logging.getLogger("mpsearch.cli")


_SUFFIXES = {".json": "json", ".onnx": "onnx", ".pt2": "pt2e"}


def _export_format(args: argparse.Namespace) -> str:
    """--format, else what -o's name ends in."""
    suffix = Path(args.output).suffix.lower()
    fmt = args.format or _SUFFIXES.get(suffix)
    if fmt is None:
        raise UserError(f"--output {args.output}: name a .json (policy), .onnx or .pt2 (model) file, or pass --format json|onnx|pt2e")
    wanted = {name: ending for ending, name in _SUFFIXES.items()}[fmt]
    if suffix != wanted:
        raise UserError(f"--output {args.output}: a {fmt} file's name ends in {wanted}")
    return fmt


def model_file(args: argparse.Namespace) -> str:
    """--onnx or --pt2e, exactly one."""
    if (args.onnx is None) == (args.pt2e is None):
        raise UserError("name the model file with --onnx FILE.onnx or --pt2e FILE.pt2, exactly one")
    from mpsearch.export.formats import format_of

    path, flag = (args.onnx, "onnx") if args.onnx is not None else (args.pt2e, "pt2e")
    if format_of(path) != flag:
        other = "pt2e" if flag == "onnx" else "onnx"
        raise UserError(f"--{flag} {path}: .pt2 files are PT2E programs: pass them with --pt2e" if flag == "onnx" else
                        f"--{flag} {path}: a PT2E program's name ends in .pt2 (an ONNX file goes with --{other})")
    return path


def export(args: argparse.Namespace) -> int:
    from mpsearch.policy import Policy
    from mpsearch.study import load_result

    fmt = _export_format(args)
    if (args.study is None) == (args.policy is None):
        raise UserError("export takes a study (--study S --pick knee) or a policy (--model M --policy p.json), exactly one")
    subject = {"model": args.model, "dataset": args.dataset, "checkpoint": args.checkpoint, "data_dir": args.data_dir,
               "image_size": args.image_size}
    if args.study is not None:
        folder = study_folder(args.study)
        policy, why = load_result(folder).choose(args.pick)
        if fmt == "json":
            policy.save(args.output)
            logger.info(f"{why} -> {args.output}")
            return 0
        from mpsearch.config import StudyConfig

        config = StudyConfig.load(folder / "config.yaml")
        study_subject = {key: getattr(config, key) for key in subject}
        given = [f"--{key.replace('_', '-')}" for key, value in subject.items() if value is not None and value != study_subject[key]]
        if given:
            raise UserError(f"{given[0]}: the study fixes the model and its data; drop it (or export with --policy)")
        subject = study_subject
    else:
        if fmt == "json":
            raise UserError("--policy is already a policy; export it with --format onnx -o FILE.onnx")
        policy = args.policy
        if Path(policy).is_file():
            recorded = Policy.load(policy)
            subject["model"] = subject["model"] or recorded.model
            subject["dataset"] = subject["dataset"] or recorded.dataset
        why = f"policy {policy}"
    from mpsearch.export.deploy import export_policy

    path, resolved = export_policy(subject.pop("model") or "resnet18", subject.pop("dataset") or "fashion-mnist", policy,
                                   args.output, fmt=fmt, progress=not args.no_progress, **subject)
    if fmt == "pt2e":
        from mpsearch.export.dispatch import exported_metadata

        float_matmuls = exported_metadata(path).get("float_matmuls", 0)
        matmuls = f", {float_matmuls} attention matmuls float" if float_matmuls else ""
        print(f"{why}: {resolved.summary()} -> {path} ({path.stat().st_size / 2**20:.2f} MiB, PT2E program for torch.compile, "
              f"int8 kernels on its quantized layers{matmuls})")
        return 0
    from mpsearch.export.onnx import kernel_summary, read_metadata

    meta = read_metadata(path)
    grids = meta.get("calibrated_output_grids", 0)
    calibrated = f", {grids} calibrated output grids on grouped convolutions" if grids else ""
    print(f"{why}: {resolved.summary()} -> {path} ({path.stat().st_size / 2**20:.2f} MiB; in onnxruntime "
          f"{kernel_summary(path)}{calibrated})")
    return 0


def latency(args: argparse.Namespace) -> int:
    from mpsearch.export.deploy import latency_report

    rows = latency_report(model_file(args), compare_fp32=not args.no_fp32, batch_sizes=int_list(args.batch_sizes, "--batch-sizes"),
                          runs=args.runs, warmup=args.warmup, threads=args.threads, checkpoint=args.checkpoint,
                          data_dir=args.data_dir)
    if args.json:
        print(json.dumps([row.to_dict() for row in rows]))
        return 0
    runtime = rows[0].latency.runtime
    threads = f"{args.threads} threads" if args.threads else f"{runtime}'s default threads (every core)"
    print(f"{runtime} CPU, {threads}, median of {args.runs} timed runs after {args.warmup} warm-up runs (IQR in brackets)")
    print(f"  {'model':<44} {'batch':>5} {'median ms':>10} {'IQR ms':>17} {'images/s':>9} {'vs fp32':>7}")
    for row in rows:
        speedup = f"{row.speedup:.2f}x" if row.speedup is not None else ""
        print(f"  {row.label:<44} {row.latency.batch_size:>5} {row.latency.median_ms:>10.3f} "
              f"{f'[{row.latency.q1_ms:.3f}, {row.latency.q3_ms:.3f}]':>17} {row.latency.images_per_s:>9.0f} {speedup:>7}")
    return 0


def register(sub: Any) -> None:
    """Add these commands' parsers to ``sub`` (argparse sub-parsers)."""
    x = sub.add_parser("export", help="write a study's chosen policy as JSON, or the model quantized by a policy as ONNX "
                                      "or PT2E (integer kernels)")
    x.add_argument("--study", default=None, help="the study's folder, or its name under studies/")
    x.add_argument("--pick", default="knee",
                   help='knee (default), max-accuracy, min-energy, trial:N, "energy<=X", "accuracy>=Y" (X relative to fp32)')
    x.add_argument("--policy", default=None, help="without a study: policy JSON file or shorthand (w8a8, w4a8, ...) to export")
    x.add_argument("--model", default=None, help="with --policy: timm model name (default: the policy's)")
    x.add_argument("--dataset", default=None, help="with --policy: data set (default: the policy's)")
    x.add_argument("--data-dir", default=None, help="folder holding the data set files")
    add_image_size(x)
    x.add_argument("--checkpoint", default=None, help="fp32 state dict the policy quantizes (default: the cached baseline)")
    x.add_argument("--format", choices=("json", "onnx", "pt2e"), default=None,
                   help="json: the policy; onnx: the quantized model for onnxruntime; pt2e: a torch.export program "
                        "for torch.compile (int8 oneDNN kernels; needs torchao) (default: from the output's name)")
    add_output(x, "file to write: policy .json, model .onnx or .pt2", required=True)
    add_progress(x)
    x.set_defaults(handler=export)

    t = sub.add_parser("latency", help="time a model file end to end (ONNX in onnxruntime, .pt2 in torch.compile; CPU), "
                                       "next to the fp32 model")
    t.add_argument("--onnx", default=None, metavar="FILE", help="an ONNX model file (written by mpsearch export)")
    t.add_argument("--pt2e", default=None, metavar="FILE", help="a .pt2 program (mpsearch export --format pt2e), run by torch.compile")
    t.add_argument("--batch-sizes", default="1,64", help="batch sizes to time, comma separated (default 1,64)")
    t.add_argument("--runs", type=int, default=50, help="timed runs per batch size (default 50, at least 30)")
    t.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    t.add_argument("--threads", type=int, default=None, help="intra-op threads (default: every core)")
    t.add_argument("--no-fp32", action="store_true", help="do not export and time the fp32 model of the same baseline")
    t.add_argument("--checkpoint", default=None, help="fp32 state dict the file was exported from (default: its metadata's)")
    t.add_argument("--data-dir", default=None, help="folder holding the data set files")
    add_json(t, "one row per model and batch size")
    t.set_defaults(handler=latency)
