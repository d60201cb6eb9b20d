"""End-to-end studies on a tiny model: outputs, the Optuna record, reproducibility, export."""

from __future__ import annotations

import json
import os

import numpy as np
import optuna
import pandas as pd
import pytest
import torch

from mpsearch.config import StudyConfig, with_overrides
from mpsearch.errors import UserError
from mpsearch.evaluation.evaluator import Evaluator
from mpsearch.evaluation.executors import EvalTask, run_task
from mpsearch.policy import Policy
from mpsearch.quant.backends import resolve_backend
from mpsearch.study import load_result, run_study, storage_url

TINY = {"model": "test_resnet", "dataset": "digits", "search.budget": 16, "search.population_size": 8,
        "search.eval_images": 120, "calibration_size": 256, "search.ilp_seeds": 3, "latency": None}


@pytest.fixture(scope="module")
def tiny_checkpoint(digits_baseline):
    return str(digits_baseline.checkpoint)


def tiny_config(tmp_path, name, checkpoint, **fields):
    """A tiny study in ``tmp_path/name``; ``fields`` are dotted config fields."""
    return with_overrides(StudyConfig(), {"name": name, "run.out_dir": str(tmp_path / name), "checkpoint": checkpoint,
                                          **TINY, "run.workers": 0, **fields})


def _run(tmp_path, name, checkpoint, **fields):
    cfg = tiny_config(tmp_path, name, checkpoint, **fields)
    return cfg, run_study(cfg, progress=False)


def pick_policy(folder, pick):
    return load_result(folder).choose(pick)


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_checkpoint):
    return _run(tmp_path_factory.mktemp("studies"), "tiny", tiny_checkpoint)


def test_study_writes_everything_and_records_every_trial(study):
    cfg, result = study
    out = result.out_dir
    for name in ("config.yaml", "trials.csv", "trials.parquet", "pareto.csv", "front.png", "front.html", "report.md"):
        assert (out / name).stat().st_size > 0, name
    loaded = optuna.load_study(study_name="tiny", storage=storage_url(cfg))
    assert len(loaded.trials) == 16
    assert loaded.metric_names == ["accuracy", "energy"]
    assert loaded.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    methods = [t.user_attrs["method"] for t in loaded.trials]
    assert "uniform:w8a8" in methods and any(m.startswith("ilp:") for m in methods)
    pareto = pd.read_csv(out / "pareto.csv")
    assert len(pareto) >= 1 and StudyConfig.load(out / "config.yaml").run.storage == storage_url(cfg)
    assert ((pareto["test_ci_low"] <= pareto["test_accuracy"]) & (pareto["test_accuracy"] <= pareto["test_ci_high"])).all()
    assert pareto["rel_energy_horowitz45nm"].is_monotonic_increasing
    assert len(list((out / "policies").glob("*.json"))) == len(pareto)
    assert result.hypervolume > 0 and load_result(out).hypervolume == result.hypervolume
    assert "hypervolume" in (out / "report.md").read_text()


@pytest.mark.slow
def test_same_seed_same_study_and_workers_do_not_matter(study, tmp_path, tiny_checkpoint):
    _, first = study
    _, again = _run(tmp_path, "tiny-again", tiny_checkpoint)
    _, ray2 = _run(tmp_path, "tiny-ray2", tiny_checkpoint, **{"run.workers": 2})
    cols = [c for c in first.trials.columns if c.startswith(("param_", "value_"))]
    pd.testing.assert_frame_equal(first.trials[cols], again.trials[cols])
    pd.testing.assert_frame_equal(first.trials[cols], ray2.trials[cols])
    # ... measured by the backend "auto" chose here (int8 kernels on a CPU with int8 dot products)
    assert set(first.trials["attr_backend"]) == set(ray2.trials["attr_backend"]) == {resolve_backend("auto")}
    # The front is re-measured on the workers: the same numbers whoever measured them.
    remeasured = ["trial", "val_images", "val_accuracy", "val_drop_bound_pp", "test_accuracy", "test_drop_pp", "test_ci_low",
                  "test_ci_high"]
    pd.testing.assert_frame_equal(first.front[remeasured], ray2.front[remeasured])


