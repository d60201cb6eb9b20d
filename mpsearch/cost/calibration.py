"""Fit an energy (or latency) profile to a measured kernel table, and check models against it.

The fitted model is the ``kernel-fit`` formula (:mod:`mpsearch.cost.energy`): per row (a layer
at one kernel precision), ``cost = mac[p] * MACs + call[p] + per_byte * bytes moved``, with one
MAC coefficient and one per-call term per precision and one per-byte coefficient shared by all.
The coefficients are non-negative least squares (``scipy.optimize.nnls``), because a negative
cost per MAC or per byte would be a fit artefact, not hardware.

Agreement is reported three ways: R² of the fit on its own rows, R² when each layer is predicted
by a fit that never saw it (leave one layer out: what the profile does for a layer it was not
measured on), and rank correlations (Spearman, Kendall) between modeled and measured cost, per
layer and per policy. A policy's measured cost is the sum of its layers' table rows at the
kernel each layer runs (int8 for widths up to 8 bits, the float kernel otherwise), so policy
agreement checks the profile as the search uses it, summed, on the same table. The analytical
profiles (horowitz45nm, seed-lab4) are scored with the same rank correlations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpsearch.cost.counting import CostTable
from mpsearch.cost.energy import energy, layer_energy
from mpsearch.cost.energy_profiles import EnergyProfile, parse_profile_text
from mpsearch.cost.kernel_table import KernelRow, KernelTable
from mpsearch.errors import UserError

__all__ = ["TARGETS", "Agreement", "Fit", "fit_profile", "profile_toml", "agreement", "policy_agreement", "summary_rows"]

TARGETS = {"latency": ("seconds", "us", 1e6), "energy": ("energy_j", "uJ", 1e6)}  # column, units, scale to units


def _target_values(rows: list[KernelRow], target: str) -> np.ndarray:
    column, _, scale = TARGETS[target]
    values = [getattr(r, column) for r in rows]
    if any(v is None for v in values):
        raise UserError("the kernel table has no energy column (no energy meter could measure on its machine); "
                        "fit target latency, or profile where RAPL or NVML can measure", fields=("target",))
    return np.asarray(values, dtype=float) * scale


def _design(rows: list[KernelRow], precisions: list[str]) -> np.ndarray:
    """Columns: mac[p] for each precision, call[p] for each precision, per_byte."""
    X = np.zeros((len(rows), 2 * len(precisions) + 1))
    for i, r in enumerate(rows):
        k = precisions.index(r.precision)
        X[i, k] = r.macs
        X[i, len(precisions) + k] = 1.0
        X[i, -1] = r.memory_bytes
    return X


def _nnls(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    from scipy.optimize import nnls

    # Columns span many orders of magnitude (MACs ~1e7, calls 1): solve on unit-norm columns.
    norms = np.linalg.norm(X, axis=0)
    norms[norms == 0] = 1.0
    coef, _ = nnls(X / norms, y)
    return coef / norms


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    total = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / total if total > 0 else float("nan")


@dataclass(frozen=True)
class Agreement:
    """How well a model's costs order and match measured ones over ``n`` items."""

    n: int
    spearman: float
    kendall: float
    median_abs_rel_error: float | None = None  # only for models in the measured units

    @classmethod
    def of(cls, modeled: np.ndarray, measured: np.ndarray, same_units: bool) -> Agreement:
        from scipy.stats import kendalltau, spearmanr

        rel = float(np.median(np.abs(modeled - measured) / measured)) if same_units else None
        return cls(len(measured), float(spearmanr(modeled, measured)[0]), float(kendalltau(modeled, measured)[0]), rel)


@dataclass(frozen=True)
class Fit:
    """A fitted kernel-fit profile's coefficients (in ``units`` per MAC / call / byte) and quality."""

    target: str
    units: str
    precisions: tuple[str, ...]
    mac: dict[str, float]
    call: dict[str, float]
    per_byte: float
    r2: float
    r2_leave_one_layer_out: float
    per_layer: Agreement
    rows: tuple[KernelRow, ...] = field(repr=False)
    measured: np.ndarray = field(repr=False)
    modeled: np.ndarray = field(repr=False)

    def coefficients(self) -> np.ndarray:
        return np.array([*(self.mac[p] for p in self.precisions), *(self.call[p] for p in self.precisions), self.per_byte])


