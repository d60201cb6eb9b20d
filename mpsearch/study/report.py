"""Tables and plots of a study: the measured front (PNG + interactive HTML) and report.md."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mpsearch.config import StudyConfig
from mpsearch.host.files import atomic_write, atomic_write_text
from mpsearch.objectives import DROP_ATTR, floor_text, objective_spec, reference_text, within_floor

if TYPE_CHECKING:
    import pandas as pd


logger = logging.getLogger(__name__)

__all__ = ["front_figure", "plot_front", "write_report", "phase_summary", "PHASES", "answers_text", "rule_text"]

# A study's phases in the order they run, as report.md names them.
PHASES = {"baseline": "baseline", "calibration": "calibration", "sensitivity": "sensitivity", "search": "search",
          "remeasure": "re-measurement", "export": "export and timing", "finetune": "fine-tuning", "other": "other"}


def phase_summary(phases: dict[str, float]) -> str:
    """``baseline 0.1 min, sensitivity 0.4 min, ...``: wall time by phase, in the order they run."""
    return ", ".join(f"{PHASES.get(k, k)} {phases[k] / 60:.1f} min" for k in [*PHASES, *sorted(set(phases) - set(PHASES))]
                     if k in phases)


# What each evaluation backend (mpsearch.quant.backends) runs, for the report.
_BACKEND_TEXT = {"int8": "oneDNN int8 kernels for every layer whose weight and input are quantized",
                 "fake": "fake quantization in float32"}


def _energy_col(config: StudyConfig) -> str:
    objectives = config.search.objectives
    return "value_energy" if "energy" in objectives else f"value_{objectives[1]}"


def _x_label(config: StudyConfig) -> str:
    first = config.search.objectives[1]
    return f"{first} relative to fp32" + (f" ({config.search.energy_profile})" if first == "energy" else "")


def _front_x(pareto: pd.DataFrame, config: StudyConfig) -> Any:
    """The front's values of the study's first cost objective."""
    xcol = objective_spec(config.search.objectives[1])[1].replace(":", "_")
    xcol = f"rel_energy_{config.search.energy_profile}" if xcol == "rel_energy" else xcol
    return pareto[xcol]


def _timed_batches(frame: pd.DataFrame, prefix: str) -> list[tuple[int, str]]:
    """(batch size, column) of the ``{prefix}{B}_ms`` latency columns of a timed front, smallest batch first."""
    return sorted((int(c[len(prefix):-len("_ms")]), c) for c in frame.columns if c.startswith(prefix) and c.endswith("_ms"))


def _latency_labels(pareto: pd.DataFrame) -> list[str]:
    """Each Pareto point's onnxruntime latency at the smallest batch size timed ("" where untimed)."""
    timed = _timed_batches(pareto, "latency_b")
    if not timed:
        return [""] * len(pareto)
    batch, column = timed[0]
    return ["" if v != v else f"{v:.1f} ms at batch {batch}" for v in pareto[column]]


