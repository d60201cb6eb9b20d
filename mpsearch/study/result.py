"""What a search returns: :class:`SearchResult` (the measured front, every trial, picks, a plot),
in memory or read back from a study's folder (:func:`load_result`).

Picks choose on validation figures (test numbers are reported, never used to choose), among the
points measured on test that hold the study's accuracy floor there too (``within_floor``: a
point the validation subset put within it can fall below it on more images). A point's
validation accuracy is the answer rule's measurement where the rule measured it (``val_images``
fresh images), else the search's (``search_images``):

- ``"drop<=PP"``: the cheapest point proven within PP percentage points of fp32 by the rule of
  :mod:`mpsearch.study.answers` (fixed-sequence testing along the front, most expensive first, on
  each point's lower confidence bound ``val_drop_bound_pp``, at the study's ``search.confidence``);
  for the study's tolerances, exactly its answers;
- ``"knee"``: the knee of the *useful* part of the whole front the search found (``front_knee``):
  the points within :data:`KNEE_WINDOW_PP` percentage points of the front's most accurate point,
  where the knee is the point farthest from the line through that part's two ends
  (:func:`~mpsearch.algorithms.pareto.knee_point`). A front also holds collapsed low-bit policies
  far below fp32; a knee taken over the whole front lands among them, which nobody ships. If
  that point falls below the floor on test, the knee of the points that hold it;
- ``"max-accuracy"``, ``"min-energy"`` (the cheapest point by the study's first cost objective);
- ``"energy<=X"`` / ``"size<=X"`` / ``"bops<=X"`` (relative to fp32): the most accurate point
  within the bound; ``"accuracy>=Y"``: the cheapest point at least that accurate;
- ``trial`` number (``12`` or ``"trial:12"``): that trial's policy, on the front or not.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mpsearch.config import StudyConfig
from mpsearch.errors import UserError
from mpsearch.objectives import drop_within, objective_spec
from mpsearch.policy import Policy, precision_for
from mpsearch.study.answers import walk_bounds
from mpsearch.study.storage import open_storage, shown_url

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["SearchResult", "load_result", "KNEE_WINDOW_PP", "PARETO_FILE", "STUDY_FILE"]

KNEE_WINDOW_PP = 2.0
PARETO_FILE = "pareto.csv"
STUDY_FILE = "study.json"  # what a finished study adds to its config: the hypervolume reference and volume
_CONSTRAINT = re.compile(r"^(energy|size|bops|accuracy|drop)\s*(<=|>=)\s*([0-9.]+)$")


@dataclass
class SearchResult:
    """A finished study: its config, every trial, the re-measured front and its policies.

    ``front`` has one row per Pareto point measured on test (accuracy and drop against fp32 on the
    search's images, on the answer rule's validation images with the drop's lower confidence
    bound, and on test with 95 % CIs; costs relative to fp32), sorted by energy; ``None`` when the
    study stopped before re-measuring. ``selection`` says how the answers were chosen (the rule,
    its confidence, the validation images it measured, the trial answering each tolerance). ``trials`` has one row per Optuna trial (``value_*``,
    ``param_*``, ``attr_*`` columns). ``hypervolume`` is that of the measured front on the search
    split against ``ref_point`` (0 % accuracy at the costliest policy of the search space).
    """

    config: StudyConfig
    trials: Any  # pandas.DataFrame
    front: Any  # pandas.DataFrame | None
    policies: dict[int, Policy]  # trial number -> policy, for every front row
    template: Policy  # the study's model, data set, checkpoint and settings, no layers
    hypervolume: float
    ref_point: tuple[float, ...]
    wall_s: float
    out_dir: Path | None = None
    storage: str | None = None
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds by phase
    selection: dict[str, Any] = field(default_factory=dict)
    _study: Any = None

    @property
    def name(self) -> str:
        return self.config.study_name

    @property
    def study(self) -> Any:
        """The Optuna study (what optuna-dashboard shows)."""
        if self._study is None:
            import optuna

            if self.storage is None:
                raise UserError(f"study {self.name!r} was kept in memory and is gone; give a storage to keep it")
            self._study = optuna.load_study(study_name=self.name, storage=open_storage(self.storage))
        return self._study

    @property
    def shown_storage(self) -> str:
        """Where the study is recorded, any password hidden."""
        return shown_url(self.storage)

    @property
    def cost_column(self) -> str:
        """The front's column of the study's first cost objective."""
        column = objective_spec(self.config.search.objectives[1])[1]
        return f"rel_energy_{self.config.search.energy_profile}" if column == "rel_energy" else column

    def pick(self, spec: str | int = "knee") -> Policy:
        """The policy ``spec`` selects (see the module docstring)."""
        return self.choose(spec)[0]

    def choose(self, spec: str | int = "knee") -> tuple[Policy, str]:
        """The policy ``spec`` selects and a one-line reason naming its measurements."""
        text = f"trial:{spec}" if isinstance(spec, (int, np.integer)) else str(spec).strip().lower().replace(" ", "")
        if text.startswith("trial:"):
            try:
                number = int(text.split(":", 1)[1])
            except ValueError:
                raise UserError(f"pick {spec!r}: expected trial:N with an integer N") from None
            if number in self.policies:
                front = self.front
                return self._row_choice(front.index[int(np.flatnonzero(front["trial"].to_numpy() == number)[0])])
            return self._trial_policy(number), f"trial {number} (not on the Pareto set)"
        m = _CONSTRAINT.match(text)
        if not m and text not in ("knee", "max-accuracy", "min-energy", "min-cost"):
            raise UserError(f"pick {spec!r}: use knee, max-accuracy, min-energy, trial:N, \"energy<=X\", \"accuracy>=Y\" "
                            "or \"drop<=PP\"")
        front = self._front()
        accuracy, cost = _val_accuracy(front).to_numpy(), front[self.cost_column].to_numpy()
        if text == "knee":
            marked = front.index[front["front_knee"].astype(bool)] if "front_knee" in front else []
            search = front["search_accuracy"].to_numpy() if "search_accuracy" in front else accuracy
            return self._row_choice(marked[0] if len(marked) else front.index[knee_index(search, cost)])
        if text == "max-accuracy":
            return self._row_choice(front.index[int(accuracy.argmax())])
        if text in ("min-energy", "min-cost"):
            return self._row_choice(front.index[int(cost.argmin())])
        assert m is not None
        what, op, value = m.group(1), m.group(2), float(m.group(3))
        if what == "drop":
            if op != "<=":
                raise UserError(f"pick {spec!r}: use drop<=PP (the cheapest point proven within PP points of fp32 on validation)")
            return self._row_choice(self._within(front, value, spec))
        col = "val_accuracy" if what == "accuracy" else (self.cost_column if what == "energy" else f"rel_{what}")
        if col not in front:
            raise UserError(f"pick {spec!r}: the study did not record {what}")
        values = _val_accuracy(front) if what == "accuracy" else front[col]
        ok = front[values <= value] if op == "<=" else front[values >= value]
        if ok.empty:
            raise UserError(f"pick {spec!r}: no Pareto point satisfies it (range {values.min():.4g} to "
                            f"{values.max():.4g}); relax the bound")
        # Within the constraint: the most accurate (cost bound) or the cheapest (accuracy bound).
        return self._row_choice(_val_accuracy(ok).idxmax() if what != "accuracy" else ok[self.cost_column].idxmin())

    def _within(self, front: pd.DataFrame, tolerance: float, spec: Any) -> Any:
        """The label of the front row ``drop<=tolerance`` picks (see the module docstring)."""
        if "val_drop_bound_pp" not in front:  # a study finished before answers were chosen with bounds
            if "val_drop_pp" not in front:
                raise UserError(f"pick {spec!r}: this study's front has no validation drops")
            ok = front[drop_within(front["val_drop_pp"], tolerance)]
            if ok.empty:
                raise UserError(f"pick {spec!r}: no Pareto point is within {tolerance:g} pp of fp32 on validation; relax the bound")
            return ok[self.cost_column].idxmin()
        walk = front.assign(_cost=front[self.cost_column]).sort_values(["_cost", "trial"], ascending=[False, True], kind="stable")
        at = walk_bounds(walk["val_drop_bound_pp"].to_numpy(dtype=float), tolerance)
        if at is None:
            bound = walk["val_drop_bound_pp"].iloc[0]
            raise UserError(f"pick {spec!r}: no Pareto point is proven within {tolerance:g} pp of fp32 at "
                            f"{self.config.search.confidence:g} confidence (the most expensive may lie "
                            f"{-bound:.2f} pp below); relax the bound, or measure on more images (--eval-images, a "
                            "larger validation split)" if bound == bound else
                            f"pick {spec!r}: the rule measured no point for {tolerance:g} pp; relax the bound")
        return walk.index[at]

    def answers(self) -> Any:
        """What a user asks first, one row each: the knee, then the cheapest point proven within
        each of the study's tolerances (chosen on validation, reported on test)."""
        import pandas as pd

        rows = []
        specs = [("knee", "knee"), *((f"cheapest within {d:g} pp", f"drop<={d:g}") for d in self.config.search.answer_tolerances)]
        for label, spec in specs:
            try:
                policy = self.pick(spec)
            except UserError:
                rows.append({"answer": label, "trial": None})
                continue
            row = self.front[self.front["trial"] == policy.provenance["trial"]].iloc[0]
            rows.append({"answer": label, **{c: row[c] for c in ("trial", "policy", "search_images", "search_drop_pp", "val_images",
                                                                  "val_drop_pp", "val_drop_bound_pp", "test_accuracy", "test_drop_pp",
                                                                  "test_drop_low_pp", "test_drop_high_pp", self.cost_column)
                                                  if c in row}})
        return pd.DataFrame(rows)

    def _front(self) -> Any:
        """The re-measured points picks choose from: those holding the study's floor on test too."""
        if self.front is None:
            raise UserError(f"study {self.name} has no re-measured front (it stopped after the search); "
                            "run the study to its end")
        if self.front.empty:
            raise UserError(f"study {self.name} has an empty Pareto set; nothing to pick")
        front = self.front
        if "within_floor" in front:
            front = front[front["within_floor"].astype(bool)]
            if front.empty:
                raise UserError(f"study {self.name}: no re-measured point holds the accuracy floor "
                                f"({self.config.search.max_drop:g} pp) on the test split; "
                                "pick one by trial:N if you must")
        return front

    def _row_choice(self, label: Any) -> tuple[Policy, str]:
        row = self.front.loc[label]
        cost = self.cost_column
        images = int(row.get("val_images", 0) or 0)
        val = (f"val {row['val_accuracy']:.4f} on {images} images" if images else
               f"val {_val_accuracy(self.front).loc[label]:.4f} on the search's images")
        return self.policies[int(row["trial"])], (f"trial {int(row['trial'])} ({row['policy']}): {val}, "
                                                  f"test {row['test_accuracy']:.4f}, {cost} {row[cost]:.4f}")

    def trial_policy(self, number: int) -> Policy:
        """The policy trial ``number`` measured (on the front or not)."""
        return self._trial_policy(number)

    def _trial_policy(self, number: int) -> Policy:
        hit = self.trials[self.trials["trial"] == number]
        if hit.empty:
            raise UserError(f"pick trial:{number}: the study has trials 0 to {len(self.trials) - 1}")
        row = hit.iloc[0]
        if row["state"] != "COMPLETE":
            raise UserError(f"pick trial:{number}: that trial failed ({row.get('attr_error', '?')}); pick another")
        layers = {name: precision_for(name, w, a) for name, (w, a) in json.loads(row["attr_layers"]).items()}
        return replace(self.template, layers=layers).with_provenance(
            study=self.name, trial=number, seed=self.config.seed, metrics={"search_accuracy": float(row["value_accuracy"])})

    def plot(self, path: str | Path | None = None) -> Any:
        """The measured front as a matplotlib figure (every trial, the front on test, the uniform
        policies); written to ``path`` as PNG when given."""
        from mpsearch.study.report import front_figure

        fig = front_figure(self.trials, self.front, self.config)
        if path is not None:
            fig.savefig(path, format="png")
        return fig


