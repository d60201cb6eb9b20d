"""Typed, versioned configuration objects that round-trip through JSON and YAML.

Each config is a frozen dataclass with defaults, value checks in ``__post_init__`` (errors name
the field) and a ``version``; ``to_dict``/``from_dict`` are exact inverses (a test saves every
config and loads it back). Its ``key()`` (a hash of the JSON) names caches, so a changed setting
never reuses a stale artifact. A :class:`StudyConfig` composes the others.
"""

from mpsearch.config._base import Config, config_from_dict, config_key, field_error, with_overrides
from mpsearch.config.quant import FinetuneConfig, QuantConfig
from mpsearch.config.study import RESUMABLE_FIELDS, LatencyConfig, RunConfig, SearchConfig, StudyConfig, timing_problem
from mpsearch.config.train import SIX_EPOCH_SCALES, TrainConfig

__all__ = [
    "Config", "config_from_dict", "config_key", "field_error", "with_overrides", "TrainConfig", "SIX_EPOCH_SCALES",
    "QuantConfig", "FinetuneConfig", "SearchConfig", "LatencyConfig", "timing_problem", "RunConfig", "StudyConfig", "RESUMABLE_FIELDS",
]
