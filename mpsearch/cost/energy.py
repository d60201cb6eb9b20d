"""Cost objectives of a per-layer bit assignment: model size, BOPs and modeled energy.

A bit assignment maps a layer name of a :class:`~mpsearch.cost.counting.CostTable` to
``(weight_bits, activation_bits)``; ``None``, or a layer missing from the mapping, means float32.
For an attention matmul the "weight" width is that of its second operand (k or v) and the
activation width that of its first (q or attn).

Energy is modeled by a profile (:mod:`mpsearch.cost.energy_profiles`: TOML data naming its units,
coefficients and formula); the formulas that turn a profile into per-layer arithmetic and memory
energy are defined and registered here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from mpsearch.cost.counting import CostTable, LayerCost
from mpsearch.cost.energy_profiles import _FORMULAS, EnergyProfile, LayerEnergy, load_profile, register_formula
from mpsearch.errors import UserError

__all__ = [
    "FLOAT_BITS",
    "KERNEL_BYTES",
    "Bits",
    "EnergyReport",
    "bops",
    "energy",
    "energy_savings",
    "fp32_energy",
    "kernel_bytes",
    "layer_energy",
    "relative_savings",
    "size_bytes",
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
# Formulas


@register_formula("seed-lab4")
def _seed_lab4(layer: LayerCost, wb: int | None, ab: int | None, profile: EnergyProfile) -> LayerEnergy:
    """The seed-lab4 comparison model: E_MAC = e·(wb/r)(ab/r), E_mem = m·(b/r) per element.

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


def layer_energy(layer: LayerCost, wb: int | None, ab: int | None, profile: EnergyProfile) -> LayerEnergy:
    """One layer's modeled energy at (weight bits, activation bits), None meaning float."""
    return _FORMULAS.get(profile.formula)(layer, wb, ab, profile)


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
