"""The end of a study: the answers chosen with evidence, the front measured on the test split,
and optionally each point fine-tuned.

The search measures candidates on its first validation images. Of the Pareto set found there
(within the study's accuracy floor), the answers (the cheapest point within each tolerance of
fp32) are chosen by :mod:`mpsearch.study.answers` on the validation images the search did not
use, measuring each point only as far as the question needs; the knee (of the whole front, on the
search's figures) is measured on all of them. Then the points the answers rest on, the knee and
points spread along the front, up to ``search.remeasure_points``, are measured on the test split
(what reports show: 95 % CIs, the drop paired with the fp32 model on the same images). Picks
choose on validation figures, never on test. Every pass runs on the executor's workers like the
trials do.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mpsearch.algorithms.pareto import non_dominated
from mpsearch.algorithms.space import BoundSpace
from mpsearch.config import StudyConfig
from mpsearch.errors import UserError
from mpsearch.evaluation.executors import EvalTask, Executor
from mpsearch.models.fp32_masks import Fp32Masks
from mpsearch.objectives import DROP_ATTR, drop_within, floor_text, full_fidelity, objective_matrix, within_floor
from mpsearch.policy import MeasurementSettings, Policy, uniform_policy
from mpsearch.study.answers import RULE_NAME, AnswerRule, Race, run_race
from mpsearch.study.result import knee_index

if TYPE_CHECKING:
    import pandas as pd

    from mpsearch.data import DataSplits
    from mpsearch.evaluation.evaluator import Evaluator
    from mpsearch.models.zoo import Baseline

__all__ = ["remeasure_front", "finetune_front"]

logger = logging.getLogger(__name__)


def _front_rows(config: StudyConfig, trials: pd.DataFrame) -> Any:
    """The front: the non-dominated full-fidelity trials within the accuracy floor (one row per
    distinct policy), cheapest first (ties by trial number)."""
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
    return front.sort_values([f"value_{search.objectives[1]}", "trial"], kind="stable").reset_index(drop=True)


def _test_positions(found: int, cap: int, first: list[int]) -> list[int]:
    """Positions (of a front of ``found`` points, cheapest first) to measure on test: ``first``
    (what the answers rest on), then both ends and points evenly spread by rank, up to ``cap``
    points (0: all; never fewer than ``first``)."""
    if cap == 0 or cap >= found:
        return list(range(found))
    spread = np.round(np.linspace(0, found - 1, max(cap, 2))).astype(int)
    spread = [*spread[[0, -1]], *spread[1:-1]]
    chosen = list(dict.fromkeys([*first, *(int(i) for i in spread)]))
    return sorted(chosen[: max(cap, len(set(first)))])


CHUNK_IMAGES = 2500  # images per task of a test pass: even work for every worker
RACE_CHUNK_IMAGES = 500  # a look adds a few hundred to a few thousand images; both workers share it


def _measure(executor: Executor, passes: dict[Any, tuple[dict, str, int, int]], *, chunk: int, desc: str,
             progress: bool) -> dict[Any, Any]:
    """Each pass (policy, split, first image, end) cut into tasks of at most ``chunk`` images
    that the executor's workers share; per pass its per-image correctness, or the error of its
    first failed task."""
    import torch
    from tqdm.auto import tqdm

    tasks, owners = [], []
    for key, (policy, split, first, end) in passes.items():
        for start in range(first, end, chunk):
            owners.append(key)
            tasks.append(EvalTask(len(tasks), policy, split=split, start=start, limit=min(start + chunk, end), keep_mask=True))
    bar = tqdm(total=sum(t.limit - t.start for t in tasks), desc=desc, unit="image", disable=not progress, leave=False)
    outcomes = executor.map(tasks, on_done=lambda o: bar.update(tasks[o.index].limit - tasks[o.index].start))
    bar.close()
    parts: dict[Any, Any] = {}
    for outcome in sorted(outcomes, key=lambda o: o.index):  # a pass's chunks in image order
        key = owners[outcome.index]
        if isinstance(parts.get(key), str):
            continue
        parts[key] = (outcome.error or "failed") if not outcome.ok else [*parts.get(key, []), outcome.mask()]
    return {key: part if isinstance(part, str) else torch.cat(part) for key, part in parts.items()}


def _fp32_mask(cache: Fp32Masks, executor: Executor, fp32: Policy, split: str, size: int, *, progress: bool) -> Any:
    """The fp32 model's correctness on the whole of ``split``: cached, else measured on the workers and cached."""
    mask = cache.load(split)
    if mask is None:
        mask = _measure(executor, {"fp32": (fp32.to_dict(), split, 0, size)}, chunk=CHUNK_IMAGES, desc=f"fp32 {split}",
                        progress=progress)["fp32"]
        if isinstance(mask, str):
            raise RuntimeError(f"the fp32 model failed on the {split} split: {mask}")
        cache.store(split, mask)
    return mask