def test_the_answers_are_chosen_after_the_search_and_every_point_they_rest_on_is_measured_on_test(study):
    _, full = study
    front = full.front
    # The search's figures: the trial's accuracy and drop on its validation images.
    trials = full.trials.set_index("trial")
    np.testing.assert_array_equal(front["search_accuracy"], trials.loc[front["trial"], "value_accuracy"])
    np.testing.assert_allclose(front["search_drop_pp"], trials.loc[front["trial"], "attr_val_drop_pp"].astype(float), atol=1e-4)
    assert front["front_knee"].sum() == 1
    # The answer rule measured the knee on every validation image the search left (180 - 120),
    # and the costliest point, where every walk starts, on at least one look.
    selection = full.selection
    assert selection["first_image"] == 120 and selection["images"] == 60 and selection["looks"] == [60]
    assert front.loc[front["front_knee"], "val_images"].item() == 60
    assert front.loc[front["rel_energy_horowitz45nm"].idxmax(), "val_images"] == 60
    measured = front[front["val_images"] > 0]
    assert (measured["val_drop_bound_pp"] < measured["val_drop_pp"]).all()
    assert selection["measured_images"] == int(front["val_images"].sum())
    for tolerance, trial in selection["answers"].items():
        if trial is not None:
            assert full.pick(f"drop<={tolerance}").provenance["trial"] == trial


def test_the_points_measured_on_test_are_what_the_answers_rest_on_then_the_ends_of_the_front():
    from mpsearch.study.front import _test_positions

    assert _test_positions(10, 4, [7, 3]) == [0, 3, 7, 9]  # the answers' points, then the ends
    assert _test_positions(10, 6, [7, 3]) == [0, 2, 3, 4, 7, 9]  # ... then points spread between
    assert _test_positions(10, 2, [7, 3, 5]) == [3, 5, 7]  # never fewer than the rule measured
    assert _test_positions(4, 8, [1]) == _test_positions(10, 0, [1])[:4] == [0, 1, 2, 3]  # 0 or a cap above the front: all


def test_the_front_is_exported_and_timed_in_onnxruntime(tmp_path, tiny_checkpoint):
    _, result = _run(tmp_path, "tiny-timed", tiny_checkpoint, **{"search.budget": 8, "search.remeasure_points": 2,
                                                                  "latency.batch_sizes": [1, 8]})
    front = result.front
    # How many points the tiny front holds depends on the CPU's arithmetic (see the test above).
    assert 1 <= len(front) <= 2 and front["latency_threads"].eq(os.cpu_count()).all()
    for batch in (1, 8):
        assert (front[f"latency_b{batch}_ms"] > 0).all() and front[f"fp32_latency_b{batch}_ms"].nunique() == 1
        np.testing.assert_allclose(front[f"speedup_b{batch}"], front[f"fp32_latency_b{batch}_ms"] / front[f"latency_b{batch}_ms"])
    assert (front["latency_b8_ms"] > front["latency_b1_ms"]).all()  # eight images take longer than one
    # The cheapest point quantizes every layer: int8 weights, a quarter of the fp32 bytes plus the graph.
    assert front["onnx_mib"].iloc[0] < 0.5 * front["fp32_onnx_mib"].iloc[0]
    saved = pd.read_csv(result.out_dir / "pareto.csv")
    np.testing.assert_allclose(saved["latency_b1_ms"], front["latency_b1_ms"])
    report = (result.out_dir / "report.md").read_text()
    assert "latency_b8_ms" in report and "Latency: each point exported to ONNX" in report


def _pattern(layers_json: str) -> str:
    """mpsearch.study.latency.layer_pattern of a trial's recorded layers."""
    return "".join("i" if w and a else "w" if w else "a" if a else "f" for w, a in json.loads(layers_json).values())


