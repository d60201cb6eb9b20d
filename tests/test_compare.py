"""Baselines in the study (ILP, greedy), multi-fidelity promotions, the prefix cache, compare."""

from __future__ import annotations

import itertools

import numpy as np
import optuna
import pandas as pd
import pytest
import torch

from mpsearch.algorithms.base import SearchContext, create_algorithm
from mpsearch.algorithms.methods import parse_methods
from mpsearch.algorithms.planning import ilp_plans, plan_units
from mpsearch.algorithms.space import BoundSpace, SearchSpace
from mpsearch.config import StudyConfig, with_overrides
from mpsearch.errors import UserError
from mpsearch.evaluation.evaluator import Evaluator
from mpsearch.evaluation.multi_fidelity import Archive, pack_mask, rungs, unpack_mask
from mpsearch.objectives import full_fidelity
from mpsearch.policy import LayerPrecision, Policy
from mpsearch.study import run_study, storage_url
from mpsearch.study.compare import method_scores

LAYERS = ["a", "b", "c"]
PARAMS = {"a": 100, "b": 1000, "c": 10}


def _toy():
    space = BoundSpace(SearchSpace.from_dict({"version": 1, "weight_bits": [2, 4, 8], "act_bits": [4, 8], "layers": "all"}), LAYERS)

    def costs(x):
        d = space.decode(x)
        return np.array([sum(PARAMS[n] * d[n].weight_bits * d[n].act_bits for n in LAYERS) / (64 * 1110)])

    scale = {"a": 5.0, "b": 0.1, "c": 1.0}
    scores = {(n, b): PARAMS[n] * {2: 1.0, 4: 0.1, 8: 0.001}[b] * scale[n] for n in LAYERS for b in (2, 4, 8)}
    return space, costs, scores


def _drain(alg, evaluate):
    proposed = []
    while not alg.exhausted:
        xs = alg.ask()
        proposed += xs
        alg.tell(xs, np.array([evaluate(x) for x in xs]))
    return proposed


def test_units_tie_layer_inputs_to_the_weight_width():
    space, _, _ = _toy()
    units, widest = plan_units(space)
    assert [u.bits for u in units] == [(2, 4, 8)] * 3
    # weight 2 or 4 -> inputs at 4 bits (the narrowest choice >= the weight width), weight 8 -> 8
    decoded = [space.decode(_with(widest, u, o))["a"] for u in units[:1] for o in range(3)]
    assert [(p.weight_bits, p.act_bits) for p in decoded] == [(2, 4), (4, 4), (8, 8)]


def _with(x, unit, option):
    y = x.copy()
    for j, c in unit.settings[option].items():
        y[j] = c
    return y


def test_ilp_solutions_are_the_brute_force_optimum_at_their_energy():
    space, costs, scores = _toy()
    alg = create_algorithm("ilp")
    alg.setup(space, n_objectives=2, seed=0, population_size=4, context=SearchContext(costs, scores, 20))
    proposed = _drain(alg, lambda x: [0.1 + 0.01 * float(np.sum(x)), costs(x)[0]])
    plans = ilp_plans(space, SearchContext(costs, scores, 20), 20)
    distinct = list({tuple(x): x for x in plans}.values())
    # the plan first, then its front polished (one-step neighbours) until the budget is spent
    assert [tuple(x) for x in proposed[:len(distinct)]] == [tuple(x) for x in distinct]
    assert len(proposed) == 20 and len({tuple(x) for x in proposed}) == 20
    units, widest = plan_units(space)
    every = [_with(_with(_with(widest, units[0], i), units[1], j), units[2], k) for i, j, k in itertools.product(range(3), repeat=3)]

    def perturbation(x):
        d = space.decode(x)
        return sum(scores[n, d[n].weight_bits] for n in LAYERS)

    assert len(plans) >= 4
    for x in plans:
        # no policy of the unit model is at most as costly and strictly less perturbed
        better = [y for y in every if costs(y)[0] <= costs(x)[0] + 1e-12 and perturbation(y) < perturbation(x) - 1e-9]
        assert not better
    energies = [costs(x)[0] for x in plans]
    assert energies == sorted(energies, reverse=True)  # budgets walk from the widest to the cheapest
    assert min(energies) == pytest.approx(min(costs(y)[0] for y in every))


def test_solver_output_is_silenced_at_the_file_descriptor(capfd):
    import os

    from mpsearch.algorithms.planning import _quiet_solver_output

    with _quiet_solver_output():
        os.write(1, b"from C++\n")  # how HiGHS prints its stray debug line
    os.write(1, b"after\n")
    assert capfd.readouterr().out == "after\n"


