"""Do the answers hold? The main command on several seeds; each answer's promise against the test split.

    python scripts/bench_answers.py [--model resnet18] [--dataset fashion-mnist] [--budget 200] [--seeds 0,1,2]
                                    [--variant nsga2] [--variant "nsga2+mf --eval-images 1600 --set search.multi_fidelity_images=400"]
                                    [--markdown docs/answers_bench.md] [--out studies/bench-answers]

Each variant is a set of extra `mpsearch optimize` flags (the first is the main command itself:
`mpsearch optimize --model resnet18 --budget 200`, a variant's first word the algorithm). Every
(variant, seed) study runs as a user runs it, in a subprocess, with the cached baseline; a study
already finished in --out is read back, not run again. For each answer (the knee and the cheapest
point within each tolerance) the table gives what it was chosen on (the validation images, the
drop measured there and its lower confidence bound) and what it gives on the 10,000 test images.
Per study: wall time by phase, the images the search measured and those the answer rule took
(what a variant costs, whatever else the machine runs), the end phase (choosing the answers and
measuring the front on test) over the search, and the hypervolume of the front as measured on
test (1 - test accuracy and relative energy, against the study's reference point).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mpsearch.algorithms.pareto import hypervolume, non_dominated
from mpsearch.host.machine import describe_machine
from mpsearch.study import SearchResult, load_result

TOLERANCE_SLACK_PP = 0.3  # "holds within the tolerance plus this" (the test split's own noise is ~0.2 pp)


def cpu_features() -> str:
    """What the CPU offers the kernels: torch's vector capability and whether int8 dot products exist."""
    import torch

    from mpsearch.quant.backends import int8_unavailable

    return f"{torch.backends.cpu.get_cpu_capability()}, " + ("int8 dot products (VNNI/AMX)" if int8_unavailable() is None
                                                           else "no int8 dot-product instructions")


def baseline_checkpoint(model: str, dataset: str) -> str:
    """The cached baseline's checkpoint (seed 0, what `mpsearch train --model M` leaves; trained now
    if missing): every seed's study searches the same model, only the search's seed changes."""
    from mpsearch.data import load_dataset
    from mpsearch.models.zoo import get_baseline

    return str(get_baseline(model, load_dataset(dataset), seed=0, progress=False).checkpoint)


