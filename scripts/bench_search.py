"""Does a search beat a rule? Every method on one study per seed, scored on what it measured.
(With --backends: does the int8 evaluation backend find the front fake quantization finds, and how
much sooner? One method, one study per backend and seed, one table.)

    python scripts/bench_search.py [--model resnet18] [--budget 200] [--seeds 0,1,2]
                                   [--methods nsga2+mf,random,ilp,greedy] [--markdown FILE] [--plot FILE]
    python scripts/bench_search.py --methods nsga2+mf --backends fake,int8 [--markdown FILE]

Per seed, one study (`mpsearch compare`) runs every method with the same budget (full evaluations
on the search subset; a multi-fidelity candidate counts the images it used) and the same
validation subset. Every method measures the uniform policies first; the population searches
also start from the HAWQ-V3 ILP's solutions at 12 energy budgets (StudyConfig.ilp_seeds), random
search does not (it would measure the seeds, not random search); NSGA-II also gives 4 offspring
of each later generation to ILP solutions in the widest gaps of its measured front
(search.ilp_gap_plans). Each method is scored by the hypervolume of its measured front
(1 - accuracy, relative energy) against three reference points: the study's own, 0 % accuracy at
the costliest policy of the search space (mpsearch.objectives.hypervolume_reference; what
`mpsearch compare` reports), (1, 1), i.e. 0 % accuracy at fp32 energy, and the useful region
around W8A8; and by whether that front strictly dominates every uniform policy. The
first method's hypervolume minus each other's
comes with a 95 % paired bootstrap interval over the search subset's images (every trial keeps
which images it got right). Every method's front is also re-measured on the first 1000 test
images (--heldout-images), which no method saw, and scored there the same ways: on the search
subset, a method that measures more policies near the top of the front draws a luckier best
accuracy (the winner's curse), and at reference (1, 1) the best accuracy weighs on most of the
volume. The Pareto re-measurement on the full splits is skipped (it does not depend on the
method). Then, on the first seed's study:

- proxy validation: Kendall tau between each sensitivity proxy's predicted ordering of the
  measured trials and their measured accuracy;
- the evaluation-cost ratio of the activation-prefix cache: the first trials of nsga2+mf and of
  ilp re-measured in the order they ran (one torch thread, like a worker), with the cache over
  without it.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mpsearch.config import SearchConfig, StudyConfig, with_overrides
from mpsearch.evaluation.multi_fidelity import rungs
from mpsearch.host.machine import describe_machine
from mpsearch.objectives import full_fidelity, objective_matrix
from mpsearch.study import SearchResult, Subject, load_result, run_study
from mpsearch.study.compare import method_scores, paired_hypervolume_difference, plot_methods, proxy_kendall

# Each method's front is scored against three references, all shared by every method of a study:
# the study's own (0 % accuracy at the costliest policy of the search space, see
# mpsearch.objectives.hypervolume_reference), fp32's (1, 1), and the useful region around W8A8.
REFERENCES = {
    "space": "space reference (0 % accuracy at the search space's costliest policy)",
    "fp32": "reference (1, 1) (0 % accuracy at fp32 energy)",
    "useful": "useful region (at most 5 pp below and no costlier than W8A8)",
}


def study_evaluator(result: SearchResult, *, prefix_cache: bool = True):
    """An evaluator measuring the way ``result``'s study did: its baseline, calibration draw and quantizer settings."""
    from mpsearch.evaluation.evaluator import Evaluator

    subject = Subject.resolve(result.config)
    ev = Evaluator(subject.baseline, subject.data, quant=result.config.quant, prefix_cache=prefix_cache)
    ev.calibrate()
    return ev


def w8a8_reference(accuracy: float, energy: float) -> np.ndarray:
    """The useful-region reference from W8A8's accuracy and energy: at most 5 pp less accurate and
    no costlier. The reference (1, 1) also counts policies at chance accuracy, which compresses
    differences between fronts that agree on everything outside the useful region."""
    return np.array([1.0 - accuracy + 0.05, energy])


def useful_region(trials) -> np.ndarray:
    """A second hypervolume reference, same for every method of a study: :func:`w8a8_reference`
    of uniform W8A8 as measured in the study (every method measures it first)."""
    ok = full_fidelity(trials)
    w8a8 = ok[ok["attr_method"].astype(str) == "uniform:w8a8"].iloc[0]
    return w8a8_reference(float(w8a8["value_accuracy"]), float(w8a8["value_energy"]))