def test_greedy_lowers_the_least_harmful_unit_first_by_measured_drop():
    space, costs, _ = _toy()
    units, widest = plan_units(space)
    # measured error: layer "b" costs the most accuracy per unit of energy saved
    harm = {"a": 0.001, "b": 0.2, "c": 0.0001}

    def measure(x):
        d = space.decode(x)
        return [0.05 + sum(harm[n] * (8 - d[n].weight_bits) / 6 for n in LAYERS), costs(x)[0]]

    alg = create_algorithm("greedy")
    alg.setup(space, n_objectives=2, seed=0, population_size=3, context=SearchContext(costs, None, 30))
    proposed = _drain(alg, measure)
    # every one of the 27 unit settings, once: the plan, then its front polished until none is left
    assert len(proposed) == 27 and len({tuple(x) for x in proposed}) == 27
    # phase 1 (every lower width fits in half the budget): the widest policy and 2 lower widths per unit
    phase1 = proposed[:7]
    assert sum(int((x != widest).any()) for x in phase1) == 6
    narrowest = next(i for i, x in enumerate(proposed) if all(p.weight_bits == 2 for p in space.decode(x).values()))
    walk = proposed[7 : narrowest + 1]  # walk steps equal to a phase-1 probe are not measured twice
    energies = [costs(x)[0] for x in walk]
    assert energies == sorted(energies, reverse=True)
    for x in walk:  # the fragile, costly layer goes down only after the robust ones are at their narrowest
        d = space.decode(x)
        assert d["b"].weight_bits == 8 or (d["a"].weight_bits == 2 and d["c"].weight_bits == 2)
    assert space.decode(walk[-1])["b"].weight_bits == 2


def test_planners_need_a_context_and_take_multi_fidelity():
    space, _, _ = _toy()
    with pytest.raises(ValueError, match="SearchContext"):
        create_algorithm("ilp").setup(space, n_objectives=2, seed=0)
    assert [(m.algorithm, m.multi_fidelity) for m in parse_methods("ilp+mf")] == [("ilp", True)]
    with pytest.raises(UserError, match="twice"):
        parse_methods("nsga2,nsga2")
    assert [(m.algorithm, m.multi_fidelity) for m in parse_methods("nsga2+mf,random")] == [("nsga2", True), ("random", False)]


def test_rungs_masks_and_paired_domination():
    assert rungs(100, 400) == [100, 200, 400]
    assert rungs(100, 300) == [100, 200, 300]
    assert rungs(500, 400) == [400]
    mask = torch.rand(203, generator=torch.Generator().manual_seed(0)) > 0.3
    assert torch.equal(unpack_mask(pack_mask(mask), 203), mask)
    archive = Archive()
    strong = torch.ones(400, dtype=torch.bool)
    archive.add([0.5], strong)
    weak = torch.ones(100, dtype=torch.bool)
    weak[:20] = False  # 20 images worse on the same images
    assert archive.surely_dominated([0.6], weak)  # costs more and is surely less accurate
    assert not archive.surely_dominated([0.4], weak)  # cheaper: not dominated whatever its accuracy
    close = torch.ones(100, dtype=torch.bool)
    close[:1] = False  # one image: within the interval
    assert not archive.surely_dominated([0.6], close)


def test_prefix_cache_gives_identical_masks_and_reuses_the_shared_prefix(digits, digits_baseline):
    cached = Evaluator(digits_baseline, digits)
    plain = Evaluator(digits_baseline, digits, prefix_cache=False)
    layers = cached.policy_layers
    gen = torch.Generator().manual_seed(0)
    policies = []
    base = {n: LayerPrecision(8, 8) for n in layers}
    for k in range(6):
        layers_k = dict(base)
        changed = layers[-1 - (k % 3)]  # late layers change: the early prefix is shared
        layers_k[changed] = LayerPrecision(int(torch.randint(2, 5, (1,), generator=gen)), 4)
        policies.append(Policy(model=digits_baseline.name, dataset=digits.info.name, layers=layers_k))
    for policy in policies:
        assert torch.equal(cached.quantized_mask(policy, "val", limit=150), plain.quantized_mask(policy, "val", limit=150))
    cache = cached.prefix_cache
    assert cache.usable
    assert cache.stages_reused > cache.stages_run / 2  # most stages came from the cache


