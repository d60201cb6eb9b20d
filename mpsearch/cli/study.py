"""Study commands: optimize (and compare, the same with several methods), dashboard.

A study's settings come from a config file (``--config``), then the everyday flags below, then
``--set FIELD=VALUE`` for any other field; the CLI writes every study to a folder (``--out-dir``,
default ``studies/<name>``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from mpsearch.cli.flags import add_image_size, add_progress, float_list, int_list
from mpsearch.errors import UserError

__all__ = ["register", "study_configs", "study_folder"]

logger = logging.getLogger("mpsearch.cli")
COMPARE_METHODS = "nsga2+mf,random,ilp,greedy"
STUDIES = Path("studies")

# flag dest -> the config field it sets (flags left unset keep the config's value)
_OPTIMIZE_FIELDS = {
    "model": "model", "dataset": "dataset", "checkpoint": "checkpoint", "seed": "seed", "name": "name",
    "allow_weak_baseline": "allow_weak_baseline", "image_size": "image_size",
    "budget": "search.budget", "population": "search.population_size", "algorithm": "search.algorithm",
    "objectives": "search.objectives", "space": "search.space", "energy_profile": "search.energy_profile",
    "sensitivity": "search.sensitivity", "eval_images": "search.eval_images", "ptq": "quant.ptq",
    "backend": "quant.backend", "max_drop": "search.max_drop", "confidence": "search.confidence",
    "tolerances": "search.tolerances",
    "workers": "run.workers", "threads": "run.torch_threads", "ray_address": "run.ray_address",
    "cpus_per_worker": "run.cpus_per_worker", "ray_dashboard": "run.ray_dashboard",
    "storage": "run.storage", "out_dir": "run.out_dir",
}


def _setting(text: str) -> tuple[str, Any]:
    """``FIELD=VALUE`` of --set; the value is read as YAML (numbers, true/false, null, [lists])."""
    import yaml

    field, sep, value = text.partition("=")
    if not sep or not field.strip():
        raise UserError(f"--set {text!r}: write FIELD=VALUE, e.g. --set search.ilp_seeds=6")
    try:
        return field.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise UserError(f"--set {text!r}: the value is not valid YAML") from None


def _max_drop(text: str) -> Any:
    """--max-drop PP: a number (checked by the config: finite, 0 to 100) or none."""
    if text.strip().lower() in ("none", "null", "off"):
        return _NO_FLOOR
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected percentage points (e.g. 2) or none, got {text!r}") from None


class _NoFloor:
    """--max-drop none: sets search.max_drop to null (a flag left unset is None and sets nothing)."""


_NO_FLOOR = _NoFloor()


def study_configs(args: argparse.Namespace) -> list[Any]:
    """One StudyConfig per seed (``--seeds``, else the config's seed), folders defaulting to studies/<name>."""
    from mpsearch.config import StudyConfig, with_overrides

    base = StudyConfig.load(args.config) if args.config else StudyConfig()
    overrides: dict[str, Any] = {}
    for dest, field in _OPTIMIZE_FIELDS.items():
        value = getattr(args, dest)
        if value is not None:
            if dest == "objectives":
                value = [o.strip() for o in value.split(",") if o.strip()]
            if dest == "tolerances":
                value = list(float_list(value, "--tolerances"))
            overrides[field] = None if value is _NO_FLOOR else value
    overrides.update(_setting(text) for text in args.set or ())
    config = with_overrides(base, overrides)
    seeds = [config.seed] if args.seeds is None else list(int_list(args.seeds, "--seeds"))
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {args.seeds!r}: each seed once, e.g. 0,1,2")
    configs = []
    for seed in seeds:
        one = with_overrides(config, {"seed": seed, "name": f"{config.name}-s{seed}" if config.name and len(seeds) > 1 else config.name})
        if one.run.out_dir is None:
            one = with_overrides(one, {"run.out_dir": str(STUDIES / one.study_name)})
        elif len(seeds) > 1:  # one folder per seed, inside the folder given
            one = with_overrides(one, {"run.out_dir": str(Path(one.run.out_dir) / one.study_name)})
        configs.append(one)
    return configs


def optimize(args: argparse.Namespace) -> int:
    from mpsearch.objectives import floor_text
    from mpsearch.study import run_study
    from mpsearch.study.compare import seed_summary
    from mpsearch.study.report import answers_text

    results = []
    for config in study_configs(args):
        results.append(run_study(config, progress=not args.no_progress))
        r = results[-1]
        print(f"study {r.name}: {len(r.trials)} trials, {len(r.front)} Pareto point{'s' if len(r.front) != 1 else ''}, "
              f"hypervolume {r.hypervolume:.4f}, {r.wall_s / 60:.1f} min -> {r.out_dir}")
        if (r.out_dir / "compare.md").exists():
            print((r.out_dir / "compare.md").read_text())
        print(answers_text(r))
        cols = [c for c in ("trial", "policy", "test_accuracy", "test_drop_pp", "within_floor", "qat_test_accuracy",
                            "qat_test_drop_pp", r.cost_column, "onnx_mib") if c in r.front]
        cols += [c for c in r.front if c.startswith(("latency_b", "speedup_b"))]
        print(f"\nthe re-measured front (test split, {floor_text(r.config.search.max_drop)}):")
        print(r.front[cols].to_string(index=False))
    if len(results) > 1:
        print(f"over {len(results)} seeds (mean, std):")
        print(seed_summary(results).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


def study_folder(study: str) -> Path:
    """A study's folder: the path given, else ``studies/<name>``."""
    path = Path(study)
    return path if path.is_dir() else STUDIES / study


def dashboard(args: argparse.Namespace) -> int:
    from mpsearch.config import StudyConfig

    folder = study_folder(args.study)
    if not (folder / "config.yaml").is_file():
        raise UserError(f"no finished study in {folder}; run `mpsearch optimize` for it first, or pass its folder")
    from mpsearch.study.storage import open_storage, shown_url

    storage = StudyConfig.load(folder / "config.yaml").run.storage
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise UserError("optuna-dashboard is not installed; pip install 'mpsearch[dashboard]' (or optuna-dashboard)") from None
    logger.info(f"optuna-dashboard on http://{args.host}:{args.port} for {shown_url(storage)} (Ctrl-C to stop)")
    run_server(open_storage(storage), host=args.host, port=args.port)
    return 0


def _add_optimize(sub: Any, name: str, help: str, algorithm_help: str) -> None:
    o = sub.add_parser(name, help=help)
    o.add_argument("--config", default=None, metavar="YAML", help="study config file (studies/*.yaml); the flags below override it")
    o.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="set any config field (repeatable), e.g. --set search.ilp_seeds=6")
    o.add_argument("--model", default=None, help="timm model name or alias (default resnet18)")
    o.add_argument("--dataset", default=None, help="fashion-mnist (default), digits, cifar10, cifar100 or imagefolder:PATH")
    add_image_size(o)
    o.add_argument("--checkpoint", default=None, help="fp32 state dict to quantize instead of the cached/trained baseline")
    o.add_argument("--allow-weak-baseline", action="store_true", default=None,
                   help="search a baseline within 10 points of chance accuracy (refused otherwise)")
    o.add_argument("--seed", type=int, default=None, help="seeds calibration, quantizers and search (default 0)")
    o.add_argument("--seeds", default=None, help="one study per seed, comma separated (e.g. 0,1,2), and their mean and spread")
    o.add_argument("--algorithm", default=COMPARE_METHODS if name == "compare" else None, help=algorithm_help)
    o.add_argument("--budget", type=int, default=None, help="trials per method (default 200)")
    o.add_argument("--population", type=int, default=None, help="population / batch size per generation (default 20)")
    o.add_argument("--objectives", default=None, help="accuracy plus any of energy, size, bops, latency (measured in onnxruntime), "
                                                           "energy@PROFILE (default accuracy,energy)")
    o.add_argument("--energy-profile", default=None, help="energy profile the search optimises (default horowitz45nm)")
    o.add_argument("--space", default=None, help="search space YAML path or name in search_spaces/ (default: by model family)")
    o.add_argument("--sensitivity", default=None, help="estimator seeding the search: hessian (default), empirical, "
                                                       "attention-ranking (ViTs), none")
    o.add_argument("--ptq", default=None, help="how weights are rounded: rtn (default), gptq, adaround, brecq")
    o.add_argument("--eval-images", type=int, default=None, help="validation images per trial (default 400)")
    o.add_argument("--backend", default=None, choices=("auto", "fake", "int8"),
                   help="what runs each candidate: int8 kernels (VNNI/AMX), fake quantization in float32, or auto "
                        "(default: int8 where the CPU has int8 dot products)")
    o.add_argument("--max-drop", type=_max_drop, default=None, metavar="PP",
                   help="accuracy floor: candidates more than PP points below fp32 on the validation images are "
                        "infeasible, never on the front, re-measured or picked (default 5; none: no floor)")
    a = o.add_argument_group("answers (chosen on validation images the search did not use; may change when a study resumes)")
    a.add_argument("--tolerances", default=None, metavar="PP,PP",
                   help="the answers' tolerances: the cheapest point proven within each, in points below fp32 "
                        "(default 0.5,1,2, those within the floor)")
    a.add_argument("--confidence", type=float, default=None,
                   help="the probability each answer holds (default 0.95)")
    r = o.add_argument_group("where it runs (run: fields; may change when a study resumes)")
    r.add_argument("--workers", type=int, default=None, help="Ray workers (default -1: one per core, or as many as the "
                                                             "cluster's CPUs hold; 0: in this process)")
    r.add_argument("--threads", type=int, default=None, help="torch threads per worker (default 1; fixed so results do not "
                                                             "depend on --workers)")
    r.add_argument("--ray-address", default=None, help="join a running Ray cluster (HEAD_IP:6379, or auto; default: "
                                                       "$RAY_ADDRESS, else a private Ray on 127.0.0.1)")
    r.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs each Ray worker reserves (default --threads)")
    r.add_argument("--ray-dashboard", action="store_true", default=None,
                   help="start the private Ray instance's dashboard on 127.0.0.1 (needs mpsearch[cluster])")
    r.add_argument("--storage", default=None, help="Optuna storage: a URL (sqlite:///, postgresql://, mysql://) or "
                                                   "journal:PATH (default sqlite:///<out-dir>/study.db)")
    o.add_argument("--name", default=None, help="study name (default <model>-<dataset>-<algorithm>-s<seed>)")
    o.add_argument("--out-dir", default=None, help="folder for the study's files (default studies/<name>)")
    add_progress(o)
    o.set_defaults(handler=optimize)


def register(sub: Any) -> None:
    """Add these commands' parsers to ``sub`` (argparse sub-parsers)."""
    methods = ("nsga2 (pymoo), optuna-nsga2, optuna-tpe, random, ilp (HAWQ-V3 integer program), greedy (AIMET-style); "
               "NAME+mf adds multi-fidelity promotions; several, comma separated, run into one study and are compared")
    _add_optimize(sub, "optimize", "search per-layer bit widths: a measured accuracy-energy Pareto set",
                  f"search method (default nsga2): {methods}")
    _add_optimize(sub, "compare", "optimize with several methods on one study: hypervolume per method, one plot",
                  f"methods, comma separated (default {COMPARE_METHODS}): {methods}")

    d = sub.add_parser("dashboard", help="open optuna-dashboard on a study")
    d.add_argument("--study", required=True, help="the study's folder, or its name under studies/")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8080)
    d.set_defaults(handler=dashboard)