def front_figure(trials: pd.DataFrame, pareto: pd.DataFrame | None, config: StudyConfig) -> Any:
    """A matplotlib figure: every trial, the re-measured front on test (if any, labelled with its
    onnxruntime latency where timed: once in the legend when every point has the same), the
    uniform policies.

    Uniform policies are the trials whose ``method`` attribute starts with ``uniform``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = trials[trials["state"] == "COMPLETE"]
    x_col = _energy_col(config)
    uniform = ok[ok["attr_method"].astype(str).str.startswith("uniform")]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    floor = config.search.max_drop
    inside = within_floor(ok, floor)
    ax.scatter(ok[x_col][inside], 100 * ok["value_accuracy"][inside], s=10, c="#bbbbbb",
               label=f"trials ({int(inside.sum())}, val subset)")
    if (~inside).any():
        ax.scatter(ok[x_col][~inside], 100 * ok["value_accuracy"][~inside], s=10, marker="x", c="#dddddd",
                   label=f"trials below the floor ({int((~inside).sum())})")
    if pareto is not None and len(pareto):
        _draw_front(ax, pareto, ok, config)
    for _, row in uniform.iterrows():
        ax.scatter(row[x_col], 100 * row["value_accuracy"], marker="s", s=40, edgecolor="black", facecolor="#1f77b4", zorder=5)
        ax.annotate(str(row["attr_method"]).split(":")[1].upper(), (row[x_col], 100 * row["value_accuracy"]),
                    textcoords="offset points", xytext=(4, -10), fontsize=7)
    if len(uniform):
        ax.scatter([], [], marker="s", s=40, edgecolor="black", facecolor="#1f77b4", label="uniform policies (val subset)")
    ax.set_xlabel(_x_label(config))
    ax.set_ylabel("top-1 accuracy (%)")
    search = config.search
    ax.set_title(f"{config.model} on {config.dataset}: {search.algorithm}, budget {search.budget}, seed {config.seed}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def _draw_front(ax: Any, pareto: pd.DataFrame, ok: Any, config: StudyConfig) -> None:
    """The re-measured front on test with its confidence intervals, the floor line, the answers
    and the onnxruntime latency labels."""
    floor = config.search.max_drop
    if floor is not None and "fp32_test_accuracy" in pareto:
        line = 100 * float(pareto["fp32_test_accuracy"].iloc[0]) - floor
        ax.axhline(line, ls="--", lw=0.8, c="#888888", label=f"floor: fp32 - {floor:g} pp (test)")
        # the useful region fills the plot; trials far below the floor are counted in the legend
        top = max(100 * float(pareto["fp32_test_accuracy"].iloc[0]), 100 * float(ok["value_accuracy"].max())) + 1.0
        ax.set_ylim(bottom=line - max(2.0, floor), top=top)
    px = _front_x(pareto, config)
    labels = _latency_labels(pareto)
    shared = len(set(labels)) == 1  # one timing for every point (one graph): said once, in the legend
    ax.errorbar(px, 100 * pareto["test_accuracy"],
                yerr=[100 * (pareto["test_accuracy"] - pareto["test_ci_low"]), 100 * (pareto["test_ci_high"] - pareto["test_accuracy"])],
                fmt="o-", color="#d62728", ms=4, capsize=2,
                label="Pareto set, test split (95% CI)" + (f"; each {labels[0]} in onnxruntime" if shared and labels[0] else ""))
    answers = pareto.get("answer_for_pp")
    if answers is not None:
        named = answers.fillna("").astype(str) != ""
        ax.scatter(px[named], 100 * pareto["test_accuracy"][named], s=60, facecolor="none", edgecolor="#2ca02c", zorder=6,
                   label="answers: the cheapest point proven within X pp (on validation)")
        for x, y, tol in zip(px[named], 100 * pareto["test_accuracy"][named], answers[named].astype(str)):
            ax.annotate(f"within {tol.replace(',', ', ')} pp", (x, y), textcoords="offset points", xytext=(-4, 6), ha="right",
                        fontsize=6, color="#2ca02c")
    seen: set[str] = set()
    for x, y, text in zip(px, 100 * pareto["test_accuracy"], [] if shared else labels):
        if text not in seen:  # points on one graph share a timing: labelled once, at the cheapest
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, -10 if seen else 4), fontsize=6,
                        color="#d62728")
        seen.add(text)


def plot_front(trials: pd.DataFrame, pareto: pd.DataFrame, config: StudyConfig, out: Path) -> None:
    """front.png (:func:`front_figure`) and, with the ``html`` extra (plotly), front.html (interactive) in ``out``."""
    import matplotlib.pyplot as plt

    fig = front_figure(trials, pareto, config)
    atomic_write(out / "front.png", lambda f: fig.savefig(f, format="png"), binary=True, what="plot")
    plt.close(fig)
    try:
        import plotly.graph_objects as go
    except ImportError:
        logger.info("front.html skipped: it needs plotly (pip install 'mpsearch[html]')")
        return

    ok = trials[trials["state"] == "COMPLETE"]
    x_col = _energy_col(config)
    uniform = ok[ok["attr_method"].astype(str).str.startswith("uniform")]
    px = _front_x(pareto, config)
    fig2 = go.Figure()
    fig2.add_trace(go.Scatter(x=ok[x_col], y=100 * ok["value_accuracy"], mode="markers", name="trials (val subset)",
                              marker={"color": "#aaaaaa", "size": 5},
                              text=[f"trial {t}: {p}" for t, p in zip(ok["trial"], ok["attr_policy"])]))
    if len(pareto):
        fig2.add_trace(go.Scatter(x=px, y=100 * pareto["test_accuracy"], mode="lines+markers", name="Pareto set (test)",
                                  text=[f"trial {t}: {p} {lat}" for t, p, lat in
                                        zip(pareto["trial"], pareto["policy"], _latency_labels(pareto))],
                                  error_y={"type": "data", "symmetric": False,
                                           "array": 100 * (pareto["test_ci_high"] - pareto["test_accuracy"]),
                                           "arrayminus": 100 * (pareto["test_accuracy"] - pareto["test_ci_low"])}))
    if len(uniform):
        fig2.add_trace(go.Scatter(x=uniform[x_col], y=100 * uniform["value_accuracy"], mode="markers+text", name="uniform",
                                  text=[str(m).split(":")[1].upper() for m in uniform["attr_method"]],
                                  textposition="bottom right", marker={"symbol": "square", "size": 9}))
    fig2.update_layout(title=f"{config.model} on {config.dataset}", xaxis_title=_x_label(config), yaxis_title="top-1 accuracy (%)")
    atomic_write_text(out / "front.html", fig2.to_html(include_plotlyjs="inline"), what="plot")


def _latency_columns(frame: pd.DataFrame) -> list[str]:
    """The per-point onnxruntime columns of a timed front (:mod:`mpsearch.study.latency`)."""
    return [c for c in frame.columns if c == "onnx_mib" or c.startswith(("latency_b", "speedup_b"))]


def _latency_lines(pareto: pd.DataFrame, config: StudyConfig) -> list[str]:
    if "fp32_onnx_mib" not in pareto.columns or pareto.empty or config.latency is None:
        return []
    first = pareto.iloc[0]
    fp32 = ", ".join(f"batch {batch} {first[c]:.2f} ms" for batch, c in _timed_batches(pareto, "fp32_latency_b"))
    return [f"Latency: each point exported to ONNX (`mpsearch export`) and run in onnxruntime {first['onnxruntime']} on "
            f"{int(first['latency_threads'])} thread(s), median of {config.latency.runs} timed runs after {config.latency.warmup} "
            "warm-up runs per batch size; speed-up over the fp32 ONNX "
            f"of the same baseline, timed in the same run ({fp32}; {first['fp32_onnx_mib']:.2f} MiB). Points with the same "
            "graph share one timing.", ""]


def _markdown_table(df, columns: list[str], formats: dict[str, str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in df.iterrows():
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(format(v, formats[c]) if c in formats and isinstance(v, (int, float, np.floating)) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _answers(result: Any) -> Any:
    """:meth:`SearchResult.answers` formatted: one string per cell, "none" where no point qualifies."""
    import pandas as pd

    table = result.answers()
    cost = result.cost_column
    out = []
    for _, row in table.iterrows():
        if pd.isna(row.get("trial")):
            out.append({"answer": row["answer"], "trial": "none", "policy": "no Pareto point proven within it"})
            continue
        images = int(row.get("val_images", 0) or 0)
        if images:
            chosen = {"val images": str(images), "val drop (pp)": f"{row['val_drop_pp']:+.2f}",
                      "bound (pp)": f"{row['val_drop_bound_pp']:+.2f}"}
        else:  # a study finished before answers were chosen with bounds: the search's figures
            search_drop = row.get("search_drop_pp", row.get("val_drop_pp", float("nan")))
            chosen = {"val images": str(int(row.get("search_images", 0) or 0) or "search's"), "val drop (pp)": f"{search_drop:+.2f}",
                      "bound (pp)": ""}
        test_ci = (f" ({row['test_drop_low_pp']:+.2f} to {row['test_drop_high_pp']:+.2f})"
                   if pd.notna(row.get("test_drop_low_pp", float("nan"))) else "")
        out.append({"answer": row["answer"], "trial": str(int(row["trial"])), "policy": row["policy"], **chosen,
                    "test accuracy": f"{row['test_accuracy']:.4f}", "test drop (pp, 95% CI)": f"{row['test_drop_pp']:+.2f}{test_ci}",
                    cost: f"{row[cost]:.4f}"})
    return pd.DataFrame(out).fillna("")


def rule_text(result: Any) -> str:
    """How the answers were chosen, in one paragraph (report.md, the CLI)."""
    selection, search = result.selection, result.config.search
    if not selection:
        return "Answers chosen on the search's validation images."
    images = selection["images"]
    where = (f"the {images} validation images the search did not use (images {selection['first_image'] + 1} to "
             f"{selection['first_image'] + images})" if not selection.get("reused") else
             f"all {images} validation images (the search used every one: its winners' luck is not removed)")
    return (f"Answers chosen on {where}, by {selection['rule']}: a point answers \"within X pp\" when the lower "
            f"{selection['confidence']:.0%} confidence bound of its paired drop against fp32 lies within X pp "
            f"(`bound`), and so does every costlier point of the front; each answer holds at {selection['confidence']:.0%} "
            f"confidence (`--confidence`). Looks at {', '.join(str(n) for n in selection['looks'])} images; "
            f"{selection['measured_images']} point-images measured over {selection['front_points']} Pareto points. "
            f"The knee is the whole front's (on the search's {search.eval_images} images), measured on every one of them.")


def answers_text(result: Any) -> str:
    """The answers table as the CLI prints it: the knee and the cheapest points within the study's tolerances."""
    selection = result.selection
    how = (f"each proven on up to {selection['images']} validation images the search did not use, at "
           f"{selection['confidence']:.0%} confidence" if selection and not selection.get("reused") else "chosen on validation")
    return f"answers ({how}; reported on test):\n" + _answers(result).to_string(index=False)


