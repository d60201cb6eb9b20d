"""How a study's search scales with Ray workers: the wall time of one budget-48 study with 1, 2 and
4 workers (one torch thread each), and what a cluster of N such machines would give on paper.

    python scripts/bench_scale.py [--model resnet18] [--dataset fashion-mnist] [--workers 1,2,4]

Each study is the same search (seed, population, space), measured on ``--eval-images`` validation
images per candidate; only the search is timed (no re-measured front). A first run in the
driver's process (no Ray) gives the driver's own work per trial: its pace of trials minus the
time spent measuring each. The baseline is trained for ``--train-epochs`` epochs when none is
cached: how well it is trained does not change how long a candidate takes to measure.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from mpsearch import get_baseline, load_dataset
from mpsearch.config import StudyConfig, with_overrides
from mpsearch.host.machine import available_cores, describe_machine
from mpsearch.models.zoo import default_recipe
from mpsearch.study import run_study


def run_one(root: Path, workers: int, args: argparse.Namespace, checkpoint: Path) -> dict[str, float]:
    """One search with ``workers`` Ray workers (0: in this process); its times in seconds."""
    name = f"scale-w{workers}"
    config = with_overrides(StudyConfig(), {
        "name": name, "model": args.model, "dataset": args.dataset, "checkpoint": str(checkpoint), "seed": 0,
        "search.budget": args.budget, "search.population_size": args.population, "search.eval_images": args.eval_images,
        "search.sensitivity": "none", "latency": None, "run.workers": workers, "run.torch_threads": 1,
        "run.out_dir": str(root / name)})
    start = time.perf_counter()
    result = run_study(config, progress=False, remeasure=False)
    wall = time.perf_counter() - start
    evals = [float(s) for s in result.trials["attr_wall_s"].dropna()]
    # Steady state: the pace of trials once the workers are up (first to last result).
    done = sorted(t.datetime_complete for t in result.study.trials)
    steady = (done[-1] - done[0]).total_seconds() / (len(done) - 1)
    return {"workers": workers, "wall": wall, "search": result.phases["search"], "eval_mean": statistics.fmean(evals),
            "steady": steady}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--workers", default="1,2,4", help="comma-separated Ray worker counts")
    ap.add_argument("--budget", type=int, default=48)
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--eval-images", type=int, default=400, help="validation images per candidate (the optimize default)")
    ap.add_argument("--train-epochs", type=int, default=1, help="epochs of the baseline when none is cached")
    args = ap.parse_args()
    counts = [int(w) for w in args.workers.split(",")]

    data = load_dataset(args.dataset)
    baseline = get_baseline(args.model, data, recipe=replace(default_recipe(args.model), epochs=args.train_epochs))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for workers in [0, *counts]:
            rows.append(run_one(Path(tmp), workers, args, baseline.checkpoint))
            r = rows[-1]
            print(f"  workers {workers}: {r['wall']:.1f} s ({r['search']:.1f} s search)", flush=True)

    in_process, one = rows[0], next((r for r in rows if r["workers"] == 1), rows[1])
    print(f"\nmachine: {describe_machine()}")
    print(f"{args.model} on {args.dataset}: budget {args.budget}, population {args.population}, "
          f"{args.eval_images} validation images per candidate, 1 torch thread per worker\n")
    print("| workers | study wall (s) | search (s) | s per trial, steady | mean evaluation (s) | speed-up over 1 worker: search | steady |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        label = "0 (in process)" if r["workers"] == 0 else str(r["workers"])
        speedups = ("", "") if r["workers"] == 0 else (f"{one['search'] / r['search']:.2f}x", f"{one['steady'] / r['steady']:.2f}x")
        print(f"| {label} | {r['wall']:.1f} | {r['search']:.1f} | {r['steady']:.2f} | {r['eval_mean']:.2f} | {speedups[0]} | {speedups[1]} |")

    # On paper: N machines like this one, one worker per core. A generation's candidates run in
    # parallel, so workers beyond the population wait; the driver handles results one at a time,
    # so it caps the pace at one trial per `driver_s`, however many workers there are.
    eval_s = one["eval_mean"]
    outside_in_process, outside_ray = in_process["steady"] - in_process["eval_mean"], one["steady"] - one["eval_mean"]
    print(f"\nper trial: {eval_s:.2f} s of evaluation on one worker; outside it {outside_in_process * 1000:.0f} ms in process "
          f"(the driver's own work) and {outside_ray * 1000:.0f} ms with one Ray worker (plus the round trip)")
    driver_s = max(outside_in_process, outside_ray)
    print(f"the driver becomes the bottleneck at ~{eval_s / driver_s:.0f} busy workers (evaluation time / {driver_s * 1000:.0f} ms); "
          f"a generation keeps at most {args.population} busy\n")
    print("| machines | workers | 200 evaluations, on paper (min) | speed-up over 1 worker |")
    print("|---:|---:|---:|---:|")
    cores = available_cores()
    for machines in (1, 2, 4, 8, 16, 32):
        busy = min(machines * cores, args.population)
        minutes = 200 * max((eval_s + driver_s) / busy, driver_s) / 60
        print(f"| {machines} | {machines * cores} | {minutes:.2f} | {200 * (eval_s + driver_s) / 60 / minutes:.1f}x |")


if __name__ == "__main__":
    main()