@pytest.mark.slow
def test_the_latency_objective_is_timed_once_per_layer_pattern_and_kept_for_resume(tmp_path, tiny_checkpoint):
    with pytest.raises(UserError, match="keep the latency section"):
        with_overrides(StudyConfig(), {"search.objectives": ["accuracy", "latency"], "latency": None})
    fields = {"search.objectives": ["accuracy", "latency"], "search.space": "int8_or_float", "search.budget": 8,
              "search.population_size": 4, "search.sensitivity": "none", "search.remeasure_points": 2,
              "latency.batch_sizes": [1], "latency.warmup": 1, "latency.threads": 1}
    _, result = _run(tmp_path, "tiny-latency", tiny_checkpoint, **fields)
    stored = json.loads((result.out_dir / "latency_objective.json").read_text())
    assert stored["settings"]["batch_size"] == 1 and stored["settings"]["threads"] == 1
    timings = stored["patterns"]
    done = result.trials[result.trials["state"] == "COMPLETE"]
    patterns = [_pattern(layers) for layers in done["attr_layers"]]
    fp32 = timings["f" * len(patterns[0])]
    # Every trial's value is its pattern's one timing over the fp32 model's: equal patterns, equal values.
    np.testing.assert_allclose(done["value_latency"], [timings[p] / fp32 for p in patterns])
    assert len(set(patterns)) >= 2  # the space offers float layers: candidates differ in kernels, not only widths
    front = result.front.set_index("trial")
    np.testing.assert_allclose(front["rel_latency"], done.set_index("trial").loc[front.index, "value_latency"])

    # Resumed with a larger budget: the recorded trials keep their values, and the timings their file.
    _, resumed = _run(tmp_path, "tiny-latency", tiny_checkpoint, **{**fields, "search.budget": 12})
    again = resumed.trials.set_index("trial").loc[done["trial"], "value_latency"]
    np.testing.assert_array_equal(again.to_numpy(), done["value_latency"].to_numpy())
    kept = json.loads((result.out_dir / "latency_objective.json").read_text())["patterns"]
    assert all(kept[p] == t for p, t in timings.items()) and len(resumed.trials) == 12


def test_search_only_stops_before_the_front(tmp_path, tiny_checkpoint):
    cfg = tiny_config(tmp_path, "search-only", tiny_checkpoint, **{"search.budget": 8})
    result = run_study(cfg, progress=False, remeasure=False)
    assert result.front is None and len(result.trials) == 8 and result.hypervolume > 0
    assert (result.out_dir / "trials.csv").exists() and not (result.out_dir / "pareto.csv").exists()
    with pytest.raises(UserError, match="no re-measured front"):
        result.pick("knee")
    with pytest.raises(UserError, match="no re-measured front"):
        pick_policy(result.out_dir, "knee")


def test_a_worker_returns_the_per_image_mask(digits_baseline, digits):
    ev = Evaluator(digits_baseline, digits)
    policy = ev.resolve_policy("w4a8")
    outcome = run_task(ev, EvalTask(3, policy.to_dict(), split="test", keep_mask=True))
    expected = ev.quantized_mask(policy, "test")
    assert outcome.index == 3 and outcome.images == len(expected) == len(digits.test)
    assert torch.equal(outcome.mask(), expected) and outcome.correct == int(expected.sum())
    with pytest.raises(ValueError, match="keep_mask"):
        run_task(ev, EvalTask(0, policy.to_dict())).mask()


def test_export_then_evaluate_reproduces_the_stored_metrics(study, digits_baseline, digits):
    from mpsearch.config import QuantConfig
    from mpsearch.evaluation.evaluator import Evaluator

    _, result = study
    for pick in ("knee", "max-accuracy", "min-energy"):
        policy, why = pick_policy(result.out_dir, pick)
        assert isinstance(policy, Policy) and "trial" in why
    policy, _ = pick_policy(result.out_dir, "max-accuracy")
    stored = policy.provenance["metrics"]
    # The study stores the backend "auto" resolved to on this machine.
    assert policy.settings().quant == QuantConfig(backend=resolve_backend("auto"))
    assert policy.settings().calibration_size == 256
    ev = Evaluator(digits_baseline, digits, quant=policy.settings().quant)
    assert ev.evaluate(ev.resolve_policy(policy), split="test").accuracy == stored["test_accuracy"]
    images = result.config.search.eval_images  # the search's figures, on its images
    assert ev.evaluate(ev.resolve_policy(policy), split="val", limit=images).accuracy == stored["search_accuracy"]
    if stored["val_images"]:  # the answer rule's, on the validation images after the search's
        mask = ev.quantized_mask(ev.resolve_policy(policy), "val", start=images, limit=images + stored["val_images"])
        assert int(mask.sum()) / len(mask) == stored["val_accuracy"]
    low, _ = pick_policy(result.out_dir, "energy<=0.5")
    assert low.provenance["metrics"]["rel_energy_horowitz45nm"] <= 0.5
    with pytest.raises(UserError, match="no Pareto point"):
        pick_policy(result.out_dir, "energy<=0.0001")
    with pytest.raises(UserError, match="use knee"):
        pick_policy(result.out_dir, "best")
    some = pick_policy(result.out_dir, "trial:5")[0]
    assert some.provenance["trial"] == 5