def fit_profile(table: KernelTable, target: str = "latency") -> Fit:
    """Fit the kernel-fit coefficients to ``table`` by non-negative least squares."""
    if target not in TARGETS:
        raise UserError(f"target {target!r}: choose one of {', '.join(TARGETS)}", fields=("target",))
    rows = list(table.rows)
    precisions = table.precisions
    layers = table.layers
    n_coef = 2 * len(precisions) + 1
    if len(rows) <= n_coef or len(layers) < 3:
        raise UserError(f"the kernel table has {len(rows)} rows over {len(layers)} layers; a fit of {n_coef} coefficients "
                        "needs more rows than coefficients and at least 3 layers: profile a bigger model")
    y = _target_values(rows, target)
    X = _design(rows, precisions)
    coef = _nnls(X, y)
    pred = X @ coef
    loo = np.empty_like(y)
    names = np.array([r.layer for r in rows])
    for layer in layers:  # predict each layer from a fit on the others
        held = names == layer
        loo[held] = X[held] @ _nnls(X[~held], y[~held])
    k = len(precisions)
    return Fit(
        target=target, units=TARGETS[target][1], precisions=tuple(precisions),
        mac=dict(zip(precisions, coef[:k].tolist())), call=dict(zip(precisions, coef[k : 2 * k].tolist())),
        per_byte=float(coef[-1]), r2=_r2(y, pred), r2_leave_one_layer_out=_r2(y, loo),
        per_layer=Agreement.of(pred, y, same_units=True), rows=tuple(rows), measured=y, modeled=pred,
    )


def profile_toml(fit: Fit, table: KernelTable, *, name: str, table_path: str, float_kernel: str = "fp32") -> str:
    """The fitted profile as a TOML file ``mpsearch`` loads like the built-in ones."""
    if float_kernel not in fit.precisions:
        raise UserError(f"float_kernel {float_kernel}: the table has no {float_kernel} rows ({', '.join(fit.precisions)})",
                        fields=("float_kernel",))
    int_kernel = "int8" if "int8" in fit.precisions else float_kernel

    def num(v: float) -> str:
        return repr(float(v))

    meters = table.time_meter + (f" + {table.energy_meter}" if table.energy_meter else "")
    source = (f"mpsearch profile: {table.model} on {table.device_name} ({table.machine}), torch {table.torch}, "
              f"{table.threads} threads, batch {table.batch_size}, {meters}, {table.created}; table {table_path}")

    lines = [
        f"# Fitted by `mpsearch calibrate-energy` to {table_path} ({len(fit.rows)} kernels, {table.created}).",
        f"# R2 {fit.r2:.4f} on the table, {fit.r2_leave_one_layer_out:.4f} leaving each layer out; "
        f"Spearman {fit.per_layer.spearman:.3f}, Kendall {fit.per_layer.kendall:.3f} per kernel.",
        f"name = {_quote(name)}",
        f"description = {_quote(_description(fit, table, int_kernel, float_kernel))}",
        f"units = {_quote(fit.units)}",
        'formula = "kernel-fit"',
        f"sources = [{_quote(source)}]",
        "",
        f"[mac]  # {fit.units} per multiply-accumulate, by kernel precision",
        *(f"{p} = {num(fit.mac[p])}" for p in fit.precisions),
        "",
        f"[call]  # {fit.units} per layer and sample, by kernel precision (dispatch and fixed overhead)",
        *(f"{p} = {num(fit.call[p])}" for p in fit.precisions),
        "",
        "[memory]",
        f"per_byte = {num(fit.per_byte)}  # {fit.units} per byte moved",
        "",
        "[rules]",
        f"int_kernel = {_quote(int_kernel)}  # runs layers whose weight and activation widths are both <= int_kernel_bits",
        "int_kernel_bits = 8",
        f"float_kernel = {_quote(float_kernel)}  # runs every other layer",
        "",
        "[fit]",
        f"target = {_quote(fit.target)}",
        f"r2 = {num(fit.r2)}",
        f"r2_leave_one_layer_out = {num(fit.r2_leave_one_layer_out)}",
        f"spearman = {num(fit.per_layer.spearman)}",
        f"kendall = {num(fit.per_layer.kendall)}",
        f"kernels = {len(fit.rows)}",
    ]
    text = "\n".join(lines) + "\n"
    parse_profile_text(text, "the fitted profile")  # what we write must load
    return text


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


