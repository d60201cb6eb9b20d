"""The ablation runner: one measurement per (variant, width, seed), resumable, summarised over seeds."""

from __future__ import annotations

import pandas as pd
import pytest

from mpsearch.cli import main
from mpsearch.config import QuantConfig
from mpsearch.data import load_dataset
from mpsearch.errors import UserError
from mpsearch.evaluation.evaluator import Evaluator
from mpsearch.models.zoo import get_baseline
from mpsearch.study.ablate import VARIANTS, markdown_table, run_ablation, summarize


def test_ablation_measures_resumes_and_summarizes(cache_dir, digits_baseline, tmp_path, messages):
    ckpt = str(digits_baseline.checkpoint)
    kw = dict(model="test_resnet", dataset="digits", variants=["default", "per-tensor-weights"], widths=["w8a8", "w3a8"],
              seeds=[0, 1], split="test", checkpoint=ckpt, calibration_size=256, out_csv=tmp_path / "a.csv",
              progress=False)
    table = run_ablation(**kw)
    assert len(table) == 8 and set(table["seed"]) == {0, 1}
    # The default W3A8 cell is what evaluate measures with seed 1's calibration set.
    data = load_dataset("digits", calibration_size=256, calibration_seed=1)
    ev = Evaluator(get_baseline("test_resnet", data, checkpoint=ckpt), data, quant=QuantConfig(seed=1))
    direct = ev.evaluate(ev.resolve_policy("w3a8"), split="test")
    row = table[(table["variant"] == "default") & (table["policy"] == "w3a8") & (table["seed"] == 1)].iloc[0]
    assert row["accuracy"] == direct.accuracy and row["drop_pp"] == pytest.approx(100 * direct.drop)
    # A rerun measures nothing new; more seeds add only their rows.
    again = run_ablation(**kw)
    assert again.equals(table) and any("8 measurements found, 0 to go" in m for m in messages)
    summary = summarize(run_ablation(**{**kw, "seeds": [0, 1, 2]}))
    cell = summary[(summary["variant"] == "per-tensor-weights") & (summary["policy"] == "w3a8")].iloc[0]
    rows = pd.read_csv(tmp_path / "a.csv")
    drops = rows[(rows["variant"] == "per-tensor-weights") & (rows["policy"] == "w3a8")]["drop_pp"]
    assert len(rows) == 12 and cell["seeds"] == 3
    assert cell["drop_pp_mean"] == pytest.approx(drops.mean()) and cell["drop_pp_std"] == pytest.approx(drops.std())
    md = markdown_table(summary, ["w8a8", "w3a8"])
    assert md.count("\n") == 3 and f"{cell['drop_pp_mean']:+.2f} ± {cell['drop_pp_std']:.2f}" in md
    rows.assign(baseline="0123456789abcdef").to_csv(tmp_path / "a.csv", index=False)  # as if another model measured them
    with pytest.raises(UserError, match="rows measured on another baseline"):
        run_ablation(**kw)


def test_ablation_rejects_bad_input_before_measuring(tmp_path):
    with pytest.raises(UserError, match="unknown ablation variant 'brecq2'"):
        run_ablation(model="test_resnet", dataset="digits", variants=["brecq2"], out_csv=tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="not an ablation table"):
        run_ablation(model="test_resnet", dataset="digits", variants=["default"], out_csv=tmp_path / "b.csv")
    assert main(["ablate", "--model", "test_resnet", "--dataset", "digits", "--seeds", "x"]) == 2
    assert set(VARIANTS) >= {"default", "gptq", "adaround", "gptq+qat", "bias-correction", "act-percentile"}


def test_the_grid_depends_on_the_model(tmp_path):
    from mpsearch.study.ablate import VIT_WIDTHS, applicable_variants, default_grid

    assert default_grid("deit_tiny") == (["default", "ranking-aware"], list(VIT_WIDTHS))
    variants, widths = default_grid("resnet18")
    assert "ranking-aware" not in variants and "gptq" in variants and "w2a8" in widths
    assert "ranking-aware" in applicable_variants("test_vit")
    with pytest.raises(UserError, match="'ranking-aware' needs a model with attention"):
        run_ablation(model="test_resnet", dataset="digits", variants=["ranking-aware"], out_csv=tmp_path / "a.csv")


def test_ranking_aware_ablation_on_a_vit(digits_vit_baseline, tmp_path):
    """Standard vs ranking-aware attention calibration, measured on a small ViT, two seeds."""
    table = run_ablation(model="test_vit", dataset="digits", variants=["default", "ranking-aware"], widths=["w8a6"],
                         seeds=[0, 1], split="val", checkpoint=str(digits_vit_baseline.checkpoint),
                         calibration_size=128, out_csv=tmp_path / "vit.csv", progress=False)
    assert len(table) == 4 and set(table["variant"]) == {"default", "ranking-aware"}
    assert (table["fp32_accuracy"] > 0.8).all()
    assert (table["drop_pp"] > -10).all()  # W8A6, 6-bit attention matmuls included, keeps this ViT working
