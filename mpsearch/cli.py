"""``mpsearch`` command line: parse flags, build configs, call the library, map errors to exit codes.

Exit codes: 0 success, 2 bad input (one line on stderr; ``--debug`` shows the traceback),
1 anything else (a bug: the traceback is kept). Machine-readable output (``--json``) goes to
stdout; progress and messages go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

from mpsearch.errors import UserError

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + error
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _add_baseline_flags(p: argparse.ArgumentParser, *, recipe_overrides: bool = True) -> None:
    p.add_argument("--model", default="resnet18", help="timm model name or alias (resnet18, deit_tiny, test_resnet, ...)")
    p.add_argument("--dataset", default="fashion-mnist",
                   help="fashion-mnist (default), digits, cifar10, cifar100 or imagefolder:PATH")
    p.add_argument("--data-dir", default=None,
                   help="folder holding the data set files (else $MPSEARCH_DATA, the cache, system paths)")
    p.add_argument("--seed", type=int, default=0, help="seed of baseline training and calibration sampling (default 0)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None, help="fp32 state dict to quantize instead of the cached/trained baseline")
    src.add_argument("--pretrained", action="store_true", help="use timm hub weights (needs internet)")
    if recipe_overrides:
        p.add_argument("--epochs", type=int, default=None, help="override the training recipe's epochs")
        p.add_argument("--batch-size", type=int, default=None, help="override the training recipe's batch size")
        p.add_argument("--lr", type=float, default=None, help="override the training recipe's peak learning rate")
        p.add_argument("--keep-fraction", type=float, default=None,
                       help="override the share of images each epoch after the first trains on, hardest first "
                            "(1: every image every epoch)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_study_flags(p: argparse.ArgumentParser) -> None:
    """The settings of a search study, shared by optimize and compare."""
    _add_baseline_flags(p)
    p.add_argument("--seeds", default=None, help="run one study per seed, comma separated (e.g. 0,1,2), and report mean +- std")
    p.add_argument("--multi-fidelity", action="store_true",
                   help="measure candidates on a quarter of --eval-images first and promote those not surely dominated "
                        "(same as NAME+mf for every population search); the budget counts full evaluations")
    p.add_argument("--multi-fidelity-images", type=int, default=None, help="images of the first rung (default 100)")
    p.add_argument("--budget", type=int, default=200,
                   help="full evaluations per method, default 200 (a multi-fidelity candidate counts the images it used)")
    p.add_argument("--population", type=int, default=20, help="population / batch size per generation (default 20)")
    p.add_argument("--space", default="", help="search space YAML path or name in search_spaces/ (default: by model family)")
    p.add_argument("--objectives", default="accuracy,energy",
                   help="accuracy plus any of energy, size, bops, energy@PROFILE (default accuracy,energy)")
    p.add_argument("--energy-profile", default="horowitz45nm", help="energy profile the search optimises (default horowitz45nm)")
    p.add_argument("--eval-images", type=int, default=None, help="validation images per trial (default 400)")
    p.add_argument("--remeasure-points", type=int, default=None,
                   help="re-measure at most N Pareto points on the full val and test splits, spread along the front (default 6; 0 = all)")
    p.add_argument("--workers", type=int, default=-1, help="Ray workers (default: one per core; 0 = in-process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (fixed so results do not depend on --workers)")
    p.add_argument("--ray-address", default=None, help="join an existing Ray cluster (e.g. ray://head:10001 or auto)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///studies/<name>/study.db)")
    p.add_argument("--name", default="", help="study name (default <model>-<dataset>-<algorithm>-s<seed>)")
    p.add_argument("--out-root", default="studies", help="folder holding studies/<name>/ (default studies)")
    p.add_argument("--sensitivity", default="hessian", help="estimator seeding the first population: hessian, empirical, "
                                                                    "attention-ranking (ViTs), none")
    p.add_argument("--calibration-size", type=int, default=512)
    p.add_argument("--weight-observer", default="minmax")
    p.add_argument("--act-observer", default="mse")
    p.add_argument("--ptq", default="rtn", help="how weights are rounded: rtn (default), gptq, adaround, brecq")
    p.add_argument("--bias-correction", action="store_true", help="bias correction after weight rounding (see evaluate)")
    p.add_argument("--smoothquant", type=float, nargs="?", const=0.5, default=None, metavar="ALPHA",
                   help="SmoothQuant smoothing, strength ALPHA (default 0.5; see evaluate)")
    p.add_argument("--attention-calibration", default=None, metavar="METHOD",
                   help="q/k ranges of attention's q.k^T: observer (default) or ranking (ranking-aware; see evaluate)")
    p.add_argument("--finetune-front", action="store_true",
                   help="after the search, fine-tune each re-measured Pareto point (LSQ + distillation; see `finetune`)")
    p.add_argument("--finetune-steps", type=int, default=300, help="fine-tuning steps per Pareto point (default 300)")


def _add_quant_flags(p: argparse.ArgumentParser) -> None:
    # None = "from the policy's provenance if it has one, else the default" (so an exported
    # policy is re-measured with the settings it was measured with).
    p.add_argument("--calibration-size", type=int, default=None, help="calibration images drawn from train (default 512)")
    p.add_argument("--weight-observer", default=None, help="weight range observer: minmax (default), percentile, mse")
    p.add_argument("--act-observer", default=None, help="activation range observer: mse (default), percentile, minmax")
    p.add_argument("--ptq", default=None, help="how weights are rounded: rtn (default), gptq, adaround, brecq (see mpsearch.quant.ptq)")
    p.add_argument("--bias-correction", action="store_true", default=None,
                   help="shift each quantized layer's bias by its mean output error on the calibration split")
    p.add_argument("--smoothquant", type=float, nargs="?", const=0.5, default=None, metavar="ALPHA",
                   help="SmoothQuant smoothing of layers quantized on both sides, strength ALPHA (default 0.5)")
    p.add_argument("--attention-calibration", default=None, metavar="METHOD",
                   help="how the ranges of q and k (inputs of attention's q.k^T) are chosen: observer (default, like "
                        "every layer input) or ranking (ranking-aware, Liu et al. 2021)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the policy's, else all cores)")
    p.add_argument("--profiles", default="horowitz45nm,seed-lab4", help="energy profiles (names or .toml paths), comma separated")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mpsearch", description="Search-based mixed-precision quantization for PyTorch/timm models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train (or load from cache) the fp32 baseline and report its accuracy")
    _add_baseline_flags(t)
    t.add_argument("--json", action="store_true", help="print the checkpoint metadata as one JSON object")

    e = sub.add_parser("evaluate", help="measure a policy: quantized accuracy (95%% CI) and modeled costs")
    _add_baseline_flags(e)
    e.add_argument("--policy", required=True,
                   help="policy JSON file or shorthand: fp32, w8a8, w6a6, w4a8, w4a4, w2a8, w8 (weights only), w4a4:all")
    e.add_argument("--split", choices=("val", "test"), default="val",
                   help="val (default; searches use it) or test (final reports)")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N images of the split")
    _add_quant_flags(e)
    e.add_argument("--save-policy", default=None, help="also write the resolved policy JSON here")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    f = sub.add_parser("finetune", help="quantization-aware fine-tuning of a policy (LSQ + distillation from fp32)")
    _add_baseline_flags(f, recipe_overrides=False)
    f.add_argument("--policy", required=True, help="policy JSON file or shorthand (w4a4, w4a8, ...)")
    _add_quant_flags(f)
    f.add_argument("--steps", type=int, default=None, help="training steps (default 300)")
    f.add_argument("--lr", type=float, default=None, help="peak learning rate of weights and step sizes (default 0.002)")
    f.add_argument("--batch-size", type=int, default=None, help="training images per step (default 64)")
    f.add_argument("--temperature", type=float, default=None, help="distillation temperature (default 1)")
    f.add_argument("--label-weight", type=float, default=None, help="weight of the cross-entropy with labels (default 0)")
    f.add_argument("-o", "--output", default=None,
                   help="fine-tuned policy JSON to write; the checkpoint goes beside it as .pt "
                        "(default: <policy>.finetuned.json beside a policy file, studies/finetuned/ for a shorthand)")
    f.add_argument("--json", action="store_true", help="print the measured metrics as one JSON object")

    ls = sub.add_parser("layers", help="list a model's quantizable layers with MACs and parameters")
    ls.add_argument("--model", default="resnet18")
    ls.add_argument("--dataset", default="fashion-mnist")
    ls.add_argument("--data-dir", default=None)
    ls.add_argument("--json", action="store_true")

    sub.add_parser("profiles", help="list the energy profiles")

    pr = sub.add_parser("profile", help="measure per-layer kernel latency (and energy where a meter exists) per precision")
    pr.add_argument("--model", default="resnet18")
    pr.add_argument("--dataset", default="fashion-mnist", help="sets the input shape and classes (no training needed)")
    pr.add_argument("--data-dir", default=None)
    pr.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    pr.add_argument("--precisions", default=None,
                    help="comma list of fp32, bf16, fp16, int8 (default: every one the device really runs)")
    pr.add_argument("--batch-size", type=int, default=32, help="samples per kernel call (default 32); rows are per sample")
    pr.add_argument("--window", type=float, default=1.0, help="seconds of repeated calls per measurement (default 1)")
    pr.add_argument("--energy-meter", default="auto",
                    help="auto (RAPL on cpu, NVML on cuda, skipped where it cannot measure), rapl, nvml or none")
    pr.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--out", default=None, help="folder for table.json and table.csv (default studies/profile-<model>-<device>)")
    pr.add_argument("--no-progress", action="store_true")
    pr.add_argument("--json", action="store_true", help="print a summary as one JSON object")

    ce = sub.add_parser("calibrate-energy", help="fit a profile's coefficients to a measured kernel table; report the fit")
    ce.add_argument("--table", default="studies/profile-resnet18-cpu/table.json",
                    help="table.json written by `mpsearch profile` (default: resnet18 on the cpu)")
    ce.add_argument("--target", default=None, choices=("latency", "energy"),
                    help="fit latency or measured energy (default: energy where the table has it, else latency)")
    ce.add_argument("--name", default=None, help="profile name (default <model>-<device>-<target>)")
    ce.add_argument("--out", default=None, help="profile .toml to write (default <table dir>/<name>.toml)")
    ce.add_argument("--float-kernel", default="fp32", help="kernel that runs float layers in the fitted profile (default fp32)")
    ce.add_argument("--policies", type=int, default=200, help="random mixed policies for the per-policy agreement (default 200)")
    ce.add_argument("--seed", type=int, default=0)
    ce.add_argument("--no-install", action="store_true",
                    help="do not install the fitted profile by name (by default it is, so that --energy-profile NAME "
                         "and --objectives accuracy,energy,energy@NAME find it)")
    ce.add_argument("--json", action="store_true", help="print the fit and agreement as one JSON object")

    o = sub.add_parser("optimize", help="search per-layer bit widths: a measured accuracy-energy Pareto set")
    o.add_argument("--algorithm", default="nsga2",
                   help="nsga2 (pymoo, default), optuna-nsga2, optuna-tpe, random, ilp (HAWQ-V3 integer program), greedy "
                        "(AIMET-style bit lowering); NAME+mf measures candidates with multi-fidelity promotions; "
                        "several, comma separated, run one after the other into one study (see compare)")
    _add_study_flags(o)
    c = sub.add_parser("compare", help="several search methods and baselines on one study: hypervolume per method, one plot")
    c.add_argument("--algorithms", default="nsga2+mf,random,ilp,greedy",
                   help="methods, comma separated (default nsga2+mf,random,ilp,greedy; see optimize --algorithm)")
    _add_study_flags(c)

    ab = sub.add_parser("ablate", help="measured ablation of quantization choices over seeds: CSV + markdown table")
    ab.add_argument("--model", default="resnet18", help="timm model name or alias")
    ab.add_argument("--dataset", default="fashion-mnist")
    ab.add_argument("--data-dir", default=None)
    ab.add_argument("--checkpoint", default=None, help="fp32 state dict to use instead of the cached/trained baseline")
    from mpsearch.ablate import VARIANTS  # light: configs only

    ab.add_argument("--variants", default=None,
                    help="comma-separated variants, or all (every one that applies to the model): " + ", ".join(VARIANTS)
                         + " (default: all; for ViTs default,ranking-aware)")
    ab.add_argument("--widths", default=None, help="uniform policies (shorthands), comma separated "
                                                   "(default w8a8,w6a6,w4a8,w4a4,w3a8,w2a8; for ViTs w8a8,w6a6,w4a8,w4a4)")
    ab.add_argument("--seeds", default="0,1,2", help="calibration seeds, comma separated (default 0,1,2)")
    ab.add_argument("--split", choices=("val", "test"), default="test", help="split to measure on (default test)")
    ab.add_argument("--limit", type=int, default=None, help="measure only the first N images of the split")
    ab.add_argument("--finetune-steps", type=int, default=300, help="fine-tuning steps of the QAT variant (default 300)")
    ab.add_argument("--out", default=None, help="folder for ablation.csv and ablation.md (default studies/ablation-<model>); "
                                                "an existing ablation.csv there is resumed")
    ab.add_argument("--no-progress", action="store_true")

    ol = sub.add_parser("outliers", help="per-layer activation outlier report and SmoothQuant smoothing factors")
    _add_baseline_flags(ol)
    ol.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength (default 0.5)")
    ol.add_argument("--calibration-size", type=int, default=512)
    ol.add_argument("--out", default=None, help="also write the table as CSV here")

    x = sub.add_parser("export", help="pick one policy of a finished study and write it as JSON")
    x.add_argument("--study", required=True, help="study name (a folder under --out-root)")
    x.add_argument("--pick", default="knee",
                   help='knee (default), max-accuracy, min-energy, trial:N, "energy<=X", "accuracy>=Y" (X relative to fp32)')
    x.add_argument("-o", "--output", required=True, help="policy JSON to write")
    x.add_argument("--out-root", default="studies")

    d = sub.add_parser("dashboard", help="open optuna-dashboard on a study")
    d.add_argument("--study", required=True)
    d.add_argument("--out-root", default="studies")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8080)

    s = sub.add_parser("sensitivity", help="per-layer sensitivity: table, CSV and bar chart")
    _add_baseline_flags(s)
    s.add_argument("--estimator", default="hessian", help="hessian (default), empirical or attention-ranking (ViTs)")
    s.add_argument("--bits", default="2,3,4,5,6,8", help="weight bit widths to score")
    s.add_argument("--out", default=None, help="folder for CSV and PNG (default studies/sensitivity-<model>)")
    return parser


def _recipe(args: argparse.Namespace):
    from dataclasses import replace

    from mpsearch.zoo import default_recipe

    if not hasattr(args, "epochs"):  # commands without recipe flags use the model's default recipe
        return default_recipe(args.model)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr),
                                   ("keep_fraction", args.keep_fraction)) if v is not None}
    return replace(default_recipe(args.model), **overrides)


def _baseline(args: argparse.Namespace, calibration_size: int = 512):
    from mpsearch.data import load_dataset
    from mpsearch.zoo import get_baseline, resolve_model_name

    resolve_model_name(args.model)  # fail on a typo before loading data
    if calibration_size < 1:
        raise UserError(f"--calibration-size must be >= 1, got {calibration_size}")
    data = load_dataset(args.dataset, data_dir=args.data_dir, calibration_size=calibration_size, calibration_seed=args.seed)
    baseline = get_baseline(
        args.model, data, recipe=_recipe(args), seed=args.seed, checkpoint=args.checkpoint,
        pretrained=args.pretrained, progress=not args.no_progress, log=_log,
    )
    return data, baseline


def _cmd_train(args: argparse.Namespace) -> int:
    data, baseline = _baseline(args)
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


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _policy_and_quant(args: argparse.Namespace):
    """The policy argument and quantizer settings of evaluate/finetune, checked before any model loads.

    Settings left unset come from the policy's provenance when it has one (so an exported policy
    is re-measured with the settings it was measured with), else from the defaults.
    """
    from pathlib import Path

    from mpsearch.config import QuantConfig
    from mpsearch.cost import load_profile
    from mpsearch.policy import Policy, parse_shorthand
    from mpsearch.quant import get_observer
    from mpsearch.quant.ptq import get_ptq
    from mpsearch.quant.qk_calibration import QK_CALIBRATIONS

    policy_arg = args.policy
    provenance: dict = {}
    if Path(args.policy).is_file():
        policy_arg = Policy.load(args.policy)
        provenance = policy_arg.provenance.get("quant", {}) if isinstance(policy_arg.provenance.get("quant"), dict) else {}
    else:
        parse_shorthand(args.policy)
    args.calibration_size = args.calibration_size or int(provenance.get("calibration_size", 512))
    args.weight_observer = args.weight_observer or str(provenance.get("weight_observer", "minmax"))
    args.act_observer = args.act_observer or str(provenance.get("act_observer", "mse"))
    args.ptq = args.ptq or str(provenance.get("ptq", "rtn"))
    args.bias_correction = bool(args.bias_correction or provenance.get("bias_correction", False))
    if args.smoothquant is None and provenance.get("smoothquant_alpha") is not None:
        args.smoothquant = float(provenance["smoothquant_alpha"])
    args.attention_calibration = args.attention_calibration or str(provenance.get("attention_calibration", "observer"))
    threads = args.threads or provenance.get("torch_threads")
    if threads is not None:
        if int(threads) < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(int(threads))
    profiles = tuple(p.strip() for p in args.profiles.split(",") if p.strip())
    if not profiles:
        raise UserError("--profiles is empty; name at least one energy profile (see `mpsearch profiles`)")
    for p in profiles:
        load_profile(p)
    get_observer(args.weight_observer)
    get_observer(args.act_observer)
    get_ptq(args.ptq)
    QK_CALIBRATIONS.get(args.attention_calibration)
    quant = QuantConfig(weight_observer=args.weight_observer, act_observer=args.act_observer, seed=args.seed, ptq=args.ptq,
                        bias_correction=args.bias_correction, smoothquant_alpha=args.smoothquant,
                        attention_calibration=args.attention_calibration)
    return policy_arg, quant, profiles


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mpsearch.evaluate import Evaluator
    from mpsearch.finetune import attach_finetuned

    policy_arg, quant, profiles = _policy_and_quant(args)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    data, baseline = _baseline(args, args.calibration_size)
    evaluator = Evaluator(baseline, data, quant=quant, profiles=profiles)
    policy = evaluator.resolve_policy(policy_arg)
    if attach_finetuned(evaluator, policy, Path(args.policy).parent):
        _log(f"using the fine-tuned weights and quantizers of {policy.provenance['finetune']['checkpoint']}")
    if args.save_policy:
        policy.save(args.save_policy)
    evaluator.calibrate()
    result = evaluator.evaluate(policy, split=args.split, limit=args.limit, progress=not args.no_progress)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    c = result.costs
    rel = c.relative()
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
        print(f"  energy     {value:,.4g} {c.energy_units[name]} per image [{name}]  ({rel['energy:' + name]:.1%} of fp32, "
              f"{1 - rel['energy:' + name]:.1%} saved)")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mpsearch.config import FinetuneConfig
    from mpsearch.evaluate import Evaluator
    from mpsearch.finetune import finetune, write_finetuned

    policy_arg, quant, profiles = _policy_and_quant(args)
    settings = {"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "temperature": args.temperature,
                "label_weight": args.label_weight}
    config = FinetuneConfig(seed=args.seed, **{k: v for k, v in settings.items() if v is not None})
    if args.output:
        output = Path(args.output)
    elif Path(args.policy).is_file():
        output = Path(args.policy).with_suffix(".finetuned.json")
    else:
        output = Path("studies") / "finetuned" / f"{args.model}-{args.policy.replace(':', '_')}.json"
    if output.suffix != ".json":
        raise UserError(f"--output {output}: name the policy file with a .json suffix")
    output.parent.mkdir(parents=True, exist_ok=True)
    data, baseline = _baseline(args, args.calibration_size)
    evaluator = Evaluator(baseline, data, quant=quant, profiles=profiles)
    policy = evaluator.resolve_policy(policy_arg)
    if policy.provenance.get("finetune"):
        raise UserError(f"policy {args.policy} is already fine-tuned; fine-tune the policy it came from")
    if all(spec.is_float for spec in policy.layers.values()):
        raise UserError("the policy quantizes no layer; there is nothing to fine-tune")
    result = finetune(evaluator, policy, config, progress=not args.no_progress, log=_log)
    write_finetuned(output, evaluator, result)
    checkpoint = output.with_suffix(".pt")
    if args.json:
        print(json.dumps({"policy": str(output), "checkpoint": str(checkpoint), "train_s": result.train_s, **result.metrics()}))
        return 0
    print(f"{baseline.name} on {data.info.name}, policy {policy.summary()}: {config.steps} steps in {result.train_s / 60:.1f} min")
    for split in result.after:
        before, after = result.before[split], result.after[split]
        print(f"  {split:<5} PTQ ({quant.ptq}) {before.accuracy:.2%} ({(before.drop or 0) * 100:+.2f} pp)  ->  "
              f"QAT {after.accuracy:.2%} ({(after.drop or 0) * 100:+.2f} pp, fp32 {after.fp32_accuracy:.2%})")
    print(f"wrote {output} and {checkpoint}")
    return 0


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise UserError(f"{flag} is empty")
    return values


def _cmd_ablate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mpsearch.ablate import applicable_variants, default_grid, run_ablation, summarize, write_markdown
    from mpsearch.config import FinetuneConfig
    from mpsearch.machine import describe_machine
    from mpsearch.zoo import resolve_model_name

    seeds = _int_list(args.seeds, "--seeds")
    resolve_model_name(args.model)
    default_variants, default_widths = default_grid(args.model)
    if args.variants is None:
        variants = default_variants
    elif args.variants.strip() == "all":
        variants = applicable_variants(args.model)
    else:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    widths = default_widths if args.widths is None else [w.strip().lower() for w in args.widths.split(",") if w.strip()]
    if not variants or not widths:
        raise UserError("--variants and --widths need at least one entry each")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    out = Path(args.out or f"studies/ablation-{args.model}")
    start = time.perf_counter()
    table = run_ablation(model=args.model, dataset=args.dataset, variants=variants, widths=widths, seeds=seeds,
                         split=args.split, limit=args.limit, data_dir=args.data_dir, checkpoint=args.checkpoint,
                         finetune_config=FinetuneConfig(steps=args.finetune_steps), out_csv=out / "ablation.csv",
                         progress=not args.no_progress, log=_log)
    notes = [f"- model {args.model} on {args.dataset}; seeds {', '.join(map(str, seeds))}; "
             f"{args.split} split{f' (first {args.limit} images)' if args.limit else ''}",
             f"- machine: {describe_machine()}; this run {(time.perf_counter() - start) / 60:.1f} min",
             f"- regenerate: `mpsearch ablate --model {args.model} --variants {','.join(variants)} --widths {','.join(widths)} "
             f"--seeds {args.seeds}`"]
    md = write_markdown(out / "ablation.md", table, widths=widths, split=args.split,
                        title=f"Quantization ablation: {args.model} on {args.dataset}", notes=notes)
    summary = summarize(table, args.split)
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    _log(f"wrote {out / 'ablation.csv'} and {md}")
    return 0


def _cmd_outliers(args: argparse.Namespace) -> int:
    from mpsearch.config import QuantConfig
    from mpsearch.evaluate import Evaluator
    from mpsearch.files import atomic_write
    from mpsearch.quant.smoothing import outlier_table

    quant = QuantConfig(seed=args.seed, smoothquant_alpha=args.alpha)  # checks alpha before the model loads
    data, baseline = _baseline(args, args.calibration_size)
    evaluator = Evaluator(baseline, data, quant=quant)
    evaluator.calibrate()
    qmodel = evaluator.qmodel
    table = outlier_table(qmodel.channel_absmax, {n: w.layer for n, w in qmodel.wrappers.items()
                                                  if n in qmodel.smooth_scales}, args.alpha)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.out:
        atomic_write(args.out, lambda f: table.to_csv(f, index=False), what="outlier report")
        _log(f"wrote {args.out}")
    return 0


def _cmd_layers(args: argparse.Namespace) -> int:
    from mpsearch.cost import count_costs
    from mpsearch.data import load_dataset
    from mpsearch.quant import quantizable_layers, quantizable_matmuls
    from mpsearch.zoo import create_model

    data = load_dataset(args.dataset, data_dir=args.data_dir)
    model = create_model(args.model, data.info)
    table = count_costs(model, (data.info.in_chans, data.info.image_size, data.info.image_size))
    names = set(quantizable_layers(model)) | set(quantizable_matmuls(model))
    rows = [
        {"name": layer.name, "kind": layer.kind, "macs": layer.macs, "params": layer.weight_params,
         "quantizable": layer.name in names}
        for layer in table.layers
    ]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'layer':<32} {'kind':<7} {'MACs':>14} {'params':>10}  quantizable")
    for r in rows:
        quantizable = "yes" if r["quantizable"] else "no (float)"
        print(f"{r['name']:<32} {r['kind']:<7} {r['macs']:>14,} {r['params']:>10,}  {quantizable}")
    return 0


def _cmd_profiles(args: argparse.Namespace) -> int:
    from mpsearch.cost import list_profiles, load_profile

    for name in list_profiles():
        p = load_profile(name)
        print(f"{name:<24} [{p.units}] {p.description.splitlines()[0][:100]}")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from mpsearch.cost import count_costs
    from mpsearch.cost.kernels import KERNELS, profile_layers
    from mpsearch.data import load_dataset
    from mpsearch.zoo import create_model, resolve_model_name

    resolve_model_name(args.model)
    device = args.device.strip().lower()
    if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise UserError(f"--device {args.device!r}: use cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: torch sees no CUDA device here; profile with --device cpu or on a GPU machine")
    precisions = None
    if args.precisions:
        precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
        for p in precisions:
            KERNELS.get(p)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.window > 0:
        raise UserError(f"--window must be > 0 seconds, got {args.window}")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    meter = None if args.energy_meter == "none" else args.energy_meter
    if meter not in (None, "auto", "rapl", "nvml"):
        raise UserError(f"--energy-meter {args.energy_meter!r}: use auto, rapl, nvml or none")
    data = load_dataset(args.dataset, data_dir=args.data_dir)
    torch.manual_seed(args.seed)
    model = create_model(args.model, data.info)
    table = count_costs(model, (data.info.in_chans, data.info.image_size, data.info.image_size))
    kernels = profile_layers(model, table, model_name=args.model, dataset=data.info.name, device=device,
                             precisions=precisions, batch_size=args.batch_size, window_s=args.window,
                             energy_meter=meter, seed=args.seed, progress=not args.no_progress, log=_log)
    out = Path(args.out or f"studies/profile-{args.model}-{device.replace(':', '')}")
    out.mkdir(parents=True, exist_ok=True)
    kernels.save(out / "table.json")
    kernels.to_frame().to_csv(out / "table.csv", index=False)
    frame = kernels.to_frame()
    wide = frame.pivot(index="layer", columns="precision", values="seconds").reindex(kernels.layers) * 1e6
    totals = {p: float(wide[p].sum()) for p in wide.columns}
    if args.json:
        print(json.dumps({"table": str(out / "table.json"), "device": kernels.device_name, "precisions": list(wide.columns),
                          "total_us_per_sample": totals, "energy_meter": kernels.energy_meter,
                          "energy_unavailable": kernels.energy_unavailable, "skipped": kernels.skipped}))
        return 0
    cols = [p for p in kernels.precisions if p in wide.columns]
    print(f"{args.model} on {kernels.device_name}, batch {kernels.batch_size}, {kernels.threads} threads: "
          "microseconds per sample")
    print(f"{'layer':<28}" + "".join(f"{p:>10}" for p in cols) + ("  fp32/int8" if {"fp32", "int8"} <= set(cols) else ""))
    for layer, row in wide.iterrows():
        speedup = f"  {row['fp32'] / row['int8']:8.2f}x" if {"fp32", "int8"} <= set(cols) else ""
        print(f"{layer:<28}" + "".join(f"{row[p]:>10.2f}" for p in cols) + speedup)
    print(f"{'total':<28}" + "".join(f"{totals[p]:>10.1f}" for p in cols)
          + (f"  {totals['fp32'] / totals['int8']:8.2f}x" if {"fp32", "int8"} <= set(cols) else ""))
    if kernels.energy_unavailable:
        _log(f"energy not measured: {kernels.energy_unavailable}")
    for what, why in kernels.skipped.items():
        _log(f"skipped {what}: {why}")
    _log(f"wrote {out / 'table.json'} and {out / 'table.csv'}")
    return 0


def _cmd_calibrate_energy(args: argparse.Namespace) -> int:
    from mpsearch.cost import load_profile
    from mpsearch.cost.calibration import calibrate_energy

    result = calibrate_energy(args.table, target=args.target, name=args.name, out=args.out, float_kernel=args.float_kernel,
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
    _log(f"wrote {result.profile_path}, {result.report_path}, " + ", ".join(result.plot_paths))
    if result.installed_path:
        name = load_profile(result.installed_path).name
        _log(f"installed as energy profile {name!r} ({result.installed_path}): search with --energy-profile {name}, "
             f"or beside the analytical one with --objectives accuracy,energy,energy@{name}")
    return 0


def _study_configs(args: argparse.Namespace, methods: str) -> list:
    """One StudyConfig per seed (``--seeds``, else ``--seed``) from the shared study flags."""
    from mpsearch.config import StudyConfig
    from mpsearch.study import MF_SUFFIX, parse_methods

    if args.epochs or args.batch_size or args.lr or args.keep_fraction:
        raise UserError(f"{args.command} uses the default baseline recipe; train another with `mpsearch train --epochs ...` "
                        "and pass its file with --checkpoint")
    if args.pretrained:
        raise UserError(f"{args.command} --pretrained is not supported yet; save the hub model and pass --checkpoint")
    if args.attention_calibration is not None:
        from mpsearch.quant.qk_calibration import QK_CALIBRATIONS

        QK_CALIBRATIONS.get(args.attention_calibration)
    parsed = parse_methods(methods)
    if args.multi_fidelity:
        population = [m for m in parsed if m.multi_fidelity or _is_population_search(m.algorithm)]
        if not population:
            raise UserError("--multi-fidelity applies to population searches (nsga2, optuna-nsga2, optuna-tpe, random); "
                            f"{methods} has none")
        methods = ",".join(m.name if m.multi_fidelity or m not in population else m.name + MF_SUFFIX for m in parsed)
        parse_methods(methods)  # e.g. nsga2 and nsga2+mf both listed
    seeds = [args.seed] if args.seeds is None else list(_int_list(args.seeds, "--seeds"))
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {args.seeds!r}: each seed once, e.g. 0,1,2")
    optional = {"eval_images": args.eval_images, "remeasure_points": args.remeasure_points,
                "multi_fidelity_images": args.multi_fidelity_images}  # None: the config's default
    return [StudyConfig(
        name=(f"{args.name}-s{seed}" if args.name and len(seeds) > 1 else args.name), model=args.model, dataset=args.dataset,
        data_dir=args.data_dir, checkpoint=args.checkpoint, seed=seed, budget=args.budget, algorithm=methods,
        population_size=args.population, space=args.space,
        objectives=tuple(o.strip() for o in args.objectives.split(",") if o.strip()), energy_profile=args.energy_profile,
        workers=args.workers, torch_threads=args.threads, ray_address=args.ray_address,
        storage=args.storage, calibration_size=args.calibration_size, weight_observer=args.weight_observer,
        act_observer=args.act_observer, ptq=args.ptq, sensitivity=args.sensitivity, out_root=args.out_root,
        bias_correction=args.bias_correction, smoothquant_alpha=args.smoothquant,
        attention_calibration=args.attention_calibration or "observer",
        finetune_front=args.finetune_front, finetune_steps=args.finetune_steps,
        **{k: v for k, v in optional.items() if v is not None},
    ) for seed in seeds]


def _is_population_search(algorithm: str) -> bool:
    from mpsearch.search.base import ALGORITHMS

    return ALGORITHMS.get(algorithm).fixed_batch


def _mean_std(values: list[float], fmt: str) -> str:
    import statistics

    spread = f" +- {format(statistics.stdev(values), fmt)}" if len(values) > 1 else ""
    return format(statistics.fmean(values), fmt) + spread


def _run_studies(args: argparse.Namespace, methods: str) -> list:
    from mpsearch.study import optimize

    results = []
    for config in _study_configs(args, methods):
        results.append(optimize(config, progress=not args.no_progress, log=_log))
        r = results[-1]
        print(f"study {r.name}: {len(r.trials)} trials, {len(r.pareto)} Pareto points, "
              f"hypervolume {r.hypervolume:.4f}, {r.wall_s / 60:.1f} min -> {r.out_dir}")
    return results


def _cmd_optimize(args: argparse.Namespace) -> int:
    from mpsearch.export import pick_policy

    results = _run_studies(args, args.algorithm)
    cost = "rel_energy_" + args.energy_profile
    for r in results:
        cols = [c for c in ("trial", "policy", "test_accuracy", "test_drop_pp", "qat_test_accuracy", "qat_test_drop_pp", cost)
                if c in r.pareto]
        print(r.pareto[cols].to_string(index=False))
    if len(results) > 1:  # one study per seed: how much the answer depends on the seed
        knees = [pick_policy(r.out_dir, "knee")[0].provenance["metrics"] for r in results]
        print(f"over {len(results)} seeds: hypervolume {_mean_std([r.hypervolume for r in results], '.4f')}; knee policy: "
              f"test accuracy {_mean_std([100 * k['test_accuracy'] for k in knees], '.2f')} %, "
              f"drop {_mean_std([100 * k['test_drop'] for k in knees], '.2f')} pp, "
              f"energy {_mean_std([100 * k.get(f'rel_energy:{args.energy_profile}', float('nan')) for k in knees], '.1f')} % of fp32")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from mpsearch.compare import method_scores

    results = _run_studies(args, args.algorithms)
    per_method: dict[str, list[float]] = {}
    for r in results:
        scores = method_scores(r.trials, tuple(o.strip() for o in args.objectives.split(",")), r.ref_point)
        print((r.out_dir / "compare.md").read_text())
        for _, row in scores.iterrows():
            per_method.setdefault(row["method"], []).append(float(row["hypervolume"]))
    if len(results) > 1:
        print(f"hypervolume over {len(results)} seeds (mean +- std):")
        for method, values in per_method.items():
            print(f"  {method:16s} {_mean_std(values, '.4f')}")
    return 0


def _study_folder(args: argparse.Namespace):
    from pathlib import Path

    folder = Path(args.out_root) / args.study
    if not (folder / "config.yaml").is_file():
        raise UserError(f"no finished study {args.study!r} in {folder}; run `mpsearch optimize --name {args.study}` first "
                        "or pass --out-root")
    return folder


def _cmd_export(args: argparse.Namespace) -> int:
    from mpsearch.export import pick_policy

    policy, why = pick_policy(_study_folder(args), args.pick)
    policy.save(args.output)
    _log(f"{why} -> {args.output}")
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    import yaml

    folder = _study_folder(args)
    storage = yaml.safe_load((folder / "config.yaml").read_text())["storage"]
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise UserError("optuna-dashboard is not installed; pip install optuna-dashboard") from None
    _log(f"optuna-dashboard on http://{args.host}:{args.port} for {storage} (Ctrl-C to stop)")
    run_server(storage, host=args.host, port=args.port)
    return 0


def _cmd_sensitivity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mpsearch.config import QuantConfig
    from mpsearch.evaluate import Evaluator
    from mpsearch.sensitivity import SensitivityConfig, compute_sensitivity, sensitivity_table, write_sensitivity

    bits = _int_list(args.bits, "--bits")
    config = SensitivityConfig(estimator=args.estimator, bits=bits, seed=args.seed)
    data, baseline = _baseline(args)
    ev = Evaluator(baseline, data, quant=QuantConfig(seed=args.seed))
    ev.calibrate()
    df = compute_sensitivity(baseline.model, ev.layer_names, data.calibration, config, quant=ev.quant,
                             checkpoint_sha256=baseline.sha256, qmodel=ev.qmodel, progress=not args.no_progress)
    out = Path(args.out or f"studies/sensitivity-{args.model}-{args.estimator}")
    out.mkdir(parents=True, exist_ok=True)
    files = write_sensitivity(df, out, f"{args.model} on {data.info.name}: {args.estimator} sensitivity")
    print(sensitivity_table(df).to_string(float_format=lambda v: f"{v:.3g}"))
    _log("wrote " + ", ".join(str(p) for p in files.values()))
    return 0


_COMMANDS = {
    "train": _cmd_train, "evaluate": _cmd_evaluate, "finetune": _cmd_finetune, "ablate": _cmd_ablate,
    "outliers": _cmd_outliers, "layers": _cmd_layers, "profiles": _cmd_profiles, "profile": _cmd_profile,
    "calibrate-energy": _cmd_calibrate_energy,
    "optimize": _cmd_optimize, "compare": _cmd_compare, "export": _cmd_export, "dashboard": _cmd_dashboard, "sensitivity": _cmd_sensitivity,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"mpsearch: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mpsearch: interrupted", file=sys.stderr)
        return 130


def entry() -> NoReturn:
    sys.exit(main())


if __name__ == "__main__":
    entry()