@dataclass
class _Front:
    """The Pareto set the search found, cheapest first, with what the end of the study needs of it."""

    rows: Any  # pandas.DataFrame of trial rows
    policies: list[Policy]
    knee: int  # position of the knee (of the whole front, on the search's figures)
    order: list[int]  # the answer rule's fixed order: positions, most expensive first (ties by trial number)

    def __len__(self) -> int:
        return len(self.rows)


def _choose_answers(config: StudyConfig, executor: Executor, front: _Front, fp32_val: Any, search_images: int, *,
                    progress: bool) -> tuple[Race, int]:
    """Race the front (:mod:`mpsearch.study.answers`) on the validation images after the
    search's (all of them when the search used every one); the race and its first image."""
    import torch

    search = config.search
    first = search_images if search_images < len(fp32_val) else 0
    race = Race(AnswerRule(search.answer_tolerances, search.confidence), fp32_val[first:], len(front),
                full=[front.order.index(front.knee)])

    def measure(wanted: Any) -> dict[int, Any]:
        passes = {k: (front.policies[front.order[k]].to_dict(), "val", first + a, first + b) for k, (a, b) in wanted.items()}
        masks = _measure(executor, passes, chunk=RACE_CHUNK_IMAGES, desc="choose answers", progress=progress)
        out = {}
        for k, mask in masks.items():
            if isinstance(mask, str):  # a policy that cannot be measured is wrong on every image: never an answer
                logger.info(f"trial {int(front.rows['trial'].iloc[front.order[k]])} failed on validation images: {mask}")
                mask = torch.zeros(passes[k][3] - passes[k][2], dtype=torch.bool)
            out[k] = mask
        return out

    return run_race(race, measure), first


