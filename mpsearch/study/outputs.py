"""A study's files: the config it ran with, every trial, the front, policies, plots and report.md.

``config.yaml`` is the study's :class:`~mpsearch.config.StudyConfig` as it ran (storage and
worker count resolved): running it again resumes the study. ``study.json`` adds what the run
found (hypervolume and its reference, phase times, the resolved search space) and the policy
template (model, data set, checkpoint, settings) that turns a trial's layers into a policy.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mpsearch.host.files import atomic_write, atomic_write_text
from mpsearch.objectives import full_fidelity
from mpsearch.policy import Policy
from mpsearch.study.result import PARETO_FILE, STUDY_FILE, SearchResult

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["write_policies", "write_outputs", "versions"]


def versions() -> dict[str, str]:
    """Versions of the packages a study's numbers depend on."""
    import optuna
    import pymoo
    import timm
    import torch

    try:
        import ray

        ray_version = ray.__version__
    except Exception:  # noqa: BLE001 - ray is optional for in-process studies
        ray_version = "unavailable"
    return {
        "python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
        "optuna": optuna.__version__, "pymoo": pymoo.__version__, "ray": ray_version, "numpy": np.__version__,
    }


def write_policies(out: Path, pareto: pd.DataFrame, policies: dict[int, Policy]) -> Any:
    """``policies/trial-NNNN.json`` for every front row; returns the front with a ``policy_file`` column."""
    folder = out / "policies"
    folder.mkdir(exist_ok=True)
    files = []
    for trial in pareto["trial"]:
        files.append(f"policies/trial-{int(trial):04d}.json")
        policies[int(trial)].save(out / files[-1])
    return pareto.assign(policy_file=files)


def write_outputs(result: SearchResult, *, space: dict[str, Any], baseline_meta: dict[str, Any], workers: int,
                  weight_scores: dict[tuple[str, int], float] | None) -> None:
    """Every file of a finished (or search-only) study in ``result.out_dir``."""
    from mpsearch.host.machine import describe_machine

    out, config, trials = result.out_dir, result.config, result.trials
    assert out is not None
    atomic_write_text(out / "config.yaml", config.to_yaml(), what="study config")
    summary = {"study_name": config.study_name, "hypervolume": result.hypervolume,
               "hypervolume_reference": list(result.ref_point), "wall_s": result.wall_s, "phases": result.phases,
               "template": result.template.to_dict(), "space": space, "selection": result.selection}
    atomic_write_text(out / STUDY_FILE, json.dumps(summary, indent=2), what="study summary")
    atomic_write(out / "trials.csv", lambda f: trials.to_csv(f, index=False), what="trial table")
    if importlib.util.find_spec("pyarrow") is not None:  # the typed copy of the table; trials.csv is enough to load a study
        atomic_write(out / "trials.parquet", lambda f: trials.to_parquet(f, index=False), binary=True, what="trial table")
    machine = describe_machine()
    if trials["attr_run"].nunique() > 1:
        from mpsearch.study.compare import write_comparison

        write_comparison(out, trials, config, np.asarray(result.ref_point), machine=machine)
    if result.front is None:
        return
    from mpsearch.study.compare import proxy_kendall
    from mpsearch.study.report import plot_front, write_report

    atomic_write(out / PARETO_FILE, lambda f: result.front.to_csv(f, index=False), what="Pareto table")
    plot_front(trials, result.front, config, out)
    proxies = {config.search.sensitivity: proxy_kendall(full_fidelity(trials), weight_scores)} if weight_scores else {}
    write_report(out, result, baseline=baseline_meta, machine=machine, versions=versions(), workers=workers,
                 platform_=platform.platform(), proxies=proxies)
