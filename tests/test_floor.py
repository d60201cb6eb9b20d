"""The accuracy floor (search.max_drop): a constraint of the search, a filter of the front, the
re-measurement and the picks; and the fp32 predictions the re-measurement pairs with, cached."""

from __future__ import annotations

import numpy as np
import optuna
import pandas as pd
import pytest

from mpsearch.algorithms.pareto import non_dominated
from mpsearch.config import StudyConfig, with_overrides
from mpsearch.errors import UserError
from mpsearch.host.paths import cache_root
from mpsearch.objectives import DROP_ATTR, DROP_TOLERANCE_PP, floor_violation, front_hypervolume, full_fidelity, objective_matrix, within_floor
from mpsearch.study import SearchResult, load_result, run_study, storage_url

FLOOR = 3.0
# test_resnet on digits: at 120 validation images and 2-8 bit widths most random policies lose
# more than 3 points, a few do not (W8A8 among them).
FLOOR_STUDY = {"model": "test_resnet", "dataset": "digits", "search.budget": 24, "search.population_size": 8,
               "search.eval_images": 120, "calibration_size": 256, "search.algorithm": "random",
               "search.sensitivity": "none", "search.max_drop": FLOOR, "latency": None, "run.workers": 0}


@pytest.fixture(scope="module")
def floored(tmp_path_factory, digits_baseline):
    out = tmp_path_factory.mktemp("floor") / "floor"
    config = with_overrides(StudyConfig(), {**FLOOR_STUDY, "name": "floor", "checkpoint": str(digits_baseline.checkpoint),
                                            "run.out_dir": str(out)})
    return config, run_study(config, progress=False)


def test_candidates_below_the_floor_are_recorded_but_never_on_the_front(floored, digits_baseline, digits):
    config, result = floored
    trials = full_fidelity(result.trials)
    drops = trials[f"attr_{DROP_ATTR}"].astype(float)
    below = set(trials["trial"][drops < -FLOOR])
    unfloored = set(trials["trial"].iloc[non_dominated(objective_matrix(trials, config.search.objectives))])
    assert below and unfloored & below  # without the floor, points below it would be on the front
    assert not set(result.front["trial"]) & below
    assert set(result.front["trial"]) <= unfloored | set(trials["trial"][drops >= -FLOOR])
    # each trial's drop is its accuracy minus fp32's on the same images
    from mpsearch.evaluation.evaluator import Evaluator

    row = trials.iloc[0]
    fp32 = Evaluator(digits_baseline, digits).fp32_mask("val", int(row["attr_images"]))
    assert row[f"attr_{DROP_ATTR}"] == pytest.approx(100 * (row["value_accuracy"] - int(fp32.sum()) / len(fp32)), abs=1e-9)
    # the study's hypervolume is the floored front's, smaller than the whole front's
    ref = np.asarray(result.ref_point)
    assert result.hypervolume == pytest.approx(front_hypervolume(result.trials, config.search.objectives, ref, FLOOR))
    assert result.hypervolume < front_hypervolume(result.trials, config.search.objectives, ref, None)
    # Optuna records the floor as each trial's constraint (<= 0 feasible): the dashboard shows it
    study = optuna.load_study(study_name="floor", storage=storage_url(config))
    for trial in study.trials:
        if trial.number in below:
            assert trial.system_attrs["constraints"][0] > 0
        elif DROP_ATTR in trial.user_attrs:
            assert trial.system_attrs["constraints"][0] <= 0


