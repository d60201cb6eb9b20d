"""Measured ablation of quantization choices: one factor at a time around the default, several seeds.

Each :class:`Variant` changes one thing of the default quantizer (per-channel symmetric weights
with min-max ranges, asymmetric activations with MSE ranges, round-to-nearest): weight
granularity, activation symmetry, how ranges are calibrated, how weights are rounded (PTQ
method), how the q/k ranges of attention are chosen (vision transformers), or whether the model
is fine-tuned afterwards (QAT). Every (variant, uniform policy,
seed) is measured on the chosen split against the fp32 model on the same images. The seed draws
the calibration images and every sample a method takes from them; the baseline stays the same
model, so the spread is that of calibration, not of training.

Rows are appended to a CSV as they are measured (atomically), and a rerun skips the rows it
finds, so a long ablation survives interruption. :func:`summarize` gives mean ± std per cell.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpsearch.config import FinetuneConfig, QuantConfig
from mpsearch.errors import UserError
from mpsearch.host.files import atomic_write, atomic_write_text

if TYPE_CHECKING:
    from mpsearch.data import DataSplits
    from mpsearch.models.zoo import Baseline

__all__ = [
    "Variant", "VARIANTS", "DEFAULT_WIDTHS", "VIT_WIDTHS", "default_grid", "applicable_variants", "run_ablation",
    "summarize", "markdown_table", "write_markdown", "ablation_grid", "ablate",
]

logger = logging.getLogger(__name__)

DEFAULT_WIDTHS = ("w8a8", "w6a6", "w4a8", "w4a4", "w3a8", "w2a8")
# Vision transformers: the widths at which ranking-aware calibration is compared with the standard
# one (at 2-3 weight bits, plain PTQ costs a ViT far more than attention ranges could change).
VIT_WIDTHS = ("w8a8", "w6a6", "w4a8", "w4a4")


@dataclass(frozen=True)
class Variant:
    """One setting of the quantizer: ``quant`` overrides :class:`QuantConfig`, ``layer`` each layer's precision."""

    name: str
    factor: str
    description: str
    quant: dict[str, Any] = field(default_factory=dict)
    layer: dict[str, Any] = field(default_factory=dict)
    finetune: bool = False
    needs_attention: bool = False  # only meaningful for models with attention (vision transformers)


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("default", "reference", "per-channel symmetric weights (min-max), asymmetric activations (MSE), round-to-nearest"),
    Variant("per-tensor-weights", "weight granularity", "one weight scale per layer instead of per output channel",
            layer={"granularity": "per-tensor"}),
    Variant("symmetric-acts", "activation symmetry", "symmetric activation grid (unsigned after ReLU) instead of a zero point",
            layer={"act_symmetric": True}),
    Variant("act-minmax", "activation calibration", "activation ranges from min-max instead of MSE",
            quant={"act_observer": "minmax"}),
    Variant("act-percentile", "activation calibration", "activation ranges from the 99.99th percentile instead of MSE",
            quant={"act_observer": "percentile"}),
    Variant("weight-mse", "weight calibration", "MSE-optimal weight clipping instead of min-max",
            quant={"weight_observer": "mse"}),
    Variant("smoothquant", "activation calibration", "SmoothQuant smoothing (alpha 0.5) of layers quantized on both sides",
            quant={"smoothquant_alpha": 0.5}),
    Variant("bias-correction", "weight calibration", "round-to-nearest plus bias correction (Nagel et al. 2019)",
            quant={"bias_correction": True}),
    Variant("adaround", "weight rounding", "AdaRound learned rounding (layer-wise)", quant={"ptq": "adaround"}),
    Variant("brecq", "weight rounding", "BRECQ block reconstruction (from layer-wise AdaRound)", quant={"ptq": "brecq"}),
    Variant("gptq", "weight rounding", "GPTQ (Hessian-aware rounding with error feedback)", quant={"ptq": "gptq"}),
    Variant("gptq+qat", "training", "GPTQ, then LSQ step sizes + distillation from fp32 (mpsearch finetune)",
            quant={"ptq": "gptq"}, finetune=True),
    Variant("ranking-aware", "attention calibration",
            "ranking-aware q/k ranges for q·kᵀ (Liu et al. 2021) instead of the activation observer's",
            quant={"attention_calibration": "ranking"}, needs_attention=True),
)}


