"""Study storages that drivers on several machines share: a live PostgreSQL server (started for
these tests on a loopback port, password authentication on) and an Optuna journal file.

Whatever happens to a study there (a second driver started on it, its driver frozen and then
killed, the study moved there from SQLite halfway), it ends up equal to the uninterrupted study
measured in this process.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from glob import glob
from pathlib import Path

import pytest
from study_checks import BUDGET, POP, assert_same_study, finished_in, finished_trials, free_port, start_study, wait_until

LEASE_S = 20  # the drivers' lease time here (MPSEARCH_LEASE_S): a lost driver is taken over after 20 s
IN_PROCESS = ("--workers", "0")  # what is tested is the storage; tests/test_cluster.py covers Ray


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of its own on 127.0.0.1 (scram-sha-256); yields its URL. The password
    reaches clients as users are told to pass it: PGPASSWORD, not the URL."""
    pg_ctl = shutil.which("pg_ctl") or max(glob("/usr/lib/postgresql/*/bin/pg_ctl"), default=None)
    if pg_ctl is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install 'mpsearch[cluster]')")
    root = Path(tempfile.mkdtemp(prefix="mpspg", dir="/tmp"))  # short: the server's socket path must fit 107 characters
    password = secrets.token_hex(16)
    (root / "password").write_text(password)
    as_server_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        for path in (root, root / "password"):
            shutil.chown(path, "postgres")
        as_server_user = ["runuser", "-u", "postgres", "--"]

    def server_command(name: str, *args: str) -> None:
        done = subprocess.run([*as_server_user, str(Path(pg_ctl).with_name(name)), *args], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"{name} failed: {done.stdout[-1500:]}{done.stderr[-1500:]}"

    data, port = str(root / "data"), free_port()
    old_password = os.environ.get("PGPASSWORD")
    try:
        server_command("initdb", "-D", data, "-U", "mpsearch", "--auth=scram-sha-256", f"--pwfile={root / 'password'}")
        server_command("pg_ctl", "-D", data, "-l", str(root / "server.log"), "-w", "-o",
                       f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")
        os.environ["PGPASSWORD"] = password  # this process and the drivers it starts
        yield f"postgresql+psycopg2://mpsearch@127.0.0.1:{port}/postgres"
    finally:
        if old_password is None:
            os.environ.pop("PGPASSWORD", None)
        else:
            os.environ["PGPASSWORD"] = old_password
        if (root / "data" / "postmaster.pid").exists():
            server_command("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["postgresql", "journal"])
def storage(request, tmp_path) -> str:
    """run.storage of a study shared between machines."""
    if request.param == "journal":
        return f"journal:{tmp_path / 'journal' / 'studies.log'}"
    return request.getfixturevalue("postgres")


# On PostgreSQL, what clusters share. The lease is the same code on every storage (the study's
# user attributes, mpsearch.study.locking), and every driver of the other tests here holds one,
# on both storages.
@pytest.mark.slow
@pytest.mark.parametrize("storage", ["postgresql"], indirect=True)
def test_a_second_driver_is_refused_until_the_first_is_lost_then_resumes_the_study(storage, tmp_path, cli_cmd, digits_baseline,
                                                                                 reference_study):
    name, checkpoint = "two-drivers", str(digits_baseline.checkpoint)
    env = dict(os.environ, MPSEARCH_LEASE_S=str(LEASE_S))
    first = start_study(cli_cmd, tmp_path / name, checkpoint, "--storage", storage, *IN_PROCESS, env=env)
    wait_until(first, lambda: finished_in(storage, name) >= 2)
    # Frozen, as a driver whose machine hangs: it holds its lease but renews it no more.
    first.send_signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        recorded = finished_in(storage, name)
        assert recorded < BUDGET
        second = start_study(cli_cmd, tmp_path / name, checkpoint, "--storage", storage, *IN_PROCESS, env=env)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2 and "being run by another driver" in err and "Traceback" not in err, err[-3000:]
        assert time.monotonic() - frozen_at < LEASE_S, "the second driver was refused for another reason than the live lease"
        assert finished_in(storage, name) == recorded  # it wrote nothing
    finally:
        first.kill()  # and then lost
        first.communicate(timeout=60)
    time.sleep(max(0.0, frozen_at + LEASE_S + 1 - time.monotonic()))  # its lease runs out
    second = start_study(cli_cmd, tmp_path / name, checkpoint, "--storage", storage, *IN_PROCESS, env=env)
    _, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-3000:]
    assert f"resuming study '{name}'" in err
    assert finished_in(storage, name) == BUDGET
    assert_same_study(tmp_path / name, reference_study)


def test_a_study_moved_from_sqlite_halfway_resumes_from_its_new_storage(storage, tmp_path, cli_cmd, digits_baseline, reference_study):
    import optuna

    from mpsearch.study.storage import open_storage

    name, checkpoint = "moved", str(digits_baseline.checkpoint)
    out = tmp_path / name
    laptop = start_study(cli_cmd, out, checkpoint, *IN_PROCESS)
    wait_until(laptop, lambda: finished_trials(out / "study.db") >= POP + 2)
    laptop.send_signal(signal.SIGINT)
    _, err = laptop.communicate(timeout=60)
    assert laptop.returncode == 130, err[-3000:]
    recorded = finished_trials(out / "study.db")
    assert POP < recorded < BUDGET
    optuna.copy_study(from_study_name=name, from_storage=f"sqlite:///{out / 'study.db'}", to_storage=open_storage(storage))
    (out / "study.db").unlink()  # the study lives in its new storage only
    cluster = start_study(cli_cmd, out, checkpoint, "--storage", storage, *IN_PROCESS)
    _, err = cluster.communicate(timeout=600)
    assert cluster.returncode == 0, err[-3000:]
    assert f"resuming study '{name}': {recorded} of {BUDGET} trials recorded" in err, err[-3000:]
    assert not (out / "study.db").exists()
    assert_same_study(out, reference_study)
