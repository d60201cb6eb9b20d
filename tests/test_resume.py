"""Reliability of a study: kill -9 and Ctrl-C at any moment, resume, dead Ray actors, one driver per study.

The studies run in a subprocess as a user runs them; an uninterrupted run of the same study in
this process is the reference every interrupted one must end up equal to.
"""

from __future__ import annotations

import os
import signal

import pytest
from study_checks import BUDGET, POP, assert_same_study, finished_trials, processes, start_study, study_config, wait_until

from mpsearch.config import with_overrides
from mpsearch.errors import UserError
from mpsearch.study import run_study

IN_PROCESS = ("--workers", "0")  # trials in the driver's process: no Ray to start (steps 2 and the next test use Ray)


@pytest.mark.slow
def test_kill_and_interrupt_at_any_moment_then_resume_equals_an_uninterrupted_run(tmp_path, cli_cmd, digits_baseline, reference_study):
    checkpoint = str(digits_baseline.checkpoint)
    db = tmp_path / "s" / "study.db"

    # 1. Ctrl-C in the middle of generation 0: a clean stop, one line that says how to resume.
    proc = start_study(cli_cmd, tmp_path / "s", checkpoint, *IN_PROCESS)
    wait_until(proc, lambda: finished_trials(db) >= 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "resume" in err and "Traceback" not in err, err
    interrupted_at = finished_trials(db)
    assert 0 < interrupted_at < BUDGET

    # 2. kill -9 in the middle of a later generation, workers on Ray: nothing gets a chance to clean up.
    proc = start_study(cli_cmd, tmp_path / "s", checkpoint)
    wait_until(proc, lambda: finished_trials(db) >= POP + 3)
    proc.kill()
    proc.communicate(timeout=60)
    killed_at = finished_trials(db)
    assert killed_at % POP != 0, f"the kill should land mid-generation, it landed after trial {killed_at}"
    assert killed_at < BUDGET

    # 3. kill -9 after the last trial, while the front is re-measured and the outputs written.
    proc = start_study(cli_cmd, tmp_path / "s", checkpoint, *IN_PROCESS)
    wait_until(proc, lambda: finished_trials(db) >= BUDGET)
    proc.kill()
    proc.communicate(timeout=60)

    # 4. Resume to the end: the same trials (numbers, policies, measurements) and the same front.
    proc = start_study(cli_cmd, tmp_path / "s", checkpoint, *IN_PROCESS)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"resuming study 's': {BUDGET} of {BUDGET} trials recorded" in err
    assert_same_study(tmp_path / "s", reference_study)
    assert finished_trials(db) == BUDGET  # nothing duplicated


@pytest.mark.slow
def test_a_killed_ray_actor_is_replaced_and_the_study_finishes_unchanged(tmp_path, cli_cmd, digits_baseline, reference_study):
    db = tmp_path / "r" / "study.db"
    proc = start_study(cli_cmd, tmp_path / "r", str(digits_baseline.checkpoint), "--workers", "2")
    wait_until(proc, lambda: finished_trials(db) >= 2, timeout=600)
    actors = _actor_pids()
    assert actors, "no Ray actor process found"
    os.kill(actors[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "died during the search; their evaluations were retried" in err
    assert_same_study(tmp_path / "r", reference_study)


def _actor_pids() -> list[int]:
    """Processes of mpsearch's Ray actors (Ray titles them ``ray::_EvalActor...``)."""
    return sorted(pid for pid, _, cmdline in processes() if cmdline[0].startswith(b"ray::_EvalActor"))


def test_a_second_driver_on_a_running_study_stops_and_leaves_it_untouched(tmp_path, digits_baseline, reference_study):
    from mpsearch.study import storage_url
    from mpsearch.study.locking import StudyLock

    cfg = study_config(tmp_path, "busy", digits_baseline)
    with StudyLock(storage_url(cfg), cfg.study_name):  # another driver holds the study
        with pytest.raises(UserError, match="in use by another mpsearch driver"):
            run_study(cfg, progress=False)
        assert not (tmp_path / "busy" / "study.db").exists()
    run_study(cfg, progress=False)  # released: the study runs


def test_a_lease_on_a_server_storage_blocks_a_second_driver_until_it_expires():
    import optuna

    from mpsearch.study.locking import LEASE_ATTR, LEASE_S, check_lease

    study = optuna.create_study()
    study.set_user_attr(LEASE_ATTR, {"host": "node1", "pid": 4242, "id": "other", "heartbeat": 1000.0})
    me = {"host": "node2", "pid": 1, "id": "me"}
    with pytest.raises(UserError, match="pid 4242 on node1"):
        check_lease(study, "s", me, now=1000.0 + LEASE_S / 2)
    check_lease(study, "s", me, now=1000.0 + LEASE_S + 1)  # the other driver is gone: take over
    check_lease(study, "s", {"host": "node1", "pid": 4242, "id": "other"}, now=1000.0)  # a driver's own lease


def test_a_policy_with_nan_outputs_is_a_failed_trial_and_the_study_goes_on(tmp_path, digits_baseline, monkeypatch):
    import optuna

    from mpsearch.evaluation.evaluator import Evaluator
    from mpsearch.study import storage_url

    real = Evaluator.quantized_mask

    def nan_at_two_bits(self, policy, *args, **kwargs):
        """The model really outputs NaN when any layer has 2-bit weights (as an overflow would)."""
        if not any(p.weight_bits == 2 for p in policy.layers.values()):
            return real(self, policy, *args, **kwargs)
        last = self.qmodel.module.get_submodule(self.qmodel.policy_layers[-1])  # the classifier: every forward path runs it
        hook = last.register_forward_hook(lambda module, inputs, output: output * float("nan"))
        try:
            return real(self, policy, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(Evaluator, "quantized_mask", nan_at_two_bits)
    cfg = study_config(tmp_path, "nan", digits_baseline)
    result = run_study(cfg, progress=False)
    study = optuna.load_study(study_name="nan", storage=storage_url(cfg))
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(study.trials) == BUDGET and failed
    assert all("NaN/inf" in t.user_attrs["error"] and "W2" in t.user_attrs["policy"] for t in failed)
    assert all("W2" not in p for p in result.front["policy"])


def test_a_replay_that_differs_from_the_checkpoint_refuses_to_resume(tmp_path, digits_baseline):
    import json

    import optuna

    from mpsearch.study import CHECKPOINT_FILE, storage_url

    cfg = study_config(tmp_path, "ck", digits_baseline, **{"search.budget": 2 * POP})
    run_study(cfg, progress=False, remeasure=False)
    path = tmp_path / "ck" / CHECKPOINT_FILE
    doc = json.loads(path.read_text())
    assert doc["generation"] == 1 and len(doc["digests"]) == 2 and doc["state"]["algorithm"] == "nsga2"
    doc["digests"][0] = "0" * 64  # as if generation 0 had been run by a search that behaves differently
    path.write_text(json.dumps(doc))
    with pytest.raises(UserError, match="replaying generation 0 gave another search state"):
        run_study(with_overrides(cfg, {"search.budget": 3 * POP}), progress=False)
    assert len(optuna.load_study(study_name="ck", storage=storage_url(cfg)).trials) == 2 * POP  # nothing added
