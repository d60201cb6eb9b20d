"""Evaluation cost: time to measure one mixed policy on the validation split divided by the time
of one plain fp32 pass over the same images, for each evaluation backend (fake quantization in
float32, int8 kernels).

    python scripts/bench_eval.py [--model resnet18] [--dataset fashion-mnist] [--repeats 3] [--backends fake,int8]

"Cold" policies are new random mixed policies (weights of unseen (layer, bits) pairs are
quantized, and int8 kernels packed, inside the timed region); "warm" re-runs a policy whose
weights and kernels are cached.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mpsearch import Evaluator, Policy, get_baseline, load_dataset
from mpsearch.config import QuantConfig
from mpsearch.evaluation.metrics import correct_mask
from mpsearch.host.machine import describe_machine
from mpsearch.policy import LayerPrecision
from mpsearch.quant.backends import BACKENDS


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
    ap.add_argument("--backends", default="fake,int8", help="evaluation backends to time, comma separated")
    args = ap.parse_args()

    data = load_dataset(args.dataset)
    baseline = get_baseline(args.model, data)
    val = data.val.subset(args.limit)
    print(f"machine: {describe_machine()}")
    fp32_t: list[float] = []
    rows = []
    layers = 0
    for backend in args.backends.split(","):
        problem = BACKENDS.get(backend)().unavailable()
        if problem:
            print(f"{backend}: skipped ({problem})")
            continue
        ev = Evaluator(baseline, data, quant=QuantConfig(backend=backend), prefix_cache=False)
        cal_s = ev.calibrate()
        gen = torch.Generator().manual_seed(0)  # the same policies for every backend
        correct_mask(baseline.model, val.subset(512))  # warm-up of both paths
        ev.apply(random_policy(ev, gen))
        correct_mask(ev.qmodel.module, val.subset(512))
        cold_t, warm_t = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            correct_mask(baseline.model, val)
            fp32_t.append(time.perf_counter() - t)
            policy = random_policy(ev, gen)
            t = time.perf_counter()
            ev.apply(policy)  # new (layer, bits) pairs: weights quantized, int8 kernels packed, all timed
            correct_mask(ev.qmodel.module, val)
            cold_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            ev.apply(policy)
            correct_mask(ev.qmodel.module, val)
            warm_t.append(time.perf_counter() - t)
        layers = len(ev.layer_names)
        rows.append((backend, statistics.median(cold_t), statistics.median(warm_t), ev.integer_layers, cal_s))
    fp32 = statistics.median(fp32_t)
    print(f"{args.model} on {args.dataset}: {len(val)} validation images, {layers} quantized "
          f"layers, median of {args.repeats} random mixed policies (weights 2-8 bits, inputs 4-8 bits) per backend")
    print(f"{'fp32 pass':42} {fp32:7.2f} s")
    for backend, cold, warm, integer, cal_s in rows:
        print(f"{backend + ' backend, cold (new bits, packing)':42} {cold:7.2f} s   ratio {cold / fp32:.3f}   "
              f"({integer} layers on integer kernels; one-off calibration {cal_s:.1f} s)")
        print(f"{backend + ' backend, warm (cached weights)':42} {warm:7.2f} s   ratio {warm / fp32:.3f}")


if __name__ == "__main__":
    main()