def test_rerunning_a_finished_study_resumes_it_without_new_trials(study, messages):
    cfg, first = study
    again = run_study(cfg, progress=False)
    assert any("resuming study 'tiny': 16 of 16 trials recorded" in m for m in messages)
    pd.testing.assert_frame_equal(again.trials, first.trials)
    pd.testing.assert_frame_equal(again.front, first.front)


def test_a_larger_budget_extends_a_study_as_if_it_had_run_at_once(study, tmp_path, tiny_checkpoint):
    cfg, _ = study
    extended = run_study(with_overrides(cfg, {"search.budget": 24}), progress=False)
    _, direct = _run(tmp_path, "tiny-24", tiny_checkpoint, **{"search.budget": 24})
    cols = ["trial"] + [c for c in direct.trials.columns if c.startswith(("param_", "value_"))]
    pd.testing.assert_frame_equal(extended.trials[cols], direct.trials[cols])


def test_bad_study_settings(tmp_path):
    with pytest.raises(UserError, match="search.objectives"):
        with_overrides(StudyConfig(), {"search.objectives": ["energy", "accuracy"]})
    with pytest.raises(UserError, match="search.budget: must be >= 1"):
        with_overrides(StudyConfig(), {"search.budget": 0})
    with pytest.raises(UserError, match="search.budget: expected int"):
        with_overrides(StudyConfig(), {"search.budget": "lots"})
    with pytest.raises(UserError, match="unknown search algorithm"):
        run_study(tiny_config(tmp_path, "bad", None, **{"search.algorithm": "annealing"}), progress=False)
    assert not (tmp_path / "bad").exists()


def test_a_study_can_round_weights_with_gptq_and_exports_it(tmp_path, tiny_checkpoint):
    cfg, result = _run(tmp_path, "tiny-gptq", tiny_checkpoint, **{"search.budget": 8, "quant.ptq": "gptq",
                                                                  "search.remeasure_points": 1})
    _, nearest = _run(tmp_path, "tiny-rtn", tiny_checkpoint, **{"search.budget": 8, "search.remeasure_points": 1})
    # Same search space and first population; the 2-bit uniform policy is where rounding matters most.
    def w2a8(trials):
        return float(trials.loc[trials["attr_method"] == "uniform:w2a8", "value_accuracy"].iloc[0])
    assert w2a8(result.trials) > w2a8(nearest.trials)
    policy, _ = pick_policy(result.out_dir, "knee")
    assert policy.settings().quant.ptq == "gptq"


def test_finetune_front_adds_measured_qat_points(tmp_path, tiny_checkpoint, digits_baseline, digits):
    from mpsearch.quant.finetune import attach_finetuned

    ft = {"search.remeasure_points": 2, "finetune.steps": 10}
    cfg, result = _run(tmp_path, "tiny-ft", tiny_checkpoint, **ft)
    pareto = pd.read_csv(result.out_dir / "pareto.csv")
    assert len(pareto) == 2 and pareto["qat_test_accuracy"].between(0, 1).all()
    assert "qat_test_drop_pp" in (result.out_dir / "report.md").read_text()
    # Each fine-tuned policy re-measures, from its checkpoint, to the accuracy the table reports.
    for _, row in pareto.iterrows():
        path = result.out_dir / row["qat_policy_file"]
        policy = Policy.load(path)
        ev = Evaluator(digits_baseline, digits)
        assert attach_finetuned(ev, policy, path.parent)
        ev.calibrate()
        assert ev.evaluate(policy, split="test").accuracy == pytest.approx(row["qat_test_accuracy"], abs=1e-12)
    # Resuming reads the fine-tuned points back instead of training them again.
    stamp = {p: p.stat().st_mtime_ns for p in (result.out_dir / "policies").glob("*.pt")}
    _run(tmp_path, "tiny-ft", tiny_checkpoint, **ft)
    assert {p: p.stat().st_mtime_ns for p in (result.out_dir / "policies").glob("*.pt")} == stamp


