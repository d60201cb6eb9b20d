"""Energy profiles as data: the :class:`EnergyProfile` a TOML file parses into, the registry of
formulas a profile names, and where profiles come from (built-in, installed, or a path).

Energy models are data: a TOML profile in ``mpsearch/cost/profiles/`` (or any ``.toml`` path)
names its sources, its units, its coefficients and the registered *formula* that turns them into
per-layer arithmetic and memory energy. Profiles give energy per input sample (batch 1) and charge
only the counted layers: norms, activations, softmax and residual adds are left out on purpose.

The built-in formulas live with the energy model (:mod:`mpsearch.cost.energy`), which registers
them here; importing :mod:`mpsearch.cost` imports it, so they are registered before any profile
is parsed.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from mpsearch.cost.counting import LayerCost
from mpsearch.errors import UserError
from mpsearch.registry import Registry

__all__ = [
    "EnergyProfile",
    "Formula",
    "LayerEnergy",
    "install_profile",
    "list_formulas",
    "list_profiles",
    "load_profile",
    "parse_profile_text",
    "register_formula",
    "user_profiles_dir",
]

# ---------------------------------------------------------------------------------------------
# Profiles and formulas


@dataclass(frozen=True)
class EnergyProfile:
    """A parsed energy profile: metadata plus the raw TOML tables its formula reads."""

    name: str
    description: str
    units: str
    formula: str
    sources: tuple[str, ...]
    data: Mapping[str, Any] = field(repr=False)
    origin: str = ""  # file it was read from, for error messages

    def value(self, *keys: str) -> Any:
        """``data[k1][k2]...``; a missing key is the profile author's error, so UserError."""
        node: Any = self.data
        for i, key in enumerate(keys):
            if not isinstance(node, Mapping) or key not in node:
                raise UserError(
                    f"energy profile {self.name!r} ({self.origin}) lacks {'.'.join(keys[: i + 1])}, "
                    f"which formula {self.formula!r} needs; add it to the profile"
                )
            node = node[key]
        return node

    def number(self, *keys: str) -> float:
        """A numeric coefficient, checked to be a non-negative number."""
        value = self.value(*keys)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise UserError(
                f"energy profile {self.name!r} ({self.origin}): {'.'.join(keys)} is {value!r}; "
                "use a non-negative number"
            )
        return float(value)

    def text(self, *keys: str) -> str:
        value = self.value(*keys)
        if not isinstance(value, str):
            raise UserError(
                f"energy profile {self.name!r} ({self.origin}): {'.'.join(keys)} must be a string"
            )
        return value


@dataclass(frozen=True)
class LayerEnergy:
    """Modeled energy of one layer for one sample, in the profile's units."""

    name: str
    arithmetic: float
    memory: float

    @property
    def total(self) -> float:
        return self.arithmetic + self.memory


Formula = Callable[[LayerCost, int | None, int | None, EnergyProfile], LayerEnergy]
"""(layer, weight_bits or None, activation_bits or None, profile) -> LayerEnergy."""

_FORMULAS: Registry[Formula] = Registry("energy formula")
register_formula = _FORMULAS.register  # makes a formula available to profiles as `formula = name`
list_formulas = _FORMULAS.names


def _profiles_dir() -> Traversable:
    return resources.files("mpsearch.cost").joinpath("profiles")


def _builtin_profiles() -> list[str]:
    return sorted(p.name[: -len(".toml")] for p in _profiles_dir().iterdir() if p.name.endswith(".toml"))


def user_profiles_dir() -> Path:
    """Where fitted profiles are installed by name (``mpsearch calibrate-energy``):
    ``$MPSEARCH_PROFILES``, else ``<cache root>/profiles`` (``~/.cache/mpsearch/profiles``)."""
    from mpsearch.host.paths import cache_root

    env = os.environ.get("MPSEARCH_PROFILES")
    return Path(env).expanduser() if env else cache_root() / "profiles"


def list_profiles() -> list[str]:
    """Names of the built-in profiles (the ``.toml`` files shipped in ``mpsearch/cost/profiles``)
    followed by those installed in :func:`user_profiles_dir`."""
    builtin = _builtin_profiles()
    user = user_profiles_dir()
    installed = sorted(p.stem for p in user.glob("*.toml") if p.stem not in builtin) if user.is_dir() else []
    return builtin + installed


def install_profile(text: str, name: str) -> Path:
    """Install a profile's TOML under ``name`` so every command (and every local worker) loads it
    by name; a built-in name cannot be shadowed."""
    from mpsearch.host.files import atomic_write_text

    if name in _builtin_profiles():
        raise UserError(f"profile name {name!r} is a built-in profile; pick another name", fields=("name",))
    profile = parse_profile_text(text, f"profile {name!r}")
    if profile.name != name:
        raise ValueError(f"profile text is named {profile.name!r}, not {name!r}")
    path = user_profiles_dir() / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text, what="energy profile")
    return path


_DUMMY = LayerCost("dummy", "matmul", 1, 1, 1, 2, 1, second_operand_elems=1)


def _parse_profile(data: dict[str, Any], origin: str) -> EnergyProfile:
    for key in ("name", "description", "units", "formula"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise UserError(f"energy profile {origin} needs a non-empty string {key!r}")
    sources = data.get("sources")
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) for s in sources):
        raise UserError(f"energy profile {origin} needs 'sources', a non-empty list of citations")
    if data["formula"] not in _FORMULAS:
        raise UserError(
            f"energy profile {origin} uses unknown formula {data['formula']!r}; "
            f"known formulas: {', '.join(list_formulas())}"
        )
    profile = EnergyProfile(
        data["name"], data["description"], data["units"], data["formula"], tuple(sources), data, origin
    )
    # Evaluate once at fp32 and at 8 bits so a missing coefficient fails at load, not mid-search.
    for wb, ab in ((None, None), (8, 8)):
        _FORMULAS.get(profile.formula)(_DUMMY, wb, ab, profile)
    return profile


def parse_profile_text(text: str, origin: str) -> EnergyProfile:
    """A profile from TOML text (``origin`` names it in errors): checked as a file would be."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"energy profile {origin} is not valid TOML: {exc}") from exc
    return _parse_profile(data, origin)


def load_profile(name_or_path: str | os.PathLike[str]) -> EnergyProfile:
    """A built-in profile by name (see :func:`list_profiles`) or a profile ``.toml`` file by path."""
    text = os.fspath(name_or_path)
    if text.endswith(".toml") or "/" in text or os.sep in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise UserError(
                f"energy profile file {path} does not exist; pass an existing .toml file "
                f"or a built-in profile name ({', '.join(list_profiles())})"
            )
        raw, origin = path.read_text(encoding="utf-8"), str(path)
    else:
        resource = _profiles_dir().joinpath(f"{text}.toml")
        installed = user_profiles_dir() / f"{text}.toml"
        if resource.is_file():
            raw, origin = resource.read_text(encoding="utf-8"), f"built-in {text}.toml"
        elif installed.is_file():
            raw, origin = installed.read_text(encoding="utf-8"), str(installed)
        else:
            raise UserError(
                f"unknown energy profile {text!r}; known profiles: {', '.join(list_profiles())} "
                "(or pass the path of a .toml profile file)"
            )
    return parse_profile_text(raw, origin)
