"""Search space files: which bit widths the search may give which layer, as versioned YAML data.

A space (``search_spaces/<name>.yaml``) lists the weight and activation widths to choose from,
which layers are searched, which are pinned and which share one width::

    version: 1
    description: ResNet-18 default space
    weight_bits: [2, 3, 4, 5, 6, 8]
    act_bits: [4, 5, 6, 8]
    layers: all                      # or a list of names / "re:<regex>" patterns
    pinned:                          # held fixed; "first"/"last" = first/last layer run
      first: {weight_bits: 8, act_bits: 8}
      last: {weight_bits: 8, act_bits: 8}
    groups:                          # each entry: layers sharing one weight and one act width
      - "re:layer1\\\\..*"
    matmul_bits: [4, 6, 8]           # optional: attention matmuls (ViTs), one width per matmul

Attention matmuls (``<attention>.matmul_qk``, ``<attention>.matmul_av``; see
:mod:`mpsearch.policy`) are layers like the others, but both of their operands are activations,
so each gets one gene choosing from ``matmul_bits`` (both operands at that width, per tensor).
Without ``matmul_bits`` they are not searched and stay float32 unless pinned. A group holds
matmuls only or layers with weights only.

A layer pattern is an exact fully qualified name, ``re:<regex>`` (matched against the whole
name, as :func:`re.fullmatch`) or one of the keywords ``first``/``last``. Precedence: a pinned
layer is fixed even when ``layers`` selects it; a layer neither selected nor pinned stays float32.
A layer may not be pinned and grouped, nor be in two groups.

:class:`SearchSpace` is the file, typed and validated; :class:`~mpsearch.algorithms.space.BoundSpace`
resolves it against one model's layers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mpsearch.errors import UserError, parse_user_yaml, read_user_file
from mpsearch.policy import LayerPrecision

__all__ = [
    "SPACE_VERSION",
    "SPACES_DIR",
    "SearchSpace",
    "available_spaces",
    "default_space_for",
]

SPACE_VERSION = 1
# The repository's search_spaces/ folder (data, not code; next to the package in a checkout).
SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"
_MIN_BITS, _MAX_BITS = 2, 8
_KEYWORDS = ("first", "last")
_FIELDS = ("version", "description", "weight_bits", "act_bits", "layers", "pinned", "groups", "matmul_bits")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _bits_order(bits: int | None) -> int:
    return 32 if bits is None else bits  # null (float32) sorts as the widest choice


def _check_choices(value: Any, where: str) -> tuple[int | None, ...]:
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{where}: expected a list of bit widths like [2, 4, 8], got {value!r}")
    if not value:
        raise UserError(f"{where}: empty; list at least one bit width (2 to 8, or null for float32)")
    for i, bits in enumerate(value):
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not _MIN_BITS <= bits <= _MAX_BITS):
            raise UserError(
                f"{where}[{i}]: bits must be an integer from {_MIN_BITS} to {_MAX_BITS} or null (float32), got {bits!r}"
            )
    if len(set(value)) != len(value):
        raise UserError(f"{where}: lists a bit width twice ({list(value)}); list each once")
    return tuple(sorted(value, key=_bits_order))  # index order = bit order, so neighbours are close widths


def _check_pattern(pattern: Any, where: str) -> str:
    if not isinstance(pattern, str) or not pattern.strip():
        raise UserError(f"{where}: expected a layer name, 're:<regex>', 'first' or 'last', got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise UserError(f"{where}: invalid regular expression {pattern[3:]!r} ({exc}); fix the pattern after 're:'") from None
    return pattern


@dataclass(frozen=True)
class SearchSpace:
    """A search space file, typed and validated; ``to_dict``/``from_dict`` are exact inverses.

    ``layers`` is ``"all"`` or a tuple of patterns; ``pinned`` maps a pattern to the precision it
    holds; each ``groups`` entry is a tuple of patterns whose layers share one width per operand.
    Choices are kept sorted (``null`` = float32 last) so gene indices follow the bit order.
    """

    weight_bits: tuple[int | None, ...]
    act_bits: tuple[int | None, ...]
    layers: str | tuple[str, ...] = "all"
    pinned: dict[str, LayerPrecision] = field(default_factory=dict)
    groups: tuple[tuple[str, ...], ...] = ()
    description: str = ""
    matmul_bits: tuple[int | None, ...] = ()  # empty: attention matmuls are not searched
    version: int = SPACE_VERSION
    # Where the space came from (file path or name), for error messages; not part of its identity.
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen: normalise once)
        if type(self.version) is not int or self.version != SPACE_VERSION:
            raise UserError(f"space.version: this mpsearch reads version {SPACE_VERSION}, got {self.version!r}")
        if not isinstance(self.description, str):
            raise UserError(f"space.description: expected text, got {self.description!r}")
        set_("weight_bits", _check_choices(self.weight_bits, "space.weight_bits"))
        set_("act_bits", _check_choices(self.act_bits, "space.act_bits"))
        if self.matmul_bits:
            set_("matmul_bits", _check_choices(self.matmul_bits, "space.matmul_bits"))
        elif not isinstance(self.matmul_bits, (list, tuple)):
            raise UserError(f"space.matmul_bits: expected a list of bit widths like [4, 8], got {self.matmul_bits!r}")
        else:
            set_("matmul_bits", ())
        if isinstance(self.layers, str):
            if self.layers != "all":
                raise UserError(f"space.layers: use `all` or a list of layer names / 're:<regex>' patterns, got {self.layers!r}")
        elif isinstance(self.layers, (list, tuple)):
            if not self.layers:
                raise UserError("space.layers: empty list; use `all` or list layer names / 're:<regex>' patterns")
            set_("layers", tuple(_check_pattern(p, f"space.layers[{i}]") for i, p in enumerate(self.layers)))
        else:
            raise UserError(f"space.layers: use `all` or a list of layer names / 're:<regex>' patterns, got {self.layers!r}")
        if not isinstance(self.pinned, Mapping):
            raise UserError(
                f"space.pinned: expected a mapping of layer pattern -> {{weight_bits, act_bits}}, got {self.pinned!r}"
            )
        pinned: dict[str, LayerPrecision] = {}
        for key, prec in self.pinned.items():
            _check_pattern(key, f"space.pinned.{key}")
            if not isinstance(prec, LayerPrecision):
                raise UserError(f"space.pinned.{key}: expected {{weight_bits, act_bits}}, got {prec!r}")
            pinned[key] = prec
        set_("pinned", pinned)
        if not isinstance(self.groups, (list, tuple)):
            raise UserError(f"space.groups: expected a list of patterns (or lists of patterns), got {self.groups!r}")
        groups = []
        for i, group in enumerate(self.groups):
            patterns = (group,) if isinstance(group, str) else group
            if not isinstance(patterns, (list, tuple)) or not patterns:
                raise UserError(f"space.groups[{i}]: expected a pattern or a non-empty list of patterns, got {group!r}")
            single = isinstance(group, str)
            groups.append(
                tuple(_check_pattern(p, f"space.groups[{i}]" + ("" if single else f"[{j}]")) for j, p in enumerate(patterns))
            )
        set_("groups", tuple(groups))

    # -- dict / YAML ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        defaults = asdict(LayerPrecision())
        pinned = {}
        for key, prec in self.pinned.items():
            spec = asdict(prec)
            # weight_bits/act_bits always; the quantizer options only where they differ, to stay readable
            pinned[key] = {k: v for k, v in spec.items() if k in ("weight_bits", "act_bits") or v != defaults[k]}
        return {
            "version": self.version,
            "description": self.description,
            "weight_bits": list(self.weight_bits),
            "act_bits": list(self.act_bits),
            "layers": self.layers if isinstance(self.layers, str) else list(self.layers),
            "pinned": pinned,
            "groups": [g[0] if len(g) == 1 else list(g) for g in self.groups],
            # only when set, so spaces without matmuls read (and are recorded in studies) as before
            **({"matmul_bits": list(self.matmul_bits)} if self.matmul_bits else {}),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_dict(cls, data: Any, *, source: str | None = None) -> SearchSpace:
        if not isinstance(data, dict):
            raise UserError(f"space: expected a mapping with the fields {list(_FIELDS)}, got {type(data).__name__}")
        unknown = [k for k in data if k not in _FIELDS]
        if unknown:
            raise UserError(f"space.{unknown[0]}: unknown field; allowed fields are {list(_FIELDS)}")
        if "version" not in data:
            raise UserError(f"space.version: required (version: {SPACE_VERSION})")
        for required in ("weight_bits", "act_bits"):
            if required not in data:
                raise UserError(f"space.{required}: required, a list of bit widths like [2, 4, 8]")
        pinned = data.get("pinned") or {}
        if not isinstance(pinned, dict):
            raise UserError(f"space.pinned: expected a mapping of layer pattern -> {{weight_bits, act_bits}}, got {pinned!r}")
        groups = data.get("groups") or []
        if not isinstance(groups, list):
            raise UserError(f"space.groups: expected a list of patterns (or lists of patterns), got {groups!r}")
        layers = data.get("layers", "all")
        description = data.get("description")
        return cls(
            version=data["version"],
            description="" if description is None else description,
            weight_bits=data["weight_bits"],
            act_bits=data["act_bits"],
            layers=tuple(layers) if isinstance(layers, list) else layers,
            pinned={str(k): LayerPrecision.from_dict(v, f"space.pinned.{k}") for k, v in pinned.items()},
            groups=tuple(tuple(g) if isinstance(g, list) else g for g in groups),
            matmul_bits=data.get("matmul_bits") or (),
            source=source,
        )

    @classmethod
    def from_yaml(cls, text: str, *, source: str | None = None) -> SearchSpace:
        return cls.from_dict(parse_user_yaml(text, "space"), source=source)

    @classmethod
    def load(cls, path_or_name: str | Path) -> SearchSpace:
        """A YAML file, or a name from ``search_spaces/`` (``"resnet18"`` -> ``search_spaces/resnet18.yaml``)."""
        text = str(path_or_name)
        if isinstance(path_or_name, str) and _NAME.match(text) and not text.endswith((".yaml", ".yml")):
            path = SPACES_DIR / f"{text}.yaml"
            if not path.is_file():
                raise UserError(
                    f"unknown search space {text!r}; choose one of {', '.join(available_spaces())} or pass a path to a YAML file"
                )
        else:
            path = Path(path_or_name)
        content = read_user_file(path, "search space file", "YAML")
        try:
            return cls.from_yaml(content, source=str(path))
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None


def available_spaces() -> list[str]:
    """Names of the spaces shipped in ``search_spaces/``."""
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def default_space_for(model_name: str) -> str:
    """The shipped space for a model: ``resnet18``, ``deit_tiny`` (any DeiT/ViT) or ``default``."""
    name = model_name.lower().split(".")[0]  # timm tags like "resnet18.a1_in1k" name the same network
    if name == "resnet18":
        return "resnet18"
    if name.startswith(("deit", "vit")):  # same block structure: patch embed, qkv/proj/fc1/fc2, head
        return "deit_tiny"
    return "default"
