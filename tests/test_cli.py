"""The CLI through a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(sys.executable).with_name("mpsearch")
BASE = ["--model", "test_resnet", "--dataset", "digits", "--epochs", "2", "--no-progress"]


def run(*args: str, cache: Path) -> subprocess.CompletedProcess:
    cmd = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "mpsearch.cli"]
    env = dict(os.environ, MPSEARCH_CACHE=str(cache))
    return subprocess.run(cmd + list(args), capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli-cache")


def test_train_then_evaluate_json(cli_cache, tmp_path):
    first = run("train", *BASE, "--json", cache=cli_cache)
    assert first.returncode == 0, first.stderr
    assert "training one now" in first.stderr
    meta = json.loads(first.stdout)
    assert meta["model"] == "test_resnet" and meta["recipe"]["epochs"] == 2 and len(meta["sha256"]) == 64

    policy_path = tmp_path / "p.json"
    out = run("evaluate", *BASE, "--policy", "w4a4", "--split", "test", "--json", "--save-policy", str(policy_path),
              cache=cli_cache)
    assert out.returncode == 0, out.stderr
    assert "training" not in out.stderr  # the cached baseline is reused
    result = json.loads(out.stdout)
    assert result["split"] == "test" and result["images"] == 360
    assert 0 <= result["accuracy"] <= 1 and result["accuracy_ci95"][0] <= result["accuracy"] <= result["accuracy_ci95"][1]
    assert 0 < result["relative_to_fp32"]["energy:horowitz45nm"] < 1
    assert 0 < result["relative_to_fp32"]["energy:seed-lab4"] < 1

    again = run("evaluate", *BASE, "--policy", str(policy_path), "--split", "test", "--json", cache=cli_cache)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["correct"] == result["correct"]  # a saved policy reproduces the measurement

    human = run("evaluate", *BASE, "--policy", "w8a8", "--limit", "100", cache=cli_cache)
    assert human.returncode == 0, human.stderr
    assert "accuracy" in human.stdout and "horowitz45nm" in human.stdout and "(100 images)" in human.stdout


def test_layers_and_profiles(cli_cache):
    out = run("layers", "--model", "test_resnet", "--dataset", "digits", "--json", cache=cli_cache)
    rows = json.loads(out.stdout)
    assert rows[0]["name"] == "conv1.0" and rows[-1]["name"] == "fc" and all(r["macs"] > 0 for r in rows)
    prof = run("profiles", cache=cli_cache)
    assert "horowitz45nm" in prof.stdout and "seed-lab4" in prof.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["evaluate", *BASE, "--policy", "w9a9"], "bits must be an integer from 2 to 8"),
        (["evaluate", *BASE, "--policy", "int4"], "not a file or a shorthand"),
        (["evaluate", "--model", "nosuchmodel", "--dataset", "digits", "--policy", "w8a8"], "unknown model"),
        (["evaluate", "--model", "test_resnet", "--dataset", "mnist-color", "--policy", "w8a8"], "unknown dataset"),
        (["evaluate", *BASE, "--policy", "w8a8", "--split", "train"], "invalid choice"),
        (["evaluate", *BASE, "--policy", "w8a8", "--profiles", "nope"], "nope"),
        (["evaluate", *BASE, "--policy", "w8a8", "--act-observer", "magic"], "unknown observer"),
        (["evaluate", *BASE, "--policy", "w8a8", "--limit", "0"], "--limit"),
        (["evaluate", *BASE, "--policy", "w8a8", "--checkpoint", "/nonexistent.pt"], "file not found"),
        (["train", *BASE[:-3], "--epochs", "0"], "recipe.epochs"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(cli_cache, args, message):
    out = run(*args, cache=cli_cache)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert message in lines[0].lower() or message in lines[0]
    assert "Traceback" not in out.stderr


def test_bad_policy_file_names_the_field(cli_cache, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "mpsearch-policy", "version": 1, "model": "test_resnet", "dataset": "digits",
                               "layers": {"layer9.conv": {"weight_bits": 4, "act_bits": 4}}}))
    out = run("evaluate", *BASE, "--policy", str(bad), cache=cli_cache)
    assert out.returncode == 2
    assert "policy.layers.layer9.conv" in out.stderr and "Traceback" not in out.stderr
    debug = run("--debug", "evaluate", *BASE, "--policy", str(bad), cache=cli_cache)
    assert "Traceback" in debug.stderr


def test_import_is_lean():
    code = "import sys, mpsearch; print('torch' in sys.modules, mpsearch.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "False"


def test_optimize_export_evaluate_and_dashboard(cli_cache, tmp_path):
    import socket
    import time
    import urllib.request

    meta = json.loads(run("train", *BASE, "--json", cache=cli_cache).stdout)
    common = ["--model", "test_resnet", "--dataset", "digits", "--checkpoint", meta["checkpoint"], "--no-progress"]
    out = run("optimize", *common, "--budget", "8", "--population", "4", "--eval-images", "100", "--workers", "0",
              "--sensitivity", "none", "--out-root", str(tmp_path), "--name", "cli", cache=cli_cache)
    assert out.returncode == 0, out.stderr
    assert "8 trials" in out.stdout and "Pareto points" in out.stdout
    policy_path = tmp_path / "picked.json"
    exp = run("export", "--study", "cli", "--out-root", str(tmp_path), "--pick", "max-accuracy", "-o", str(policy_path),
              cache=cli_cache)
    assert exp.returncode == 0, exp.stderr
    stored = json.loads(policy_path.read_text())["provenance"]["metrics"]
    ev = run("evaluate", *common, "--policy", str(policy_path), "--json", cache=cli_cache)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["accuracy"] == stored["val_accuracy"]  # reproduced exactly
    missing = run("export", "--study", "nope", "--out-root", str(tmp_path), "-o", str(policy_path), cache=cli_cache)
    assert missing.returncode == 2 and "no finished study 'nope'" in missing.stderr

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "mpsearch.cli"]
    server = subprocess.Popen(cmd + ["dashboard", "--study", "cli", "--out-root", str(tmp_path), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body = None
        for _ in range(60):
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2).read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert body is not None and '"cli"' in body
        summary = json.loads(body)["study_summaries"][0]
        detail = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", timeout=5).read().decode())
        assert len(detail["trials"]) == 8
        assert detail["objective_names"] == ["accuracy", "energy"]  # what the dashboard labels its axes with
    finally:
        server.terminate()
        server.wait(timeout=10)
