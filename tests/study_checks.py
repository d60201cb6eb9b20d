"""What tests of studies run as a user runs them share: the trials two runs must agree on, the
trials a study database holds while its driver runs, and the processes a test kills."""

from __future__ import annotations

import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

# Columns that must match between two runs of one study (plus every param_ and value_ column).
SAME = ["trial", "state", "attr_generation", "attr_slot", "attr_method", "attr_correct"]


def trial_columns(trials: pd.DataFrame) -> list[str]:
    return SAME + sorted(c for c in trials.columns if c.startswith(("param_", "value_")))


def assert_same_study(folder: Path, reference: Path) -> None:
    """The study written to ``folder`` has the trials and front of the one in ``reference``."""
    trials, ref = pd.read_csv(folder / "trials.csv"), pd.read_csv(reference / "trials.csv")
    pd.testing.assert_frame_equal(trials[trial_columns(ref)], ref[trial_columns(ref)])
    pd.testing.assert_frame_equal(pd.read_csv(folder / "pareto.csv"), pd.read_csv(reference / "pareto.csv"))


def finished_trials(db: Path) -> int:
    """Finished trials in the study database (0 while it does not exist yet)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT count(*) FROM trials WHERE state IN ('COMPLETE', 'FAIL')").fetchone()[0]
    except sqlite3.Error:  # the driver is creating the schema
        return 0


def wait_until(proc: subprocess.Popen, condition, timeout: float = 240) -> None:
    """Poll ``condition`` while the study in ``proc`` runs (the kill point of a test)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the study ended before the kill point: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "kill point not reached in time"
        time.sleep(0.005)


def processes() -> Iterator[tuple[int, int, list[bytes]]]:
    """(pid, parent pid, command line) of every process this user can see."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            yield int(entry.name), parent, cmdline