def _point_row(config: StudyConfig, evaluator: Evaluator, front: _Front, i: int, race: Race, test_mask: Any, fp32_test: Any,
               answer_for: list[float], search_fp32: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pareto.csv row, policy provenance metrics) of front point ``i`` measured on test."""
    from mpsearch.evaluation.metrics import bootstrap_ci

    search, row, policy = config.search, front.rows.iloc[i], front.policies[i]
    k = front.order.index(i)
    images = race.images(k)
    val = evaluator.summarize(policy, race.points[k].mask, split="val", fp32_mask=race.fp32[:images]) if images else None
    test = evaluator.summarize(policy, test_mask, split="test", fp32_mask=fp32_test)
    test_drop_pp = 100 * (test.drop or 0.0)
    search_drop_pp = float(row.get(f"attr_{DROP_ATTR}", np.nan))
    if not np.isfinite(search_drop_pp):  # trials recorded before drops were kept
        search_drop_pp = 100 * (float(row["value_accuracy"]) - search_fp32)
    figures = {
        "search_images": min(search.eval_images, len(evaluator.data.val)), "search_accuracy": float(row["value_accuracy"]),
        "search_drop_pp": search_drop_pp,
        "val_images": images, "val_accuracy": val.accuracy if val else np.nan, "val_drop_pp": 100 * val.drop if val else np.nan,
        "val_drop_bound_pp": race.bound(k),
        "test_accuracy": test.accuracy, "test_ci_low": test.accuracy_ci95[0], "test_ci_high": test.accuracy_ci95[1],
        "test_drop_pp": test_drop_pp, "test_drop_low_pp": 100 * test.drop_ci95[0], "test_drop_high_pp": 100 * test.drop_ci95[1],
    }
    latency = {"rel_latency": float(row["value_latency"])} if "value_latency" in row else {}
    metrics = {**figures, "test_ci95": list(test.accuracy_ci95), "test_drop": test.drop, "test_drop_ci95": list(test.drop_ci95),
               "answer_for_pp": answer_for, **{f"rel_{k}": v for k, v in test.costs.relative().items()}, **latency}
    out = {
        "trial": int(row["trial"]), "policy": policy.summary(), "method": row.get("attr_method", ""), **figures,
        **dict(zip(("test_boot_low", "test_boot_high"), bootstrap_ci(test_mask, seed=config.seed))),
        # Held on test too: the search's subset can flatter a point near the floor.
        "within_floor": search.max_drop is None or bool(drop_within(min(test_drop_pp, search_drop_pp), search.max_drop)),
        "front_knee": i == front.knee,
        "answer_for_pp": ",".join(f"{t:g}" for t in answer_for),
        "fp32_val_accuracy": float(race.fp32[:images].float().mean()) if images else np.nan,
        "fp32_test_accuracy": test.fp32_accuracy,
        **{f"rel_{k}": v for k, v in test.costs.relative().items()}, **latency,
    }
    return out, metrics


def _search_front(config: StudyConfig, trials: pd.DataFrame, space: BoundSpace, to_policy: Callable[[np.ndarray], Policy]) -> _Front:
    """The front the search found (:func:`_front_rows`), with each point's policy, its knee and the
    answer rule's order."""
    rows = _front_rows(config, trials)
    found, cost_col = len(rows), f"value_{config.search.objectives[1]}"
    order = sorted(range(found), key=lambda i: (-float(rows[cost_col].iloc[i]), int(rows["trial"].iloc[i])))
    return _Front(rows, [to_policy(space.x_from_params({k[len("param_"):]: int(v) for k, v in row.items() if k.startswith("param_")}))
                         for _, row in rows.iterrows()],
                  knee_index(rows["value_accuracy"].to_numpy(dtype=float), rows[cost_col].to_numpy(dtype=float)), order)


def _answers_and_test_positions(config: StudyConfig, front: _Front, race: Race) -> tuple[dict[float, int | None], list[int]]:
    """Each tolerance's answer (a front position; None where no point qualifies) and the positions
    to measure on test: the answers, the knee and the points the race measured first."""
    answers = {t: None if k is None else front.order[k] for t, k in race.answers().items()}
    raced = [front.order[k] for k in range(len(front)) if race.images(k)]
    positions = _test_positions(len(front), config.search.remeasure_points,
                                list(dict.fromkeys([*(p for p in answers.values() if p is not None), front.knee, *raced])))
    return answers, positions


def _measure_on_test(config: StudyConfig, evaluator: Evaluator, executor: Executor, front: _Front, positions: list[int], race: Race,
                     answers: dict[float, int | None], fp32_test: Any, search_fp32: float, *,
                     progress: bool) -> tuple[list[dict[str, Any]], dict[int, Policy]]:
    """The pareto.csv rows and the policies (by trial, with their provenance) of the front points at
    ``positions``, measured on the whole test split; a point that fails is left out."""
    found, rows = len(front), front.rows
    shown = f"the {found} Pareto point{'s' if found != 1 else ''}" if len(positions) == found else f"{len(positions)} of {found} Pareto points"
    logger.info(f"measuring {shown} on the test split ...")
    size = len(evaluator.data.test)
    masks = _measure(executor, {i: (front.policies[i].to_dict(), "test", 0, size) for i in positions}, chunk=CHUNK_IMAGES,
                     desc="measure front", progress=progress)
    settings = MeasurementSettings(config.quant, config.calibration_size, config.run.torch_threads)
    out, policies = [], {}
    for i in positions:
        trial_no = int(rows["trial"].iloc[i])
        if isinstance(masks[i], str):
            logger.info(f"trial {trial_no} ({front.policies[i].summary()}) failed when measured again and is left out: {masks[i]}")
            continue
        row, metrics = _point_row(config, evaluator, front, i, race, masks[i], fp32_test,
                                  [t for t, p in answers.items() if p == i], search_fp32)
        out.append(row)
        policies[trial_no] = front.policies[i].with_provenance(study=config.study_name, trial=trial_no, seed=config.seed,
                                                               metrics=metrics).with_settings(settings)
    return out, policies