def applicable_variants(model: str) -> list[str]:
    """Every variant that means something for ``model`` (attention variants need a ViT)."""
    from mpsearch.models.zoo import is_vision_transformer

    vit = is_vision_transformer(model)
    return [name for name, v in VARIANTS.items() if vit or not v.needs_attention]


def default_grid(model: str) -> tuple[list[str], list[str]]:
    """(variants, widths) an ablation of ``model`` runs unless told otherwise: for a vision
    transformer standard vs ranking-aware attention calibration at :data:`VIT_WIDTHS`, for
    other models every applicable variant at :data:`DEFAULT_WIDTHS`."""
    from mpsearch.models.zoo import is_vision_transformer

    if is_vision_transformer(model):
        return ["default", "ranking-aware"], list(VIT_WIDTHS)
    return applicable_variants(model), list(DEFAULT_WIDTHS)

_COLUMNS = ["variant", "factor", "policy", "seed", "split", "images", "accuracy", "fp32_accuracy", "drop_pp", "wall_s",
            "baseline"]


def _read_rows(path: Path) -> list[dict[str, Any]]:
    import pandas as pd

    if not path.exists():
        return []
    try:
        table = pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001 - pandas raises many parser errors
        raise UserError(f"{path}: not a readable ablation CSV ({type(exc).__name__}); move it away to start over") from None
    if list(table.columns) != _COLUMNS:
        raise UserError(f"{path}: columns {list(table.columns)} are not an ablation table's; move it away to start over")
    return table.to_dict("records")


def run_ablation(
    *,
    model: str,
    dataset: str = "fashion-mnist",
    variants: Sequence[str] = tuple(VARIANTS),
    widths: Sequence[str] = DEFAULT_WIDTHS,
    seeds: Sequence[int] = (0, 1, 2),
    split: str = "test",
    limit: int | None = None,
    data_dir: str | None = None,
    checkpoint: str | None = None,
    calibration_size: int = 512,
    finetune_config: FinetuneConfig | None = None,
    out_csv: str | Path,
    progress: bool = True,
):
    """Measure every (variant, width, seed) not yet in ``out_csv``; returns the full table (pandas)."""
    import pandas as pd
    import torch

    from mpsearch.data import load_dataset
    from mpsearch.evaluation.evaluator import Evaluator
    from mpsearch.models.zoo import get_baseline

    chosen = _checked_variants(model, variants, widths, split)
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    rows = _read_rows(out_csv)
    data = load_dataset(dataset, data_dir=data_dir, calibration_size=calibration_size, calibration_seed=seeds[0])
    baseline = get_baseline(model, data, seed=0, checkpoint=checkpoint, progress=progress)
    ident = _same_baseline(rows, baseline, out_csv)
    done = {(r["variant"], r["policy"], int(r["seed"]), r["split"]) for r in rows}
    todo = [(v, w, s) for s in seeds for v in chosen for w in widths if (v.name, w, s, split) not in done]
    if len(todo) < len(seeds) * len(chosen) * len(widths):
        logger.info(f"{out_csv}: {len(seeds) * len(chosen) * len(widths) - len(todo)} measurements found, {len(todo)} to go")
    finetune_config = finetune_config or FinetuneConfig()
    for seed in seeds:
        jobs = [(v, w) for v, w, s in todo if s == seed]
        if not jobs:
            continue
        data = load_dataset(dataset, data_dir=data_dir, calibration_size=calibration_size, calibration_seed=seed)
        evaluators: dict[tuple, Evaluator] = {}
        fp32_masks: dict[str, torch.Tensor] = {}
        for variant, width in jobs:
            start = time.perf_counter()
            measured = _measure_variant(variant, width, baseline, data, seed=seed, split=split, limit=limit,
                                        finetune_config=finetune_config, evaluators=evaluators, fp32_masks=fp32_masks,
                                        progress=progress)
            row = {"variant": variant.name, "factor": variant.factor, "policy": width, "seed": seed, "split": split,
                   "images": measured.images, "accuracy": measured.accuracy, "fp32_accuracy": measured.fp32_accuracy,
                   "drop_pp": 100 * (measured.drop or 0.0), "wall_s": round(time.perf_counter() - start, 2),
                   "baseline": ident}
            rows.append(row)
            table = pd.DataFrame(rows, columns=_COLUMNS)
            atomic_write(out_csv, lambda f: table.to_csv(f, index=False), what="ablation table")
            logger.info(f"seed {seed} {variant.name:<18} {width:<5} accuracy {row['accuracy']:.2%} ({row['drop_pp']:+.2f} pp) "
                f"in {row['wall_s']:.0f} s")
    return pd.DataFrame(rows, columns=_COLUMNS)


