"""Where a ViT's W4A4 loss comes from: the attention matmuls' widths, one matmul at a time.

    python scripts/attention_widths.py [--model deit_tiny] [--policy w4a4] [--seed 0] [--split test]

Measures the uniform policy with its attention matmuls at 4 or 8 bits, q·kᵀ and softmax·v
separately (both operands of a matmul at one width), everything else as the policy says, paired
with fp32 on the same images. Prints a markdown table for the README.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from mpsearch import Evaluator, get_baseline, load_dataset
from mpsearch.config import QuantConfig
from mpsearch.host.machine import describe_machine
from mpsearch.policy import MATMUL_AV, MATMUL_QK, uniform_policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_tiny")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--policy", default="w4a4", help="uniform shorthand whose matmul widths are varied")
    ap.add_argument("--seed", type=int, default=0, help="calibration seed")
    ap.add_argument("--split", default="test", choices=("val", "test"))
    args = ap.parse_args()

    start = time.perf_counter()
    data = load_dataset(args.dataset, calibration_seed=args.seed)
    baseline = get_baseline(args.model, data)
    ev = Evaluator(baseline, data, quant=QuantConfig(seed=args.seed))
    base = uniform_policy(args.policy, model=baseline.name, dataset=data.info.name, layers=ev.policy_layers,
                          checkpoint_sha256=baseline.sha256)
    if not ev.qmodel.matmul_names:
        raise SystemExit(f"{args.model} has no attention matmuls to vary")
    rows = ["| q·kᵀ bits | softmax·v bits | accuracy | change vs fp32, pp (95 % CI) |", "|---:|---:|---:|---:|"]
    for qk_bits, av_bits in ((4, 4), (8, 4), (4, 8), (8, 8)):
        layers = dict(base.layers)
        for name in ev.qmodel.matmul_names:
            bits = qk_bits if name.endswith(MATMUL_QK) else av_bits if name.endswith(MATMUL_AV) else None
            layers[name] = replace(layers[name], weight_bits=bits, act_bits=bits)
        result = ev.evaluate(replace(base, layers=layers), split=args.split)
        lo, hi = result.drop_ci95
        rows.append(f"| {qk_bits} | {av_bits} | {result.accuracy:.2%} | {100 * result.drop:+.2f} ({100 * lo:+.2f} to {100 * hi:+.2f}) |")
        print(rows[-1], flush=True)
    print(f"\n{args.model}, {args.policy.upper()} otherwise (ends at W8A8), {args.split} split, calibration seed {args.seed}; "
          f"{describe_machine()}; {(time.perf_counter() - start) / 60:.1f} min\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
