"""Choose the training recipe of a model family: train each candidate recipe briefly on a subset of
Fashion-MNIST and rank by validation accuracy (the test split is not looked at).

    python scripts/sweep_family_recipe.py --models mobilenetv3_small_100,convnext_atto \\
        --train-images 6400 --epochs 2 --out docs/recipe_families.md

Every candidate shares the brief schedule (``--epochs`` on ``--train-images`` images, every image
every epoch, native size); only the optimizer settings differ. The table states the machine.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from mpsearch.config import TrainConfig
from mpsearch.data import load_dataset
from mpsearch.evaluation.metrics import correct_mask
from mpsearch.host.machine import describe_machine
from mpsearch.models.train import train_model
from mpsearch.models.zoo import CONVNET_ADAMW_RECIPE, create_model

# name -> the optimizer settings tried; the brief schedule is added by brief().
CANDIDATES: dict[str, TrainConfig] = {
    "sgd lr 0.3 (ResNet recipe)": TrainConfig(),
    "sgd lr 0.05": TrainConfig(lr=0.05),
    "adamw lr 1e-3": replace(CONVNET_ADAMW_RECIPE, lr=1e-3),
    "adamw lr 3e-3": replace(CONVNET_ADAMW_RECIPE, lr=3e-3),
}


def brief(recipe: TrainConfig, epochs: int) -> TrainConfig:
    return replace(recipe, epochs=epochs, image_scales=(1.0,), keep_fraction=1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenetv3_small_100,convnext_atto")
    ap.add_argument("--train-images", type=int, default=6400)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="markdown table to write (default: print only)")
    args = ap.parse_args()
    data = load_dataset("fashion-mnist")
    train = data.train.subset(args.train_images)
    rows = []
    for model_name in args.models.split(","):
        for label, recipe in CANDIDATES.items():
            torch.manual_seed(args.seed)
            model = create_model(model_name, data.info)
            start = time.perf_counter()
            train_model(model, train, data.info, brief(recipe, args.epochs), seed=args.seed, progress=False)
            wall = time.perf_counter() - start
            mask = correct_mask(model.eval(), data.val)
            accuracy = float(mask.float().mean()) if mask.numel() else float("nan")
            rows.append((model_name, label, accuracy, wall))
            print(f"{model_name:24s} {label:28s} val {accuracy:.2%}  {wall / 60:.1f} min", flush=True)
    lines = [
        f"Brief training ({args.epochs} epochs on {args.train_images} Fashion-MNIST training images, seed {args.seed}), "
        f"validation accuracy on the 5000 held-out images. Machine: {describe_machine()}.",
        f"Command: `python scripts/sweep_family_recipe.py --models {args.models} --train-images {args.train_images} "
        f"--epochs {args.epochs}`",
        "",
        "| model | recipe | val accuracy | train min |",
        "|---|---|---:|---:|",
        *(f"| {m} | {label} | {acc:.2%} | {wall / 60:.1f} |" for m, label, acc, wall in rows),
    ]
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
