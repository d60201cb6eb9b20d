"""Five small digits studies, fingerprinted: the trial parameters, objective values and front of each.

    python scripts/same_trials.py --write before.json                 # run the five studies, keep their trials
    python scripts/same_trials.py --against before.json               # run them again, list every difference
    python scripts/same_trials.py --against before.json --tree ../old # run another checkout's code instead

A change that should not change what a search does (moving modules, splitting functions) must
leave all five identical: same trial numbers, same parameters, same objective values, same front.
The five cover the search methods a user picks (NSGA-II, NSGA-II with multi-fidelity, Optuna's
TPE, random, ILP) on a CNN and a vision transformer. Each study runs as a user runs it, with
``mpsearch optimize`` in its own process, in a temporary folder. ``--tree`` names the source tree
whose ``mpsearch`` runs (default: this one), so the same script compares two checkouts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

STUDIES = {
    "nsga2-resnet": ["--model", "test_resnet", "--algorithm", "nsga2"],
    "nsga2-mf-resnet": ["--model", "test_resnet", "--algorithm", "nsga2+mf"],
    "tpe-resnet": ["--model", "test_resnet", "--algorithm", "optuna-tpe"],
    "random-ilp-resnet": ["--model", "test_resnet", "--algorithm", "random,ilp"],
    # test_vit does not learn digits in its recipe's 3 epochs; the fingerprint does not need it to
    "nsga2-vit": ["--model", "test_vit", "--algorithm", "nsga2", "--allow-weak-baseline"],
}
COMMON = ["--dataset", "digits", "--budget", "12", "--workers", "0", "--seed", "0",
          "--set", "search.population_size=6", "--set", "search.eval_images=120", "--set", "search.ilp_seeds=2"]


def fingerprint(folder: Path) -> dict:
    """What must not change: each trial's parameters and objective values, and the front's trials."""
    trials = pd.read_csv(folder / "trials.csv")
    columns = ["trial"] + sorted(c for c in trials.columns if c.startswith(("param_", "value_")))
    front = pd.read_csv(folder / "pareto.csv")
    return {"trials": json.loads(trials[columns].to_json(orient="records", double_precision=15)),
            "front": sorted(int(t) for t in front["trial"])}


def run_studies(tree: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = {}
    with tempfile.TemporaryDirectory(prefix="same-trials-") as tmp:
        for name, args in STUDIES.items():
            start = time.perf_counter()
            folder = Path(tmp) / name
            subprocess.run([sys.executable, "-m", "mpsearch.cli", "optimize", *args, *COMMON, "--name", name, "--out-dir", str(folder)],
                           check=True, env=env, cwd=tmp, stdout=subprocess.DEVNULL)
            out[name] = fingerprint(folder)
            print(f"{name}: {len(out[name]['trials'])} trials, front {out[name]['front']} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    return out


def differences(before: dict, after: dict) -> list[str]:
    found = []
    for name in sorted(set(before) | set(after)):
        if name not in before or name not in after:
            found.append(f"{name}: only in one run")
        elif before[name]["front"] != after[name]["front"]:
            found.append(f"{name}: front {before[name]['front']} != {after[name]['front']}")
        else:
            found += [f"{name} trial {a['trial']}: {a} != {b}" for a, b in zip(before[name]["trials"], after[name]["trials"]) if a != b]
            if len(before[name]["trials"]) != len(after[name]["trials"]):
                found.append(f"{name}: {len(before[name]['trials'])} trials != {len(after[name]['trials'])}")
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1], help="source tree whose mpsearch runs")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path, help="write the fingerprints to this JSON file")
    group.add_argument("--against", type=Path, help="compare with fingerprints written before")
    args = ap.parse_args()
    found = run_studies(args.tree.resolve())
    if args.write:
        args.write.write_text(json.dumps(found, indent=1))
        print(f"wrote {args.write}")
        return
    diff = differences(json.loads(args.against.read_text()), found)
    print("\n".join(diff) if diff else f"identical: {len(found)} studies, "
          f"{sum(len(s['trials']) for s in found.values())} trials, same parameters, values and fronts")
    sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
