"""Bound search spaces: a search space resolved against one model's layers, as integer vectors.

:class:`SearchSpace` is the file, typed (:mod:`mpsearch.algorithms.space_file`, re-exported here);
:class:`BoundSpace` resolves it against one model's ordered layer names and encodes a policy as
an integer vector (one index into the choices per :class:`Gene`), the form both pymoo and Optuna
search over. Indices rather than categories so that crossover and mutation see the order of the
bit widths (Optuna gives categorical parameters uniform crossover only).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import replace as dataclass_replace
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from mpsearch.algorithms.space_file import SPACE_VERSION, SPACES_DIR, SearchSpace, available_spaces, default_space_for
from mpsearch.errors import UserError
from mpsearch.policy import LayerPrecision, is_matmul, precision_for

if TYPE_CHECKING:  # optuna is imported lazily: binding a space must not pay for it
    from optuna.distributions import IntDistribution

__all__ = [
    "SPACE_VERSION",
    "SPACES_DIR",
    "SearchSpace",
    "BoundSpace",
    "Gene",
    "available_spaces",
    "default_space_for",
]

_FP32 = LayerPrecision(weight_bits=None, act_bits=None)


@dataclass(frozen=True)
class Gene:
    """One free decision: the index into ``choices`` for one operand of one layer or group."""

    name: str  # "w:layer1.0.conv1", "a:group0", "m:blocks.0.attn.matmul_qk": the Optuna parameter name too
    operand: str  # "weight", "act" or "matmul" (both operands of an attention matmul)
    choices: tuple[int | None, ...]
    layers: tuple[str, ...]


def _units(free: Sequence[str], group_of: Mapping[str, int]) -> list[tuple[str, tuple[str, ...]]]:
    """Units (a layer, or a group at its first member's place) in execution order, with their layers."""
    units: list[tuple[str, tuple[str, ...]]] = []
    for name in free:
        gi = group_of.get(name)
        if gi is None:
            units.append((name, (name,)))
        elif all(unit != f"group{gi}" for unit, _ in units):
            units.append((f"group{gi}", tuple(n for n in free if group_of.get(n) == gi)))
    return units


class BoundSpace:
    """A :class:`SearchSpace` resolved against one model's quantizable layers (in execution order).

    Genes come in execution order of the layer (or a group's first layer) they control, weight
    before activation; an operand with a single choice is a constant, not a gene. Vectors are
    integer indices into each gene's choices, bounded by ``xl`` (zeros) and ``xu``.
    """

    def __init__(self, space: SearchSpace, layers: Sequence[str], *, model: str | None = None) -> None:
        self.space = space
        self.layers: tuple[str, ...] = tuple(layers)
        self._model = model
        if not self.layers:
            self._fail("space: the model has no quantizable layer")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("BoundSpace: the layer list names a layer twice")

        # Pins first: they override `layers` (that is how "all but the ends" is written).
        pins, pinned_by = self._resolve_pins()
        selected = self._selected_layers()
        # Matmuls are searched only when the space offers widths for them.
        free = [n for n in self.layers if n in selected and n not in pins and (space.matmul_bits or not is_matmul(n))]
        group_of = self._resolve_groups(selected, pinned_by)
        if not free:
            self._fail("space: every searched layer is pinned, nothing is left to search; unpin a layer or widen space.layers")
        genes = self._genes(_units(free, group_of))

        self.genes: tuple[Gene, ...] = tuple(genes)
        self.pinned: dict[str, LayerPrecision] = {n: pins[n] for n in self.layers if n in pins}
        self.free_layers: tuple[str, ...] = tuple(free)
        self.n_var = len(genes)
        self.xl = np.zeros(self.n_var, dtype=np.int64)
        self.xu = np.array([len(g.choices) - 1 for g in genes], dtype=np.int64)
        self.xl.setflags(write=False)
        self.xu.setflags(write=False)
        self._constant = {
            "weight": space.weight_bits[0] if len(space.weight_bits) == 1 else None,
            "act": space.act_bits[0] if len(space.act_bits) == 1 else None,
            "matmul": space.matmul_bits[0] if len(space.matmul_bits) == 1 else None,
        }
        self._gene_index = {g.name: k for k, g in enumerate(genes)}

    # -- binding (the stages of __init__) --------------------------------------------------------
    def _resolve_pins(self) -> tuple[dict[str, LayerPrecision], dict[str, str]]:
        """Pinned layer -> its precision, and pinned layer -> the ``space.pinned`` key that first names it."""
        pins: dict[str, LayerPrecision] = {}
        pinned_by: dict[str, str] = {}
        for key, prec in self.space.pinned.items():
            for name in self._resolve(key, f"space.pinned.{key}"):
                if name in pins and pins[name] != prec:
                    self._fail(
                        f"space.pinned.{key}: layer {name!r} is also pinned by space.pinned.{pinned_by[name]} "
                        "to other bits; keep one of the two"
                    )
                # A matmul's operands are quantized per tensor (mpsearch.policy); "first: {...}" pins
                # written with the default (per-channel) options mean exactly that.
                pins[name] = dataclass_replace(prec, granularity="per-tensor") if is_matmul(name) else prec
                pinned_by.setdefault(name, key)
        return pins, pinned_by

    def _selected_layers(self) -> set[str]:
        """The layers ``space.layers`` selects (pinned ones included)."""
        if self.space.layers == "all":
            return set(self.layers)
        selected: set[str] = set()
        for i, pattern in enumerate(self.space.layers):
            selected.update(self._resolve(pattern, f"space.layers[{i}]"))
        return selected

    def _resolve_groups(self, selected: set[str], pinned_by: Mapping[str, str]) -> dict[str, int]:
        """Grouped layer -> the index of its group in ``space.groups``; ``pinned_by``'s keys are the pinned layers."""
        group_of: dict[str, int] = {}
        for gi, patterns in enumerate(self.space.groups):
            members: set[str] = set()
            for j, pattern in enumerate(patterns):
                where = f"space.groups[{gi}]" if len(patterns) == 1 else f"space.groups[{gi}][{j}]"
                members.update(self._resolve(pattern, where))
            for name in (n for n in self.layers if n in members):
                self._check_group_member(gi, name, selected, pinned_by, group_of)
                group_of[name] = gi
        return group_of

    def _check_group_member(
        self, gi: int, name: str, selected: set[str], pinned_by: Mapping[str, str], group_of: Mapping[str, int]
    ) -> None:
        """Fail unless layer ``name`` may join group ``gi``: searched, unpinned, not yet grouped."""
        if name in pinned_by:
            self._fail(
                f"space.groups[{gi}]: layer {name!r} is pinned (space.pinned.{pinned_by[name]}) and grouped; "
                "a layer is either pinned or shares a width, remove it from one of them"
            )
        if name not in selected:
            self._fail(
                f"space.groups[{gi}]: layer {name!r} is not searched (space.layers does not select it); "
                "add it to space.layers or narrow the group's pattern"
            )
        if is_matmul(name) and not self.space.matmul_bits:
            self._fail(
                f"space.groups[{gi}]: layer {name!r} is an attention matmul, which the space does not search; "
                "add matmul_bits or narrow the group's pattern"
            )
        if name in group_of:
            self._fail(
                f"space.groups[{gi}]: layer {name!r} is already in space.groups[{group_of[name]}]; "
                "a layer belongs to one group at most"
            )

    def _genes(self, units: Sequence[tuple[str, tuple[str, ...]]]) -> list[Gene]:
        """One gene per operand of each unit that has more than one choice."""
        space = self.space
        genes = []
        for unit, members in units:
            kinds = {is_matmul(n) for n in members}
            if len(kinds) > 1:
                self._fail(f"space.groups[{unit[len('group'):]}]: mixes attention matmuls with layers that have weights; "
                           "a group holds one kind")
            if kinds == {True}:
                operands = (("matmul", "m", space.matmul_bits),)
            else:
                operands = (("weight", "w", space.weight_bits), ("act", "a", space.act_bits))
            for operand, prefix, choices in operands:
                if len(choices) > 1:
                    genes.append(Gene(f"{prefix}:{unit}", operand, choices, members))
        if not genes:
            self._fail(
                "space: nothing to search: weight_bits and act_bits (and matmul_bits) offer one choice each; "
                "list at least two widths in one of them"
            )
        if len({g.name for g in genes}) != len(genes):  # a layer literally named "group0" ...
            raise ValueError("BoundSpace: two genes share a name; rename the group or layer")
        return genes

    # -- helpers ----------------------------------------------------------------------------------
    def _fail(self, message: str) -> NoReturn:
        prefix = f"{self.space.source}: " if self.space.source else ""
        raise UserError(prefix + message)

    def _resolve(self, pattern: str, where: str) -> list[str]:
        """Layers a pattern selects, in execution order; selecting none is the user's error."""
        if pattern == "first":
            return [self.layers[0]]
        if pattern == "last":
            return [self.layers[-1]]
        how = f"`mpsearch layers --model {self._model or 'MODEL'}` lists them"
        if pattern.startswith("re:"):
            rx = re.compile(pattern[3:])
            found = [n for n in self.layers if rx.fullmatch(n)]
            if not found:
                self._fail(f"{where}: pattern {pattern!r} matches no layer (the whole name must match); {how}")
            return found
        if pattern not in self.layers:
            close = difflib.get_close_matches(pattern, self.layers, n=3)
            hint = f" (similar: {', '.join(close)})" if close else ""
            named = "" if where.endswith(f".{pattern}") else f" {pattern!r}"
            self._fail(f"{where}: no such layer{named}{hint}; {how}")
        return [pattern]

    def validate(self, x: Sequence[int] | np.ndarray) -> np.ndarray:
        """``x`` as an int64 vector; ``ValueError`` unless it has ``n_var`` integers within ``[xl, xu]``."""
        arr = np.asarray(x)
        if arr.shape != (self.n_var,):
            raise ValueError(f"expected a vector of {self.n_var} gene indices, got shape {arr.shape}")
        if arr.dtype.kind not in "iub":
            if arr.dtype.kind != "f" or not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                raise ValueError(f"gene indices must be integers, got {arr.tolist()}")
        out = arr.astype(np.int64)
        bad = np.flatnonzero((out < self.xl) | (out > self.xu))
        if bad.size:
            k = int(bad[0])
            raise ValueError(f"gene {self.genes[k].name}: index {int(out[k])} is outside 0..{int(self.xu[k])}")
        return out

    # -- encoding -------------------------------------------------------------------------------
    def decode(self, x: Sequence[int] | np.ndarray) -> dict[str, LayerPrecision]:
        """Every quantizable layer -> its precision: pinned, chosen by ``x``, or float32."""
        idx = self.validate(x)
        chosen: dict[tuple[str, str], int | None] = {}
        for gene, i in zip(self.genes, idx):
            for layer in gene.layers:
                chosen[gene.operand, layer] = gene.choices[i]
        free = set(self.free_layers)
        out: dict[str, LayerPrecision] = {}
        for name in self.layers:
            if name in self.pinned:
                out[name] = self.pinned[name]
            elif name in free and is_matmul(name):
                bits = chosen.get(("matmul", name), self._constant["matmul"])
                out[name] = precision_for(name, bits, bits)
            elif name in free:
                out[name] = LayerPrecision(
                    weight_bits=chosen.get(("weight", name), self._constant["weight"]),
                    act_bits=chosen.get(("act", name), self._constant["act"]),
                )
            else:
                out[name] = _FP32
        return out

    def encode(self, layers: Mapping[str, LayerPrecision]) -> np.ndarray | None:
        """The vector whose :meth:`decode` equals ``layers`` (unlisted = float32), or ``None`` if none does.

        ``Policy.layers`` fits directly; a policy is representable only if its pins, constants,
        groups, float layers and quantizer options all agree with the space.
        """
        if any(name not in self.layers for name in layers):
            return None
        x = np.zeros(self.n_var, dtype=np.int64)
        for k, gene in enumerate(self.genes):
            operand = "act" if gene.operand == "matmul" else gene.operand  # decode checks weight_bits == act_bits
            values = {getattr(layers.get(n, _FP32), f"{operand}_bits") for n in gene.layers}
            if len(values) != 1 or next(iter(values)) not in gene.choices:
                return None
            x[k] = gene.choices.index(next(iter(values)))
        wanted = {name: layers.get(name, _FP32) for name in self.layers}
        return x if self.decode(x) == wanted else None

    def uniform(self, weight_bits: int | None, act_bits: int | None) -> np.ndarray | None:
        """Every free layer at ``weight_bits``/``act_bits``, matmuls at ``act_bits`` (both their
        operands are activations; pins stay); ``None`` if a width is no choice."""
        if weight_bits not in self.space.weight_bits or act_bits not in self.space.act_bits:
            return None
        if any(g.operand == "matmul" for g in self.genes) and act_bits not in self.space.matmul_bits:
            return None
        want = {"weight": weight_bits, "act": act_bits, "matmul": act_bits}
        return np.array([g.choices.index(want[g.operand]) for g in self.genes], dtype=np.int64)

    def params(self, x: Sequence[int] | np.ndarray) -> dict[str, int]:
        """Optuna parameters for ``x``: ``{gene.name: index}``."""
        return {g.name: int(i) for g, i in zip(self.genes, self.validate(x))}

    def x_from_params(self, params: Mapping[str, Any]) -> np.ndarray:
        """Inverse of :meth:`params`; ``ValueError`` on a missing or unknown parameter."""
        missing = [g.name for g in self.genes if g.name not in params]
        extra = [k for k in params if k not in self._gene_index]
        if missing or extra:
            raise ValueError(f"params do not fit this space: missing {missing[:3]}, unknown {extra[:3]}")
        return self.validate([params[g.name] for g in self.genes])

    def distributions(self) -> dict[str, IntDistribution]:
        """One ``IntDistribution(0, len(choices) - 1)`` per gene: an index, so samplers see the order."""
        from optuna.distributions import IntDistribution

        return {g.name: IntDistribution(0, len(g.choices) - 1) for g in self.genes}

    @property
    def size(self) -> int:
        """Number of distinct points (policies) in the space."""
        return math.prod(len(g.choices) for g in self.genes)

    def summary(self) -> str:
        return (
            f"{self.n_var} genes over {len(self.free_layers)} searched layers "
            f"({len(self.pinned)} pinned, {len(self.layers) - len(self.free_layers) - len(self.pinned)} float32), "
            f"{float(self.size):.3g} policies"
        )

