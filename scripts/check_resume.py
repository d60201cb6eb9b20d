"""kill -9 a real study mid-generation, resume it, and compare with an uninterrupted run.

    python scripts/check_resume.py [--model resnet18] [--dataset fashion-mnist] [--budget 40] [--kill-at 27] [--workers -1]
                                   [--reference resnet18-fashion-mnist-nsga2-s0] [--out-dir studies]

Runs `mpsearch optimize` as a user would (its own process group, Ray workers included), kills
the whole group with SIGKILL as soon as the study holds ``--kill-at`` trials, runs the same
command again, and checks that the resumed study's trials (numbers, policies, measured accuracy
and energy) equal the first ``--budget`` trials of ``--reference``, an uninterrupted study with
the same settings and a budget at least as large (runs it first when it does not exist). Prints
the timings and the machine. tests/test_resume.py does the same on a tiny model in CI.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from mpsearch.host.machine import describe_machine

SAME = ["trial", "state", "value_accuracy", "value_energy", "attr_correct", "attr_policy", "attr_method"]


def recorded(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT count(*) FROM trials WHERE state IN ('COMPLETE', 'FAIL')").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--budget", type=int, default=40)
    ap.add_argument("--kill-at", type=int, default=27, help="kill once this many trials are recorded (mid-generation)")
    ap.add_argument("--workers", type=int, default=-1)
    ap.add_argument("--reference", default="", help="uninterrupted study to compare with (default: run one)")
    ap.add_argument("--out-dir", default="studies", help="folder holding the studies' folders")
    args = ap.parse_args()
    exe = [str(Path(sys.executable).with_name("mpsearch"))]
    common = ["--model", args.model, "--dataset", args.dataset, "--workers", str(args.workers),
              "--set", "search.remeasure_points=2", "--no-progress"]
    name = f"{args.model}-resume-check"
    folder = Path(args.out_dir) / name
    if folder.exists():
        sys.exit(f"{folder} exists; remove it first")
    reference = args.reference
    if not reference:
        reference = f"{args.model}-resume-reference"
        subprocess.run(exe + ["optimize", *common, "--budget", str(args.budget), "--name", reference,
                              "--out-dir", str(Path(args.out_dir) / reference)], check=True)
    cmd = exe + ["optimize", *common, "--budget", str(args.budget), "--name", name, "--out-dir", str(folder)]

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while recorded(folder / "study.db") < args.kill_at:
        if proc.poll() is not None:
            sys.exit("the study finished before the kill point; raise --budget or lower --kill-at")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_s, at = time.perf_counter() - start, recorded(folder / "study.db")
    print(f"kill -9 after {killed_s:.0f} s with {at} trials recorded")

    start = time.perf_counter()
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    if resumed.returncode != 0:
        sys.exit(f"resume failed (exit {resumed.returncode}):\n{resumed.stderr[-2000:]}")
    resume_s = time.perf_counter() - start
    ours = pd.read_csv(folder / "trials.csv")
    ref = pd.read_csv(Path(args.out_dir) / reference / "trials.csv").iloc[: args.budget]
    cols = SAME + [c for c in ref.columns if c.startswith("param_")]
    pd.testing.assert_frame_equal(ours[cols].reset_index(drop=True), ref[cols].reset_index(drop=True))
    print(f"resumed in {resume_s:.0f} s; {len(ours)} trials identical to the first {args.budget} of {reference} "
          f"(numbers, policies, accuracy, energy)")
    print(f"machine: {describe_machine()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
