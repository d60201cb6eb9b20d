"""Search algorithms compared: hypervolume of each one's measured front, same budget, seed and
reference point, and whether that front dominates the uniform policies.

    python scripts/bench_search.py [--model resnet18] [--budget 200] [--seed 0] [--eval-images 400]
                                   [--algorithms nsga2,optuna-nsga2,optuna-tpe,random] [--markdown FILE]

Every algorithm runs a full `mpsearch optimize` search (same search space, same first population
of uniform and sensitivity-guided policies, same validation subset, every candidate measured)
and is scored on what it measured: the hypervolume of its non-dominated set of
(1 - accuracy, relative energy) against the reference point (1, 1), i.e. 0 % accuracy at fp32
energy. The uniform policies are measured in every study, so "dominates" is strict: another
policy of the front is at least as accurate and at most as costly, and better in one of the two.
The Pareto re-measurement on full splits is skipped here (it does not depend on the algorithm).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from mpsearch.config import StudyConfig
from mpsearch.machine import describe_machine
from mpsearch.search.pareto import dominates, hypervolume, non_dominated
from mpsearch.study import REF_POINT_PAD, optimize, study_dir


def score(trials, objectives: tuple[str, ...]) -> dict:
    """Hypervolume and uniform-policy dominance of one study's measured trials."""
    ok = trials[trials["state"] == "COMPLETE"]
    F = np.stack([1.0 - ok["value_accuracy"].to_numpy(dtype=float)]
                 + [ok[f"value_{o}"].to_numpy(dtype=float) for o in objectives[1:]], axis=1)
    front = F[non_dominated(F)]
    methods = ok["attr_method"].astype(str).to_numpy()
    uniform = {m.split(":", 1)[1].upper(): F[i] for i, m in enumerate(methods) if m.startswith("uniform:")}
    beaten = {name: bool(any(dominates(f, u) for f in front)) for name, u in uniform.items()}
    best = ok.loc[ok["value_accuracy"].idxmax()]
    return {
        "hv": hypervolume(front, np.full(len(objectives), REF_POINT_PAD)),
        "front": len(front),
        "beaten": beaten,
        "best_accuracy": float(best["value_accuracy"]),
        "trials": len(trials),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--budget", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--population", type=int, default=20)
    ap.add_argument("--eval-images", type=int, default=StudyConfig.eval_images, help="validation images per evaluation (the study default)")
    ap.add_argument("--workers", type=int, default=-1)
    ap.add_argument("--algorithms", default="nsga2,optuna-nsga2,optuna-tpe,random")
    ap.add_argument("--out-root", default="studies/bench-search", help="where the benchmark's studies go (replaced)")
    ap.add_argument("--markdown", default=None, help="also write the result table to this Markdown file")
    args = ap.parse_args()

    machine = describe_machine()  # before the studies pin this process to their per-worker threads
    rows = []
    for algorithm in args.algorithms.split(","):
        config = StudyConfig(
            name=f"{args.model}-{algorithm}-b{args.budget}-s{args.seed}", model=args.model, dataset=args.dataset,
            seed=args.seed, budget=args.budget, algorithm=algorithm, population_size=args.population,
            eval_images=args.eval_images, workers=args.workers, out_root=args.out_root,
        )
        folder = study_dir(config)
        if folder.exists():  # the benchmark owns its folder: always a fresh study
            shutil.rmtree(folder)
        start = time.perf_counter()
        result = optimize(config, remeasure=False, log=lambda m: None)
        rows.append({"algorithm": algorithm, "wall_s": time.perf_counter() - start,
                     **score(result.trials, config.objectives)})
        r = rows[-1]
        print(f"{algorithm:13s} hypervolume {r['hv']:.4f}  front {r['front']:3d}  "
              f"dominates {sum(r['beaten'].values())}/{len(r['beaten'])} uniform  ({r['wall_s'] / 60:.1f} min)", flush=True)

    uniform_names = list(rows[0]["beaten"]) if rows else []
    lines = [
        f"{args.model} on {args.dataset}: budget {args.budget} evaluations, seed {args.seed}, population {args.population}, "
        f"first {args.eval_images} validation images per evaluation; objectives 1 - accuracy and relative energy "
        f"(horowitz45nm), reference point ({REF_POINT_PAD:g}, {REF_POINT_PAD:g}).",
        "",
        "| algorithm | hypervolume | front size | best accuracy | " + " | ".join(f"dominates {u}" for u in uniform_names)
        + " | wall time |",
        "|---|---|---|---|" + "---|" * len(uniform_names) + "---|",
    ]
    for r in rows:
        marks = " | ".join("yes" if r["beaten"].get(u) else "no" for u in uniform_names)
        lines.append(f"| {r['algorithm']} | {r['hv']:.4f} | {r['front']} | {100 * r['best_accuracy']:.2f}% | {marks} | "
                     f"{r['wall_s'] / 60:.1f} min |")
    lines += ["", f"Measured by `python scripts/bench_search.py` on {machine}; each evaluation on a worker with one torch thread."]
    text = "\n".join(lines)
    print()
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