def paired_text(trials, lead: str, other: str, config: StudyConfig, ref) -> str:
    """HV(lead) - HV(other) and its paired bootstrap interval, as printed."""
    return "{:+.4f} [{:+.4f}, {:+.4f}]".format(
        *paired_hypervolume_difference(trials, lead, other, config.search.objectives, ref, seed=config.seed))


def seeds_only(trials, method: str, objectives: tuple[str, ...], ref: np.ndarray) -> float:
    """Hypervolume, reference ``ref``, of ``method``'s seed policies alone (the uniform policies and
    the ILP solutions it started from, as measured): what the search added is its final volume
    minus this."""
    from mpsearch.algorithms.pareto import hypervolume, non_dominated

    ok = full_fidelity(trials)
    kind = ok["attr_method"].astype(str)
    first = ok[(ok["attr_run"].astype(str) == method) & (kind.str.startswith("uniform:") | kind.str.startswith("ilp:"))]
    F = objective_matrix(first, objectives)
    return hypervolume(F[non_dominated(F)], ref) if len(F) else 0.0


def volume_bound(trials, ref: np.ndarray) -> float:
    """Hypervolume, reference ``ref``, of one point holding the best accuracy any trial of the
    study measured at the lowest relative energy any trial measured: no front of measured points
    can exceed it (the ILP measures the cheapest policy of the space, at its smallest budget)."""
    ok = full_fidelity(trials)
    best_error, least_energy = 1.0 - float(ok["value_accuracy"].max()), float(ok["value_energy"].min())
    return max(0.0, float(ref[0]) - best_error) * max(0.0, float(ref[1]) - least_energy)


def mean_std(values: list[float], fmt: str = ".4f") -> str:
    spread = f" ± {statistics.stdev(values):{fmt}}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):{fmt}}{spread}"


def proxy_table(result: SearchResult) -> list[tuple[str, float, float, int]]:
    """Kendall tau of the hessian and empirical proxies over the study's full-fidelity trials."""
    import torch

    from mpsearch.sensitivity import SensitivityConfig, compute_sensitivity

    config, trials = result.config, result.trials
    ev = study_evaluator(result)
    # the searched layers in gene order, as the study asked for them (so the study's Hessian comes from the cache)
    layers = [c[len("param_w:"):] for c in trials.columns if c.startswith("param_w:")]
    ok = full_fidelity(trials)
    rows = []
    torch.set_num_threads(2)
    hessian = {"batches": config.search.sensitivity_batches, "max_probes": config.search.sensitivity_probes}
    for estimator, extra in (("hessian", hessian), ("empirical", {})):
        scfg = SensitivityConfig(estimator=estimator, bits=(2, 3, 4, 5, 6, 8), seed=config.seed, **extra)
        df = compute_sensitivity(ev.baseline.model, layers, ev.data.calibration, scfg, quant=config.quant,
                                 checkpoint_sha256=ev.baseline.sha256, progress=False)
        scores = {(str(n), int(b)): float(s) for n, b, s in df[["layer", "bits", "score"]].itertuples(index=False)}
        rows.append((estimator, *proxy_kendall(ok, scores)))
    return rows


def heldout_trials(result: SearchResult, methods: list[str], images: int):
    """Each method's front (full fidelity, search subset) re-measured on the first ``images`` test
    images, as trial rows (run, energy, accuracy, per-image mask) that :func:`method_scores` and
    :func:`paired_hypervolume_difference` score like the study's, and the useful-region reference
    with W8A8 measured on the same images. The search picked its front on
    the search subset, whose noise favours the method that measured more policies near its best
    accuracy (the winner's curse); images no method saw score every front without that bias."""
    import torch

    from mpsearch.algorithms.pareto import non_dominated
    from mpsearch.evaluation.multi_fidelity import pack_mask

    torch.set_num_threads(2)
    objectives = result.config.search.objectives
    ev = study_evaluator(result)
    ok = full_fidelity(result.trials)
    measured: dict[str, torch.Tensor] = {}  # a policy two methods share is measured once

    def mask_of(row) -> torch.Tensor:
        key = row["attr_layers"]
        if key not in measured:
            measured[key] = ev.quantized_mask(result.trial_policy(int(row["trial"])), "test", limit=images)
        return measured[key]

    rows = []
    for method in methods:
        mine = ok[ok["attr_run"].astype(str) == method]
        for _, row in mine.iloc[non_dominated(objective_matrix(mine, objectives))].iterrows():
            mask = mask_of(row)
            rows.append({"state": "COMPLETE", "attr_run": method, "attr_method": row["attr_method"], "attr_fidelity": 1.0,
                         "attr_images": len(mask), "attr_mask": pack_mask(mask), "value_accuracy": float(mask.float().mean()),
                         **{f"value_{name}": row[f"value_{name}"] for name in objectives[1:]}})
    w8a8 = ok[ok["attr_method"].astype(str) == "uniform:w8a8"].iloc[0]
    return pd.DataFrame(rows), w8a8_reference(float(mask_of(w8a8).float().mean()), float(w8a8["value_energy"]))