def _selection(config: StudyConfig, front: _Front, race: Race, first: int, answers: dict[float, int | None]) -> dict[str, Any]:
    """How the answers were chosen: the rule, its confidence, the images it measured and each tolerance's answer (a trial)."""
    search, found = config.search, len(front)
    return {"rule": RULE_NAME, "confidence": search.confidence, "tolerances": list(search.answer_tolerances),
            "first_image": first, "images": len(race.fp32), "reused": first == 0,
            "looks": race.look_sizes, "front_points": found, "measured_images": sum(race.images(k) for k in range(found)),
            "answers": {f"{t:g}": None if p is None else int(front.rows["trial"].iloc[p]) for t, p in answers.items()}}


def remeasure_front(config: StudyConfig, evaluator: Evaluator, executor: Executor, space: BoundSpace, trials: pd.DataFrame,
                    to_policy: Callable[[np.ndarray], Policy], *,
                    progress: bool) -> tuple[Any, dict[int, Policy], dict[str, Any]]:
    """The measured Pareto points (one row per point, sorted by energy), each point's policy (its
    provenance holding the study, trial, metrics and the settings that re-measure it) and how the
    answers were chosen (the rule, its confidence and the images it measured).

    The answers are chosen first (:func:`_choose_answers`); then the points the rule measured,
    the knee and points spread along the front, up to ``search.remeasure_points``, run on the test
    split, each paired with the fp32 model on the same images (cached by
    :mod:`mpsearch.models.fp32_masks`). ``within_floor`` marks the points whose drops on the search's
    images and on test both lie within the study's floor; picks choose among those.
    ``front_knee`` marks the knee of the whole front the search found; ``answer_for_pp`` the
    tolerances a point answers.
    """
    import pandas as pd

    search = config.search
    front = _search_front(config, trials, space, to_policy)
    found = len(front)
    fp32 = uniform_policy("fp32", model=evaluator.baseline.name, dataset=evaluator.data.info.name,
                          layers=evaluator.policy_layers, checkpoint_sha256=evaluator.baseline.sha256)
    cache = Fp32Masks(evaluator.baseline.sha256, evaluator.data, evaluator.batch_size)
    fp32_val = _fp32_mask(cache, executor, fp32, "val", len(evaluator.data.val), progress=progress)
    search_images = min(search.eval_images, len(fp32_val))
    within = "" if search.max_drop is None else f" within the {floor_text(search.max_drop)}"
    logger.info(f"choosing the answers among the {found} Pareto point{'s' if found != 1 else ''}{within} ...")
    race, first = _choose_answers(config, executor, front, fp32_val, search_images, progress=progress)
    answers, positions = _answers_and_test_positions(config, front, race)
    fp32_test = _fp32_mask(cache, executor, fp32, "test", len(evaluator.data.test), progress=progress)
    search_fp32 = float(fp32_val[:search_images].float().mean())
    out, policies = _measure_on_test(config, evaluator, executor, front, positions, race, answers, fp32_test, search_fp32,
                                     progress=progress)
    pareto = pd.DataFrame(out)
    energy_col = f"rel_energy_{search.energy_profile}"
    sort_col = energy_col if energy_col in pareto else pareto.columns[-1]
    return (pareto.sort_values([sort_col, "trial"], kind="stable").reset_index(drop=True), policies,
            _selection(config, front, race, first, answers))


def finetune_front(config: StudyConfig, baseline: Baseline, data: DataSplits, profiles: tuple[str, ...], pareto: pd.DataFrame, out: Path, *,
                   progress: bool) -> Any:
    """Fine-tune each re-measured Pareto point (LSQ + distillation, ``config.finetune``) and add its measurements.

    Each point gets a fresh quantized copy of the baseline, so points do not share weights; the
    fine-tuned policy and checkpoint go next to the point's policy file. A point already
    fine-tuned with the same settings (a resumed study) is read back, not trained again.
    """
    import pandas as pd
    import torch

    from mpsearch.evaluation.evaluator import Evaluator
    from mpsearch.quant.finetune import finetune, write_finetuned

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
