"""Cost objectives of a per-layer bit assignment: model size, BOPs and modeled energy.

A bit assignment maps a layer name of a :class:`~mpsearch.cost.counting.CostTable` to
``(weight_bits, activation_bits)``; ``None``, or a layer missing from the mapping, means float32.
For an attention matmul the "weight" width is that of its second operand (k or v) and the
activation width that of its first (q or attn).

Energy models are data: a TOML profile in ``mpsearch/cost/profiles/`` (or any ``.toml`` path)
names its sources, its units, its coefficients and the registered *formula* that turns them into
per-layer arithmetic and memory energy. Profiles give energy per input sample (batch 1) and charge
only the counted layers: norms, activations, softmax and residual adds are left out on purpose.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import tomllib

from mpsearch.cost.counting import CostTable, LayerCost
from mpsearch.errors import UserError
from mpsearch.registry import Registry

__all__ = [
    "FLOAT_BITS",
    "KERNEL_BYTES",
    "Bits",
    "EnergyProfile",
    "EnergyReport",
    "Formula",
    "LayerEnergy",
    "bops",
    "energy",
    "energy_savings",
    "fp32_energy",
    "install_profile",
    "kernel_bytes",
    "layer_energy",
    "list_formulas",
    "list_profiles",
    "load_profile",
    "parse_profile_text",
    "register_formula",
    "relative_savings",
    "size_bytes",
    "user_profiles_dir",
]

FLOAT_BITS = 32  # storage width of float32 tensors; used by size/BOPs (energy profiles carry their own)
_FP32_BYTES = 4  # biases and other parameters stay float32

Bits = Mapping[str, tuple[int | None, int | None]]


def _check_width(value: object, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= FLOAT_BITS:
        raise UserError(f"{what} is {value!r}; use an integer from 1 to {FLOAT_BITS}, or None for float32")
    return value


def _resolve(table: CostTable, bits: Bits) -> dict[str, tuple[int | None, int | None]]:
    """Per-layer (weight_bits, activation_bits) for every layer of ``table``, validated.

    Names that are not layers of the table are rejected: a typo would otherwise silently leave
    a layer in float32.
    """
    known = set(table.names)
    unknown = sorted(set(bits) - known)
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise UserError(
            f"bit assignment names {len(unknown)} layer(s) the cost table does not have: {shown}; "
            "use names from CostTable.names"
        )
    out: dict[str, tuple[int | None, int | None]] = {}
    for name in table.names:
        pair = bits.get(name, (None, None))
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise UserError(f"bits for layer {name!r} are {pair!r}; use (weight_bits, activation_bits)")
        out[name] = (
            _check_width(pair[0], f"weight bits of layer {name!r}"),
            _check_width(pair[1], f"activation bits of layer {name!r}"),
        )
    return out


def size_bytes(table: CostTable, bits: Bits) -> float:
    """Model size in bytes: weights at their bit width, biases and other parameters as float32."""
    widths = _resolve(table, bits)
    total: float = table.other_params * _FP32_BYTES
    for layer in table.layers:
        wb = widths[layer.name][0] or FLOAT_BITS
        total += layer.weight_params * wb / 8 + layer.bias_params * _FP32_BYTES
    return float(total)


def bops(table: CostTable, bits: Bits) -> float:
    """Bit operations per sample: the sum over layers of MACs · weight bits · activation bits."""
    widths = _resolve(table, bits)
    total = 0.0
    for layer in table.layers:
        wb, ab = widths[layer.name]
        total += layer.macs * (wb or FLOAT_BITS) * (ab or FLOAT_BITS)
    return float(total)


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


@register_formula("seed-lab4")
def _seed_lab4(layer: LayerCost, wb: int | None, ab: int | None, profile: EnergyProfile) -> LayerEnergy:
    """The research project's model: E_MAC = e·(wb/r)(ab/r), E_mem = m·(b/r) per element.

    Each operand is charged at its own width: parameters (and a matmul's second operand) at the
    weight width, the other inputs and the outputs at the activation width.
    """
    float_bits = profile.number("rules", "float_bits")
    w, a = wb or float_bits, ab or float_bits
    ref_mac = profile.number("mac", "reference_bits")
    ref_mem = profile.number("memory", "reference_bits")
    arithmetic = layer.macs * profile.number("mac", "energy") * (w / ref_mac) * (a / ref_mac)
    w_elems = layer.params + layer.second_operand_elems
    a_elems = layer.input_elems - layer.second_operand_elems + layer.output_elems
    memory = profile.number("memory", "energy_per_element") * (w_elems * w + a_elems * a) / ref_mem
    return LayerEnergy(layer.name, arithmetic, memory)


@register_formula("horowitz")
def _horowitz(layer: LayerCost, wb: int | None, ab: int | None, profile: EnergyProfile) -> LayerEnergy:
    """Per-operation energies (Horowitz, ISSCC 2014) with the data-movement rules of the profile.

    Arithmetic: a layer with both widths set is integer: the anchor multiplier's energy scaled by
    (wb·ab)/(anchor bits)² plus one accumulator add per MAC; otherwise float mult + add per MAC.
    Memory: weights and biases from the weight memory, inputs read from and outputs written to the
    activation memory, each at its own width, priced per bit from a read of ``access_bits``.
    """
    ops, rules = "operations", "rules"
    float_bits = profile.number(rules, "float_bits")
    if wb is not None and ab is not None:
        anchor_bits = profile.number(rules, "int_mult_anchor_bits")
        mult = profile.number(ops, profile.text(rules, "int_mult_anchor")) * wb * ab / anchor_bits**2
        per_mac = mult + profile.number(ops, profile.text(rules, "int_accumulate"))
    else:
        per_mac = profile.number(ops, profile.text(rules, "float_mult")) + profile.number(
            ops, profile.text(rules, "float_add")
        )

    access_bits = profile.number(rules, "access_bits")

    def per_bit(role: str) -> float:
        return profile.number("memories", profile.text(rules, role)) / access_bits

    w, a = wb or float_bits, ab or float_bits
    act = per_bit("activation_memory")
    memory = (
        layer.weight_params * w * per_bit("weight_memory")
        + layer.bias_params * profile.number(rules, "bias_bits") * per_bit("bias_memory")
        + layer.second_operand_elems * w * act  # k / v of a matmul: activations at the weight width
        + (layer.input_elems - layer.second_operand_elems) * a * act
        + layer.output_elems * a * act * profile.number(rules, "write_to_read_ratio")
    )
    return LayerEnergy(layer.name, layer.macs * per_mac, memory)


KERNEL_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}  # element width each kernel precision moves


def kernel_bytes(layer: LayerCost, kernel: str) -> float:
    """Bytes a ``kernel`` precision moves for ``layer`` per sample: weights, inputs and outputs
    at its width, biases at 4 bytes in fp32 and int8 kernels (int8 kernels take float biases)."""
    width = KERNEL_BYTES[kernel]
    bias_width = 4 if kernel in ("fp32", "int8") else width
    return (layer.weight_params + layer.input_elems + layer.output_elems) * width + layer.bias_params * bias_width


@register_formula("kernel-fit")
def _kernel_fit(layer: LayerCost, wb: int | None, ab: int | None, profile: EnergyProfile) -> LayerEnergy:
    """A linear model fitted to measured kernels (``mpsearch calibrate-energy``).

    The hardware runs a layer on one kernel: the integer kernel (``rules.int_kernel``, int8)
    when both widths are set and at most ``rules.int_kernel_bits``, the float kernel otherwise;
    narrower widths cost what the integer kernel costs, because that is what runs. Arithmetic:
    ``mac.<kernel>`` per MAC plus ``call.<kernel>`` per layer and sample (dispatch and fixed
    overhead, fitted beside the MACs); memory: ``memory.per_byte`` per byte the kernel moves
    (weights, inputs and outputs at its width; biases stay 4-byte in int8 kernels).
    """
    rules = "rules"
    int_kernel, float_kernel = profile.text(rules, "int_kernel"), profile.text(rules, "float_kernel")
    integer = wb is not None and ab is not None and max(wb, ab) <= profile.number(rules, "int_kernel_bits")
    kernel = int_kernel if integer else float_kernel
    if kernel not in KERNEL_BYTES:
        raise UserError(f"energy profile {profile.name!r}: kernel {kernel!r} is not one of {', '.join(KERNEL_BYTES)}")
    moved = kernel_bytes(layer, kernel)
    arithmetic = layer.macs * profile.number("mac", kernel) + profile.number("call", kernel)
    return LayerEnergy(layer.name, arithmetic, moved * profile.number("memory", "per_byte"))


def _profiles_dir() -> Traversable:
    return resources.files("mpsearch.cost").joinpath("profiles")


def _builtin_profiles() -> list[str]:
    return sorted(p.name[: -len(".toml")] for p in _profiles_dir().iterdir() if p.name.endswith(".toml"))


def user_profiles_dir() -> Path:
    """Where fitted profiles are installed by name (``mpsearch calibrate-energy``):
    ``$MPSEARCH_PROFILES``, else ``<cache root>/profiles`` (``~/.cache/mpsearch/profiles``)."""
    from mpsearch.paths import cache_root

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
    from mpsearch.files import atomic_write_text

    if name in _builtin_profiles():
        raise UserError(f"profile name {name!r} is a built-in profile; pick another with --name")
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


def layer_energy(layer: LayerCost, wb: int | None, ab: int | None, profile: EnergyProfile) -> LayerEnergy:
    """One layer's modeled energy at (weight bits, activation bits), None meaning float."""
    return _FORMULAS.get(profile.formula)(layer, wb, ab, profile)


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


# ---------------------------------------------------------------------------------------------
# Reports


def relative_savings(value: float, reference: float) -> float:
    """``1 - value / reference``: the fraction of the reference (e.g. fp32) energy saved."""
    if reference <= 0:
        raise ValueError(f"reference value must be positive, got {reference}")
    return 1.0 - value / reference


@dataclass(frozen=True)
class EnergyReport:
    """Per-layer and total modeled energy of one bit assignment, per sample."""

    profile: str
    units: str
    layers: tuple[LayerEnergy, ...]

    @property
    def arithmetic(self) -> float:
        return sum(layer.arithmetic for layer in self.layers)

    @property
    def memory(self) -> float:
        return sum(layer.memory for layer in self.layers)

    @property
    def total(self) -> float:
        return self.arithmetic + self.memory

    def layer(self, name: str) -> LayerEnergy:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r} in the energy report")

    def savings_vs(self, reference: EnergyReport) -> float:
        """Fraction of ``reference``'s total energy saved (use the fp32 report as reference)."""
        if reference.profile != self.profile:
            raise ValueError(f"cannot compare energy of profile {self.profile!r} with {reference.profile!r}")
        return relative_savings(self.total, reference.total)


def _as_profile(profile: EnergyProfile | str | os.PathLike[str]) -> EnergyProfile:
    return profile if isinstance(profile, EnergyProfile) else load_profile(profile)


def energy(table: CostTable, bits: Bits, profile: EnergyProfile | str | os.PathLike[str]) -> EnergyReport:
    """Modeled per-sample energy of ``table`` under the bit assignment ``bits``."""
    prof = _as_profile(profile)
    formula = _FORMULAS.get(prof.formula)
    widths = _resolve(table, bits)
    layers = tuple(formula(layer, *widths[layer.name], prof) for layer in table.layers)
    return EnergyReport(prof.name, prof.units, layers)


def fp32_energy(table: CostTable, profile: EnergyProfile | str | os.PathLike[str]) -> EnergyReport:
    """The float32 reference: every layer at (None, None)."""
    return energy(table, {}, profile)


def energy_savings(table: CostTable, bits: Bits, profile: EnergyProfile | str | os.PathLike[str]) -> float:
    """``1 - E(bits) / E(fp32)`` under one profile."""
    prof = _as_profile(profile)
    return energy(table, bits, prof).savings_vs(fp32_energy(table, prof))