def _description(fit: Fit, table: KernelTable, int_kernel: str, float_kernel: str) -> str:
    what = "wall-clock latency" if fit.target == "latency" else "measured energy (idle included)"
    return (f"{what} of {table.model}'s layers on {table.device_name}, per sample, fitted per kernel precision "
            f"({', '.join(fit.precisions)}): integer layers (both widths <= 8 bits) cost the {int_kernel} kernel, "
            f"others the {float_kernel} kernel.")


def _rows_bits(row: KernelRow) -> tuple[int | None, int | None] | None:
    """The bit assignment that runs on a row's kernel (None: no policy runs it, e.g. bf16)."""
    return {"fp32": (None, None), "int8": (8, 8)}.get(row.precision)


def agreement(table: KernelTable, profile: EnergyProfile, target: str = "latency") -> Agreement | None:
    """Per-kernel rank agreement of any profile with the table's fp32 and int8 rows."""
    rows = [r for r in table.rows if _rows_bits(r) is not None]
    if len(rows) < 3:
        return None
    measured = _target_values(rows, target)
    modeled = np.array([_layer_energy(r, profile) for r in rows])
    return Agreement.of(modeled, measured, same_units=profile.formula == "kernel-fit")


def _layer_energy(row: KernelRow, profile: EnergyProfile) -> float:
    wb, ab = _rows_bits(row)  # type: ignore[misc]
    return layer_energy(row.layer_cost(), wb, ab, profile).total


def policy_agreement(table: KernelTable, profiles: list[EnergyProfile], *, n_policies: int = 200, seed: int = 0,
                     target: str = "latency", float_kernel: str = "fp32") -> tuple[dict[str, Agreement], np.ndarray, dict[str, np.ndarray]]:
    """Rank agreement per policy: ``n_policies`` seeded random per-layer choices of the float
    kernel or int8 (plus all-float and all-int8), measured as the sum of their table rows and
    modeled by each profile (integer layers at W8A8, float layers at fp32)."""
    if "int8" not in table.precisions or float_kernel not in table.precisions:
        raise UserError(f"policy agreement needs int8 and {float_kernel} rows; the table has {', '.join(table.precisions)}")
    layers = [name for name in table.layers if table.row(name, "int8") and table.row(name, float_kernel)]
    rng = np.random.default_rng(seed)
    masks = [np.zeros(len(layers), bool), np.ones(len(layers), bool)]
    masks += [rng.random(len(layers)) < rng.random() for _ in range(max(n_policies - 2, 0))]
    column, _, scale = TARGETS[target]
    measured = []
    for mask in masks:
        picked = [table.row(name, "int8" if m else float_kernel) for name, m in zip(layers, mask)]
        values = [getattr(r, column) for r in picked]
        if any(v is None for v in values):
            raise UserError("the kernel table has no energy column; use target latency", fields=("target",))
        measured.append(sum(values) * scale)
    measured_arr = np.asarray(measured)
    table_costs = CostTable(tuple(table.row(name, "int8").layer_cost() for name in layers), 0, (1, 1, 1))  # type: ignore[union-attr]
    out, modeled_by = {}, {}
    for profile in profiles:
        modeled = np.array([energy(table_costs, {n: (8, 8) for n, m in zip(layers, mask) if m}, profile).total for mask in masks])
        out[profile.name] = Agreement.of(modeled, measured_arr, same_units=profile.formula == "kernel-fit")
        modeled_by[profile.name] = modeled
    return out, measured_arr, modeled_by


def summary_rows(per_kernel: dict[str, Agreement | None], per_policy: dict[str, Agreement]) -> list[dict[str, Any]]:
    """One row per profile for the report table."""
    out = []
    for name in per_policy:
        k, p = per_kernel.get(name), per_policy[name]
        out.append({
            "profile": name,
            "kernel_spearman": k.spearman if k else math.nan, "kernel_kendall": k.kendall if k else math.nan,
            "policy_spearman": p.spearman, "policy_kendall": p.kendall,
            "policy_median_rel_error": p.median_abs_rel_error,
        })
    return out


