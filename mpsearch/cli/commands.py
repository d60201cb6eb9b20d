"""Commands on one model: train, evaluate, finetune, layers, profiles, profile, calibrate-energy,
ablate, outliers, sensitivity. Each parses its flags, calls one library function, prints."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from mpsearch.cli.flags import (
    add_image_size,
    add_json,
    add_out_dir,
    add_output,
    add_progress,
    add_quant,
    add_subject,
    int_list,
    quant_overrides,
)
from mpsearch.errors import UserError

__all__ = ["register"]

logger = logging.getLogger("mpsearch.cli")


def _given(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _subject(args: argparse.Namespace) -> dict[str, Any]:
    return {"checkpoint": args.checkpoint, "data_dir": args.data_dir, "image_size": args.image_size,
            "pretrained": getattr(args, "pretrained", False)}


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _profiles(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(p.strip() for p in args.profiles.split(",") if p.strip())


def train(args: argparse.Namespace) -> int:
    from mpsearch.evaluation.prepared import load_baseline
    from mpsearch.models.zoo import resolve_model_name

    resolve_model_name(args.model)
    changes = _given(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, keep_fraction=args.keep_fraction)
    baseline, data = load_baseline(args.model, args.dataset, seed=args.seed or 0, recipe_changes=changes,
                                   progress=not args.no_progress, **_subject(args))
    meta = dict(baseline.meta, checkpoint=str(baseline.checkpoint) if baseline.checkpoint else None)
    if args.json:
        print(json.dumps(meta))
        return 0
    print(f"model       {baseline.name} on {data.info.name} ({data.source})")
    print(f"checkpoint  {baseline.checkpoint}  sha256 {baseline.sha256}")
    for key, label in (("val_accuracy", "val acc"), ("test_accuracy", "test acc")):
        if key in meta:
            print(f"{label:<11} {meta[key]:.2%}")
    if "train_wall_s" in meta:
        print(f"train time  {meta['train_wall_s'] / 60:.1f} min on {meta.get('machine', '?')}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from mpsearch.evaluation.prepared import measure_policy

    if args.onnx or args.pt2e:
        return _evaluate_exported(args)
    if args.policy is None:
        raise UserError("evaluate needs --policy (a policy JSON file or shorthand such as w8a8), --onnx FILE or --pt2e FILE")
    result = measure_policy(args.model or "resnet18", args.dataset or "fashion-mnist", args.policy, split=args.split,
                            limit=args.limit, quant=quant_overrides(args),
                            calibration_size=args.calibration_size, torch_threads=args.threads, seed=args.seed,
                            profiles=_profiles(args), save_policy=args.output, progress=not args.no_progress, **_subject(args))
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    c, rel = result.costs, result.costs.relative()
    lo, hi = result.accuracy_ci95
    print(f"{result.model} on {result.dataset}, {result.split} split ({result.images} images), policy {result.policy}")
    print(f"  accuracy   {result.accuracy:.2%}  (95% CI {lo:.2%} to {hi:.2%})")
    if result.fp32_accuracy is not None and result.drop_ci95 is not None:
        dlo, dhi = result.drop_ci95
        print(f"  fp32       {result.fp32_accuracy:.2%}  change {result.drop * 100:+.2f} pp "
              f"(paired 95% CI {dlo * 100:+.2f} to {dhi * 100:+.2f})")
    print(f"  size       {_fmt_bytes(c.size_bytes)}  ({rel['size']:.1%} of fp32 {_fmt_bytes(c.fp32_size_bytes)})")
    print(f"  BOPs       {c.bops / 1e9:.2f} G  ({rel['bops']:.1%} of fp32)")
    for name, value in c.energy.items():
        print(f"  energy     {value:,.4g} {c.energy_units[name]} per image [{name}]  ({rel['energy_' + name]:.1%} of fp32, "
              f"{1 - rel['energy_' + name]:.1%} saved)")
    return 0


def _evaluate_exported(args: argparse.Namespace) -> int:
    """evaluate --onnx / --pt2e: the file in its runtime next to the fake-quantized model of its policy."""
    from mpsearch.cli.deploy import model_file
    from mpsearch.export.deploy import compare_exported

    path = model_file(args)
    if quant_overrides(args) or args.calibration_size is not None:
        raise UserError(f"evaluate --{'onnx' if args.onnx else 'pt2e'} measures the file's own quantizers; drop the quantizer flags")
    result = compare_exported(path, split=args.split, limit=args.limit, model=args.model, dataset=args.dataset,
                          policy=args.policy, checkpoint=args.checkpoint, data_dir=args.data_dir, image_size=args.image_size,
                          threads=args.threads, progress=not args.no_progress)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    threads = f"{result.threads} threads" if result.threads else f"{result.runtime}'s default threads"
    print(f"{result.model} on {result.dataset}, {result.split} split ({result.images} images), policy {result.policy}")
    for label, accuracy, (lo, hi) in ((result.runtime, result.exported_accuracy, result.exported_ci95),
                                      ("fake quant", result.fake_quant_accuracy, result.fake_quant_ci95)):
        print(f"  {label:<13} {accuracy:.2%}  (95% CI {lo:.2%} to {hi:.2%})")
    print(f"  difference    {(result.exported_accuracy - result.fake_quant_accuracy) * 100:+.2f} pp; "
          f"both predict the same class on {result.agreement:.2%} of images")
    compiling = ", compilation included" if result.runtime == "torch.compile" else ""
    print(f"  {result.path}: {result.exported_seconds:.1f} s in {result.runtime} ({threads}{compiling})")
    return 0


def finetune(args: argparse.Namespace) -> int:
    from mpsearch.cli.tasks import finetune_policy
    from mpsearch.config import FinetuneConfig

    config = FinetuneConfig(seed=args.seed or 0, **_given(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                                           temperature=args.temperature, label_weight=args.label_weight))
    result, path = finetune_policy(args.model, args.dataset, args.policy, config=config, output=args.output,
                                   quant=quant_overrides(args), calibration_size=args.calibration_size, torch_threads=args.threads,
                                   profiles=_profiles(args), progress=not args.no_progress, **_subject(args))
    checkpoint = path.with_suffix(".pt")
    if args.json:
        print(json.dumps({"policy": str(path), "checkpoint": str(checkpoint), "train_s": result.train_s, **result.metrics()}))
        return 0
    print(f"policy {result.policy.summary()}: {config.steps} steps in {result.train_s / 60:.1f} min")
    for split in result.after:
        before, after = result.before[split], result.after[split]
        print(f"  {split:<5} PTQ {before.accuracy:.2%} ({(before.drop or 0) * 100:+.2f} pp)  ->  "
              f"QAT {after.accuracy:.2%} ({(after.drop or 0) * 100:+.2f} pp, fp32 {after.fp32_accuracy:.2%})")
    print(f"wrote {path} and {checkpoint}")
    return 0


def layers(args: argparse.Namespace) -> int:
    from mpsearch.cli.tasks import layer_table

    rows = layer_table(args.model, args.dataset, data_dir=args.data_dir, image_size=args.image_size)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'layer':<32} {'kind':<7} {'MACs':>14} {'params':>10}  quantizable")
    for r in rows:
        print(f"{r['name']:<32} {r['kind']:<7} {r['macs']:>14,} {r['params']:>10,}  {'yes' if r['quantizable'] else 'no (float)'}")
    return 0


def profiles(args: argparse.Namespace) -> int:
    from mpsearch.cost import list_profiles, load_profile

    for name in list_profiles():
        p = load_profile(name)
        print(f"{name:<24} [{p.units}] {p.description.splitlines()[0][:100]}")
    return 0


def profile(args: argparse.Namespace) -> int:
    from mpsearch.cli.tasks import profile_kernels

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()] if args.precisions else None
    kernels, out = profile_kernels(args.model, args.dataset, device=args.device, precisions=precisions, batch_size=args.batch_size,
                                   window_s=args.window, energy_meter=None if args.energy_meter == "none" else args.energy_meter,
                                   threads=args.threads, seed=args.seed, out_dir=args.out_dir, data_dir=args.data_dir,
                                   image_size=args.image_size, progress=not args.no_progress)
    wide = kernels.microseconds()
    totals = {p: float(wide[p].sum()) for p in wide.columns}
    if args.json:
        print(json.dumps({"table": str(out / "table.json"), "device": kernels.device_name, "precisions": list(wide.columns),
                          "total_us_per_sample": totals, "energy_meter": kernels.energy_meter,
                          "energy_unavailable": kernels.energy_unavailable, "skipped": kernels.skipped}))
        return 0
    ratio = {"fp32", "int8"} <= set(wide.columns)
    print(f"{args.model} on {kernels.device_name}, batch {kernels.batch_size}, {kernels.threads} threads: microseconds per sample")
    print(f"{'layer':<28}" + "".join(f"{p:>10}" for p in wide.columns) + ("  fp32/int8" if ratio else ""))
    for layer, row in wide.iterrows():
        print(f"{layer:<28}" + "".join(f"{row[p]:>10.2f}" for p in wide.columns) + (f"  {row['fp32'] / row['int8']:8.2f}x" if ratio else ""))
    print(f"{'total':<28}" + "".join(f"{totals[p]:>10.1f}" for p in wide.columns)
          + (f"  {totals['fp32'] / totals['int8']:8.2f}x" if ratio else ""))
    if kernels.energy_unavailable:
        logger.info(f"energy not measured: {kernels.energy_unavailable}")
    for what, why in kernels.skipped.items():
        logger.info(f"skipped {what}: {why}")
    logger.info(f"wrote {out / 'table.json'} and {out / 'table.csv'}")
    return 0


def calibrate_energy(args: argparse.Namespace) -> int:
    from mpsearch.cost import load_profile
    from mpsearch.cost.calibration import calibrate_energy as calibrate

    result = calibrate(args.table, target=args.target, name=args.name, out=args.output, float_kernel=args.float_kernel,
                       n_policies=args.policies, seed=args.seed, install=not args.no_install)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    f, table = result.fit, result.table
    print(f"{table.model} on {table.device_name}: {f.target} fitted over {len(f.rows)} kernels ({', '.join(f.precisions)})")
    print(f"  R2 {f.r2:.4f} (leaving each layer out: {f.r2_leave_one_layer_out:.4f}); per kernel Spearman "
          f"{f.per_layer.spearman:.3f}, Kendall {f.per_layer.kendall:.3f}")
    for p in f.precisions:
        print(f"  {p:<5} {f.mac[p]:.4g} {f.units}/MAC + {f.call[p]:.4g} {f.units}/call")
    print(f"  memory {f.per_byte:.4g} {f.units}/byte")
    print(f"  {'profile':<28}{'kernel rho':>11}{'kernel tau':>11}{'policy rho':>11}{'policy tau':>11}")
    for r in result.summary:
        print(f"  {r['profile']:<28}{r['kernel_spearman']:>11.3f}{r['kernel_kendall']:>11.3f}"
              f"{r['policy_spearman']:>11.3f}{r['policy_kendall']:>11.3f}")
    logger.info(f"wrote {result.profile_path}, {result.report_path}, " + ", ".join(result.plot_paths))
    if result.installed_path:
        name = load_profile(result.installed_path).name
        logger.info(f"installed as energy profile {name!r} ({result.installed_path}): search with --energy-profile {name}, "
                    f"or beside the analytical one with --objectives accuracy,energy,energy@{name}")
    return 0


def ablate(args: argparse.Namespace) -> int:
    from mpsearch.study.ablate import ablate as run

    variants = None if args.variants is None else ("all" if args.variants.strip() == "all" else
                                                    [v.strip() for v in args.variants.split(",") if v.strip()])
    widths = None if args.widths is None else [w.strip().lower() for w in args.widths.split(",") if w.strip()]
    summary, md = run(args.model, args.dataset, variants=variants, widths=widths, seeds=int_list(args.seeds, "--seeds"),
                      split=args.split, limit=args.limit, data_dir=args.data_dir, checkpoint=args.checkpoint,
                      finetune_steps=args.finetune_steps, out_dir=args.out_dir, progress=not args.no_progress)
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    logger.info(f"wrote {md.with_name('ablation.csv')} and {md}")
    return 0


def outliers(args: argparse.Namespace) -> int:
    from mpsearch.cli.tasks import outlier_report
    from mpsearch.host.files import atomic_write

    table = outlier_report(args.model, args.dataset, alpha=args.alpha, calibration_size=args.calibration_size,
                           seed=args.seed or 0, progress=not args.no_progress, **_subject(args))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.output:
        atomic_write(args.output, lambda f: table.to_csv(f, index=False), what="outlier report")
        logger.info(f"wrote {args.output}")
    return 0


def sensitivity(args: argparse.Namespace) -> int:
    from mpsearch.cli.tasks import sensitivity_report
    from mpsearch.sensitivity import sensitivity_table

    df, files = sensitivity_report(args.model, args.dataset, estimator=args.estimator, bits=int_list(args.bits, "--bits"),
                                   seed=args.seed or 0, out_dir=args.out_dir, progress=not args.no_progress, **_subject(args))
    print(sensitivity_table(df).to_string(float_format=lambda v: f"{v:.3g}"))
    logger.info("wrote " + ", ".join(str(p) for p in files.values()))
    return 0


def register(sub: Any) -> None:
    """Add these commands' parsers to ``sub`` (argparse sub-parsers)."""
    t = sub.add_parser("train", help="train (or load from cache) the fp32 baseline and report its accuracy")
    add_subject(t)
    t.add_argument("--epochs", type=int, default=None, help="override the training recipe's epochs")
    t.add_argument("--batch-size", type=int, default=None, help="override the training recipe's batch size")
    t.add_argument("--lr", type=float, default=None, help="override the training recipe's peak learning rate")
    t.add_argument("--keep-fraction", type=float, default=None,
                   help="share of images each epoch after the first trains on, hardest first (1: every image every epoch)")
    add_progress(t)
    add_json(t, "the checkpoint metadata")
    t.set_defaults(handler=train)

    e = sub.add_parser("evaluate", help="measure a policy: quantized accuracy (95%% CI) and modeled costs; "
                                        "or an exported ONNX file against its policy")
    add_subject(e, file_default="the model file")
    e.add_argument("--policy", default=None,
                   help="policy JSON file or shorthand: fp32, w8a8, w6a6, w4a8, w4a4, w2a8, w8 (weights only), w4a4:all")
    e.add_argument("--onnx", default=None, metavar="FILE",
                   help="run this exported model in onnxruntime and compare it with the fake-quantized model of its policy")
    e.add_argument("--pt2e", default=None, metavar="FILE",
                   help="the same for a .pt2 program (mpsearch export --format pt2e), compiled by torch.compile")
    e.add_argument("--split", choices=("val", "test"), default="val", help="val (default; searches use it) or test (final reports)")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N images of the split")
    add_quant(e)
    add_output(e, "also write the resolved policy JSON here")
    add_progress(e)
    add_json(e, "the measurement")
    e.set_defaults(handler=evaluate)

    f = sub.add_parser("finetune", help="quantization-aware fine-tuning of a policy (LSQ + distillation from fp32)")
    add_subject(f)
    f.add_argument("--policy", required=True, help="policy JSON file or shorthand (w4a4, w4a8, ...)")
    add_quant(f)
    f.add_argument("--steps", type=int, default=None, help="training steps (default 300)")
    f.add_argument("--lr", type=float, default=None, help="peak learning rate of weights and step sizes (default 0.002)")
    f.add_argument("--batch-size", type=int, default=None, help="training images per step (default 64)")
    f.add_argument("--temperature", type=float, default=None, help="distillation temperature (default 1)")
    f.add_argument("--label-weight", type=float, default=None, help="weight of the cross-entropy with labels (default 0)")
    add_output(f, "fine-tuned policy JSON to write, the checkpoint beside it as .pt (default: <policy>.finetuned.json "
                  "beside a policy file, studies/finetuned/ for a shorthand)")
    add_progress(f)
    add_json(f, "the measured metrics")
    f.set_defaults(handler=finetune)

    ls = sub.add_parser("layers", help="list a model's layers with MACs and parameters, and which ones a policy covers")
    ls.add_argument("--model", default="resnet18")
    ls.add_argument("--dataset", default="fashion-mnist", help="sets the input shape and classes (no training needed)")
    ls.add_argument("--data-dir", default=None)
    add_image_size(ls)
    add_json(ls, "the layer table")
    ls.set_defaults(handler=layers)

    sub.add_parser("profiles", help="list the energy profiles").set_defaults(handler=profiles)

    pr = sub.add_parser("profile", help="measure per-layer kernel latency (and energy where a meter exists) per precision")
    pr.add_argument("--model", default="resnet18")
    pr.add_argument("--dataset", default="fashion-mnist", help="sets the input shape and classes (no training needed)")
    pr.add_argument("--data-dir", default=None)
    add_image_size(pr)
    pr.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    pr.add_argument("--precisions", default=None, help="comma list of fp32, bf16, fp16, int8 (default: every one the device runs)")
    pr.add_argument("--batch-size", type=int, default=32, help="samples per kernel call (default 32); rows are per sample")
    pr.add_argument("--window", type=float, default=1.0, help="seconds of repeated calls per measurement (default 1)")
    pr.add_argument("--energy-meter", default="auto",
                    help="auto (RAPL on cpu, NVML on cuda, skipped where it cannot measure), rapl, nvml or none")
    pr.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    pr.add_argument("--seed", type=int, default=0)
    add_out_dir(pr, "folder for table.json and table.csv (default studies/profile-<model>-<device>)")
    add_progress(pr)
    add_json(pr, "a summary")
    pr.set_defaults(handler=profile)

    ce = sub.add_parser("calibrate-energy", help="fit a profile's coefficients to a measured kernel table; report the fit")
    ce.add_argument("--table", default="studies/profile-resnet18-cpu/table.json",
                    help="table.json written by `mpsearch profile` (default: resnet18 on the cpu)")
    ce.add_argument("--target", default=None, choices=("latency", "energy"),
                    help="fit latency or measured energy (default: energy where the table has it, else latency)")
    ce.add_argument("--name", default=None, help="profile name (default <model>-<device>-<target>)")
    add_output(ce, "profile .toml to write (default <table dir>/<name>.toml)")
    ce.add_argument("--float-kernel", default="fp32", help="kernel that runs float layers in the fitted profile (default fp32)")
    ce.add_argument("--policies", type=int, default=200, help="random mixed policies for the per-policy agreement (default 200)")
    ce.add_argument("--seed", type=int, default=0)
    ce.add_argument("--no-install", action="store_true",
                    help="do not install the fitted profile by name (by default it is, so that --energy-profile NAME finds it)")
    add_json(ce, "the fit and agreement")
    ce.set_defaults(handler=calibrate_energy)

    from mpsearch.study.ablate import VARIANTS  # light: configs only

    ab = sub.add_parser("ablate", help="measured ablation of quantization choices over seeds: CSV + markdown table")
    ab.add_argument("--model", default="resnet18", help="timm model name or alias")
    ab.add_argument("--dataset", default="fashion-mnist")
    ab.add_argument("--data-dir", default=None)
    ab.add_argument("--checkpoint", default=None, help="fp32 state dict to use instead of the cached/trained baseline")
    ab.add_argument("--variants", default=None, help="comma-separated variants, or all (every one that applies): "
                                                     + ", ".join(VARIANTS) + " (default: all; for ViTs default,ranking-aware)")
    ab.add_argument("--widths", default=None, help="uniform policies (shorthands), comma separated "
                                                   "(default w8a8,w6a6,w4a8,w4a4,w3a8,w2a8; for ViTs w8a8,w6a6,w4a8,w4a4)")
    ab.add_argument("--seeds", default="0,1,2", help="calibration seeds, comma separated (default 0,1,2)")
    ab.add_argument("--split", choices=("val", "test"), default="test", help="split to measure on (default test)")
    ab.add_argument("--limit", type=int, default=None, help="measure only the first N images of the split")
    ab.add_argument("--finetune-steps", type=int, default=300, help="fine-tuning steps of the QAT variant (default 300)")
    add_out_dir(ab, "folder for ablation.csv and ablation.md (default studies/ablation-<model>); an existing ablation.csv "
                    "there is resumed")
    add_progress(ab)
    ab.set_defaults(handler=ablate)

    ol = sub.add_parser("outliers", help="per-layer activation outlier report and SmoothQuant smoothing factors")
    add_subject(ol)
    ol.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength (default 0.5)")
    ol.add_argument("--calibration-size", type=int, default=512)
    add_output(ol, "also write the table as CSV here")
    add_progress(ol)
    ol.set_defaults(handler=outliers)

    s = sub.add_parser("sensitivity", help="per-layer sensitivity: table, CSV and bar chart")
    add_subject(s)
    s.add_argument("--estimator", default="hessian", help="hessian (default), empirical or attention-ranking (ViTs)")
    s.add_argument("--bits", default="2,3,4,5,6,8", help="weight bit widths to score")
    add_out_dir(s, "folder for CSV and PNG (default studies/sensitivity-<model>-<estimator>)")
    add_progress(s)
    s.set_defaults(handler=sensitivity)
