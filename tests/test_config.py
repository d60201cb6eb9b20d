from __future__ import annotations

import json

import pytest

from mpsearch.config import FinetuneConfig, QuantConfig, TrainRecipe
from mpsearch.errors import UserError


@pytest.mark.parametrize("config", [TrainRecipe(), TrainRecipe(epochs=2, lr=0.3, hflip=False), QuantConfig(),
                                    QuantConfig(weight_observer="mse", act_observer="percentile", seed=3),
                                    FinetuneConfig(), FinetuneConfig(steps=50, temperature=2.0, label_weight=0.5)])
def test_every_config_round_trips_through_json(config):
    restored = type(config).from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert restored.key() == config.key()


def test_keys_change_with_settings_and_configs_reject_bad_values():
    assert TrainRecipe().key() != TrainRecipe(epochs=5).key()
    with pytest.raises(UserError, match="recipe.epochs"):
        TrainRecipe(epochs=0)
    with pytest.raises(UserError, match="unknown field 'epoch'"):
        TrainRecipe.from_dict({"epoch": 3})
    with pytest.raises(UserError, match="version"):
        QuantConfig.from_dict({"version": 2})
    with pytest.raises(UserError, match="version"):
        QuantConfig.from_dict({"version": True})
    with pytest.raises(UserError, match=r"TrainRecipe.epochs: expected int, got '4'"):
        TrainRecipe.from_dict({"epochs": "4"})
    assert TrainRecipe.from_dict({"lr": 1}).lr == 1  # an int is a fine float
    with pytest.raises(UserError, match="finetune.steps"):
        FinetuneConfig(steps=0)


def test_a_study_record_with_a_retired_field_still_loads():
    """hawq_budgets gave way to ilp_seeds: config.yaml files written before must stay readable."""
    from mpsearch.config import StudyConfig

    old = {**StudyConfig().to_dict(), "hawq_budgets": [3.0, 4.0, 5.0, 6.0]}
    old.pop("ilp_seeds")
    assert StudyConfig.from_dict(old) == StudyConfig()
    with pytest.raises(UserError, match="unknown field 'hawq_budget'"):
        StudyConfig.from_dict({"hawq_budget": [3.0]})