def _val_accuracy(front: pd.DataFrame) -> Any:
    """Each front row's validation accuracy: the answer rule's where it measured the point, else the search's."""
    if "search_accuracy" not in front:
        return front["val_accuracy"]
    return front["val_accuracy"].where(front["val_accuracy"].notna(), front["search_accuracy"]) if "val_accuracy" in front \
        else front["search_accuracy"]


def knee_index(accuracy: np.ndarray, cost: np.ndarray, window_pp: float = KNEE_WINDOW_PP) -> int:
    """Index of the knee of the front's useful part: the points within ``window_pp`` percentage
    points of the most accurate one (see the module docstring)."""
    from mpsearch.algorithms.pareto import knee_point

    useful = np.flatnonzero(accuracy >= accuracy.max() - window_pp / 100 - 1e-12)
    F = np.stack([1 - accuracy[useful], cost[useful]], axis=1)
    return int(useful[knee_point(F)])


def load_result(folder: str | Path) -> SearchResult:
    """A finished study read back from its folder (``config.yaml``, trials, ``pareto.csv``, policies)."""
    import pandas as pd

    folder = Path(folder)
    if not (folder / "config.yaml").is_file() or not (folder / "trials.csv").is_file():
        raise UserError(f"no finished study in {folder}; run `mpsearch optimize` to the end for it first")
    config = StudyConfig.load(folder / "config.yaml")
    trials = pd.read_parquet(folder / "trials.parquet") if (folder / "trials.parquet").is_file() else pd.read_csv(folder / "trials.csv")
    if not (folder / STUDY_FILE).is_file():
        raise UserError(f"no finished study in {folder} (no {STUDY_FILE}); run `mpsearch optimize` to the end for it first")
    summary = json.loads((folder / STUDY_FILE).read_text())
    front, policies = None, {}
    if (folder / PARETO_FILE).is_file():
        front = pd.read_csv(folder / PARETO_FILE, dtype={"answer_for_pp": str})
        policies = {int(t): Policy.load(folder / f) for t, f in zip(front["trial"], front["policy_file"])}
    return SearchResult(config=config, trials=trials, front=front, policies=policies, template=Policy.from_dict(summary["template"]),
                        hypervolume=float(summary.get("hypervolume", float("nan"))),
                        ref_point=tuple(summary.get("hypervolume_reference", ())), wall_s=float(summary.get("wall_s", 0.0)),
                        out_dir=folder, storage=config.run.storage, phases=summary.get("phases", {}),
                        selection=summary.get("selection", {}))
