"""What tests of studies run as a user runs them share: one small study (test_resnet on digits)
run in a subprocess or in this process, the trials two runs must agree on, the trials a study
holds while its driver runs, and the processes a test kills."""

from __future__ import annotations

import functools
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

POP, BUDGET = 6, 24

# Columns that must match between two runs of one study (plus every param_ and value_ column).
SAME = ["trial", "state", "attr_generation", "attr_slot", "attr_method", "attr_correct"]


def study_settings(eval_images: int = 180) -> dict[str, Any]:
    """The small study's settings (in-process runs measure with --workers 0)."""
    return {"model": "test_resnet", "dataset": "digits", "search.budget": BUDGET, "search.population_size": POP,
            "search.eval_images": eval_images, "search.sensitivity": "none", "run.workers": 0, "latency": None}


def study_config(root: Path, name: str, baseline, eval_images: int = 180, **fields: Any):
    """The small study named ``name``, written to ``root/name``, on ``baseline``'s checkpoint."""
    from mpsearch.config import StudyConfig, with_overrides

    return with_overrides(StudyConfig(), {"name": name, "run.out_dir": str(root / name), "checkpoint": str(baseline.checkpoint),
                                          **study_settings(eval_images), **fields})


def start_study(cli_cmd: list[str], out: Path, checkpoint: str, *extra: str, eval_images: int = 180,
                env: dict[str, str] | None = None) -> subprocess.Popen:
    """``mpsearch optimize`` of the small study into ``out`` (named as its folder), as a user runs it."""
    flags = ["--model", "test_resnet", "--dataset", "digits", "--budget", str(BUDGET), "--population", str(POP),
             "--eval-images", str(eval_images), "--sensitivity", "none", "--set", "latency=null", "--no-progress"]
    return subprocess.Popen(cli_cmd + ["optimize", *flags, "--checkpoint", checkpoint, "--out-dir", str(out), "--name", out.name, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ if env is None else env, OMP_NUM_THREADS="1"), preexec_fn=_ctrl_c_as_in_a_terminal)


def _ctrl_c_as_in_a_terminal() -> None:
    # A test run started in the background (`cmd &`, nohup) ignores SIGINT, and so would the study
    # it starts: Python turns SIGINT into KeyboardInterrupt only when it is not ignored at start.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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


@functools.lru_cache(maxsize=None)
def _optuna_storage(url: str) -> Any:
    import optuna

    from mpsearch.study.storage import open_storage

    return optuna.storages.get_storage(open_storage(url))


def finished_in(url: str, study_name: str) -> int:
    """Finished trials of ``study_name`` in the storage at ``url`` (a server URL or journal:PATH)."""
    storage = _optuna_storage(url)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:  # not created yet
        return 0
    return sum(t.state.is_finished() for t in storage.get_all_trials(study_id, deepcopy=False))


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
