"""Regenerate the quantization ablation table (docs/ablation_<model>.md and .csv).

    python scripts/ablate.py --model resnet18 [--variants all|a,b,...] [--widths w8a8,...] [--seeds 0,1,2]
                             [--finetune-steps 300] [--out docs]

One factor at a time around the default quantizer, every cell measured on the test split against
the fp32 model on the same images, mean ± std over calibration seeds (mpsearch.ablate). The CSV
is resumed when present, so the run can be stopped and restarted. Costs on a 2-core CPU for
ResNet-18: ~25 s per post-training cell, ~90 s per GPTQ cell, ~6 min per QAT cell, ~20 min per
AdaRound cell.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mpsearch.ablate import DEFAULT_WIDTHS, VARIANTS, run_ablation, write_markdown
from mpsearch.config import FinetuneConfig
from mpsearch.machine import describe_machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--variants", default="all")
    ap.add_argument("--widths", default=",".join(DEFAULT_WIDTHS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()

    variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    widths = args.widths.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    start = time.perf_counter()
    table = run_ablation(model=args.model, dataset=args.dataset, variants=variants, widths=widths, seeds=seeds,
                         split="test", finetune_config=FinetuneConfig(steps=args.finetune_steps),
                         out_csv=out / f"ablation_{args.model}.csv")
    per_variant = table.groupby("variant")["wall_s"].sum().to_dict()
    notes = [
        f"- model {args.model} on {args.dataset}, test split; seeds {args.seeds}; QAT {args.finetune_steps} steps",
        f"- machine: {describe_machine()}",
        f"- measurement time per variant (all cells, s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in sorted(per_variant.items())),
        f"- this run: {(time.perf_counter() - start) / 60:.1f} min (cells found in the CSV are not re-measured)",
        f"- regenerate: `python scripts/ablate.py --model {args.model} --variants {','.join(variants)} "
        f"--widths {args.widths} --seeds {args.seeds}`",
    ]
    path = write_markdown(out / f"ablation_{args.model}.md", table, widths=widths, split="test",
                          title=f"Quantization ablation: {args.model} on {args.dataset}", notes=notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