def run_variant(model: str, dataset: str, budget: int, seed: int, flags: list[str], out: Path,
                checkpoint: str) -> tuple[SearchResult, float]:
    """The study of one (variant, seed): run with `mpsearch optimize` unless already finished in ``out``."""
    if (out / "study.json").is_file() and (out / "pareto.csv").is_file():
        result = load_result(out)
        return result, result.wall_s
    cmd = [sys.executable, "-m", "mpsearch.cli", "optimize", "--model", model, "--dataset", dataset, "--budget", str(budget),
           "--seed", str(seed), *(["--checkpoint", checkpoint] if seed else []),
           "--algorithm", flags[0], *flags[1:], "--out-dir", str(out), "--name", out.name, "--no-progress"]
    print("$", shlex.join(cmd[2:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return load_result(out), time.perf_counter() - start


def test_hypervolume(result: SearchResult) -> float:
    """Hypervolume of the front measured on test: (1 - test accuracy, relative cost) of every
    point measured there, against the study's reference point."""
    front = result.front
    F = np.stack([1 - front["test_accuracy"].to_numpy(dtype=float), front[result.cost_column].to_numpy(dtype=float)], axis=1)
    return hypervolume(F[non_dominated(F)], np.asarray(result.ref_point))


def answer_rows(result: SearchResult, variant: str, seed: int) -> list[dict]:
    rows = []
    for _, a in result.answers().iterrows():
        tolerance = float(a["answer"].split()[2]) if a["answer"].startswith("cheapest") else None
        row = {"variant": variant, "seed": seed, "answer": a["answer"], "tolerance_pp": tolerance}
        if pd.notna(a.get("trial")):
            row.update({"trial": int(a["trial"]), "val_images": int(a["val_images"]), "val_drop_pp": a["val_drop_pp"],
                        "bound_pp": a["val_drop_bound_pp"], "search_drop_pp": a["search_drop_pp"],
                        "test_drop_pp": a["test_drop_pp"], "test_drop_low_pp": a["test_drop_low_pp"],
                        "test_drop_high_pp": a["test_drop_high_pp"], "energy": a[result.cost_column]})
            if tolerance is not None:
                row["holds"] = bool(-a["test_drop_pp"] <= tolerance + 1e-9)
                row["holds_with_slack"] = bool(-a["test_drop_pp"] <= tolerance + TOLERANCE_SLACK_PP + 1e-9)
        rows.append(row)
    return rows


def study_row(result: SearchResult, variant: str, seed: int, wall: float) -> dict:
    phases = result.phases
    end = phases.get("remeasure", float("nan"))
    return {"variant": variant, "seed": seed, "trials": len(result.trials), "front_points": result.selection.get("front_points"),
            "measured_on_test": len(result.front), "wall_min": wall / 60, "search_min": phases.get("search", float("nan")) / 60,
            "end_min": end / 60, "end_over_search": end / phases["search"] if phases.get("search") else float("nan"),
            "search_images": int(result.trials["attr_images"].fillna(0).sum()),
            "answer_images": result.selection.get("measured_images"), "hypervolume_search": result.hypervolume,
            "hypervolume_test": test_hypervolume(result)}


def markdown(answers: pd.DataFrame, studies: pd.DataFrame, variants: dict[str, list[str]], args: argparse.Namespace,
             baseline: str) -> str:
    lines = ["# Do the answers hold?", "",
             f"`mpsearch optimize --model {args.model} --dataset {args.dataset} --budget {args.budget}` on each seed "
             "(the seed drives calibration and the search; one cached baseline for all), and each answer's promise "
             "against the test split. Holds: the test drop is within the tolerance; `within +0.3`: within the "
             "tolerance plus 0.3 pp (the test split's own noise). The end phase chooses the answers and measures the "
             "front on test. Baseline: " + baseline + ".", "",
             f"Measured with `python scripts/bench_answers.py --model {args.model} --dataset {args.dataset} --budget {args.budget} "
             f"--seeds {args.seeds}"
             + "".join(f" --variant {shlex.quote(' '.join(v))}" for v in variants.values()) + "`",
             f"on {describe_machine()} ({cpu_features()}).", ""]
    lines += ["### Answers: chosen on validation, measured on test", "",
              "| variant | seed | answer | trial | val images | val drop (pp) | bound (pp) | search's drop (pp) | test drop (pp, 95% CI) "
              "| energy | holds |", "|" + "---|" * 11]
    for _, r in answers.iterrows():
        if pd.isna(r.get("trial")):
            lines.append(f"| {r['variant']} | {r['seed']} | {r['answer']} | none | | | | | | | |")
            continue
        holds = "" if pd.isna(r.get("holds")) else ("yes" if r["holds"] else ("within +0.3" if r["holds_with_slack"] else "**no**"))
        lines.append(f"| {r['variant']} | {r['seed']} | {r['answer']} | {int(r['trial'])} | {int(r['val_images'])} | "
                     f"{r['val_drop_pp']:+.2f} | {r['bound_pp']:+.2f} | {r['search_drop_pp']:+.2f} | {r['test_drop_pp']:+.2f} "
                     f"({r['test_drop_low_pp']:+.2f} to {r['test_drop_high_pp']:+.2f}) | {100 * r['energy']:.2f} % | {holds} |")
    lines += ["", "### Per variant", "",
              "| variant | answers within tolerance | within tolerance + 0.3 pp | wall (min) | search (min) | images the search measured "
              "| images the answers took | end phase / search | hypervolume on test |", "|---|---|---|---|---|---|---|---|---|"]
    for variant in variants:
        a = answers[(answers["variant"] == variant) & answers["tolerance_pp"].notna()]
        given = a[a["trial"].notna()]
        given = given.reindex(columns=[*given.columns, *({"holds", "holds_with_slack"} - set(given.columns))])
        given = given.fillna({"holds": False, "holds_with_slack": False})
        s = studies[studies["variant"] == variant]
        lines.append(f"| {variant} | {int(given['holds'].sum())} of {len(a)} | {int(given['holds_with_slack'].sum())} of {len(a)} | "
                     f"{_mean_std(s['wall_min'], '.1f')} | {_mean_std(s['search_min'], '.1f')} | {_mean_std(s['search_images'], ',.0f')} | "
                     f"{_mean_std(s['answer_images'], ',.0f')} | {_mean_std(s['end_over_search'], '.2f')} | "
                     f"{_mean_std(s['hypervolume_test'], '.4f')} |")
    return "\n".join(lines) + "\n"


def _mean_std(values: pd.Series, fmt: str) -> str:
    values = [float(v) for v in values if v == v]
    if not values:
        return ""
    spread = f" ± {statistics.stdev(values):{fmt}}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):{fmt}}{spread}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--budget", type=int, default=200)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variant", action="append", default=None,
                   help="the algorithm and extra optimize flags of one variant (repeatable; default: nsga2)")
    p.add_argument("--out", default="studies/bench-answers", help="folder of the studies (one per variant and seed)")
    p.add_argument("--markdown", default=None, help="write the tables to this file")
    args = p.parse_args()
    variants = {v: shlex.split(v) for v in (args.variant or ["nsga2"])}
    answers, studies, fp32_test = [], [], []
    checkpoint = baseline_checkpoint(args.model, args.dataset)
    for variant, flags in variants.items():
        for seed in (int(s) for s in args.seeds.split(",")):
            name = f"{args.model}-{'_'.join(flags).replace('+', '-').replace('=', '-').replace('.', '')}-s{seed}"[:120]
            result, wall = run_variant(args.model, args.dataset, args.budget, seed, flags, Path(args.out) / name, checkpoint)
            answers += answer_rows(result, variant, seed)
            studies.append(study_row(result, variant, seed, wall))
            fp32_test.append(float(result.front["fp32_test_accuracy"].iloc[0]))
    answers_df, studies_df = pd.DataFrame(answers), pd.DataFrame(studies)
    pd.set_option("display.width", 200)
    print(answers_df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(studies_df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    baseline = f"{args.model} at {100 * fp32_test[0]:.2f} % test (the cached seed-0 checkpoint)"
    text = markdown(answers_df, studies_df, variants, args, baseline)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
