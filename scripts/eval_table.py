"""Measured table of uniform policies: accuracy (test split, 95% CI), size, BOPs, energy.

    python scripts/eval_table.py --model resnet18 --dataset fashion-mnist [--ptq rtn] [--policies fp32,w8a8,...]
                                 [--out docs/eval_table.md]

``--ptq`` picks how weights are rounded (rtn, gptq, adaround: mpsearch.quant.ptq).

Uses the cached baseline (trains it on first use). Every number is measured by running the
quantized model, or computed by the cost model from the traced layer shapes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mpsearch import Evaluator, get_baseline, load_dataset
from mpsearch.config import QuantConfig
from mpsearch.host.machine import describe_machine

POLICIES = ("fp32", "w8a8", "w6a6", "w4a8", "w4a4", "w2a8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--split", default="test", choices=("val", "test"))
    ap.add_argument("--ptq", default="rtn", help="weight rounding: rtn (default), gptq, adaround")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated shorthands")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args()

    start = time.perf_counter()
    data = load_dataset(args.dataset)
    baseline = get_baseline(args.model, data)
    ev = Evaluator(baseline, data, quant=QuantConfig(ptq=args.ptq))
    ev.calibrate()
    rows = []
    for shorthand in [p.strip() for p in args.policies.split(",") if p.strip()]:
        r = ev.evaluate(ev.resolve_policy(shorthand), split=args.split, progress=True)
        rel = r.costs.relative()
        lo, hi = r.accuracy_ci95
        rows.append(
            f"| {shorthand.upper() if shorthand != 'fp32' else 'FP32'} | {r.accuracy:.2%} ({lo:.2%}–{hi:.2%}) "
            f"| {r.drop * 100:+.2f} | {r.costs.size_bytes / 2**20:.2f} | {r.costs.bops / 1e9:.1f} "
            f"| {r.costs.energy['horowitz45nm'] / 1e6:.1f} ({1 - rel['energy_horowitz45nm']:.1%}) "
            f"| {1 - rel['energy_seed-lab4']:.1%} |"
        )
        print(rows[-1], flush=True)
    header = (
        f"{args.model} on {args.dataset}, {args.split} split ({r.images} images); first and last layer at 8 bits "
        f"in every quantized policy; weights per-channel symmetric (min-max grid, {args.ptq} rounding), "
        f"activations per-tensor (MSE-calibrated "
        f"on {len(data.calibration)} training images).\n\n"
        "| policy | accuracy (95% CI) | Δ vs FP32 (pp) | size (MiB) | GBOPs / image "
        "| energy µJ / image, horowitz45nm (saved) | energy saved, seed-lab4 |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    flags = "" if args.ptq == "rtn" else f" --ptq {args.ptq} --policies {args.policies}"
    footer = f"\nMeasured by `python scripts/eval_table.py{flags}` in {time.perf_counter() - start:.0f} s on {describe_machine()}.\n"
    text = header + "\n".join(rows) + "\n" + footer
    print("\n" + text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