def test_a_vit_study_searches_attention_matmuls_and_exports_them(tmp_path, digits_vit_baseline, digits):
    """ViT end to end: matmul genes in the trials, ranking-aware calibration recorded, export re-measures."""
    from mpsearch.policy import is_matmul

    cfg, result = _run(tmp_path, "vit", str(digits_vit_baseline.checkpoint), model="test_vit",
                       **{"search.budget": 10, "search.population_size": 5, "search.remeasure_points": 2,
                          "quant.attention_calibration": "ranking", "search.space": "deit_tiny"})
    matmul_params = [c for c in result.trials.columns if c.startswith("param_m:")]
    assert len(matmul_params) == 2 * len(digits_vit_baseline.model.blocks)
    assert result.trials["value_accuracy"].max() > 0.5
    policy, _ = pick_policy(result.out_dir, "max-accuracy")
    matmuls = {n: p for n, p in policy.layers.items() if is_matmul(n)}
    assert matmuls and all(p.granularity == "per-tensor" and p.weight_bits == p.act_bits for p in matmuls.values())
    quant = policy.settings().quant
    assert quant.attention_calibration == "ranking"
    ev = Evaluator(digits_vit_baseline, digits, quant=quant)
    assert ev.evaluate(ev.resolve_policy(policy), split="test").accuracy == policy.provenance["metrics"]["test_accuracy"]


def test_a_fitted_profile_is_searched_beside_the_analytical_one(tmp_path, tiny_checkpoint, monkeypatch):
    """--objectives accuracy,energy,energy@NAME: a calibrated profile installed by name becomes a
    third objective, with values equal to the relative energy under that profile."""
    monkeypatch.setenv("MPSEARCH_PROFILES", str(tmp_path / "installed-profiles"))  # the in-process evaluator finds it there
    from mpsearch.cost import count_costs, energy, fp32_energy, load_profile
    from mpsearch.cost.calibration import fit_profile, profile_toml
    from mpsearch.cost.energy_profiles import install_profile
    from mpsearch.cost.kernel_table import profile_layers
    from mpsearch.data import load_dataset
    from mpsearch.models.zoo import create_model

    info = load_dataset("digits").info
    model = create_model("test_resnet", info)
    table = count_costs(model, (info.in_chans, info.image_size, info.image_size))
    kernels = profile_layers(model, table, model_name="test_resnet", dataset="digits", precisions=["fp32", "int8"],
                             batch_size=4, window_s=0.005, energy_meter=None, progress=False)
    install_profile(profile_toml(fit_profile(kernels), kernels, name="tiny-fit", table_path="mem"), "tiny-fit")
    cfg, result = _run(tmp_path, "beside", tiny_checkpoint, **{"search.budget": 8, "search.population_size": 4,
                                                               "search.sensitivity": "none",
                                                               "search.objectives": ["accuracy", "energy", "energy@tiny-fit"]})
    loaded = optuna.load_study(study_name="beside", storage=storage_url(cfg))
    assert loaded.metric_names == ["accuracy", "energy", "energy@tiny-fit"]
    fitted = load_profile("tiny-fit")
    reference = fp32_energy(table, fitted).total
    for trial in loaded.trials:
        bits = {name: tuple(pair) for name, pair in json.loads(trial.user_attrs["layers"]).items()}
        assert trial.values[2] == pytest.approx(energy(table, bits, fitted).total / reference, rel=1e-9)
    # Every width up to 8 bits runs the same int8 kernel, and every searched width is: under the
    # measured profile all trials cost the same, whatever their mix of 2 to 8 bits (the analytical
    # objective tells them apart).
    assert len({round(t.values[2], 12) for t in loaded.trials}) == 1
    assert len({round(t.values[1], 12) for t in loaded.trials}) > 1
    with pytest.raises(UserError, match="energy@PROFILE"):
        with_overrides(StudyConfig(), {"search.objectives": ["accuracy", "energy@"]})
    with pytest.raises(UserError, match="a profile name"):
        with_overrides(StudyConfig(), {"search.energy_profile": "studies/x/fit.toml"})
