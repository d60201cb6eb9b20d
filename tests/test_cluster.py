"""Ray as Ray users run it: a private instance on loopback with its authentication on, and a
live two-node cluster (``ray start``) that a study joins, loses a node of, and finishes on.

The cluster runs on this machine: a head and a second node with their own CPUs and temp dirs,
so Ray's scheduler sees two nodes; killing the second node's raylet is what a lost machine
looks like to the rest of the cluster.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from study_checks import BUDGET, assert_same_study, finished_trials, free_port, processes, start_study, study_config, wait_until

from mpsearch.config import StudyConfig
from mpsearch.study import run_study

ROOT = Path(__file__).resolve().parents[1]
EVAL_IMAGES = 360  # trials long enough for the node to be lost mid-study


def listening_sockets() -> set[tuple[str, int]]:
    """(address, port) of every TCP socket listening on this machine, from /proc/net."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            address, port = fields[1].split(":")
            found.add((address if len(address) == width else "?", int(port, 16)))
    return found


def is_loopback(address: str) -> bool:
    """A /proc/net address (little-endian hex words) on 127.0.0.0/8 or ::1 (v4-mapped included)."""
    if len(address) == 8:
        return address[6:8] == "7F"
    words = [address[i:i + 8] for i in range(0, 32, 8)]
    if words[:3] == ["00000000"] * 3:
        return words[3] == "01000000"  # ::1
    return words[:2] == ["00000000"] * 2 and words[2] == "FFFF0000" and words[3][6:8] == "7F"  # ::ffff:127.x


@pytest.fixture(scope="module")
def local_study(tmp_path_factory, digits_baseline) -> Path:
    """The study measured in this process: what every distributed run must reproduce."""
    config = study_config(tmp_path_factory.mktemp("local"), "local", digits_baseline, EVAL_IMAGES)
    return run_study(config, progress=False).out_dir


def test_no_code_in_mpsearch_turns_ray_authentication_off():
    lines = [f"{p.relative_to(ROOT)}: {line.strip()}" for p in (ROOT / "mpsearch").rglob("*.py") for line in p.read_text().splitlines()
             if "RAY_AUTH_MODE" in line and ("disabled" in line or "environ" in line)]
    assert not lines, f"these lines set Ray's authentication mode: {lines}"


def test_a_private_ray_instance_listens_on_loopback_only(digits, digits_baseline, monkeypatch):
    from mpsearch.evaluation.executors import NamedSource, RayExecutor, WorkerSpec

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = listening_sockets()
    spec = WorkerSpec(NamedSource("test_resnet", "digits", str(digits_baseline.checkpoint), calibration_size=256))
    with RayExecutor(spec, 2) as executor:
        assert len(executor.actors) == 2
        opened = listening_sockets() - before
    # The GCS, the raylet, the object manager, the driver's and each actor's worker server.
    assert len(opened) >= 5, opened
    exposed = sorted(s for s in opened if not is_loopback(s[0]))
    assert not exposed, f"Ray ports listening beyond loopback: {exposed}"


def _ray(*args: str, env: dict[str, str]) -> str:
    ray_cli = Path(sys.executable).with_name("ray")
    done = subprocess.run([str(ray_cli), *args], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, f"ray {' '.join(args)} failed: {done.stdout[-1500:]}{done.stderr[-1500:]}"
    return done.stdout + done.stderr


def _processes_under(*paths: str) -> list[int]:
    """Processes whose command line names one of ``paths`` (a node's temp dir: its raylet, GCS, agents)."""
    return [pid for pid, _, cmdline in processes() if any(p in b" ".join(cmdline).decode(errors="replace") for p in paths)]


@pytest.fixture
def two_node_cluster():
    """A Ray head and a second node on this machine, with token authentication on as a shared
    cluster should have it; yields (address, the second node's temp dir, env for processes that
    join it: the cluster's mode and token, as its admin hands them out)."""
    # Short temp dirs: Ray's socket paths must fit in 107 characters.
    head_dir, node_dir = tempfile.mkdtemp(prefix="mpsh", dir="/tmp"), tempfile.mkdtemp(prefix="mpsn", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    port = free_port()
    # Quick node-death detection (a lost node is declared dead after ~2 s instead of ~30 s).
    health = json.dumps({"health_check_period_ms": 500, "health_check_failure_threshold": 4})
    try:
        _ray("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
             "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", head_dir, "--system-config", health, env=env)
        _ray("start", "--address", f"127.0.0.1:{port}", "--num-cpus", "1", "--disable-usage-stats", "--temp-dir", node_dir,
             env=env)
        yield f"127.0.0.1:{port}", node_dir, env
    finally:
        subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True, env=env,
                       timeout=120)
        deadline = time.monotonic() + 30
        while _processes_under(head_dir, node_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        stray = _processes_under(head_dir, node_dir)
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(node_dir, ignore_errors=True)
        assert not stray, f"Ray processes left after the cluster stopped: {stray}"


@pytest.mark.slow
def test_a_study_joins_a_two_node_cluster_survives_a_lost_node_and_equals_the_local_study(
        tmp_path, cli_cmd, digits_baseline, local_study, two_node_cluster):
    address, node_dir, env = two_node_cluster
    out = tmp_path / "c"
    # Joined the way `ray job submit` passes the cluster's address.
    proc = start_study(cli_cmd, out, str(digits_baseline.checkpoint), eval_images=EVAL_IMAGES, env=dict(env, RAY_ADDRESS=address))
    wait_until(proc, lambda: finished_trials(out / "study.db") >= 2, timeout=300)
    # The second node goes away mid-study, as a lost machine does: its raylet and the workers it
    # started (the actor it hosted among them) all at once.
    found = list(processes())
    raylets = [pid for pid, _, cmdline in found if cmdline[0].endswith(b"raylet") and node_dir.encode() in b" ".join(cmdline)]
    assert len(raylets) == 1, raylets
    hosted = [(pid, cmdline) for pid, parent, cmdline in found if parent == raylets[0]]
    assert any(cmdline[0].startswith(b"ray::_EvalActor") for _, cmdline in hosted), \
        "no mpsearch worker on the second node (the actors should spread over both)"
    for pid in (raylets[0], *(pid for pid, _ in hosted)):
        os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    joined = re.search(r"joined the Ray cluster at \S+ \(([^)]*)\): (\d+) node\(s\), 3 CPUs", err)
    assert joined and joined.group(1) == address and joined.group(2) == "2", err[-3000:]
    assert "died during the search; their evaluations were retried" in err, err[-3000:]
    assert finished_trials(out / "study.db") == BUDGET
    assert_same_study(out, local_study)
    # As many workers as the cluster's CPUs hold, one thread each.
    assert StudyConfig.load(out / "config.yaml").run.workers == 3
    # A driver without the cluster's token is turned away, in one line.
    intruder = start_study(cli_cmd, tmp_path / "intruder", str(digits_baseline.checkpoint), "--workers", "1",
                           env=dict(env, RAY_ADDRESS=address, RAY_AUTH_TOKEN=secrets.token_hex(32)))
    _, err = intruder.communicate(timeout=300)
    assert intruder.returncode == 2 and f"cannot join the Ray cluster at '{address}'" in err and "Traceback" not in err, err[-3000:]
    assert finished_trials(tmp_path / "intruder" / "study.db") == 0
