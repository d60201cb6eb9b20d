"""The end of a study: the points of its measured front that a user acts on, measured on the
test split, and optionally each point fine-tuned.

The search measures candidates on a validation subset. Of the Pareto set found there (within
the study's accuracy floor), the points the answers name (the knee and the cheapest point
within 0.5, 1 and 2 pp of fp32, chosen on those validation images), then points spread along
the front, up to ``search.remeasure_points``, are measured on the test split (what reports show,
95 % CIs, the drop paired with the fp32 model on the same images). Their validation figures stay
the search's own: picks choose on what the search measured, never on test. The test passes run
on the executor's workers like the trials do.
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
from mpsearch.fp32_masks import Fp32Masks
from mpsearch.objectives import DROP_ATTR, drop_within, floor_text, full_fidelity, objective_matrix, within_floor
from mpsearch.policy import MeasurementSettings, Policy, uniform_policy
from mpsearch.runtime import EvalTask, Executor
from mpsearch.study.result import ANSWER_DROPS_PP, knee_index

__all__ = ["remeasure_front", "finetune_front"]

logger = logging.getLogger(__name__)


def _answer_positions(front: Any, search: Any) -> list[int]:
    """Positions in ``front`` (cheapest first) of what the answers name, on the search's own
    measurements: the knee, then the cheapest point within each of :data:`ANSWER_DROPS_PP`."""
    import pandas as pd

    accuracy = front["value_accuracy"].to_numpy(dtype=float)
    cost = front[f"value_{search.objectives[1]}"].to_numpy(dtype=float)
    positions = [knee_index(accuracy, cost)]
    column = f"attr_{DROP_ATTR}"
    if column in front:  # trials recorded before drops were kept have none
        drop = pd.to_numeric(front[column], errors="coerce").to_numpy(dtype=float)
        for limit in ANSWER_DROPS_PP:
            ok = np.flatnonzero(drop_within(drop, limit))
            if ok.size:
                positions.append(int(ok[cost[ok].argmin()]))
    return positions


def _front_rows(config: StudyConfig, trials: Any) -> tuple[Any, int, int]:
    """The front's trial rows to measure on test (cheapest first), how many points the front
    has, and the trial number of its knee: the non-dominated full-fidelity trials within the
    accuracy floor; when they are more than ``remeasure_points``, the answers' points first, then
    points evenly spread by rank along the cost axis (both ends first)."""
    search = config.search
    ok = full_fidelity(trials).reset_index(drop=True)
    if ok.empty:
        raise UserError("no trial produced a finite measurement; widen the search space (higher bit widths)")
    floored = ok[within_floor(ok, search.max_drop)]
    if floored.empty:
        import pandas as pd

        best = float(pd.to_numeric(ok[f"attr_{DROP_ATTR}"], errors="coerce").max())
        raise UserError(f"no candidate of study {config.study_name!r} lies within the accuracy floor ({search.max_drop:g} pp "
                        f"below fp32 on the validation images): the most accurate is {-best:.2f} pp below; start another "
                        "study (--name) with a lower floor (--max-drop) or wider bit widths", fields=("search.max_drop",))
    idx = non_dominated(objective_matrix(floored, search.objectives))
    # The same policy may appear twice (algorithms re-propose); measure it once.
    front = floored.iloc[idx].drop_duplicates(subset=[c for c in ok.columns if c.startswith("param_")])
    front = front.sort_values([f"value_{search.objectives[1]}", "trial"], kind="stable").reset_index(drop=True)
    found, cap = len(front), search.remeasure_points
    answers = _answer_positions(front, search)
    knee_trial = int(front["trial"].iloc[answers[0]])
    if 0 < cap < found:
        ends_first = np.round(np.linspace(0, found - 1, max(cap, 2))).astype(int)
        ends_first = [*ends_first[[0, -1]], *ends_first[1:-1]]
        chosen = list(dict.fromkeys(int(i) for i in (*answers, *ends_first)))[:cap]
        front = front.iloc[sorted(chosen)]
    return front, found, knee_trial


CHUNK_IMAGES = 2500  # images per task of a re-measurement pass: even work for every worker


def _measure(executor: Executor, passes: dict[Any, tuple[dict, str, int]], sizes: dict[str, int], *,
             progress: bool) -> dict[Any, Any]:
    """Each pass (policy, split, first image) run to the split's end, cut into tasks of
    :data:`CHUNK_IMAGES` images that the executor's workers share; per pass its per-image
    correctness, or the error of its first failed task."""
    import torch
    from tqdm.auto import tqdm

    tasks, owners = [], []
    for key, (policy, split, first) in passes.items():
        for start in range(first, sizes[split], CHUNK_IMAGES):
            owners.append(key)
            tasks.append(EvalTask(len(tasks), policy, split=split, start=start, limit=min(start + CHUNK_IMAGES, sizes[split]),
                                  keep_mask=True))
    bar = tqdm(total=sum(t.limit - t.start for t in tasks), desc="measure front", unit="image", disable=not progress)
    outcomes = executor.map(tasks, on_done=lambda o: bar.update(tasks[o.index].limit - tasks[o.index].start))
    bar.close()
    parts: dict[Any, Any] = {}
    for outcome in sorted(outcomes, key=lambda o: o.index):  # a pass's chunks in image order
        key = owners[outcome.index]
        if isinstance(parts.get(key), str):
            continue
        parts[key] = (outcome.error or "failed") if not outcome.ok else [*parts.get(key, []), outcome.mask()]
    return {key: part if isinstance(part, str) else torch.cat(part) for key, part in parts.items()}


def remeasure_front(config: StudyConfig, evaluator: Any, executor: Executor, space: BoundSpace, trials: Any,
                    to_policy: Callable[[np.ndarray], Policy], *, progress: bool) -> tuple[Any, dict[int, Policy]]:
    """The measured Pareto points (one row per point, sorted by energy) and each point's policy,
    its provenance holding the study, trial, metrics and the settings that re-measure it.

    Every chosen point (:func:`_front_rows`) runs on the test split, in chunks shared by the
    executor's workers; its validation figures are the search's, on the first ``eval_images``
    validation images. The fp32 test pass it is paired with comes from :mod:`mpsearch.fp32_masks`
    when training or an earlier study left it there. ``within_floor`` marks the points whose
    drops on those validation images and on test both lie within the study's floor; picks choose
    among those. ``front_knee`` marks the knee of the whole front the search found.
    """
    import pandas as pd

    from mpsearch.fidelity import unpack_mask
    from mpsearch.metrics import bootstrap_ci

    search = config.search
    front, found, knee_trial = _front_rows(config, trials)
    full = min(search.eval_images, len(evaluator.data.val))
    points = []
    for _, row in front.iterrows():
        params = {k[len("param_"):]: int(v) for k, v in row.items() if k.startswith("param_")}
        packed = row.get("attr_mask")
        known = unpack_mask(packed, full) if isinstance(packed, str) and int(row.get("attr_images", 0)) == full else None
        points.append((row, to_policy(space.x_from_params(params)), known))
    fp32 = uniform_policy("fp32", model=evaluator.baseline.name, dataset=evaluator.data.info.name,
                          layers=evaluator.policy_layers, checkpoint_sha256=evaluator.baseline.sha256)
    cache = Fp32Masks(evaluator.baseline.sha256, evaluator.data, evaluator.batch_size)
    fp32_test = cache.load("test")
    sizes = {"test": len(evaluator.data.test), "val": full}
    passes: dict[Any, tuple[dict, str, int]] = {}  # key -> (policy, split, first image)
    if fp32_test is None:
        passes["fp32", "test"] = (fp32.to_dict(), "test", 0)
    for i, (_, policy, known) in enumerate(points):
        passes[i, "test"] = (policy.to_dict(), "test", 0)
        if known is None:  # a trial recorded without its per-image results
            passes[i, "val"] = (policy.to_dict(), "val", 0)
    plural = "s" if found != 1 else ""
    shown = f"the {found} Pareto point{plural}" if len(points) == found else f"{len(points)} of {found} Pareto points (the answers first)"
    within = "" if search.max_drop is None else f" within the {floor_text(search.max_drop)}"
    logger.info(f"measuring {shown}{within} on the test split ...")
    masks = _measure(executor, passes, sizes, progress=progress)
    if fp32_test is None:
        if isinstance(masks["fp32", "test"], str):
            raise RuntimeError(f"the fp32 model failed on the test split: {masks['fp32', 'test']}")
        fp32_test = masks["fp32", "test"]
        cache.store("test", fp32_test)
    fp32_val = evaluator.fp32_mask("val", full)  # the search's reference, already computed
    settings = MeasurementSettings(config.quant, config.calibration_size, config.run.torch_threads)
    rows, policies = [], {}
    for i, (row, policy, known) in enumerate(points):
        test_mask = masks[i, "test"]
        val_mask = known if known is not None else masks[i, "val"]
        trial_no = int(row["trial"])
        failed = [m for m in (test_mask, val_mask) if isinstance(m, str)]
        if failed:
            logger.info(f"trial {trial_no} ({policy.summary()}) failed when measured again and is left out: {failed[0]}")
            continue
        val = evaluator.summarize(policy, val_mask, split="val", fp32_mask=fp32_val)
        test = evaluator.summarize(policy, test_mask, split="test", fp32_mask=fp32_test)
        test_drop_pp, val_drop_pp = 100 * (test.drop or 0.0), 100 * (val.drop or 0.0)
        metrics = {
            "search_accuracy": float(row["value_accuracy"]),
            "val_accuracy": val.accuracy, "val_ci95": list(val.accuracy_ci95), "val_drop": val.drop,
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
            "val_drop_pp": val_drop_pp,
            "test_accuracy": test.accuracy, "test_ci_low": test.accuracy_ci95[0], "test_ci_high": test.accuracy_ci95[1],
            **dict(zip(("test_boot_low", "test_boot_high"), bootstrap_ci(test_mask, seed=config.seed))),
            "test_drop_pp": test_drop_pp,
            # Held on test too: the search's subset can flatter a point near the floor.
            "within_floor": search.max_drop is None or bool(drop_within(min(test_drop_pp, val_drop_pp), search.max_drop)),
            "front_knee": trial_no == knee_trial,
            "fp32_test_accuracy": test.fp32_accuracy,
            **{f"rel_{k.replace(':', '_')}": v for k, v in test.costs.relative().items()},
            **({"rel_latency": float(row["value_latency"])} if "value_latency" in row else {}),
        })
    pareto = pd.DataFrame(rows)
    energy_col = f"rel_energy_{search.energy_profile}"
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