def test_prefix_cache_turns_itself_off_for_a_vit(digits, digits_vit_baseline):
    ev = Evaluator(digits_vit_baseline, digits)
    plain = Evaluator(digits_vit_baseline, digits, prefix_cache=False)
    policy = ev.resolve_policy("w8a8")
    assert torch.equal(ev.quantized_mask(policy, "val", limit=64), plain.quantized_mask(policy, "val", limit=64))
    assert ev.prefix_cache.usable is False


TINY = {"model": "test_resnet", "dataset": "digits", "search.budget": 24, "search.population_size": 6, "search.eval_images": 120,
        "search.multi_fidelity_images": 30, "calibration_size": 256, "search.ilp_seeds": 3, "run.workers": 0,
        "latency": None}
BUDGET = TINY["search.budget"]
OBJECTIVES = ("accuracy", "energy")


@pytest.fixture(scope="module")
def compared(tmp_path_factory, digits_baseline):
    cfg = with_overrides(StudyConfig(), {"name": "cmp", "run.out_dir": str(tmp_path_factory.mktemp("cmp") / "cmp"),
                                         "checkpoint": str(digits_baseline.checkpoint),
                                         "search.algorithm": "nsga2+mf,random,ilp,greedy", **TINY})
    return cfg, run_study(cfg, progress=False)


def test_compare_runs_every_method_into_one_study_with_its_budget(compared):
    cfg, result = compared
    trials = result.trials
    assert set(trials["attr_run"]) == {"nsga2+mf", "random", "ilp", "greedy"}
    assert (trials.groupby("attr_run").size() == BUDGET).all()  # trials, whatever images each took
    mf = trials[trials["attr_run"] == "nsga2+mf"]
    assert (mf["attr_fidelity"] < 1).any(), "some candidates should stop at a lower rung"
    assert (mf["attr_fidelity"] == 1).any(), "candidates near the front climb to the top rung"
    assert set(mf["attr_images"]) <= {30, 60, 120}
    assert (trials[trials["attr_run"] != "nsga2+mf"]["attr_fidelity"] == 1).all()
    scores = method_scores(trials, OBJECTIVES)
    assert list(scores["method"]) == ["nsga2+mf", "random", "ilp", "greedy"]
    assert (scores["hypervolume"] > 0).all()
    assert "dominates_W8A8" in scores
    same = method_scores(trials, OBJECTIVES, np.array([1.0, 1.0]))  # one reference value per objective
    assert same["hypervolume"].tolist() == scores["hypervolume"].tolist()
    tighter = method_scores(trials, OBJECTIVES, np.array([0.5, 0.5]))
    assert (tighter["hypervolume"] < scores["hypervolume"]).all()
    assert (result.out_dir / "compare.png").stat().st_size > 0
    assert "| ilp |" in (result.out_dir / "compare.md").read_text()


def test_the_hypervolume_reference_is_the_costliest_policy_of_the_space(compared):
    """0 % accuracy at W8A8 everywhere (the widest choices of the default space), recorded with the
    study and used by compare.md: against fp32's (1, 1) every front loses exactly its best accuracy
    times the stretch of energy between the space's costliest policy and fp32."""
    import json

    cfg, result = compared
    ref = np.asarray(result.ref_point)
    ok = full_fidelity(result.trials)
    w8a8 = ok[ok["attr_method"] == "uniform:w8a8"]["value_energy"].iloc[0]
    assert ref[0] == 1.0 and ref[1] == pytest.approx(w8a8, rel=1e-6) and ref[1] < 1.0
    assert (ok["value_energy"] <= ref[1] * (1 + 1e-6)).all()
    assert json.loads((result.out_dir / "study.json").read_text())["hypervolume_reference"] == list(result.ref_point)
    scores = method_scores(result.trials, OBJECTIVES, ref).set_index("method")
    fp32 = method_scores(result.trials, OBJECTIVES, np.ones(2)).set_index("method")
    best = ok.groupby("attr_run")["value_accuracy"].max()
    for method in scores.index:
        assert fp32.loc[method, "hypervolume"] - scores.loc[method, "hypervolume"] == pytest.approx(
            best[method] * (1.0 - ref[1]), abs=1e-6)
    floored = method_scores(result.trials, OBJECTIVES, ref, cfg.search.max_drop)  # compare.md's fronts hold the floor
    assert f"| {floored['hypervolume'].iloc[0]:.4f} |" in (result.out_dir / "compare.md").read_text()


