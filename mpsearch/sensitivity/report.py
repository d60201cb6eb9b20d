"""Sensitivity as a table (layers x bit widths) and as a grouped bar chart."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from mpsearch.errors import UserError
from mpsearch.host.files import atomic_write
from mpsearch.sensitivity.base import canonical_frame
from mpsearch.sensitivity.compute import write_csv_atomic

__all__ = ["sensitivity_table", "write_sensitivity"]


def sensitivity_table(df: pd.DataFrame, values: str = "score") -> pd.DataFrame:
    """Pivot: one row per layer (in the frame's order), one column per bit width (ascending)."""
    order = list(dict.fromkeys(df["layer"]))
    table = df.pivot(index="layer", columns="bits", values=values)
    table = table.reindex(index=order, columns=sorted(table.columns))
    table.columns.name = "bits"
    return table


def _slug(title: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-").lower() or "sensitivity"


def write_sensitivity(df: pd.DataFrame, out_dir: Path, title: str, *, stem: str | None = None) -> dict[str, Path]:
    """Write ``<stem>.csv`` (the long frame) and ``<stem>.png`` (a bar chart) into ``out_dir``.

    ``stem`` defaults to a slug of ``title``. The chart has one group of bars per layer and one
    bar per bit width on a log scale (scores span orders of magnitude between 2 and 8 bits).
    Both files are written to a temp name and renamed, so a reader never sees half a file.
    """
    # matplotlib is imported here, not at module level: `import mpsearch.sensitivity` stays lean.
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    stem = stem or _slug(title)
    paths = {"csv": out_dir / f"{stem}.csv", "png": out_dir / f"{stem}.png"}
    try:
        write_csv_atomic(canonical_frame(df), paths["csv"])
    except OSError as exc:
        raise UserError(f"cannot write {paths['csv']}: {exc.strerror}; choose a writable folder") from None

    table = sensitivity_table(df)
    layers, bits = list(table.index), list(table.columns)
    # Figure and canvas directly (no pyplot): no global backend switch, no figure registry to leak.
    fig = Figure(figsize=(max(6.0, 2.0 + len(layers) * (0.25 + 0.08 * len(bits))), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(bits))
    cmap = colormaps["viridis"]
    for j, b in enumerate(bits):
        heights = table[b].to_numpy(dtype=float)
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(layers))]
        ax.bar(xs, heights, width=width, label=f"{b} bit", color=cmap(j / max(1, len(bits) - 1)))
    # Zero scores (e.g. an unchanged output) cannot sit on a log axis: clip them off the plot.
    ax.set_yscale("log", nonpositive="clip")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_ylabel("sensitivity score (log)")
    ax.set_title(title)
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.legend(title="weight bits", fontsize=8, ncols=min(len(bits), 6))

    atomic_write(paths["png"], lambda f: fig.savefig(f, format="png", dpi=120), binary=True, what="sensitivity plot")
    return paths
