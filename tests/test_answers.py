"""The answer rule (mpsearch.study.answers) where the truth is known: simulated per-image correctness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mpsearch.study.answers import AnswerRule, Race, run_race, walk_bounds

FP32_ACCURACY = 0.93
RIGHT_WHEN_FP32_WRONG = 0.2  # how often a quantized model gets right an image fp32 gets wrong
# True drops (pp below fp32) of a front, most expensive first: points on both sides of every tolerance.
TRUE_DROPS = np.array([0.0, 0.2, 0.45, 0.55, 0.7, 0.9, 1.05, 1.2, 1.6, 1.95, 2.1, 2.5])
TOLERANCES = (0.5, 1.0, 2.0)
SEARCH_IMAGES, VAL_IMAGES = 400, 5000


def _draw(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fp32's correctness on ``n`` images and each candidate's, paired with it image by image."""
    fp32 = rng.random(n) < FP32_ACCURACY
    masks = []
    for drop in TRUE_DROPS:
        # P(wrong | fp32 right) chosen so that the expected accuracy is fp32's minus the drop
        wrong_when_right = (drop / 100 + (1 - FP32_ACCURACY) * RIGHT_WHEN_FP32_WRONG) / FP32_ACCURACY
        u = rng.random(n)
        masks.append(torch.from_numpy(np.where(fp32, u >= wrong_when_right, u < RIGHT_WHEN_FP32_WRONG)))
    return torch.from_numpy(fp32), masks


def _held_out_drops() -> np.ndarray:
    """Each candidate's drop on a large held-out draw (400,000 images: within ~0.05 pp of the truth)."""
    fp32, masks = _draw(400_000, np.random.default_rng(12345))
    return np.array([100 * (m.float().mean() - fp32.float().mean()).item() for m in masks])


def _choose(rule: AnswerRule, fp32: torch.Tensor, masks: list[torch.Tensor]) -> tuple[dict[float, int | None], int]:
    """The rule's answers on the images after the search's, and how many point-images it measured."""
    race = Race(rule, fp32[SEARCH_IMAGES:], len(masks))
    run_race(race, lambda wanted: {k: masks[k][SEARCH_IMAGES + a: SEARCH_IMAGES + b] for k, (a, b) in wanted.items()})
    return race.answers(), sum(race.images(k) for k in range(len(masks)))


def _bare(fp32: torch.Tensor, masks: list[torch.Tensor], tolerance: float) -> int | None:
    """The cheapest point whose drop on the search's images lies within the tolerance (the point estimate)."""
    drops = [100 * (m[:SEARCH_IMAGES].float().mean() - fp32[:SEARCH_IMAGES].float().mean()).item() for m in masks]
    within = [k for k, d in enumerate(drops) if -d <= tolerance]
    return max(within) if within else None  # most expensive first: the largest position is the cheapest


@pytest.mark.parametrize("confidence", [0.95, 0.8])
def test_answers_chosen_by_the_rule_hold_at_the_stated_confidence_and_point_estimates_do_not(confidence):
    truth = _held_out_drops()
    rule = AnswerRule(TOLERANCES, confidence)
    repeats = 150
    broken = {t: 0 for t in TOLERANCES}
    broken_bare = {t: 0 for t in TOLERANCES}
    answered = {t: 0 for t in TOLERANCES}
    measured = []
    for seed in range(repeats):
        fp32, masks = _draw(VAL_IMAGES, np.random.default_rng(seed))
        answers, images = _choose(rule, fp32, masks)
        measured.append(images)
        for t in TOLERANCES:
            if answers[t] is not None:
                answered[t] += 1
                broken[t] += bool(-truth[answers[t]] > t)
            bare = _bare(fp32, masks, t)
            broken_bare[t] += bare is not None and bool(-truth[bare] > t)
    for t in TOLERANCES:
        # Each answer holds at the stated confidence (a binomial margin of 2.5 standard errors over 150 draws) ...
        allowed = (1 - confidence) + 2.5 * np.sqrt(confidence * (1 - confidence) / repeats)
        assert broken[t] / repeats <= allowed, (t, broken[t])
        # ... and the rule answers: 1 and 2 pp almost always; 0.5 pp, where 4,600 images barely
        # settle the most accurate points (about 0.25 pp standard error), often.
        assert answered[t] >= (0.4 if t == 0.5 else 0.9) * repeats, (t, answered[t])
        # The cheapest point within the tolerance on the search's 400 images breaks it most of the time.
        assert broken_bare[t] / repeats > 0.4, (t, broken_bare[t])
    # Racing: far fewer images than measuring every point on every fresh image.
    assert np.mean(measured) < 0.6 * len(TRUE_DROPS) * (VAL_IMAGES - SEARCH_IMAGES)


def test_looks_spend_the_error_rate_in_proportion_to_the_images_they_add():
    rule = AnswerRule((1.0,), 0.95)
    assert rule.looks(4600) == [1150, 2300, 4600]
    assert rule.looks(600) == [300, 600] and rule.looks(120) == [120] and rule.looks(0) == []
    z = rule.z_values([1150, 2300, 4600])
    np.testing.assert_allclose(z, [2.2414, 2.2414, 1.9600], atol=1e-4)  # 1.25 %, 1.25 %, 2.5 % one-sided
    assert AnswerRule((1.0,), 0.95).z_values([100]) == pytest.approx([1.6449], abs=1e-4)


def test_the_walk_stops_at_the_first_point_not_proven():
    # bounds (pp, negative below fp32) of the front's points, most expensive first
    assert walk_bounds([-0.1, -0.4, -0.9, -0.3], 0.5) == 1  # the cheaper -0.3 lies behind a failure
    assert walk_bounds([-0.1, -0.4, -0.9, -0.3], 1.0) == 3
    assert walk_bounds([-0.6, -0.1], 0.5) is None
    assert walk_bounds([-0.1, float("nan"), -0.1], 0.5) == 0  # a point the rule did not measure is not proven
    assert walk_bounds([-0.5], 0.5) == 0  # at the bound counts as within


def test_the_race_measures_only_what_the_question_needs():
    # fp32 right on every image; point 0 never disagrees, point 1 is wrong on a fifth of the images.
    n = 2000
    fp32 = torch.ones(n, dtype=torch.bool)
    masks = [torch.ones(n, dtype=torch.bool), torch.arange(n) % 5 != 0, torch.ones(n, dtype=torch.bool)]
    race = Race(AnswerRule((1.0,), 0.95), fp32, 3, full=[2])
    assert race.wanted() == {2: 2000, 0: 500}  # the knee (point 2) to the end, point 0 to its first look
    run_race(race, lambda wanted: {k: masks[k][a:b] for k, (a, b) in wanted.items()})
    # Point 0 is proven at its first look; point 1 (20 pp below) fails at its first look and ends the walk.
    assert race.images(0) == 500 and race.images(1) == 500 and race.images(2) == 2000
    assert race.answers() == {1.0: 0}
    assert race.bound(1) < -15 and -1.0 < race.bound(0) < 0
