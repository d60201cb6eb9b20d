from __future__ import annotations

import json

import pytest

from mpsearch.config import FinetuneConfig, LatencyConfig, QuantConfig, RunConfig, SearchConfig, StudyConfig, TrainConfig, with_overrides
from mpsearch.errors import UserError


@pytest.mark.parametrize("config", [TrainConfig(), TrainConfig(epochs=2, lr=0.3, hflip=False), QuantConfig(),
                                    QuantConfig(weight_observer="mse", act_observer="percentile", seed=3),
                                    FinetuneConfig(), FinetuneConfig(steps=50, temperature=2.0, label_weight=0.5),
                                    SearchConfig(), SearchConfig(algorithm="nsga2+mf,random", objectives=("accuracy", "size")),
                                    RunConfig(), RunConfig(workers=0, storage="sqlite:///x.db"), StudyConfig(),
                                    StudyConfig(seed=2, quant=QuantConfig(ptq="gptq"), finetune=FinetuneConfig(steps=7)),
                                    LatencyConfig(), LatencyConfig(batch_sizes=(1, 32), runs=40, threads=1),
                                    StudyConfig(latency=None)])
def test_every_config_round_trips_through_json(config):
    restored = type(config).from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert restored.key() == config.key()


def test_keys_change_with_settings_and_configs_reject_bad_values():
    assert TrainConfig().key() != TrainConfig(epochs=5).key()
    with pytest.raises(UserError, match="recipe.epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(UserError, match="recipe.epoch: unknown field"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(UserError, match="version"):
        QuantConfig.from_dict({"version": 2})
    with pytest.raises(UserError, match="version"):
        QuantConfig.from_dict({"version": True})
    with pytest.raises(UserError, match=r"recipe.epochs: expected int, got '4'"):
        TrainConfig.from_dict({"epochs": "4"})
    assert TrainConfig.from_dict({"lr": 1}).lr == 1  # an int is a fine float
    with pytest.raises(UserError, match="finetune.steps"):
        FinetuneConfig(steps=0)


def test_the_latency_section_is_on_by_default_may_be_null_and_checks_its_values():
    assert StudyConfig().latency == LatencyConfig() and StudyConfig().latency.batch_sizes == (1, 64)
    assert StudyConfig.from_dict({"latency": None}).latency is None  # typed "| None": may be off
    assert with_overrides(StudyConfig(latency=None), {"latency.runs": 50}).latency == LatencyConfig(runs=50)
    with pytest.raises(UserError, match="quant: expected a mapping"):
        StudyConfig.from_dict({"quant": None})  # a section that may not be off
    with pytest.raises(UserError, match="latency.runs: at least 30"):
        LatencyConfig(runs=10)
    with pytest.raises(UserError, match="latency.batch_sizes"):
        LatencyConfig(batch_sizes=(1, 0))
    with pytest.raises(UserError, match="latency.threads"):
        StudyConfig.from_dict({"latency": {"threads": 0}})


def test_a_study_config_composes_its_sections_and_reads_yaml(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("model: test_resnet\nseed: 3\nsearch:\n  budget: 24\n  objectives: [accuracy, size]\n"
                    "quant:\n  ptq: gptq\nfinetune:\n  steps: 5\n")
    config = StudyConfig.load(path)
    assert config.search.budget == 24 and config.search.objectives == ("accuracy", "size") and config.quant.ptq == "gptq"
    assert config.quant.seed == 3 and config.finetune.seed == 3  # the study's seed seeds every section
    assert config.search.population_size == SearchConfig().population_size  # unset fields keep their defaults
    (tmp_path / "again.yaml").write_text(config.to_yaml())
    assert StudyConfig.load(tmp_path / "again.yaml") == config
    path.write_text("search:\n  budgt: 24\n")
    with pytest.raises(UserError, match=r"s.yaml: search.budgt: unknown field") as err:
        StudyConfig.load(path)
    assert err.value.fields == ("search.budgt",)
    path.write_text("search: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML .* at line 2"):
        StudyConfig.load(path)


def test_overrides_set_dotted_fields_and_are_checked_like_a_file():
    config = with_overrides(StudyConfig(), {"search.budget": 24, "seed": 1, "finetune.steps": 9, "run.workers": 0})
    assert (config.search.budget, config.seed, config.quant.seed, config.finetune.steps, config.run.workers) == (24, 1, 1, 9, 0)
    with pytest.raises(UserError, match="search.budget: expected int, got 'lots'"):
        with_overrides(StudyConfig(), {"search.budget": "lots"})
    with pytest.raises(UserError, match="seed: not a section; cannot set seed.budget"):
        with_overrides(StudyConfig(), {"seed.budget": 1})
    with pytest.raises(UserError, match="run.workers: -1"):
        with_overrides(StudyConfig(), {"run.workers": -5})


def test_a_resume_may_change_where_and_how_much_but_not_what_is_measured():
    stored = StudyConfig(name="s")
    assert with_overrides(stored, {"search.budget": 400, "run.workers": 0, "run.storage": "sqlite:///x.db",
                                   "finetune.steps": 5, "search.remeasure_points": 0}).conflict_with(stored) is None
    assert with_overrides(stored, {"search.population_size": 4}).conflict_with(stored) == (
        "search.population_size", "search.population_size is 20 in the study, 4 now")
    assert with_overrides(stored, {"quant.act_observer": "minmax"}).conflict_with(stored)[0] == "quant.act_observer"
    assert with_overrides(stored, {"seed": 1}).conflict_with(stored)[0] == "seed"
