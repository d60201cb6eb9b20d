"""Exported models measured end to end: for each policy, the fake-quantized accuracy (PyTorch), the
accuracy of its exported file in its runtime (ONNX in onnxruntime, or with ``--format pt2e`` a PT2E
program compiled by ``torch.compile``), the share of images on which both predict the same class,
the file's latency at batch 1 and 64 with its speed-up over the fp32 model of the same baseline
in the same runtime, and the file's size.

    python scripts/bench_export.py --model resnet18 --study studies/resnet18-fashion-mnist-nsga2-s0 \\
        --policies fp32,w8a8,w4a4 --picks knee
    python scripts/bench_export.py --model deit_tiny --policies fp32,w8a8 --out docs/export_bench.md --append
    python scripts/bench_export.py --model resnet18 --format pt2e --policies fp32,w8a8,w4a4 --out docs/export_bench.md --append

``--policies`` are shorthands (fp32, w8a8, w4a8, w4a4) or policy JSON files; ``--picks`` adds
searched policies of ``--study`` (knee, min-energy, trial:N, ...). Accuracy is on the test split
(``--limit``: its first N images). Each row says whether it is within the export's tolerance:
agreement >= 99.5 % and accuracies within 0.15 pp. The table states the machine and the threads.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from mpsearch.export.deploy import compare_exported, export_policy
from mpsearch.export.formats import FORMATS
from mpsearch.export.latency import measure_latency
from mpsearch.host.machine import describe_machine

AGREEMENT_MIN, ACCURACY_PP_MAX = 0.995, 0.15
MIB = 2 ** 20


def _policies(args: argparse.Namespace) -> list[tuple[str, object]]:
    """(label, policy) for each row: the shorthands and files given, then the study's picks."""
    from mpsearch.study import load_result

    rows: list[tuple[str, object]] = [(p, p) for p in args.policies.split(",") if p]
    if args.study:
        result = load_result(args.study)
        for pick in args.picks.split(","):
            policy, _ = result.choose(pick)
            rows.append((f"searched {pick} (trial {policy.provenance['trial']})", policy))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--policies", default="fp32,w8a8,w4a8,w4a4", help="shorthands or policy JSON files; fp32 first: "
                                                                     "the speed-up reference")
    ap.add_argument("--study", default=None, help="a finished study's folder: its --picks are added")
    ap.add_argument("--picks", default="knee,max-accuracy")
    ap.add_argument("--limit", type=int, default=None, help="first N test images (default: all)")
    ap.add_argument("--runs", type=int, default=30, help="timed runs per batch size (after 10 warm-up runs)")
    ap.add_argument("--format", choices=tuple(FORMATS), default="onnx", help="onnx (onnxruntime) or pt2e (torch.compile)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="runtime threads (default: every core)")
    ap.add_argument("--out", default="docs/export_bench.md", help="markdown file to write the table to "
                                                                  "(default docs/export_bench.md; '': print only)")
    ap.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    args = ap.parse_args()
    if not args.policies.startswith("fp32"):
        ap.error("--policies must start with fp32: the other rows' speed-ups are over it")

    start = time.perf_counter()
    runtime = {"onnx": "onnxruntime", "pt2e": "torch.compile"}[args.format]
    lines = [f"### {args.model} on {args.dataset}" + (", PT2E int8 in torch.compile" if args.format == "pt2e" else ""), "",
             f"| policy | fake quant | {runtime} | diff (pp) | agreement | batch 1 (ms) | speed-up | batch 64 (ms) | "
             "speed-up | file (MiB) | within tolerance |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    reference: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        for i, (label, policy) in enumerate(_policies(args)):
            path, resolved = export_policy(args.model, args.dataset, policy, Path(tmp) / f"row{i}{FORMATS[args.format]}", fmt=args.format)
            compared = compare_exported(path, split="test", limit=args.limit, threads=args.threads)
            timed = {r.batch_size: r.median_ms for r in
                     measure_latency(path, batch_sizes=(1, 64), runs=args.runs, warmup=10, threads=args.threads)}
            reference = reference or timed
            diff_pp = 100 * (compared.exported_accuracy - compared.fake_quant_accuracy)
            ok = compared.agreement >= AGREEMENT_MIN and abs(diff_pp) <= ACCURACY_PP_MAX
            summary = resolved.summary()
            shown = label if label.lower() == summary.lower() else f"{label}: {summary}"
            lines.append(
                f"| {shown} | {100 * compared.fake_quant_accuracy:.2f} % | {100 * compared.exported_accuracy:.2f} % "
                f"| {diff_pp:+.2f} | {100 * compared.agreement:.2f} % | {timed[1]:.2f} | {reference[1] / timed[1]:.2f}x "
                f"| {timed[64]:.1f} | {reference[64] / timed[64]:.2f}x | {path.stat().st_size / MIB:.2f} | {'yes' if ok else 'no'} |")
            print(lines[-1], flush=True)
    lines += ["", f"{compared.images} test images; {runtime} CPU, {args.threads} thread(s), median of {args.runs} timed runs "
                  f"after 10 warm-up runs; machine: {describe_machine()}; {(time.perf_counter() - start) / 60:.1f} min. "
                  f"Command: `python scripts/bench_export.py --model {args.model} --dataset {args.dataset} "
                  + (f"--format {args.format} " if args.format != "onnx" else "")
                  + f"--policies {args.policies} --threads {args.threads}"
                  + (f" --study {args.study} --picks {args.picks}" if args.study else "")
                  + (f" --limit {args.limit}" if args.limit else "") + "`", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a" if args.append else "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
