"""What every configuration object shares: a JSON round trip, a stable key, one way to report bad fields.

A config is a frozen dataclass that subclasses :class:`Config`: defaults on every field, value
checks in ``__post_init__`` (errors name the field, e.g. ``search.budget``), a ``version``.
Sections compose: a field whose default is another config (or ``None`` with the type listed in
``SECTIONS``) holds a nested config, written as a nested mapping in JSON and YAML. A section
typed ``X | None`` may be null (off), whatever its default.
"""

from __future__ import annotations

import hashlib
import json
import typing
from dataclasses import MISSING, asdict, fields
from typing import Any, ClassVar, TypeVar

from mpsearch.errors import UserError

__all__ = ["Config", "config_key", "config_from_dict", "field_error", "with_overrides"]

C = TypeVar("C", bound="Config")


def field_error(field: str, problem: str) -> UserError:
    """A :class:`UserError` about one config field (``search.budget``): the CLI names the flag instead."""
    return UserError(f"{field}: {problem}", fields=(field,))


def config_key(config: Any, ignore: tuple[str, ...] = ()) -> str:
    """A stable hash of a config's JSON form (sha256 hex): caches keyed by it never reuse stale artifacts.

    ``ignore`` names fields that do not change what the cached artifacts hold.
    """
    data = {k: v for k, v in asdict(config).items() if k not in ignore}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            for f in fields(cls)}


def config_from_dict(cls: type[C], data: Any, where: str | None = None) -> C:
    """Build ``cls`` from a mapping, rejecting unknown fields, other versions and wrong types in one line.

    ``where`` is the section's path in the document (``search``); messages name ``where.field``.
    """
    where = cls.SECTION if where is None else where
    if not isinstance(data, dict):
        raise field_error(where or cls.__name__, f"expected a mapping of settings, got {type(data).__name__}")
    defaults = _defaults(cls)
    unknown = sorted(set(data) - set(defaults))
    if unknown:
        raise field_error(_join(where, unknown[0]), f"unknown field; known fields are {sorted(defaults)}")
    version = data.get("version", 1)
    if type(version) is not int or version != 1:
        raise field_error(_join(where, "version"), f"this mpsearch reads version 1, got {version!r}")
    values = dict(data)
    for name, value in data.items():
        default, path = defaults[name], _join(where, name)
        section = cls.SECTIONS.get(name)
        if section is not None:
            optional = default is None or _allows_none(cls, name)
            values[name] = None if value is None and optional else config_from_dict(section, value, path)
            continue
        if default is None or (value is None and _allows_none(cls, name)):
            continue  # optional fields (None allowed) are checked by the class itself
        expected = type(default)
        if expected is tuple and isinstance(value, list):  # JSON/YAML have lists, configs keep tuples
            values[name] = value = tuple(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if expected is float else type(value) is expected
        if not ok:
            raise field_error(path, f"expected {expected.__name__}, got {value!r}")
    return cls(**values)


def _allows_none(cls: type, name: str) -> bool:
    """Whether the field's type annotation admits None (``X | None``, ``Optional[X]``)."""
    return type(None) in typing.get_args(typing.get_type_hints(cls)[name])


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def with_overrides(config: C, overrides: dict[str, Any]) -> C:
    """``config`` with dotted fields replaced (``{"search.budget": 24}``), validated like a loaded file.

    Setting a field of an optional section that is off (``finetune.steps`` while ``finetune`` is
    null) turns the section on with its defaults."""
    data = config.to_dict()
    for dotted, value in overrides.items():
        *path, last = dotted.split(".")
        node, cls = data, type(config)
        for i, part in enumerate(path):
            section = cls.SECTIONS.get(part)
            if section is None:
                raise field_error(".".join(path[: i + 1]), f"not a section; cannot set {dotted}")
            if node.get(part) is None:
                node[part] = {}
            node, cls = node[part], section
        node[last] = list(value) if isinstance(value, tuple) else value
    return type(config).from_dict(data)


class Config:
    """Base of every config dataclass: ``to_dict``/``from_dict`` are exact inverses, ``key()`` hashes it."""

    SECTION: ClassVar[str] = ""  # how messages name this config's fields: "quant" -> "quant.seed"
    SECTIONS: ClassVar[dict[str, type]] = {}  # nested config fields -> their types

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], data: Any) -> C:
        return config_from_dict(cls, data)

    def key(self) -> str:
        return config_key(self)
