"""Typed, versioned configuration objects that round-trip through JSON.

Each config is a frozen dataclass with defaults, value checks in ``__post_init__`` and a
``version``; ``to_dict``/``from_dict`` are exact inverses (a test saves every config and loads it
back). Its ``key()`` (a hash of the JSON) names caches, so a changed setting never reuses a stale
artifact.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

from mpsearch.errors import UserError

__all__ = ["TrainRecipe", "QuantConfig", "config_key", "config_from_dict"]

C = TypeVar("C")


def config_key(config: Any) -> str:
    """A stable hash of a config's JSON form (sha256 hex)."""
    return hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()


def config_from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build ``cls`` from a dict, rejecting unknown fields and other versions with a clear line."""
    if not isinstance(data, dict):
        raise UserError(f"{cls.__name__}: expected an object of settings, got {type(data).__name__}")
    defaults = {f.name: f.default for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(defaults))
    if unknown:
        raise UserError(f"{cls.__name__}: unknown field {unknown[0]!r}; known fields are {sorted(defaults)}")
    version = data.get("version", 1)
    if type(version) is not int or version != 1:
        raise UserError(f"{cls.__name__}.version: this mpsearch reads version 1, got {version!r}")
    for name, value in data.items():
        expected = type(defaults[name])  # every field has a plain-typed default
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if expected is float else type(value) is expected
        if not ok:
            raise UserError(f"{cls.__name__}.{name}: expected {expected.__name__}, got {value!r}")
    return cls(**data)


@dataclass(frozen=True)
class TrainRecipe:
    """How a baseline is trained: SGD + Nesterov, one-cycle LR, label smoothing, crop/flip.

    The default reaches >= 93.5 % test accuracy for ResNet-18 on Fashion-MNIST in under 30 minutes
    on 2 CPU cores (measured numbers in the README). bf16 autocast and channels_last roughly halve
    the CPU time per epoch; evaluation always runs in float32.
    """

    version: int = 1
    epochs: int = 4
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.25
    crop_padding: int = 2
    hflip: bool = True
    bf16: bool = True
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise UserError(f"recipe.epochs: must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise UserError(f"recipe.batch_size: must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise UserError(f"recipe.lr: must be > 0, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"recipe.label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.warmup_fraction < 1:
            raise UserError(f"recipe.warmup_fraction: must be in (0, 1), got {self.warmup_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainRecipe:
        return config_from_dict(cls, data)

    def key(self) -> str:
        return config_key(self)


@dataclass(frozen=True)
class QuantConfig:
    """How quantizers are calibrated (the policy says which bit widths; this says how).

    Weight ranges come from ``weight_observer`` on the weights themselves; activation ranges from
    ``act_observer`` on ``act_samples`` values per layer drawn while the calibration split runs
    through the float model once.
    """

    version: int = 1
    weight_observer: str = "minmax"
    act_observer: str = "mse"
    act_samples: int = 2**16
    calibration_batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        # Observer names are checked against the registry by the quantizer that uses them
        # (config sits below quant in the import order).
        if self.act_samples < 16:
            raise UserError(f"quant.act_samples: must be >= 16, got {self.act_samples}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        return config_from_dict(cls, data)

    def key(self) -> str:
        return config_key(self)
