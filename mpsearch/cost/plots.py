"""Figures of the cost models: a policy's per-layer energy breakdown (arithmetic vs memory) and
modeled against measured kernel costs."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from mpsearch.cost.counting import CostTable
from mpsearch.cost.energy import Bits, energy
from mpsearch.cost.energy_profiles import EnergyProfile

__all__ = ["plot_breakdown", "plot_modeled_vs_measured"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_breakdown(table: CostTable, bits: Bits, profiles: list[EnergyProfile], path: str | os.PathLike[str], *,
                   title: str, machine: str = "") -> None:
    """Stacked bars per layer (arithmetic, memory) of one bit assignment, one panel per profile."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(profiles), 1, figsize=(max(8.0, 0.45 * len(table) + 2), 2.8 * len(profiles)),
                             squeeze=False)
    x = np.arange(len(table))
    for ax, profile in zip(axes[:, 0], profiles):
        report = energy(table, bits, profile)
        arithmetic = np.array([layer.arithmetic for layer in report.layers])
        memory = np.array([layer.memory for layer in report.layers])
        ax.bar(x, arithmetic, color="#4c72b0", label=f"arithmetic ({arithmetic.sum() / report.total:.0%})")
        ax.bar(x, memory, bottom=arithmetic, color="#dd8452", label=f"memory ({memory.sum() / report.total:.0%})")
        ax.set_ylabel(f"{profile.units} per sample")
        ax.set_title(f"{profile.name}: {report.total:,.4g} {profile.units} per sample", fontsize=9)
        ax.legend(fontsize=8, loc="upper left", framealpha=0.9)
        ax.grid(axis="y", alpha=0.3)
        ax.set_xticks(x, [""] * len(x))
    axes[-1, 0].set_xticks(x, list(table.names), rotation=90, fontsize=7)
    fig.suptitle(title + (f"\n{machine}" if machine else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_modeled_vs_measured(measured: Mapping[str, np.ndarray], modeled: Mapping[str, Mapping[str, np.ndarray]],
                             path: str | os.PathLike[str], *, units: str, title: str, machine: str = "") -> None:
    """One panel per level (e.g. "kernels", "policies"): each profile's modeled cost against the
    measured one, log-log; profiles in other units are scaled to the measured mean (their shape
    is what is compared, and the legend says so)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(measured), figsize=(5.2 * len(measured), 4.6), squeeze=False)
    for ax, (level, y) in zip(axes[0], measured.items()):
        lo, hi = float(y.min()), float(y.max())
        for name, values in modeled[level].items():
            scale = 1.0 if name.endswith("(fitted)") else float(y.mean() / values.mean())
            label = name if scale == 1.0 else f"{name} (x{scale:.3g} to the measured mean)"
            ax.scatter(y, values * scale, s=12, alpha=0.7, label=label)
            lo, hi = min(lo, float((values * scale).min())), max(hi, float((values * scale).max()))
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--", label="modeled = measured")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"measured, {units} per sample")
        ax.set_ylabel(f"modeled, {units} per sample")
        ax.set_title(f"{level} ({len(y)})", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(title + (f"\n{machine}" if machine else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
