"""What a search returns: :class:`SearchResult` (the measured front, every trial, picks, a plot),
in memory or read back from a study's folder (:func:`load_result`).

Picks choose on the validation images the search measured (test numbers are reported, never
used to choose), among the points measured on test that hold the study's accuracy floor there
too (``within_floor``: a point the validation subset put within it can fall below it on more
images):

- ``"knee"``: the knee of the *useful* part of the whole front the search found (``front_knee``):
  the points within :data:`KNEE_WINDOW_PP` percentage points of the front's most accurate point,
  where the knee is the point farthest from the line through that part's two ends
  (:func:`~mpsearch.algorithms.pareto.knee_point`). A front also holds collapsed low-bit policies
  far below fp32; a knee taken over the whole front lands among them, which nobody ships. If
  that point falls below the floor on test, the knee of the points that hold it.
- ``"max-accuracy"``, ``"min-energy"`` (the cheapest point by the study's first cost objective);
- ``"energy<=X"`` / ``"size<=X"`` / ``"bops<=X"`` (relative to fp32): the most accurate point
  within the bound; ``"accuracy>=Y"``: the cheapest point at least that accurate; ``"drop<=PP"``:
  the cheapest point within PP percentage points of fp32 (on the search's validation images);
- ``trial`` number (``12`` or ``"trial:12"``): that trial's policy, on the front or not.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mpsearch.config import StudyConfig
from mpsearch.errors import UserError
from mpsearch.objectives import drop_within
from mpsearch.policy import Policy, precision_for
from mpsearch.study.storage import open_storage, shown_url

__all__ = ["SearchResult", "load_result", "KNEE_WINDOW_PP", "PARETO_FILE", "STUDY_FILE"]

KNEE_WINDOW_PP = 2.0
PARETO_FILE = "pareto.csv"
STUDY_FILE = "study.json"  # what a finished study adds to its config: the hypervolume reference and volume
_CONSTRAINT = re.compile(r"^(energy|size|bops|accuracy|drop)\s*(<=|>=)\s*([0-9.]+)$")
ANSWER_DROPS_PP = (0.5, 1.0, 2.0)  # what the answers table gives the cheapest point within (pp below fp32)


@dataclass
class SearchResult:
    """A finished study: its config, every trial, the re-measured front and its policies.

    ``front`` has one row per Pareto point measured on test (val accuracy on the search's images
    and test accuracy with 95 % CIs, the drops against fp32, costs relative to fp32), sorted by energy; ``None`` when the study
    stopped before re-measuring. ``trials`` has one row per Optuna trial (``value_*``,
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
        first = self.config.search.objectives[1]
        return f"rel_energy_{self.config.search.energy_profile}" if first == "energy" else f"rel_{first.replace(':', '_')}"

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
        accuracy, cost = front["val_accuracy"].to_numpy(), front[self.cost_column].to_numpy()
        if text == "knee":
            marked = front.index[front["front_knee"].astype(bool)] if "front_knee" in front else []
            return self._row_choice(marked[0] if len(marked) else front.index[knee_index(accuracy, cost)])
        if text == "max-accuracy":
            return self._row_choice(front.index[int(accuracy.argmax())])
        if text in ("min-energy", "min-cost"):
            return self._row_choice(front.index[int(cost.argmin())])
        assert m is not None
        what, op, value = m.group(1), m.group(2), float(m.group(3))
        if what == "drop":
            if op != "<=" or "val_drop_pp" not in front:
                raise UserError(f"pick {spec!r}: use drop<=PP (the cheapest point within PP points of fp32 on validation)"
                                + ("" if "val_drop_pp" in front else "; this study's front has no validation drops"))
            ok = front[drop_within(front["val_drop_pp"], value)]
            if ok.empty:
                raise UserError(f"pick {spec!r}: no Pareto point is within {value:g} pp of fp32 on validation (the closest "
                                f"is {-front['val_drop_pp'].max():.2f} pp below); relax the bound")
            return self._row_choice(ok[self.cost_column].idxmin())
        col = "val_accuracy" if what == "accuracy" else (self.cost_column if what == "energy" else f"rel_{what}")
        if col not in front:
            raise UserError(f"pick {spec!r}: the study did not record {what}")
        ok = front[front[col] <= value] if op == "<=" else front[front[col] >= value]
        if ok.empty:
            raise UserError(f"pick {spec!r}: no Pareto point satisfies it (range {front[col].min():.4g} to "
                            f"{front[col].max():.4g}); relax the bound")
        # Within the constraint: the most accurate (cost bound) or the cheapest (accuracy bound).
        return self._row_choice(ok["val_accuracy"].idxmax() if what != "accuracy" else ok[self.cost_column].idxmin())

    def answers(self) -> Any:
        """What a user asks first, one row each: the knee, then the cheapest point within each of
        :data:`ANSWER_DROPS_PP` points of fp32 (chosen on validation, reported on test)."""
        import pandas as pd

        rows = []
        for label, spec in [("knee", "knee"), *((f"cheapest within {d:g} pp", f"drop<={d:g}") for d in ANSWER_DROPS_PP)]:
            try:
                policy = self.pick(spec)
            except UserError:
                rows.append({"answer": label, "trial": None})
                continue
            row = self.front[self.front["trial"] == policy.provenance["trial"]].iloc[0]
            rows.append({"answer": label, **{c: row[c] for c in ("trial", "policy", "val_drop_pp", "test_accuracy",
                                                                  "test_drop_pp", self.cost_column) if c in row}})
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
        return self.policies[int(row["trial"])], (f"trial {int(row['trial'])} ({row['policy']}): val {row['val_accuracy']:.4f}, "
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
        from mpsearch.report import front_figure

        fig = front_figure(self.trials, self.front, self.config)
        if path is not None:
            fig.savefig(path, format="png")
        return fig


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
        front = pd.read_csv(folder / PARETO_FILE)
        policies = {int(t): Policy.load(folder / f) for t, f in zip(front["trial"], front["policy_file"])}
    return SearchResult(config=config, trials=trials, front=front, policies=policies, template=Policy.from_dict(summary["template"]),
                        hypervolume=float(summary.get("hypervolume", float("nan"))),
                        ref_point=tuple(summary.get("hypervolume_reference", ())), wall_s=float(summary.get("wall_s", 0.0)),
                        out_dir=folder, storage=config.run.storage)