def cache_ratio(result: SearchResult, limit: int, method: str) -> tuple[float, float, int, float]:
    """(seconds with the cache, seconds without, policies, stages reused / stages in all) for the
    first ``limit`` trials of ``method``, re-measured in the order they ran."""
    import torch

    torch.set_num_threads(result.config.run.torch_threads)
    run = result.trials[result.trials["attr_run"] == method].head(limit)
    policies = [result.trial_policy(int(t)) for t in run["trial"]]
    seconds = {}
    for cached in (False, True):
        ev = study_evaluator(result, prefix_cache=cached)
        for p in policies:  # weights quantized outside the timed region: both runs see a warm weight cache
            ev.qmodel.apply(p)
        start = time.perf_counter()
        for p, (_, row) in zip(policies, run.iterrows()):
            ev.quantized_mask(p, "val", limit=int(row["attr_images"]))
        seconds[cached] = time.perf_counter() - start
        if cached:
            reuse = ev.prefix_cache.stages_reused / max(1, ev.prefix_cache.stages_reused + ev.prefix_cache.stages_run)
    return seconds[True], seconds[False], len(policies), reuse


def compare_backends(args: argparse.Namespace, checkpoint: str | None, machine: str) -> str:
    """One study per (backend, seed) with ``args.methods`` and no re-measurement; one table of the
    hypervolume at the study's reference (the search space's, the same for every backend) and the
    wall time of the search, and whether each backend's mean lies within the seed-to-seed spread
    of the first one's."""
    backends, seeds = args.backends.split(","), [int(s) for s in args.seeds.split(",")]
    rows: dict[str, list[tuple[float, float, float, int]]] = {}
    for backend in backends:
        for seed in seeds:
            name = f"bench-{args.model}-b{args.budget}-s{seed}-{backend}"
            folder = Path(args.out_dir) / name
            if args.rescore:
                result = load_result(folder)
            else:
                config = with_overrides(StudyConfig(), {
                    "name": name, "model": args.model, "dataset": args.dataset, "seed": seed, "checkpoint": checkpoint,
                    "search.budget": args.budget, "search.algorithm": args.methods, "search.max_drop": args.max_drop,
                    "search.population_size": args.population, "search.eval_images": args.eval_images,
                    "quant.backend": backend, "run.workers": args.workers, "run.out_dir": str(folder)})
                if folder.exists():
                    shutil.rmtree(folder)
                result = run_study(config, remeasure=False)
            integer = result.trials["attr_integer_layers"].astype(float).mean() if "attr_integer_layers" in result.trials else 0.0
            rows.setdefault(backend, []).append((result.hypervolume, result.phases.get("search", float("nan")),
                                                 result.wall_s, integer))
            print(f"{backend} seed {seed}: hypervolume {result.hypervolume:.4f}, search {result.phases.get('search', 0) / 60:.1f} min",
                  flush=True)
    first = backends[0]
    hv_first = [r[0] for r in rows[first]]
    lines = [
        f"{args.model} on {args.dataset}: {args.methods}, budget {args.budget} ({args.eval_images} validation images per "
        f"trial), population {args.population}, seeds {args.seeds}, {args.workers} worker(s) (-1: one per core) x 1 torch "
        "thread; hypervolume of the measured front at the study's reference (0 % accuracy at the search space's costliest "
        "policy; 1 - accuracy and relative energy, horowitz45nm). Mean ± std over seeds; no re-measurement.",
        "",
        "| backend | hypervolume | per seed | search wall time | study wall time | layers on integer kernels (mean per trial) |",
        "|---|---|---|---|---|---|",
    ]
    for backend in backends:
        r = rows[backend]
        lines.append(f"| {backend} | {mean_std([x[0] for x in r])} | {', '.join(f'{x[0]:.4f}' for x in r)} | "
                     f"{mean_std([x[1] / 60 for x in r], '.1f')} min | {mean_std([x[2] / 60 for x in r], '.1f')} min | "
                     f"{statistics.fmean(x[3] for x in r):.1f} |")
    lines.append("")
    for backend in backends[1:]:
        hv = statistics.fmean(x[0] for x in rows[backend])
        low, high = min(hv_first), max(hv_first)
        spread = statistics.stdev(hv_first) if len(hv_first) > 1 else 0.0
        lines.append(f"- {backend}: mean hypervolume {hv:.4f} vs {first} {statistics.fmean(hv_first):.4f} ± {spread:.4f} "
                     f"(seeds {low:.4f} to {high:.4f}); difference {hv - statistics.fmean(hv_first):+.4f}, "
                     + ("within" if low <= hv <= high or abs(hv - statistics.fmean(hv_first)) <= spread else "outside")
                     + f" the seed-to-seed spread of {first}; search {statistics.fmean(x[1] for x in rows[backend]) / 60:.1f} "
                     f"min vs {statistics.fmean(x[1] for x in rows[first]) / 60:.1f} min")
    lines += ["", f"Measured by `python scripts/bench_search.py --methods {args.methods} --backends {args.backends}` on {machine}."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--budget", type=int, default=200)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default="nsga2+mf,random,ilp,greedy")
    ap.add_argument("--population", type=int, default=20)
    ap.add_argument("--eval-images", type=int, default=SearchConfig().eval_images)
    ap.add_argument("--max-drop", type=lambda t: None if t.lower() == "none" else float(t), default=None,
                    help="the studies' accuracy floor in pp (default none: methods are compared on whole fronts)")
    ap.add_argument("--workers", type=int, default=-1)
    ap.add_argument("--cache-policies", type=int, default=40, help="policies re-measured per method for the prefix-cache ratio")
    ap.add_argument("--heldout-images", type=int, default=1000,
                    help="re-measure each method's front on this many test images and score it there too (0: skip)")
    ap.add_argument("--cache-methods", default="nsga2+mf,ilp", help="methods whose trials the prefix-cache ratio replays")
    ap.add_argument("--out-dir", default="studies/bench-search", help="folder of the benchmark's study folders (replaced)")
    ap.add_argument("--markdown", default=None, help="also write the result tables to this Markdown file")
    ap.add_argument("--plot", default=None, help="also write the first seed's fronts to this PNG")
    ap.add_argument("--rescore", action="store_true", help="score the studies in --out-dir again instead of running them")
    ap.add_argument("--backends", default=None,
                    help="instead of comparing methods: run --methods with each of these evaluation backends (e.g. "
                         "fake,int8) per seed and print one table of their hypervolumes and wall times")
    ap.add_argument("--checkpoint", default=None,
                    help="fp32 baseline every seed's study quantizes (default: the cached seed-0 baseline; the seeds vary "
                         "calibration and search, not the trained model)")
    args = ap.parse_args()

    machine = describe_machine()  # before the studies pin this process to their per-worker threads
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    checkpoint = args.checkpoint
    if checkpoint is None and not args.rescore:
        from mpsearch.data import load_dataset
        from mpsearch.models.zoo import get_baseline

        checkpoint = str(get_baseline(args.model, load_dataset(args.dataset), seed=0).checkpoint)
    if args.backends:
        text = compare_backends(args, checkpoint, machine)
        print()
        print(text)
        if args.markdown:
            Path(args.markdown).write_text(text + "\n")
        return
    per_seed = []
    studies = []
    space_refs = []
    for seed in seeds:
        name = f"bench-{args.model}-b{args.budget}-s{seed}"
        folder = Path(args.out_dir) / name
        start = time.perf_counter()
        if args.rescore:  # score the studies a previous run measured, without measuring again
            result = load_result(folder)
        else:
            config = with_overrides(StudyConfig(), {
                "name": name, "model": args.model, "dataset": args.dataset, "seed": seed, "checkpoint": checkpoint,
                "search.budget": args.budget, "search.algorithm": args.methods, "search.population_size": args.population,
                "search.eval_images": args.eval_images, "search.max_drop": args.max_drop, "run.workers": args.workers,
                "run.out_dir": str(folder)})
            if folder.exists():  # the benchmark owns its folder: always a fresh study
                shutil.rmtree(folder)
            result = run_study(config, remeasure=False)
        config, trials, space_ref = result.config, result.trials, np.asarray(result.ref_point)
        objectives = config.search.objectives
        refs = {"space": space_ref, "fp32": np.ones(len(objectives)), "useful": useful_region(trials)}
        floor = config.search.max_drop
        scores = method_scores(trials, objectives, refs["space"], floor).set_index("method")
        lead = methods[0]
        for name, ref in refs.items():
            scores[f"hv_{name}"] = method_scores(trials, objectives, ref, floor).set_index("method")["hypervolume"]
            scores[f"hv_seeds_{name}"] = [seeds_only(trials, m, objectives, ref) for m in scores.index]
            scores[f"hv_bound_{name}"] = volume_bound(trials, ref)
            for other in methods[1:]:  # is the lead's margin more than the draw of the search subset's images?
                try:
                    scores.loc[other, f"paired_{name}"] = paired_text(trials, lead, other, config, ref)
                except ValueError:  # --rescore of a study recorded before every trial kept its mask
                    scores.loc[other, f"paired_{name}"] = "n/a (no per-image masks)"
        if args.heldout_images:
            held, held_useful = heldout_trials(result, methods, args.heldout_images)
            for name, ref in dict(refs, useful=held_useful).items():
                scores[f"test_{name}"] = method_scores(held, objectives, ref).set_index("method")["hypervolume"]
                for other in methods[1:]:
                    scores.loc[other, f"paired_test_{name}"] = paired_text(held, lead, other, config, ref)
        per_seed.append(scores)
        studies.append(result)
        space_refs.append(space_ref)
        print(f"seed {seed} ({(time.perf_counter() - start) / 60:.1f} min): " + ", ".join(
            f"{m} {scores.loc[m, 'hypervolume']:.4f}" for m in methods), flush=True)

    uniform_cols = [c for c in per_seed[0].columns if c.startswith("dominates_")]
    ladder = "/".join(map(str, rungs(min(SearchConfig().multi_fidelity_images, args.eval_images), args.eval_images)))
    space_energy = mean_std([100 * float(ref[1]) for ref in space_refs], ".1f")
    lines = [
        f"{args.model} on {args.dataset}: budget {args.budget} full evaluations per method ({args.eval_images} validation "
        f"images each; multi-fidelity rungs {ladder}), population {args.population}, seeds {args.seeds}; objectives "
        "1 - accuracy and relative energy (horowitz45nm). Hypervolume references: the study's own, 0 % accuracy at the "
        f"costliest policy of the search space ({space_energy} % of fp32 energy; what `mpsearch compare` reports); "
        "(1, 1), 0 % accuracy at fp32 energy; and the useful region, at most 5 pp below and no costlier than W8A8 as "
        "measured. Mean ± std over seeds.",
        "",
        "| method | hypervolume, space reference | vs random | hypervolume, ref (1, 1) | vs random | "
        "hypervolume, useful region | vs random | front size | candidates measured | evaluations used | best accuracy | "
        "front dominates every uniform policy | evaluation time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio_text(m: str, key: str) -> str:
        if "random" not in methods:
            return "-"
        return mean_std([s.loc[m, key] / s.loc["random", key] for s in per_seed], ".3f")

    for m in methods:
        cells = [f"{mean_std([s.loc[m, f'hv_{name}'] for s in per_seed], '.5f' if name == 'useful' else '.4f')} | "
                 f"{ratio_text(m, f'hv_{name}')}" for name in REFERENCES]
        beats = sum(all(bool(s.loc[m, c]) for c in uniform_cols) for s in per_seed)
        wall = [float(r.trials[r.trials["attr_run"] == m]["attr_wall_s"].sum()) / 60 for r in studies]
        lines.append(
            f"| {m} | {' | '.join(cells)} | "
            f"{mean_std([float(s.loc[m, 'front']) for s in per_seed], '.1f')} | "
            f"{mean_std([float(s.loc[m, 'candidates']) for s in per_seed], '.0f')} | "
            f"{mean_std([float(s.loc[m, 'evaluations']) for s in per_seed], '.0f')} | "
            f"{mean_std([100 * float(s.loc[m, 'best_accuracy']) for s in per_seed], '.2f')}% | {beats}/{len(per_seed)} seeds | "
            f"{mean_std(wall, '.1f')} min |")
    lead = methods[0]
    checks = []
    if "random" in methods:
        for name, label in REFERENCES.items():
            ratios = [s.loc[lead, f"hv_{name}"] / s.loc["random", f"hv_{name}"] for s in per_seed]
            bound = [s.loc[lead, f"hv_bound_{name}"] / s.loc["random", f"hv_{name}"] for s in per_seed]
            checks.append(f"HV({lead}) / HV(random), {label}: {mean_std(ratios, '.3f')}; ceiling (the best "
                          f"measured accuracy at the cheapest measured energy): {mean_std(bound, '.3f')} x HV(random)")
    for name in ("space", "fp32"):
        seeded = [(s.loc[lead, f"hv_{name}"], s.loc[lead, f"hv_seeds_{name}"]) for s in per_seed]
        checks.append(f"{lead}'s seed policies alone (uniform policies and ILP solutions, as measured), {REFERENCES[name]}: "
                      f"hypervolume {mean_std([b for _, b in seeded])}; the search after it: {mean_std([a for a, _ in seeded])}")
    if "ilp" in methods:
        ahead = {name: sum(s.loc[lead, f"hv_{name}"] >= s.loc["ilp", f"hv_{name}"] for s in per_seed) for name in REFERENCES}
        checks.append(f"HV({lead}) >= HV(ilp) on " + ", ".join(
            f"{k}/{len(per_seed)} seeds ({name} reference)" for name, k in ahead.items()))
    for other in methods[1:]:
        for name, label in REFERENCES.items():
            checks.append(f"HV({lead}) - HV({other}), {label}, with a 95 % paired bootstrap interval over the "
                          f"{args.eval_images} images: " + "; ".join(
                              f"seed {seed} {s.loc[other, f'paired_{name}']}" for seed, s in zip(seeds, per_seed)))
    if args.heldout_images:
        for name, label in REFERENCES.items():
            label += ", W8A8 measured on them" if name == "useful" else ""
            lines_hv = ", ".join(f"{m} {mean_std([s.loc[m, f'test_{name}'] for s in per_seed], '.5f')}" for m in methods)
            checks.append(f"fronts re-measured on {args.heldout_images} test images, {label}: hypervolume {lines_hv}")
            for other in methods[1:]:
                ahead = sum(s.loc[lead, f"test_{name}"] >= s.loc[other, f"test_{name}"] for s in per_seed)
                checks.append(f"  HV({lead}) - HV({other}) there, 95 % paired bootstrap interval over those images: " + "; ".join(
                    f"seed {seed} {s.loc[other, f'paired_test_{name}']}" for seed, s in zip(seeds, per_seed))
                    + f" ({lead} ahead on {ahead}/{len(per_seed)} seeds)")
    dominated = [all(bool(s.loc[lead, c]) for c in uniform_cols) for s in per_seed]
    checks.append(f"{lead}'s front dominates every uniform policy ({', '.join(c.split('_', 1)[1] for c in uniform_cols)}) "
                  f"on {sum(dominated)}/{len(dominated)} seeds")

    first = studies[0]
    config0, trials0 = first.config, first.trials
    for method in [m for m in args.cache_methods.split(",") if m in methods]:
        with_cache, without, n, reuse = cache_ratio(first, args.cache_policies, method)
        checks.append(f"evaluation-cost ratio with the activation-prefix cache, {method}: {with_cache / without:.3f} "
                      f"({with_cache:.1f} s vs {without:.1f} s for its first {n} trials of seed {seeds[0]}, "
                      f"in the order they ran, one torch thread; {100 * reuse:.0f} % of stage passes reused)")
    proxies = proxy_table(first)
    lines += ["", *[f"- {c}" for c in checks], "",
              f"Sensitivity proxies against the {len(full_fidelity(trials0))} full-fidelity trials of seed {seeds[0]} "
              "(Kendall tau-b between minus the summed per-layer weight scores and measured accuracy):", "",
              "| proxy | Kendall tau | p-value | trials |", "|---|---|---|---|",
              *[f"| {name} | {tau:.3f} | {p:.2g} | {k} |" for name, tau, p, k in proxies],
              "", f"Measured by `python scripts/bench_search.py` on {machine}; each evaluation on a worker with one torch thread."]
    text = "\n".join(lines)
    print()
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.plot:
        plot_methods(trials0, config0, Path(args.plot),
                     title=f"{args.model} on {args.dataset}: measured fronts, budget {args.budget}, seed {seeds[0]}")


if __name__ == "__main__":
    main()
