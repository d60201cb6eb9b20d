"""Evaluation overhead: time to measure one mixed policy on the validation split divided by the
time of one plain fp32 pass over the same images.

    python scripts/bench_eval.py [--model resnet18] [--dataset fashion-mnist] [--repeats 3]

"Cold" policies are new random mixed policies (weights of unseen (layer, bits) pairs are
quantized inside the timed region); "warm" re-runs a policy whose weights are cached.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mpsearch import Evaluator, LayerPrecision, Policy, get_baseline, load_dataset
from mpsearch.machine import describe_machine
from mpsearch.metrics import correct_mask


def random_policy(ev: Evaluator, gen: torch.Generator) -> Policy:
    layers = {}
    for name in ev.layer_names:
        w = int(torch.randint(2, 9, (1,), generator=gen))
        a = int(torch.randint(4, 9, (1,), generator=gen))
        layers[name] = LayerPrecision(w, a)
    return Policy(model=ev.baseline.name, dataset=ev.data.info.name, layers=layers, checkpoint_sha256=ev.baseline.sha256)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="first N validation images (default: all)")
    args = ap.parse_args()

    data = load_dataset(args.dataset)
    baseline = get_baseline(args.model, data)
    ev = Evaluator(baseline, data)
    cal_s = ev.calibrate()
    val = data.val.subset(args.limit)
    gen = torch.Generator().manual_seed(0)
    correct_mask(baseline.model, val.subset(512))  # warm-up of both paths
    ev.qmodel.apply(random_policy(ev, gen))
    correct_mask(ev.qmodel.module, val.subset(512))

    fp32_t, cold_t, warm_t = [], [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        correct_mask(baseline.model, val)
        fp32_t.append(time.perf_counter() - t)
        policy = random_policy(ev, gen)
        t = time.perf_counter()
        ev.qmodel.apply(policy)
        correct_mask(ev.qmodel.module, val)
        cold_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        ev.qmodel.apply(policy)
        correct_mask(ev.qmodel.module, val)
        warm_t.append(time.perf_counter() - t)
    fp32, cold, warm = (statistics.median(x) for x in (fp32_t, cold_t, warm_t))
    print(f"machine: {describe_machine()}")
    print(f"{args.model} on {args.dataset}: {len(val)} validation images, {len(ev.layer_names)} quantized layers, "
          f"median of {args.repeats}; one-off calibration {cal_s:.1f} s")
    print(f"fp32 pass                      {fp32:7.2f} s")
    print(f"mixed policy, cold (new bits)  {cold:7.2f} s   ratio {cold / fp32:.3f}")
    print(f"mixed policy, warm (cached)    {warm:7.2f} s   ratio {warm / fp32:.3f}")


if __name__ == "__main__":
    main()