@dataclass(frozen=True)
class CalibrationResult:
    """What ``mpsearch calibrate-energy`` wrote and measured."""

    fit: Fit
    table: KernelTable = field(repr=False)
    profile_path: str
    report_path: str
    plot_paths: tuple[str, ...]
    summary: tuple[dict[str, Any], ...]  # per profile: rank agreement per kernel and per policy
    installed_path: str | None = None  # where the profile was installed by name, if it was

    def to_dict(self) -> dict[str, Any]:
        f = self.fit
        return {
            "target": f.target, "units": f.units, "r2": f.r2, "r2_leave_one_layer_out": f.r2_leave_one_layer_out,
            "kernel_spearman": f.per_layer.spearman, "kernel_kendall": f.per_layer.kendall,
            "kernel_median_rel_error": f.per_layer.median_abs_rel_error,
            "coefficients": {"mac": f.mac, "call": f.call, "per_byte": f.per_byte},
            "profile": self.profile_path, "installed": self.installed_path, "report": self.report_path, "plots": list(self.plot_paths),
            "agreement": list(self.summary),
        }


def calibrate_energy(table_path: str, *, target: str | None = None, name: str | None = None, out: str | None = None,
                     float_kernel: str = "fp32", n_policies: int = 200, seed: int = 0,
                     compare: tuple[str, ...] = ("horowitz45nm", "seed-lab4"),
                     breakdown_bits: tuple[int, int] = (8, 8), install: bool = True) -> CalibrationResult:
    """Fit a kernel-fit profile to the table at ``table_path`` and write, next to ``out`` (the
    profile's path; default ``<table dir>/<name>.toml``): the profile, ``calibration.md`` with the
    fit and the agreement of the fitted and the analytical profiles, and two figures (modeled vs
    measured, and the per-layer arithmetic/memory breakdown of the all-``breakdown_bits`` policy).
    ``target`` None fits energy where every row has it, else latency.
    With ``install`` the profile is also installed by name (:func:`~mpsearch.cost.energy_profiles.install_profile`),
    so that ``--energy-profile NAME`` or an ``energy@NAME`` objective searches with it."""

    from mpsearch.cost.energy_profiles import install_profile, load_profile
    from mpsearch.cost.kernel_table import load_kernel_table
    from mpsearch.host.files import atomic_write_text

    if n_policies < 3:
        raise UserError(f"policies must be >= 3, got {n_policies}", fields=("policies",))
    table = load_kernel_table(table_path)
    if target is None:
        target = "energy" if table.rows and all(r.energy_j is not None for r in table.rows) else "latency"
    fit = fit_profile(table, target)
    name = name or f"{table.model}-{table.device}-{target}"
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise UserError(f"name {name!r}: letters, digits, '-', '_' and '.' only", fields=("name",))
    profile_path = Path(out) if out else Path(table_path).parent / f"{name}.toml"
    if profile_path.suffix != ".toml":
        raise UserError(f"output {profile_path}: the profile file must end in .toml", fields=("output",))
    profile_path.parent.mkdir(parents=True, exist_ok=True)
    text = profile_toml(fit, table, name=name, table_path=str(table_path), float_kernel=float_kernel)
    atomic_write_text(profile_path, text, what="energy profile")
    installed = str(install_profile(text, name)) if install else None
    fitted = parse_profile_text(text, str(profile_path))
    others = [load_profile(p) for p in compare]
    profiles = [fitted, *others]
    per_kernel = {p.name: agreement(table, p, target) for p in profiles}
    per_policy, measured_policies, modeled_policies = policy_agreement(
        table, profiles, n_policies=n_policies, seed=seed, target=target, float_kernel=float_kernel)
    summary = summary_rows(per_kernel, per_policy)

    out_dir = profile_path.parent
    scatter, breakdown = _calibration_figures(table, fit, profiles, modeled_policies, measured_policies, out_dir,
                                              name=name, target=target, float_kernel=float_kernel,
                                              breakdown_bits=breakdown_bits)
    report = out_dir / f"{name}_calibration.md"
    atomic_write_text(report, _report_markdown(fit, table, str(table_path), str(profile_path), summary, n_policies,
                                               float_kernel, (scatter.name, breakdown.name)), what="calibration report")
    return CalibrationResult(fit, table, str(profile_path), str(report), (str(scatter), str(breakdown)), tuple(summary), installed)