def _proxy_lines(proxies: dict[str, tuple[float, float, int]]) -> list[str]:
    if not proxies:
        return []
    lines = ["## Sensitivity proxies against measurements", "",
             "Kendall tau-b between each proxy's predicted ordering of the measured trials (minus the summed per-layer "
             "scores of their weight widths: less perturbation, higher predicted accuracy) and their measured accuracy "
             "(full search fidelity); 1 = the proxy orders the trials exactly as measured.", "",
             "| proxy | Kendall tau | p-value | trials |", "|---|---|---|---|"]
    lines += [f"| {name} | {tau:.3f} | {p:.2g} | {n} |" for name, (tau, p, n) in proxies.items()]
    return lines + [""]


def _study_lines(result: Any, baseline: dict[str, Any], *, machine: str, versions: dict[str, str], workers: int,
                 platform_: str) -> list[str]:
    """report.md's "Study" section: what was searched, how, on what machine, and where time went."""
    config, trials = result.config, result.trials
    search = config.search
    ok = trials[trials["state"] == "COMPLETE"]
    failed = int((trials["state"] == "FAIL").sum())
    search_s = result.phases.get("search", result.wall_s)
    feasible = int(within_floor(ok, search.max_drop).sum()) if f"attr_{DROP_ATTR}" in ok else len(ok)
    return [
    "## Study",
    "",
    f"- model **{config.model}** on **{config.dataset}**; baseline test accuracy "
    f"{baseline.get('test_accuracy', float('nan')):.4f}",
    f"- algorithm **{search.algorithm}**, budget {search.budget} trials ({len(ok)} measured, {failed} failed), "
    f"population {search.population_size}, seed {config.seed}",
    f"- objectives: {', '.join(search.objectives)} (energy profile {search.energy_profile}); each trial measured on the "
    f"first {search.eval_images} validation images; "
    + (f"at most {search.remeasure_points} Pareto points (those the answers rest on, the knee, then spread along the "
       "front) " if search.remeasure_points else "every Pareto point ")
    + "measured on the test split",
    f"- {floor_text(search.max_drop)}: {feasible} of {len(ok)} measured candidates within it; the front, "
    "re-measurement and picks hold only those (`within_floor`: the point also holds it on test)",
    f"- hypervolume of the measured front (1 - accuracy and relative costs, reference point "
    f"{reference_text(result.ref_point)}): **{result.hypervolume:.4f}**",
    f"- wall time {result.wall_s / 60:.1f} min, {workers} worker(s) x {config.run.torch_threads} torch thread(s); "
    f"machine: {machine}; {platform_}",
    f"- time by phase: {phase_summary(result.phases) or f'search {search_s / 60:.1f} min'}",
    f"- candidates measured with the **{config.quant.backend}** backend ({_BACKEND_TEXT.get(config.quant.backend, '')})",
    f"- storage: `{result.shown_storage}`; versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
    "",
    ]