def _same_baseline(rows: list[dict[str, Any]], baseline: Baseline, out_csv: Path) -> str:
    """The baseline's short identity, after checking that the rows already in ``out_csv`` were measured on it.

    The baseline is the same model for every seed (the seed draws calibration images): rows
    measured on another one (a retrained or other checkpoint) would mix two models in one table."""
    ident = (baseline.sha256 or "unidentified")[:16]
    other = sorted({str(r["baseline"]) for r in rows} - {ident})
    if other:
        raise UserError(f"{out_csv} holds rows measured on another baseline ({other[0]}, this one is {ident}); "
                        "move it away to start over")
    return ident


def _checked_variants(model: str, variants: Sequence[str], widths: Sequence[str], split: str) -> list[Variant]:
    """The named variants, after checking every name, width and observer before any model runs."""
    from mpsearch.models.zoo import is_vision_transformer
    from mpsearch.policy import parse_shorthand
    from mpsearch.quant import get_observer
    from mpsearch.quant.ptq import get_ptq

    chosen = [VARIANTS[v] if v in VARIANTS else None for v in variants]
    if None in chosen:
        bad = variants[chosen.index(None)]
        raise UserError(f"unknown ablation variant {bad!r}; choose from {', '.join(VARIANTS)}")
    for v in chosen:
        if v.needs_attention and not is_vision_transformer(model):
            raise UserError(f"ablation variant {v.name!r} needs a model with attention (a ViT/DeiT), not {model!r}; drop it")
        cfg = QuantConfig(**v.quant)
        get_observer(cfg.weight_observer), get_observer(cfg.act_observer), get_ptq(cfg.ptq)
    for w in widths:
        parse_shorthand(w)
    if split not in ("val", "test"):
        raise UserError(f"split: must be val or test, got {split!r}")
    return chosen  # type: ignore[return-value]


def _measure_variant(variant: Variant, width: str, baseline: Baseline, data: DataSplits, *, seed: int, split: str, limit: int | None,
                     finetune_config: FinetuneConfig, evaluators: dict[tuple, Any], fp32_masks: dict[str, Any],
                     progress: bool) -> Any:
    """One (variant, width) measured on ``split``: evaluators are shared between variants of the
    same quantization settings (fine-tuned ones excepted), fp32 masks between all of them."""
    from mpsearch.evaluation.evaluator import Evaluator
    from mpsearch.policy import uniform_policy
    from mpsearch.quant.finetune import finetune

    quant = QuantConfig(seed=seed, **variant.quant)
    key = tuple(sorted(variant.quant.items()))
    if variant.finetune or key not in evaluators:
        ev = Evaluator(baseline, data, quant=quant)
        if not variant.finetune:  # fine-tuning changes the model: never share it
            evaluators[key] = ev
    else:
        ev = evaluators[key]
    policy = uniform_policy(width, model=baseline.name, dataset=data.info.name, layers=ev.policy_layers,
                            checkpoint_sha256=baseline.sha256)
    if variant.layer:
        policy = replace(policy, layers={n: replace(p, **variant.layer) for n, p in policy.layers.items()})
    if variant.finetune:
        return finetune(ev, policy, replace(finetune_config, seed=seed), splits=(split,), progress=progress).after[split]
    ev.calibrate()
    mask = ev.quantized_mask(policy, split, limit, progress)
    if split not in fp32_masks:
        fp32_masks[split] = ev.fp32_mask(split, limit)
    return ev.summarize(policy, mask, split=split, fp32_mask=fp32_masks[split])


def summarize(table, split: str = "test"):
    """Mean and sample std (over seeds) of accuracy and drop per (variant, policy)."""
    part = table[table["split"] == split]
    grouped = part.groupby(["variant", "policy"], sort=False)
    out = grouped.agg(factor=("factor", "first"), seeds=("seed", "nunique"), accuracy_mean=("accuracy", "mean"),
                      accuracy_std=("accuracy", "std"), drop_pp_mean=("drop_pp", "mean"), drop_pp_std=("drop_pp", "std"),
                      fp32_accuracy=("fp32_accuracy", "mean"))
    return out.fillna({"accuracy_std": 0.0, "drop_pp_std": 0.0}).reset_index()


