"""The end of a study: its measured front re-measured on the full validation and test splits, and
optionally each point fine-tuned.

The search measures candidates on a validation subset; the Pareto set found there is measured
again on the full validation split (what picks choose on) and on the test split (what reports
show, 95 % CIs, the drop paired with the fp32 model on the same images). The measurements run on
the executor's workers like the trials do.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mpsearch.algorithms.pareto import non_dominated
from mpsearch.algorithms.space import BoundSpace
from mpsearch.config import StudyConfig
from mpsearch.errors import UserError
from mpsearch.objectives import front_matrix, full_fidelity
from mpsearch.policy import MeasurementSettings, Policy, uniform_policy
from mpsearch.runtime import EvalTask, Executor

__all__ = ["remeasure_front", "finetune_front"]

logger = logging.getLogger(__name__)


def _front_rows(config: StudyConfig, trials: Any) -> tuple[Any, int]:
    """The front's trial rows to re-measure, cheapest first, and how many points the front has."""
    ok = full_fidelity(trials).reset_index(drop=True)
    if ok.empty:
        raise UserError("no trial produced a finite measurement; widen the search space (higher bit widths)")
    idx = non_dominated(front_matrix(trials, config.search.objectives))
    # The same policy may appear twice (algorithms re-propose); measure it once.
    front = ok.iloc[idx].drop_duplicates(subset=[c for c in ok.columns if c.startswith("param_")])
    front = front.sort_values([f"value_{config.search.objectives[1]}", "trial"], kind="stable")
    found, cap = len(front), config.search.remeasure_points
    if 0 < cap < found:  # evenly spread by rank along the cost axis, both ends kept
        front = front.iloc[np.unique(np.round(np.linspace(0, found - 1, cap)).astype(int))]
    return front, found


def remeasure_front(config: StudyConfig, evaluator: Any, executor: Executor, space: BoundSpace, trials: Any,
                    to_policy: Callable[[np.ndarray], Policy], *, progress: bool) -> tuple[Any, dict[int, Policy]]:
    """The re-measured Pareto set (one row per point, sorted by energy) and each point's policy,
    its provenance holding the study, trial, metrics and the settings that re-measure it."""
    import pandas as pd
    from tqdm.auto import tqdm

    from mpsearch.metrics import bootstrap_ci

    front, found = _front_rows(config, trials)
    points = []
    for _, row in front.iterrows():
        params = {k[len("param_"):]: int(v) for k, v in row.items() if k.startswith("param_")}
        points.append((row, to_policy(space.x_from_params(params))))
    fp32 = uniform_policy("fp32", model=evaluator.baseline.name, dataset=evaluator.data.info.name,
                          layers=evaluator.policy_layers, checkpoint_sha256=evaluator.baseline.sha256)
    tasks = [EvalTask(0, fp32.to_dict(), split="test", keep_mask=True)]
    for i, (_, policy) in enumerate(points):
        tasks.append(EvalTask(1 + 2 * i, policy.to_dict(), split="test", keep_mask=True))
        tasks.append(EvalTask(2 + 2 * i, policy.to_dict(), split="val", keep_mask=True))
    shown = f"{len(points)} Pareto points" if len(points) == found else f"{len(points)} of {found} Pareto points (spread along the front)"
    logger.info(f"re-measuring {shown} on the full validation and test splits ...")
    bar = tqdm(total=len(tasks), desc="re-measure front", unit="eval", disable=not progress)
    outcomes = executor.map(tasks, on_done=lambda _: bar.update(1))
    bar.close()
    if not outcomes[0].ok:
        raise RuntimeError(f"the fp32 model failed on the test split: {outcomes[0].error}")
    fp32_test = outcomes[0].mask()
    settings = MeasurementSettings(config.quant, config.calibration_size, config.run.torch_threads)
    rows, policies = [], {}
    for i, (row, policy) in enumerate(points):
        test_out, val_out = outcomes[1 + 2 * i], outcomes[2 + 2 * i]
        trial_no = int(row["trial"])
        if not (test_out.ok and val_out.ok):
            logger.info(f"trial {trial_no} ({policy.summary()}) failed on a full split and is left out: "
                        f"{test_out.error or val_out.error}")
            continue
        val = evaluator.summarize(policy, val_out.mask(), split="val")
        test = evaluator.summarize(policy, test_out.mask(), split="test", fp32_mask=fp32_test)
        metrics = {
            "search_accuracy": float(row["value_accuracy"]),
            "val_accuracy": val.accuracy, "val_ci95": list(val.accuracy_ci95),
            "test_accuracy": test.accuracy, "test_ci95": list(test.accuracy_ci95),
            "test_drop": test.drop, "test_drop_ci95": list(test.drop_ci95 or ()),
            **{f"rel_{k}": v for k, v in test.costs.relative().items()},
            **({"rel_latency": float(row["value_latency"])} if "value_latency" in row else {}),
        }
        policies[trial_no] = policy.with_provenance(study=config.study_name, trial=trial_no, seed=config.seed,
                                                    metrics=metrics).with_settings(settings)
        rows.append({
            "trial": trial_no, "policy": policy.summary(), "method": row.get("attr_method", ""),
            "search_accuracy": metrics["search_accuracy"],
            "val_accuracy": val.accuracy, "val_ci_low": val.accuracy_ci95[0], "val_ci_high": val.accuracy_ci95[1],
            "test_accuracy": test.accuracy, "test_ci_low": test.accuracy_ci95[0], "test_ci_high": test.accuracy_ci95[1],
            **dict(zip(("test_boot_low", "test_boot_high"), bootstrap_ci(test_out.mask(), seed=config.seed))),
            "test_drop_pp": 100 * (test.drop or 0.0),
            "fp32_test_accuracy": test.fp32_accuracy,
            **{f"rel_{k.replace(':', '_')}": v for k, v in test.costs.relative().items()},
            **({"rel_latency": float(row["value_latency"])} if "value_latency" in row else {}),
        })
    pareto = pd.DataFrame(rows)
    energy_col = f"rel_energy_{config.search.energy_profile}"
    sort_col = energy_col if energy_col in pareto else pareto.columns[-1]
    return pareto.sort_values(sort_col, kind="stable").reset_index(drop=True), policies


