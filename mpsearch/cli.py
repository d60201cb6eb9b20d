"""``mpsearch`` command line: parse flags, build configs, call the library, map errors to exit codes.

Exit codes: 0 success, 2 bad input (one line on stderr; ``--debug`` shows the traceback),
1 anything else (a bug: the traceback is kept). Machine-readable output (``--json``) goes to
stdout; progress and messages go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
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


def _add_baseline_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet18", help="timm model name or alias (resnet18, deit_tiny, test_resnet, ...)")
    p.add_argument("--dataset", default="fashion-mnist",
                   help="fashion-mnist (default), digits, cifar10, cifar100 or imagefolder:PATH")
    p.add_argument("--data-dir", default=None,
                   help="folder holding the data set files (else $MPSEARCH_DATA, the cache, system paths)")
    p.add_argument("--seed", type=int, default=0, help="seed of baseline training and calibration sampling (default 0)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None, help="fp32 state dict to quantize instead of the cached/trained baseline")
    src.add_argument("--pretrained", action="store_true", help="use timm hub weights (needs internet)")
    p.add_argument("--epochs", type=int, default=None, help="override the training recipe's epochs")
    p.add_argument("--batch-size", type=int, default=None, help="override the training recipe's batch size")
    p.add_argument("--lr", type=float, default=None, help="override the training recipe's peak learning rate")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


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
    # None = "from the policy's provenance if it has one, else the default" (so an exported
    # policy is re-measured with the settings it was measured with).
    e.add_argument("--calibration-size", type=int, default=None, help="calibration images drawn from train (default 512)")
    e.add_argument("--weight-observer", default=None, help="weight range observer: minmax (default), percentile, mse")
    e.add_argument("--act-observer", default=None, help="activation range observer: mse (default), percentile, minmax")
    e.add_argument("--ptq", default=None, help="how weights are rounded: rtn (default), gptq, adaround (see mpsearch.quant.ptq)")
    e.add_argument("--threads", type=int, default=None, help="torch threads (default: the policy's, else all cores)")
    e.add_argument("--profiles", default="horowitz45nm,seed-lab4", help="energy profiles (names or .toml paths), comma separated")
    e.add_argument("--save-policy", default=None, help="also write the resolved policy JSON here")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    ls = sub.add_parser("layers", help="list a model's quantizable layers with MACs and parameters")
    ls.add_argument("--model", default="resnet18")
    ls.add_argument("--dataset", default="fashion-mnist")
    ls.add_argument("--data-dir", default=None)
    ls.add_argument("--json", action="store_true")

    sub.add_parser("profiles", help="list the energy profiles")

    o = sub.add_parser("optimize", help="search per-layer bit widths: a measured accuracy-energy Pareto set")
    _add_baseline_flags(o)
    o.add_argument("--budget", type=int, default=200, help="number of real evaluations (trials), default 200")
    o.add_argument("--algorithm", default="nsga2", help="nsga2 (pymoo, default), optuna-nsga2, optuna-tpe, random")
    o.add_argument("--population", type=int, default=20, help="population / batch size per generation (default 20)")
    o.add_argument("--space", default="", help="search space YAML path or name in search_spaces/ (default: by model family)")
    o.add_argument("--objectives", default="accuracy,energy", help="accuracy plus any of energy, size, bops (default accuracy,energy)")
    o.add_argument("--energy-profile", default="horowitz45nm", help="energy profile the search optimises (default horowitz45nm)")
    o.add_argument("--eval-images", type=int, default=None, help="validation images per trial (default 400)")
    o.add_argument("--remeasure-points", type=int, default=None,
                   help="re-measure at most N Pareto points on the full val and test splits, spread along the front (default 6; 0 = all)")
    o.add_argument("--workers", type=int, default=-1, help="Ray workers (default: one per core; 0 = in-process)")
    o.add_argument("--threads", type=int, default=1, help="torch threads per worker (fixed so results do not depend on --workers)")
    o.add_argument("--ray-address", default=None, help="join an existing Ray cluster (e.g. ray://head:10001 or auto)")
    o.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///studies/<name>/study.db)")
    o.add_argument("--name", default="", help="study name (default <model>-<dataset>-<algorithm>-s<seed>)")
    o.add_argument("--out-root", default="studies", help="folder holding studies/<name>/ (default studies)")
    o.add_argument("--sensitivity", default="hessian", help="estimator seeding the first population: hessian, empirical, none")
    o.add_argument("--calibration-size", type=int, default=512)
    o.add_argument("--weight-observer", default="minmax")
    o.add_argument("--act-observer", default="mse")
    o.add_argument("--ptq", default="rtn", help="how weights are rounded: rtn (default), gptq, adaround")

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
    s.add_argument("--estimator", default="hessian", help="hessian (default) or empirical")
    s.add_argument("--bits", default="2,3,4,5,6,8", help="weight bit widths to score")
    s.add_argument("--out", default=None, help="folder for CSV and PNG (default studies/sensitivity-<model>)")
    return parser


def _recipe(args: argparse.Namespace):
    from dataclasses import replace

    from mpsearch.config import TrainRecipe

    overrides = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr)) if v is not None}
    return replace(TrainRecipe(), **overrides)


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


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mpsearch.config import QuantConfig
    from mpsearch.cost import load_profile
    from mpsearch.evaluate import Evaluator
    from mpsearch.policy import Policy, parse_shorthand
    from mpsearch.quant import get_observer
    from mpsearch.quant.ptq import get_ptq

    # Check every input before the (possibly long) baseline is loaded or trained.
    policy_arg: str | Policy = args.policy
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
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    quant = QuantConfig(weight_observer=args.weight_observer, act_observer=args.act_observer, seed=args.seed, ptq=args.ptq)
    data, baseline = _baseline(args, args.calibration_size)
    evaluator = Evaluator(baseline, data, quant=quant, profiles=profiles)
    policy = evaluator.resolve_policy(policy_arg)
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


def _cmd_layers(args: argparse.Namespace) -> int:
    from mpsearch.cost import count_costs
    from mpsearch.data import load_dataset
    from mpsearch.quant import quantizable_layers
    from mpsearch.zoo import create_model

    data = load_dataset(args.dataset, data_dir=args.data_dir)
    model = create_model(args.model, data.info)
    table = count_costs(model, (data.info.in_chans, data.info.image_size, data.info.image_size))
    names = set(quantizable_layers(model))
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
        print(f"{name:<14} [{p.units}] {p.description.splitlines()[0][:100]}")
    return 0


def _cmd_optimize(args: argparse.Namespace) -> int:
    from mpsearch.config import StudyConfig
    from mpsearch.study import optimize

    if args.epochs or args.batch_size or args.lr:
        raise UserError("optimize uses the default baseline recipe; train another with `mpsearch train --epochs ...` "
                        "and pass its file with --checkpoint")
    if args.pretrained:
        raise UserError("optimize --pretrained is not supported yet; save the hub model and pass --checkpoint")
    optional = {"eval_images": args.eval_images, "remeasure_points": args.remeasure_points}  # None: the config's default
    config = StudyConfig(
        name=args.name, model=args.model, dataset=args.dataset, data_dir=args.data_dir, checkpoint=args.checkpoint,
        seed=args.seed, budget=args.budget, algorithm=args.algorithm, population_size=args.population, space=args.space,
        objectives=tuple(o.strip() for o in args.objectives.split(",") if o.strip()), energy_profile=args.energy_profile,
        workers=args.workers, torch_threads=args.threads, ray_address=args.ray_address,
        storage=args.storage, calibration_size=args.calibration_size, weight_observer=args.weight_observer,
        act_observer=args.act_observer, ptq=args.ptq, sensitivity=args.sensitivity, out_root=args.out_root,
        **{k: v for k, v in optional.items() if v is not None},
    )
    result = optimize(config, progress=not args.no_progress, log=_log)
    print(f"study {result.name}: {len(result.trials)} trials, {len(result.pareto)} Pareto points, "
          f"hypervolume {result.hypervolume:.4f}, {result.wall_s / 60:.1f} min -> {result.out_dir}")
    cols = [c for c in ("trial", "policy", "test_accuracy", "test_drop_pp", "rel_energy_" + args.energy_profile) if c in result.pareto]
    print(result.pareto[cols].to_string(index=False))
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

    try:
        bits = tuple(int(b) for b in args.bits.split(","))
    except ValueError:
        raise UserError(f"--bits must be comma-separated integers, got {args.bits!r}") from None
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
    "train": _cmd_train, "evaluate": _cmd_evaluate, "layers": _cmd_layers, "profiles": _cmd_profiles,
    "optimize": _cmd_optimize, "export": _cmd_export, "dashboard": _cmd_dashboard, "sensitivity": _cmd_sensitivity,
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