def markdown_table(summary, widths: Sequence[str]) -> str:
    """Variants as rows, policies as columns, cells ``drop mean ± std`` in points."""
    order = [v for v in VARIANTS if v in set(summary["variant"])]
    widths = [w for w in widths if w in set(summary["policy"])]
    lines = ["| variant | factor | " + " | ".join(w.upper() for w in widths) + " |",
             "|---|---|" + "---:|" * len(widths)]
    for name in order:
        cells = []
        for w in widths:
            hit = summary[(summary["variant"] == name) & (summary["policy"] == w)]
            if hit.empty:
                cells.append("")
                continue
            r = hit.iloc[0]
            n = int(r["seeds"])
            cells.append(f"{r['drop_pp_mean']:+.2f} ± {r['drop_pp_std']:.2f}" if n > 1 else f"{r['drop_pp_mean']:+.2f} (1 seed)")
        lines.append(f"| {name} | {VARIANTS[name].factor} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(path: str | Path, table, *, widths: Sequence[str], split: str, title: str, notes: Sequence[str]) -> Path:
    """The ablation report: how it was measured, the drop table, accuracies and what each variant is."""
    summary = summarize(table, split)
    fp32 = summary["fp32_accuracy"].iloc[0] if len(summary) else float("nan")
    lines = [f"# {title}", "", *notes, "",
             f"Accuracy change versus fp32 ({fp32:.2%}) on the {split} split, in percentage points, "
             "mean ± sample std over seeds (the seed draws the calibration images).", "",
             markdown_table(summary, widths), "", "Variants:", ""]
    lines += [f"- **{v.name}**: {v.description}" for v in VARIANTS.values() if v.name in set(summary["variant"])]
    return atomic_write_text(path, "\n".join(lines) + "\n", what="ablation report")


def ablation_grid(model: str, variants: Sequence[str] | str | None, widths: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """The (variants, widths) to measure: ``variants`` names, ``"all"`` (every one that applies to
    ``model``) or None (:func:`default_grid`); ``widths`` uniform shorthands, None for the grid's."""
    default_variants, default_widths = default_grid(model)
    if variants is None:
        variants = default_variants
    elif variants == "all":
        variants = applicable_variants(model)
    variants, widths = list(variants), default_widths if widths is None else list(widths)
    if not variants or not widths:
        raise UserError("variants and widths need at least one entry each")
    return variants, widths


def ablate(model: str, dataset: str = "fashion-mnist", *, variants: Sequence[str] | str | None = None,
           widths: Sequence[str] | None = None, seeds: Sequence[int] = (0, 1, 2), split: str = "test", limit: int | None = None,
           data_dir: str | None = None, checkpoint: str | None = None, finetune_steps: int = 300,
           out_dir: str | Path | None = None, progress: bool = True) -> tuple[Any, Path]:
    """Run (or resume) an ablation and write ``ablation.csv`` and ``ablation.md`` to ``out_dir``
    (default ``studies/ablation-<model>``); returns the per-cell summary and the report's path.
    ``variants``: names, ``"all"`` (every one that applies) or None (:func:`default_grid`);
    ``widths``: uniform shorthands, None for the grid's."""
    from mpsearch.host.machine import describe_machine
    from mpsearch.models.zoo import resolve_model_name

    resolve_model_name(model)
    variants, widths = ablation_grid(model, variants, widths)
    if limit is not None and limit < 1:
        raise UserError(f"limit: must be >= 1, got {limit}", fields=("limit",))
    out = Path(out_dir or f"studies/ablation-{model}")
    start = time.perf_counter()
    table = run_ablation(model=model, dataset=dataset, variants=variants, widths=widths, seeds=seeds, split=split, limit=limit,
                         data_dir=data_dir, checkpoint=checkpoint, finetune_config=FinetuneConfig(steps=finetune_steps),
                         out_csv=out / "ablation.csv", progress=progress)
    notes = [f"- model {model} on {dataset}; seeds {', '.join(map(str, seeds))}; "
             f"{split} split{f' (first {limit} images)' if limit else ''}",
             f"- machine: {describe_machine()}; this run {(time.perf_counter() - start) / 60:.1f} min",
             f"- regenerate: `mpsearch ablate --model {model} --variants {','.join(variants)} --widths {','.join(widths)} "
             f"--seeds {','.join(map(str, seeds))}`"]
    md = write_markdown(out / "ablation.md", table, widths=widths, split=split,
                        title=f"Quantization ablation: {model} on {dataset}", notes=notes)
    return summarize(table, split), md