def _calibration_figures(table: KernelTable, fit: Fit, profiles: list[EnergyProfile], modeled_policies: dict,
                         measured_policies: np.ndarray, out_dir: Path, *, name: str, target: str, float_kernel: str,
                         breakdown_bits: tuple[int, int]) -> tuple[Path, Path]:
    """The two figures of a calibration: modeled vs measured (kernels and random policies), and the
    per-layer arithmetic/memory breakdown of the all-``breakdown_bits`` policy."""
    from mpsearch.cost.plots import plot_breakdown, plot_modeled_vs_measured

    fitted = profiles[0]
    kernel_rows = [r for r in table.rows if _rows_bits(r) is not None]
    kernel_measured = _target_values(kernel_rows, target)
    label = {fitted.name: f"{fitted.name} (fitted)"}
    modeled = {
        "kernels (fp32 and int8 rows)": {label.get(p.name, p.name): np.array([_layer_energy(r, p) for r in kernel_rows])
                                         for p in profiles},
        f"policies (random per-layer {float_kernel}/int8 mixes)": {label.get(k, k): v for k, v in modeled_policies.items()},
    }
    measured = dict(zip(modeled, (kernel_measured, measured_policies)))
    scatter = out_dir / f"{name}_modeled_vs_measured.png"
    machine = table.machine if table.device == "cpu" else f"{table.device_name}; {table.machine}"
    plot_modeled_vs_measured(measured, modeled, scatter, units=fit.units,
                             title=f"{table.model}: modeled vs measured {target}", machine=machine)
    layers = [n for n in table.layers if table.row(n, "int8") or table.row(n, float_kernel)]
    cost_table = CostTable(tuple((table.row(n, "int8") or table.row(n, float_kernel)).layer_cost() for n in layers), 0, (1, 1, 1))  # type: ignore[union-attr]
    breakdown = out_dir / f"{name}_breakdown_w{breakdown_bits[0]}a{breakdown_bits[1]}.png"
    plot_breakdown(cost_table, {n: breakdown_bits for n in layers}, profiles[:2], breakdown,
                   title=f"{table.model}, every layer W{breakdown_bits[0]}A{breakdown_bits[1]}: per-layer energy",
                   machine=machine)
    return scatter, breakdown


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _report_markdown(fit: Fit, table: KernelTable, table_path: str, profile_path: str, summary: list[dict[str, Any]],
                     n_policies: int, float_kernel: str, plots: tuple[str, str]) -> str:
    lines = [
        f"# Calibrated {fit.target} profile: {table.model} on {table.device_name}",
        "",
        f"Table `{table_path}`: {len(table.rows)} kernels ({', '.join(table.precisions)}) over {len(table.layers)} layers, "
        f"batch {table.batch_size}, {table.threads} threads, windows of {table.window_s:g} s, "
        f"measured {table.created} on {table.machine}."
        + (f" Energy: {table.energy_unavailable}." if table.energy_unavailable else ""),
        "",
        f"Fit (non-negative least squares, {fit.units} per sample): R2 = {fit.r2:.4f}; leaving each layer out "
        f"R2 = {fit.r2_leave_one_layer_out:.4f}; per kernel Spearman {fit.per_layer.spearman:.3f}, Kendall "
        f"{fit.per_layer.kendall:.3f}, median |relative error| {_fmt(fit.per_layer.median_abs_rel_error, '.1%')}.",
        "",
        "| precision | per MAC | per layer call |",
        "|---|---|---|",
        *(f"| {p} | {fit.mac[p]:.4g} {fit.units} | {fit.call[p]:.4g} {fit.units} |" for p in fit.precisions),
        "",
        f"Memory: {fit.per_byte:.4g} {fit.units} per byte moved. Profile written to `{profile_path}`.",
        "",
        f"Agreement with the measured table, per kernel (fp32 and int8 rows) and per policy ({n_policies} seeded "
        f"random per-layer {float_kernel}/int8 mixes, measured as the sum of their table rows):",
        "",
        "| profile | kernels: Spearman | kernels: Kendall | policies: Spearman | policies: Kendall | policies: median abs. rel. error |",
        "|---|---|---|---|---|---|",
        *(f"| {r['profile']} | {_fmt(r['kernel_spearman'])} | {_fmt(r['kernel_kendall'])} | {_fmt(r['policy_spearman'])} | "
          f"{_fmt(r['policy_kendall'])} | {_fmt(r['policy_median_rel_error'], '.1%')} |" for r in summary),
        "",
        f"Produced by `mpsearch calibrate-energy --table {table_path}` from the table `mpsearch profile --model "
        f"{table.model} --device {table.device}` wrote.",
        "",
        f"![modeled vs measured]({plots[0]})",
        "",
        f"![per-layer breakdown]({plots[1]})",
        "",
    ]
    return "\n".join(lines)
