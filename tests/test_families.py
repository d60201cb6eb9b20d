"""Every timm family end to end on small images, or refused in one line.

Each of timm's ``test_*`` models (one or more per family) at 8 px (digits) and 28 px (a slice of
Fashion-MNIST): train a baseline briefly with its family's recipe, compute the default
sensitivity, run a small study, write the knee policy to a file, read it back, apply it with
:func:`mpsearch.quantize` and measure it again: the same accuracy as the study's front.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import timm
import torch

import mpsearch
from mpsearch.config import QuantConfig, SearchConfig, StudyConfig
from mpsearch.errors import UserError
from mpsearch.models.zoo import default_recipe, get_baseline, model_family
from mpsearch.policy import Policy
from mpsearch.quant import quantizable_layers
from mpsearch.quant.apply import quantizable_matmuls

MODELS = timm.list_models("test_*")
# Refused at 28 px: attention partitioned into windows (MaxViT) or sized for stage grids that 28
# does not halve into (CoAtNet: 7 -> 4 where its pooling gives 3); both run at 8, 16, 24, 32 px.
REFUSED = {8: set(), 28: {"test_coatnet", "test_maxvit"}}


@pytest.fixture(scope="module")
def small_data(cache_dir, digits, fmnist_small):
    """8 px digits and a 28 px slice of Fashion-MNIST, each with 16 calibration images."""
    fmnist = replace(fmnist_small, train=fmnist_small.train.subset(512), val=fmnist_small.val.subset(128),
                     test=fmnist_small.test.subset(128), calibration=fmnist_small.calibration.subset(16))
    return {8: replace(digits, calibration=digits.calibration.subset(16)), 28: fmnist}


def _brief(name: str):
    return replace(default_recipe(name), epochs=1, image_scales=(1.0,), keep_fraction=1.0, bf16=False)


# No accuracy floor: one brief epoch and 128 test images leave drops too noisy to hold one. What
# does not depend on the family is left to the tests of its own module, where it took most of a
# study's time here: the ILP seeds (tests/test_search_algorithms.py) and the MSE grid search of
# activation ranges (min-max ranges instead; tests/test_quant.py).
STUDY = StudyConfig(allow_weak_baseline=True, latency=None,  # one brief epoch: some families are still near chance
                    quant=QuantConfig(act_observer="minmax"),
                    search=SearchConfig(max_drop=None, population_size=4, eval_images=64, multi_fidelity_images=32,
                                        ilp_seeds=0, ilp_gap_plans=0, sensitivity_batches=1, sensitivity_probes=1,
                                        remeasure_points=1))


def test_every_family_with_a_test_model_runs_at_28_px():
    """Coverage by family, whatever the count of test models a timm release brings: every family
    has a test model that runs at 28 px (MaxViT and CoAtNet share the maxxvit family)."""
    families = {model_family(m) for m in MODELS}
    running = {model_family(m) for m in set(MODELS) - REFUSED[28]}
    assert {"resnet", "vision_transformer", "efficientnet", "convnext"} <= families
    assert running == families - {"maxxvit"}


@pytest.mark.slow
@pytest.mark.parametrize("size", [8, 28])
@pytest.mark.parametrize("name", MODELS)
def test_family_runs_end_to_end_or_is_refused_in_one_line(name, size, small_data, tmp_path):
    data = small_data[size]
    if name in REFUSED[size]:
        with pytest.raises(UserError) as refused:
            get_baseline(name, data, recipe=_brief(name), progress=False)
        message = str(refused.value)
        assert "\n" not in message and f"cannot run on {size} px images" in message and "it runs on 8, 16" in message
        return
    baseline = get_baseline(name, data, recipe=_brief(name), progress=False)
    result = mpsearch.search(baseline.model, data, budget=4, workers=0, progress=False,
                             config=replace(STUDY, model=name))
    assert len(result.front) >= 1
    assert all(math.isfinite(v) for v in result.trials["value_accuracy"])  # every trial measured
    policy = result.pick("knee")
    # The policy covers the documented layers: every plain conv and linear (depthwise and grouped
    # included) and the attention matmuls of timm's ViT/DeiT.
    covered = set(quantizable_layers(baseline.model)) | set(quantizable_matmuls(baseline.model))
    assert policy.layers and set(policy.layers) <= covered
    policy.save(tmp_path / "policy.json")
    loaded = Policy.load(tmp_path / "policy.json")
    quantized = mpsearch.quantize(baseline.model, loaded, data)
    row = result.front[result.front["trial"] == policy.provenance["trial"]].iloc[0]
    correct = total = 0
    with torch.no_grad():
        for x, y in data.test.batches(256):
            correct += int((quantized(x).argmax(1) == y).sum())
            total += len(y)
    assert abs(correct / total - row["test_accuracy"]) <= 1 / total