def test_pareto_rows_hold_the_floor_or_say_they_do_not_and_picks_skip_them(floored):
    config, result = floored
    pareto = pd.read_csv(result.out_dir / "pareto.csv")
    assert len(pareto)
    for _, row in pareto.iterrows():
        assert bool(row["within_floor"]) == (min(row["test_drop_pp"], row["search_drop_pp"]) >= -FLOOR - DROP_TOLERANCE_PP)
    # The search's figures: every row is within the floor there, so test decides.
    trials = result.trials.set_index("trial")
    np.testing.assert_allclose(pareto["search_drop_pp"], trials.loc[pareto["trial"], f"attr_{DROP_ATTR}"].astype(float), atol=1e-4)
    assert (pareto["search_drop_pp"] >= -FLOOR).all() and pareto["front_knee"].sum() <= 1
    loaded = load_result(result.out_dir)
    for spec in ("knee", "max-accuracy", "min-energy"):
        trial = loaded.pick(spec).provenance["trial"]
        assert bool(pareto.loc[pareto["trial"] == trial, "within_floor"].iloc[0]), spec
    answers = loaded.answers()
    assert list(answers["answer"]) == ["knee", "cheapest within 0.5 pp", "cheapest within 1 pp", "cheapest within 2 pp"]
    report = (result.out_dir / "report.md").read_text()
    assert report.index("## Answers") < report.index("## Pareto set")


def _front(rows: list[tuple[int, float, float, bool]]) -> SearchResult:
    """A study result holding only a front: (trial, val drop pp, energy, within floor) per row;
    each drop's lower bound lies 0.3 pp below it."""
    from mpsearch.policy import Policy

    front = pd.DataFrame([{"trial": t, "policy": f"p{t}", "search_accuracy": 0.9 + d / 100, "search_drop_pp": d,
                           "val_images": 1000, "val_accuracy": 0.9 + d / 100, "val_drop_pp": d, "val_drop_bound_pp": d - 0.3,
                           "test_accuracy": 0.9 + d / 100, "test_drop_pp": d, "rel_energy_horowitz45nm": e,
                           "within_floor": ok} for t, d, e, ok in rows])
    template = Policy(model="m", dataset="d", layers={})
    policies = {t: template.with_provenance(trial=t) for t, *_ in rows}
    return SearchResult(config=with_overrides(StudyConfig(), {"search.max_drop": 2.0}), trials=pd.DataFrame(), front=front,
                        policies=policies, template=template, hypervolume=0.0, ref_point=(1.0, 1.0), wall_s=0.0)


def test_picks_choose_only_points_that_hold_the_floor():
    # trial 3 is cheapest and most accurate on validation but fell below the floor on test
    result = _front([(1, -0.2, 0.5, True), (2, -1.5, 0.2, True), (3, -0.1, 0.1, False)])
    assert result.pick("min-energy").provenance["trial"] == 2
    assert result.pick("max-accuracy").provenance["trial"] == 1
    assert result.pick("drop<=1").provenance["trial"] == 1  # proven within 1 pp: -0.5 at worst
    assert result.pick("drop<=2").provenance["trial"] == 2  # -1.8 at worst
    assert result.pick("drop<=1.7").provenance["trial"] == 1  # -1.5 measured, but -1.8 at worst
    assert result.pick("trial:3").provenance["trial"] == 3  # asked for by number: still given
    with pytest.raises(UserError, match="no Pareto point is proven within 0.4 pp of fp32 at 0.95 confidence"):
        result.pick("drop<=0.4")
    with pytest.raises(UserError, match="no re-measured point holds the accuracy floor"):
        _front([(3, -0.1, 0.1, False)]).pick("knee")


def test_the_knee_is_the_whole_fronts_knee_while_it_holds_the_floor():
    rows = [(1, -0.2, 0.5, True), (2, -1.5, 0.2, True), (3, -0.6, 0.3, True)]
    assert _front(rows).pick("knee").provenance["trial"] == 3  # of these three points alone
    # The search's front had more points; its knee (marked) is trial 1: that is what "knee" gives.
    result = _front(rows)
    result.front["front_knee"] = result.front["trial"] == 1
    assert result.pick("knee").provenance["trial"] == 1
    # ... unless trial 1 fell below the floor on test: then the knee of the points that hold it.
    result.front.loc[result.front["trial"] == 1, "within_floor"] = False
    assert result.pick("knee").provenance["trial"] in (2, 3)


