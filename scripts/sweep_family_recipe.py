"""Choose the training recipe of a model family: train each candidate recipe briefly on a subset of
Fashion-MNIST (or digits) and rank by validation accuracy (the test split is not looked at).

    python scripts/sweep_family_recipe.py --models mobilenetv3_small_100,convnext_atto \\
        --train-images 6400 --epochs 2 --out docs/recipe_families.md
    python scripts/sweep_family_recipe.py --dataset digits --train-images 0 --schedule full \\
        --models lcnet_050,mixnet_s --recipes "family recipe;family recipe at native size"

With ``--schedule brief`` every candidate shares the brief schedule (``--epochs`` on
``--train-images`` images, every image every epoch, native size) and only the optimizer
settings differ; ``--schedule full`` trains each recipe as it is (its epochs, progressive
resizing, selective epochs), as a baseline would. The table states the machine.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from mpsearch.config import TrainConfig
from mpsearch.data import load_dataset
from mpsearch.evaluation.metrics import correct_mask
from mpsearch.host.machine import describe_machine
from mpsearch.models.train import train_model
from mpsearch.models.zoo import CONVNET_ADAMW_RECIPE, create_model, default_recipe, training_recipe

# name -> the recipe tried, from the model's family recipe (mpsearch.models.zoo.default_recipe for
# large data sets). --schedule brief then shortens each (brief()); full keeps its own schedule.
CANDIDATES: dict[str, Callable[[TrainConfig], TrainConfig]] = {
    "family recipe": lambda family: family,
    "family recipe at native size": lambda family: replace(family, image_scales=(1.0,)),
    "family recipe at native size, every image": lambda family: replace(family, image_scales=(1.0,), keep_fraction=1.0),
    "sgd lr 0.3 (ResNet recipe)": lambda family: TrainConfig(),
    "sgd lr 0.05": lambda family: TrainConfig(lr=0.05),
    "adamw lr 1e-3": lambda family: replace(CONVNET_ADAMW_RECIPE, lr=1e-3),
    "adamw lr 3e-3": lambda family: replace(CONVNET_ADAMW_RECIPE, lr=3e-3),
}


def brief(recipe: TrainConfig, epochs: int) -> TrainConfig:
    return replace(recipe, epochs=epochs, image_scales=(1.0,), keep_fraction=1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenetv3_small_100,convnext_atto")
    ap.add_argument("--dataset", default="fashion-mnist", choices=("fashion-mnist", "digits"))
    ap.add_argument("--train-images", type=int, default=6400, help="the first N training images (0: all)")
    ap.add_argument("--recipes", default="", help=f"semicolon-separated, of: {'; '.join(CANDIDATES)} (default: all)")
    ap.add_argument("--schedule", default="brief", choices=("brief", "full"),
                    help="brief: --epochs at native size on every image; full: each recipe's own epochs, sizes and selection")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the brief schedule")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="markdown table to write (default: print only)")
    args = ap.parse_args()
    data = load_dataset(args.dataset)
    train = data.train.subset(args.train_images) if args.train_images else data.train
    chosen = [r.strip() for r in args.recipes.split(";") if r.strip()] or list(CANDIDATES)
    unknown = [r for r in chosen if r not in CANDIDATES]
    if unknown:
        ap.error(f"--recipes: unknown {unknown}; choose from: {'; '.join(CANDIDATES)}")
    rows = []
    for model_name in args.models.split(","):
        for label in chosen:
            torch.manual_seed(args.seed)
            model = create_model(model_name, data.info)
            recipe = CANDIDATES[label](default_recipe(model_name))
            # As a baseline trains: at native size only where the model cannot run at the smaller sizes.
            recipe = brief(recipe, args.epochs) if args.schedule == "brief" else training_recipe(model_name, model, recipe, data.info)
            start = time.perf_counter()
            train_model(model, train, data.info, recipe, seed=args.seed, progress=False)
            wall = time.perf_counter() - start
            mask = correct_mask(model.eval(), data.val)
            accuracy = float(mask.float().mean()) if mask.numel() else float("nan")
            rows.append((model_name, label, accuracy, wall))
            print(f"{model_name:24s} {label:28s} val {accuracy:.2%}  {wall / 60:.1f} min", flush=True)
    lines = [
        (f"Brief training ({args.epochs} epochs" if args.schedule == "brief" else "Training (each recipe's own schedule") +
        f" on {len(train)} {data.info.name} training images, seed {args.seed}), "
        f"validation accuracy on the {len(data.val)} held-out images. Machine: {describe_machine()}.",
        f"Command: `python scripts/sweep_family_recipe.py {shlex.join(sys.argv[1:])}`",
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
