"""Pick one policy from a finished study (``mpsearch export``).

Picks use the measurements of the re-measured Pareto set on the full validation split (searches
choose on validation; the test numbers are reported, never used to choose).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from mpsearch.errors import UserError
from mpsearch.policy import Policy, precision_for

__all__ = ["pick_policy"]

_CONSTRAINT = re.compile(r"^(energy|size|bops|accuracy)\s*(<=|>=)\s*([0-9.]+)$")


def _energy_column(pareto) -> str:
    cols = [c for c in pareto.columns if c.startswith("rel_energy_")]
    return cols[0]


def pick_policy(folder: Path, pick: str) -> tuple[Policy, str]:
    """The policy of ``folder``'s study selected by ``pick``; returns it and a one-line reason."""
    import pandas as pd
    import yaml

    from mpsearch.search.pareto import knee_point

    config = yaml.safe_load((folder / "config.yaml").read_text())
    if not (folder / "pareto.csv").exists():
        raise UserError(f"study {folder.name} has no pareto.csv (its front was never re-measured); "
                        "run mpsearch optimize to the end for this study")
    pareto = pd.read_csv(folder / "pareto.csv")
    if pareto.empty:
        raise UserError(f"study {folder.name} has an empty Pareto set; nothing to export")
    energy = _energy_column(pareto) if config["objectives"][1] == "energy" else f"rel_{config['objectives'][1]}"
    pick = pick.strip().lower().replace(" ", "")
    if pick == "knee":
        F = np.stack([1 - pareto["val_accuracy"].to_numpy(), pareto[energy].to_numpy()], axis=1)
        i = knee_point(F)
    elif pick == "max-accuracy":
        i = int(pareto["val_accuracy"].to_numpy().argmax())
    elif pick in ("min-energy", "min-cost"):
        i = int(pareto[energy].to_numpy().argmin())
    elif pick.startswith("trial:"):
        try:
            number = int(pick.split(":", 1)[1])
        except ValueError:
            raise UserError(f"--pick {pick!r}: expected trial:N with an integer N") from None
        hit = pareto.index[pareto["trial"] == number]
        if len(hit):
            i = int(hit[0])
        else:
            return _policy_of_trial(folder, config, number), f"trial {number} (not on the Pareto set)"
    else:
        m = _CONSTRAINT.match(pick)
        if not m:
            raise UserError(f"--pick {pick!r}: use knee, max-accuracy, min-energy, trial:N, \"energy<=X\" or \"accuracy>=Y\"")
        what, op, value = m.group(1), m.group(2), float(m.group(3))
        col = "val_accuracy" if what == "accuracy" else (energy if what == "energy" else f"rel_{what}")
        if col not in pareto:
            raise UserError(f"--pick {pick!r}: the study did not record {what}")
        ok = pareto[pareto[col] <= value] if op == "<=" else pareto[pareto[col] >= value]
        if ok.empty:
            raise UserError(f"--pick {pick!r}: no Pareto point satisfies it (range {pareto[col].min():.4g} to "
                            f"{pareto[col].max():.4g}); relax the bound")
        # Within the constraint: the most accurate (cost bound) or the cheapest (accuracy bound).
        i = int(ok["val_accuracy"].idxmax()) if what != "accuracy" else int(ok[energy].idxmin())
    row = pareto.iloc[i]
    policy = Policy.load(folder / row["policy_file"])
    return policy, (f"trial {int(row['trial'])} ({row['policy']}): val {row['val_accuracy']:.4f}, "
                    f"test {row['test_accuracy']:.4f}, {energy} {row[energy]:.4f}")


def _policy_of_trial(folder: Path, config: dict, number: int) -> Policy:
    import pandas as pd

    trials = pd.read_csv(folder / "trials.csv")
    hit = trials[trials["trial"] == number]
    if hit.empty:
        raise UserError(f"--pick trial:{number}: the study has trials 0 to {len(trials) - 1}")
    row = hit.iloc[0]
    if row["state"] != "COMPLETE":
        raise UserError(f"--pick trial:{number}: that trial failed ({row.get('attr_error', '?')}); pick another")
    layers = {name: precision_for(name, w, a) for name, (w, a) in json.loads(row["attr_layers"]).items()}
    reference = Policy.load(next((folder / "policies").glob("*.json")))  # same model, data set, checkpoint
    return Policy(
        model=reference.model, dataset=reference.dataset, layers=layers, checkpoint_sha256=reference.checkpoint_sha256,
        provenance={"study": config["study_name"], "trial": number, "seed": config["seed"],
                    "metrics": {"search_accuracy": float(row["value_accuracy"])},
                    "quant": {"weight_observer": config["weight_observer"], "act_observer": config["act_observer"],
                              "ptq": config.get("ptq", "rtn"), "bias_correction": config.get("bias_correction", False),
                              "smoothquant_alpha": config.get("smoothquant_alpha"),
                              "attention_calibration": config.get("attention_calibration", "observer"),
                              "calibration_size": config["calibration_size"], "torch_threads": config["torch_threads"]}},
    )