def test_a_drop_at_a_bound_counts_as_within_it():
    from mpsearch.study.answers import walk_bounds

    # A drop recorded in float32 (-5 pp on 400 images stored as -5.000003) is at the floor, not below it.
    assert floor_violation(-5.000003, 5.0) == 0.0 and floor_violation(-5.25, 5.0) == pytest.approx(0.25)
    assert within_floor(pd.DataFrame({f"attr_{DROP_ATTR}": [-5.000003, -5.25]}), 5.0).tolist() == [True, False]
    # ... and at an answer's bound: a point whose lower bound is 0.5 pp below fp32 is proven within 0.5 pp.
    assert walk_bounds([0.0, -0.500003, -2.000003], 0.5) == 1 and walk_bounds([0.0, -0.501, -2.0], 0.5) == 0


def test_no_candidate_within_the_floor_is_one_clear_error(tmp_path, digits_baseline):
    config = with_overrides(StudyConfig(), {**FLOOR_STUDY, "name": "none-within", "checkpoint": str(digits_baseline.checkpoint),
                                            "search.max_drop": 0.0, "search.budget": 8, "search.space": str(_two_bit_space(tmp_path)),
                                            "run.out_dir": str(tmp_path / "none-within")})
    with pytest.raises(UserError, match=r"no candidate of study 'none-within' lies within the accuracy floor \(0 pp"):
        run_study(config, progress=False)


def test_the_fp32_predictions_are_cached_per_baseline_and_split(floored, digits_baseline, digits):
    from mpsearch.evaluation.evaluator import Evaluator

    folder = cache_root() / "fp32" / digits_baseline.sha256
    cached = sorted(p.name.split("-")[0] for p in folder.glob("*.npy"))
    assert cached == ["test", "val"]  # what the answers and the front on test are paired with
    for split in cached:
        mask = np.load(next(folder.glob(f"{split}-*.npy")))
        assert np.array_equal(mask.astype(bool), Evaluator(digits_baseline, digits).fp32_mask(split).numpy())


def _two_bit_space(tmp_path):
    path = tmp_path / "two-bit.yaml"
    path.write_text("version: 1\nweight_bits: [2, 3]\nact_bits: [2, 3]\npinned: {}\n")
    return path


def test_multi_fidelity_stops_candidates_surely_below_the_floor():
    import torch

    from mpsearch.evaluation.multi_fidelity import surely_below_floor

    fp32 = torch.ones(200, dtype=torch.bool)
    far = fp32.clone()
    far[:40] = False  # 20 points below fp32 on these images
    near = fp32.clone()
    near[:4] = False  # 2 points below
    assert surely_below_floor(far, fp32, 5.0)
    assert not surely_below_floor(near, fp32, 5.0)
    few = torch.ones(10, dtype=torch.bool)
    few[:2] = False  # 20 points below, on 10 images: not sure
    assert not surely_below_floor(few, fp32, 5.0)


def test_the_max_drop_flag_sets_the_floor_or_removes_it():
    from mpsearch.cli import build_parser
    from mpsearch.cli.study import study_configs

    def floor(*flags):
        args = build_parser().parse_args(["optimize", "--model", "test_resnet", "--sensitivity", "none", *flags])
        return study_configs(args)[0].search

    assert floor().max_drop == 5.0 and floor().sensitivity == "none"
    assert floor("--max-drop", "1.5").max_drop == 1.5
    assert floor("--max-drop", "none").max_drop is None


def test_drop_picks_walk_the_front_from_the_most_expensive_point():
    # a cheaper point proven within 1 pp behind a costlier one that is not: the walk stops there
    result = _front([(1, 0.0, 0.9, True), (2, -1.2, 0.5, True), (3, -0.2, 0.2, True)])
    assert result.pick("drop<=1").provenance["trial"] == 1
    assert result.pick("drop<=1.5").provenance["trial"] == 3
    answers = result.answers().set_index("answer")
    assert answers.loc["cheapest within 1 pp", "trial"] == 1 and answers.loc["cheapest within 2 pp", "trial"] == 3