def test_a_promoted_candidate_is_measured_on_the_added_images_only(compared, digits, digits_baseline):
    cfg, result = compared
    trials = result.trials
    full = trials[(trials["attr_run"] == "nsga2+mf") & (trials["attr_images"] == 120)].iloc[0]
    ev = Evaluator(digits_baseline, digits)
    ev.calibrate()
    layers = {n: LayerPrecision(w, a) for n, (w, a) in __import__("json").loads(full["attr_layers"]).items()}
    policy = Policy(model="test_resnet", dataset=digits.info.name, layers=layers)
    mask = ev.quantized_mask(policy, "val", limit=120)
    assert float(mask.float().mean()) == pytest.approx(full["value_accuracy"])


def test_every_trial_keeps_its_mask_and_fronts_compare_paired(compared):
    from mpsearch.study.compare import paired_hypervolume_difference

    cfg, result = compared
    ok = full_fidelity(result.trials)
    for _, row in ok.iterrows():  # every method, multi-fidelity or not, records which images were right
        assert float(unpack_mask(row["attr_mask"], int(row["attr_images"])).float().mean()) == pytest.approx(row["value_accuracy"])
    scores = method_scores(result.trials, OBJECTIVES).set_index("method")
    diff, low, high = paired_hypervolume_difference(result.trials, "nsga2+mf", "ilp", OBJECTIVES, resamples=300)
    # value_accuracy is stored as float32: equal to ~1e-7
    assert diff == pytest.approx(scores.loc["nsga2+mf", "hypervolume"] - scores.loc["ilp", "hypervolume"], abs=1e-6)
    assert low < high and low - 0.05 < diff < high + 0.05
    back = paired_hypervolume_difference(result.trials, "ilp", "nsga2+mf", OBJECTIVES, resamples=300)
    assert back == pytest.approx((-diff, -high, -low))  # the same draws of images, the other way round
    assert paired_hypervolume_difference(result.trials, "ilp", "ilp", OBJECTIVES, resamples=50) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="masks"):
        paired_hypervolume_difference(result.trials.drop(columns="attr_mask"), "ilp", "random", OBJECTIVES)


def test_compare_study_resumes_without_new_trials(compared):
    cfg, result = compared
    again = run_study(cfg, progress=False)
    assert len(again.trials) == len(result.trials)
    assert len(optuna.load_study(study_name="cmp", storage=storage_url(cfg)).trials) == len(result.trials)
    cols = [c for c in result.trials.columns if c.startswith(("param_", "value_"))]
    pd.testing.assert_frame_equal(result.trials[cols], again.trials[cols])


def test_cli_compare_over_seeds_prints_every_method(digits_baseline, tmp_path, capsys):
    from mpsearch.cli import main

    args = ["compare", "--model", "test_resnet", "--dataset", "digits", "--checkpoint", str(digits_baseline.checkpoint),
            "--budget", "8", "--population", "4", "--eval-images", "60", "--workers", "0", "--set", "search.remeasure_points=1",
            "--set", "calibration_size=128", "--set", "latency=null", "--algorithm", "random,ilp", "--seeds", "0,1", "--name", "cli-cmp",
            "--out-dir", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "over 2 seeds" in out and "hypervolume ilp" in out and out.count("| ilp |") == 2
    for seed in (0, 1):
        assert (tmp_path / f"cli-cmp-s{seed}" / "compare.md").exists()
        assert "Kendall" in (tmp_path / f"cli-cmp-s{seed}" / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("budget", [6, 20])  # 6: the first generation of 8 cut short; 20: two full, then one cut short
def test_every_method_with_and_without_multi_fidelity_ends_with_exactly_its_budget(budget, digits, digits_baseline):
    """Every registered algorithm, plain and +mf, in one study: exactly ``budget`` trials each
    (a generation cut by the budget is never told, and nothing is asked after it); planners whose
    plan is shorter polish its front."""
    from mpsearch.algorithms.base import ALGORITHMS

    methods = [f"{name}{mf}" for name in ALGORITHMS.names() for mf in ("", "+mf")]
    cfg = with_overrides(StudyConfig(), {
        "model": "test_resnet", "dataset": "digits", "search.algorithm": ",".join(methods), "search.budget": budget,
        "search.population_size": 8, "search.eval_images": 16, "search.multi_fidelity_images": 4, "calibration_size": 64,
        "search.ilp_seeds": 3, "search.sensitivity_batches": 1, "search.sensitivity_probes": 2, "latency": None, "run.workers": 0})
    result = run_study(cfg, model=digits_baseline, data=digits, progress=False, remeasure=False)
    counts = result.trials.groupby("attr_run").size()
    assert counts.to_dict() == dict.fromkeys(methods, budget)
    assert (result.trials["state"] == "COMPLETE").all()