def write_report(out: Path, result: Any, *, baseline: dict[str, Any], machine: str, versions: dict[str, str], workers: int,
                 platform_: str, proxies: dict[str, tuple[float, float, int]] | None = None) -> None:
    """report.md of a finished study (``result`` is its :class:`~mpsearch.study.SearchResult`)."""
    config, pareto = result.config, result.front
    search = config.search
    energy_col = f"rel_energy_{search.energy_profile}"
    cols = ["trial", "policy", "method", "answer_for_pp", "test_accuracy", "test_ci_low", "test_ci_high", "test_drop_pp",
            "test_drop_low_pp", "test_drop_high_pp", "search_drop_pp", "val_images", "val_drop_pp", "val_drop_bound_pp",
            "within_floor", energy_col, "rel_size", "rel_bops", *_latency_columns(pareto), "qat_test_accuracy", "qat_test_drop_pp"]
    fmt = {"test_accuracy": ".4f", "test_ci_low": ".4f", "test_ci_high": ".4f", "test_drop_pp": "+.2f", "test_drop_low_pp": "+.2f",
           "test_drop_high_pp": "+.2f", "search_drop_pp": "+.2f", "val_accuracy": ".4f", "val_drop_pp": "+.2f",
           "val_drop_bound_pp": "+.2f", energy_col: ".4f", "rel_size": ".4f", "rel_bops": ".4f",
           "qat_test_accuracy": ".4f", "qat_test_drop_pp": "+.2f", **{c: ".2f" for c in _latency_columns(pareto)}}
    answers = _answers(result)
    lines = [
        f"# Study {config.study_name}",
        "",
        "## Answers (chosen on validation, reported on test)",
        "",
        _markdown_table(answers, list(answers.columns), {}),
        "",
        rule_text(result),
        "",
        "`mpsearch export --study DIR --pick knee` (or `--pick \"drop<=1\"`) writes the chosen model.",
        "",
        *_study_lines(result, baseline, machine=machine, versions=versions, workers=workers, platform_=platform_),
        f"## Pareto set within the floor: {len(pareto)} point{'s' if len(pareto) != 1 else ''} measured on the test split",
        "",
        "Test accuracy with its 95% Wilson CI; the drop against fp32 paired on the same images, with its 95% CI; "
        "`search_drop_pp` on the search's validation images, `val_drop_pp` and its lower bound on the images the answer "
        "rule measured (`val_images`; 0: the rule did not need the point); `answer_for_pp`: the tolerances the point answers.",
        "",
        _markdown_table(pareto, [c for c in cols if c in pareto.columns], fmt),
        "",
        *_latency_lines(pareto, config),
        *_proxy_lines(proxies or {}),
        "Files: `trials.csv` / `trials.parquet` (every trial), `pareto.csv`, `policies/trial-NNNN.json`, "
        "`front.png`, `front.html`, `config.yaml` (run it again to resume: `mpsearch optimize --config config.yaml`).",
    ]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n", what="report")