def finetune_front(config: StudyConfig, baseline: Any, data: Any, profiles: tuple[str, ...], pareto: Any, out: Path, *,
                   progress: bool) -> Any:
    """Fine-tune each re-measured Pareto point (LSQ + distillation, ``config.finetune``) and add its measurements.

    Each point gets a fresh quantized copy of the baseline, so points do not share weights; the
    fine-tuned policy and checkpoint go next to the point's policy file. A point already
    fine-tuned with the same settings (a resumed study) is read back, not trained again.
    """
    import pandas as pd
    import torch

    from mpsearch.evaluate import Evaluator
    from mpsearch.finetune import finetune, write_finetuned

    ft_config = config.finetune
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # the workers are idle now: train on every core
    rows = []
    try:
        for i, row in pareto.iterrows():
            source = out / row["policy_file"]
            target = source.with_name(source.stem + ".finetuned.json")
            checkpoint = target.with_suffix(".pt")
            policy = Policy.load(source)
            tuned = Policy.load(target) if target.exists() else None
            done = (tuned is not None and checkpoint.exists()
                    and tuned.provenance.get("finetune", {}).get("config") == ft_config.to_dict()
                    and tuned.provenance["finetune"].get("sha256") == hashlib.sha256(checkpoint.read_bytes()).hexdigest())
            if done:
                metrics = tuned.provenance["metrics"]
            else:
                logger.info(f"fine-tuning Pareto point {i + 1}/{len(pareto)}: trial {int(row['trial'])} ({policy.summary()}) ...")
                evaluator = Evaluator(baseline, data, quant=config.quant, profiles=profiles)
                result = finetune(evaluator, policy, ft_config, progress=progress)
                metrics = write_finetuned(target, evaluator, result).provenance["metrics"]
            rows.append({"qat_val_accuracy": metrics["val_accuracy"], "qat_test_accuracy": metrics["test_accuracy"],
                         "qat_test_drop_pp": 100 * metrics["test_drop"],
                         "qat_policy_file": str(target.relative_to(out))})
    finally:
        torch.set_num_threads(threads)
    return pd.concat([pareto.reset_index(drop=True), pd.DataFrame(rows)], axis=1)
