"""Regenerate the quantization ablation table (docs/ablation_<model>.md and .csv).

    python scripts/ablate.py --model resnet18 [--variants all|a,b,...] [--widths w8a8,...] [--seeds 0,1,2]
                             [--finetune-steps 300] [--out-dir docs]
    python scripts/ablate.py --model deit_tiny      # standard vs ranking-aware attention calibration

One factor at a time around the default quantizer, every cell measured on the test split against
the fp32 model on the same images, mean ± std over calibration seeds (mpsearch.study.ablate). The CSV
is resumed when present, so the run can be stopped and restarted; ``--report-only`` rewrites
the markdown from it. The defaults of variants and widths depend on the model
(mpsearch.study.ablate.default_grid). `mpsearch ablate` runs the same measurements into a study folder;
this script writes the tables under docs/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mpsearch.config import FinetuneConfig
from mpsearch.host.machine import describe_machine
from mpsearch.study.ablate import DEFAULT_WIDTHS, VARIANTS, ablation_grid, run_ablation, write_markdown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--variants", default=None, help="all, or comma separated (default: by model)")
    ap.add_argument("--widths", default=None, help="comma separated (default: by model)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--out-dir", default="docs")
    ap.add_argument("--report-only", action="store_true", help="rewrite the markdown from the CSV without measuring")
    args = ap.parse_args()

    variants, widths = ablation_grid(args.model, args.variants if args.variants in (None, "all") else args.variants.split(","),
                                     None if args.widths is None else args.widths.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out_dir)
    csv = out / f"ablation_{args.model}.csv"
    if args.report_only:
        import pandas as pd

        table = pd.read_csv(csv)
    else:
        table = run_ablation(model=args.model, dataset=args.dataset, variants=variants, widths=widths, seeds=seeds,
                             split="test", finetune_config=FinetuneConfig(steps=args.finetune_steps), out_csv=csv)
    notes = [
        f"- model {args.model} on {args.dataset}, test split"
        + (f"; QAT {args.finetune_steps} steps" if any(VARIANTS[v].finetune for v in set(table["variant"])) else ""),
        f"- machine: {describe_machine()}",
        "- cells are resumed from the CSV, so the table may come from several runs; these commands measure it again:",
    ]
    # The cells measured, as few commands as possible: per variant, which seeds each width has;
    # variants with the same layout share a command.
    layouts: dict[tuple, list[str]] = {}
    for variant in [v for v in VARIANTS if v in set(table["variant"])]:
        rows = table[table["variant"] == variant]
        by_seeds: dict[tuple, list[str]] = {}
        for width in dict.fromkeys(DEFAULT_WIDTHS + tuple(rows["policy"])):
            seeds = tuple(sorted(set(rows[rows["policy"] == width]["seed"])))
            if seeds:
                by_seeds.setdefault(seeds, []).append(width)
        layouts.setdefault(tuple(sorted((k, tuple(v)) for k, v in by_seeds.items())), []).append(variant)
    for layout, names in layouts.items():
        for seeds, group_widths in layout:
            notes.append(f"  `python scripts/ablate.py --model {args.model} --variants {','.join(names)} "
                         f"--widths {','.join(group_widths)} --seeds {','.join(map(str, seeds))}`")
    all_widths = [w for w in dict.fromkeys(DEFAULT_WIDTHS + tuple(widths)) if w in set(table["policy"])]
    path = write_markdown(out / f"ablation_{args.model}.md", table, widths=all_widths, split="test",
                          title=f"Quantization ablation: {args.model} on {args.dataset}", notes=notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
