from __future__ import annotations

import pytest
import torch

from mpsearch.errors import UserError
from mpsearch.evaluation.evaluator import Evaluator
from mpsearch.policy import Policy


@pytest.fixture(scope="module")
def evaluator(digits_baseline, digits):
    ev = Evaluator(digits_baseline, digits)
    ev.calibrate()
    return ev


def test_fp32_policy_reproduces_fp32_accuracy_exactly(evaluator):
    r = evaluator.evaluate(evaluator.resolve_policy("fp32"), split="test")
    assert r.images == 360
    assert r.accuracy == r.fp32_accuracy and r.drop == 0.0
    assert r.costs.relative() == {"size": 1.0, "bops": 1.0, "energy_horowitz45nm": 1.0, "energy_seed-lab4": 1.0}
    lo, hi = r.accuracy_ci95
    assert lo <= r.accuracy <= hi and hi - lo > 0.01  # 360 images: a CI of a few points


def test_uniform_costs_relative_to_fp32(evaluator):
    r = evaluator.evaluate(evaluator.resolve_policy("w8a8:all"), split="val")
    rel = r.costs.relative()
    assert rel["bops"] == pytest.approx((8 * 8) / (32 * 32))  # every MAC at 8x8 instead of 32x32
    table = evaluator.cost_table
    weights = sum(layer.weight_params for layer in table.layers)
    fp32 = r.costs.fp32_size_bytes
    assert fp32 - r.costs.size_bytes == pytest.approx(weights * 3)  # 1 byte per weight instead of 4
    w4 = evaluator.evaluate(evaluator.resolve_policy("w4a4:all"), split="val")
    for key in rel:
        assert w4.costs.relative()[key] < rel[key] < 1.0


def test_evaluation_is_deterministic(evaluator, digits_baseline, digits):
    p = evaluator.resolve_policy("w4a4")
    a = evaluator.evaluate(p, split="val")
    fresh = Evaluator(digits_baseline, digits)  # calibrates and quantizes from scratch
    b = fresh.evaluate(fresh.resolve_policy("w4a4"), split="val")
    assert (a.correct, a.costs) == (b.correct, b.costs)
    assert torch.equal(evaluator.quantized_mask(p, "val"), fresh.quantized_mask(p, "val"))


def test_policies_for_other_models_or_data_sets_are_refused(evaluator, tmp_path):
    p = evaluator.resolve_policy("w8a8")
    other = Policy.from_dict(dict(p.to_dict(), model="resnet18"))
    with pytest.raises(UserError, match="policy.model"):
        evaluator.resolve_policy(other)
    elsewhere = Policy.from_dict(dict(p.to_dict(), dataset="fashion-mnist"))
    with pytest.raises(UserError, match="policy.dataset"):
        evaluator.resolve_policy(elsewhere)
    with pytest.raises(UserError, match="neither a shorthand"):
        evaluator.resolve_policy(str(tmp_path / "nope.json"))
