"""The CLI through a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(sys.executable).with_name("mpsearch")
BASE = ["--model", "test_resnet", "--dataset", "digits", "--no-progress"]


def run(*args: str, cache: Path) -> subprocess.CompletedProcess:
    cmd = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "mpsearch.cli"]
    env = dict(os.environ, MPSEARCH_CACHE=str(cache))
    return subprocess.run(cmd + list(args), capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli-cache")


@pytest.fixture(scope="module")
def trained(cli_cache) -> list[str]:
    """A two-epoch baseline trained by `mpsearch train`: the flags that evaluate it."""
    first = run("train", *BASE, "--epochs", "2", "--json", cache=cli_cache)
    assert first.returncode == 0, first.stderr
    assert "training one now" in first.stderr
    meta = json.loads(first.stdout)
    assert meta["model"] == "test_resnet" and meta["recipe"]["epochs"] == 2 and len(meta["sha256"]) == 64
    # digits is a small data set: the family recipe for it, with the flags' changes made to it
    assert meta["recipe"]["image_scales"] == [1.0] and meta["recipe"]["keep_fraction"] == 1.0
    again = run("train", *BASE, "--epochs", "2", "--json", cache=cli_cache)
    assert "training" not in again.stderr and json.loads(again.stdout)["sha256"] == meta["sha256"]  # cached
    return [*BASE, "--checkpoint", meta["checkpoint"]]


def test_train_then_evaluate_json(cli_cache, trained, tmp_path):
    policy_path = tmp_path / "p.json"
    out = run("evaluate", *trained, "--policy", "w4a4", "--split", "test", "--json", "-o", str(policy_path), cache=cli_cache)
    assert out.returncode == 0, out.stderr
    assert "training" not in out.stderr  # the checkpoint is used
    result = json.loads(out.stdout)
    assert result["split"] == "test" and result["images"] == 360
    assert 0 <= result["accuracy"] <= 1 and result["accuracy_ci95"][0] <= result["accuracy"] <= result["accuracy_ci95"][1]
    assert 0 < result["relative_to_fp32"]["energy_horowitz45nm"] < 1
    assert 0 < result["relative_to_fp32"]["energy_seed-lab4"] < 1

    again = run("evaluate", *trained, "--policy", str(policy_path), "--split", "test", "--json", cache=cli_cache)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["correct"] == result["correct"]  # a saved policy reproduces the measurement

    human = run("evaluate", *trained, "--policy", "w8a8", "--limit", "100", cache=cli_cache)
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
        (["evaluate", *BASE, "--policy", "w8a8", "--limit", "0"], "--limit: must be >= 1"),
        (["evaluate", *BASE, "--policy", "w8a8", "--checkpoint", "/nonexistent.pt"], "file not found"),
        (["train", *BASE, "--epochs", "0"], "--epochs: must be >= 1"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(cli_cache, args, message, capsys, monkeypatch):
    """In this process (the command's main, as the script calls it): a subprocess per case costs
    seconds of imports. test_bad_input_through_the_installed_script covers the script itself."""
    from mpsearch.cli import main

    monkeypatch.setenv("MPSEARCH_CACHE", str(cli_cache))
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0].lower() or message in lines[0]
    assert "Traceback" not in err


def test_bad_input_through_the_installed_script(cli_cache):
    for args, message in (["frobnicate"], "invalid choice"), (["evaluate", "--model", "nosuchmodel", "--dataset", "digits",
                                                                "--policy", "w8a8"], "unknown model"):
        out = run(*args, cache=cli_cache)
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "Traceback" not in out.stderr


def test_bad_policy_file_names_the_field(cli_cache, trained, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "mpsearch-policy", "version": 1, "model": "test_resnet", "dataset": "digits",
                               "layers": {"layer9.conv": {"weight_bits": 4, "act_bits": 4}}}))
    out = run("evaluate", *trained, "--policy", str(bad), cache=cli_cache)
    assert out.returncode == 2
    assert "policy.layers.layer9.conv" in out.stderr and "Traceback" not in out.stderr
    debug = run("--debug", "evaluate", *trained, "--policy", str(bad), cache=cli_cache)
    assert "Traceback" in debug.stderr


def test_import_is_lean():
    code = "import sys, mpsearch; print('torch' in sys.modules, mpsearch.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "False"


@pytest.mark.slow
def test_optimize_export_evaluate_and_dashboard(cli_cache, trained, tmp_path):
    import time
    import urllib.request

    from study_checks import free_port

    common = trained
    folder = tmp_path / "cli"
    # No accuracy floor: eight trials on a two-epoch baseline may all fall 5 pp below it on test
    # (they did on one CPU), and what is tested here is the way from a study to a policy file.
    out = run("optimize", *common, "--budget", "8", "--population", "4", "--eval-images", "100", "--workers", "0",
              "--sensitivity", "none", "--max-drop", "none", "--set", "latency=null", "--out-dir", str(folder), "--name", "cli",
              cache=cli_cache)
    assert out.returncode == 0, out.stderr
    assert "8 trials" in out.stdout and "Pareto point" in out.stdout
    policy_path = tmp_path / "picked.json"
    exp = run("export", "--study", str(folder), "--pick", "max-accuracy", "-o", str(policy_path), cache=cli_cache)
    assert exp.returncode == 0, exp.stderr
    stored = json.loads(policy_path.read_text())["provenance"]["metrics"]
    # Reproduced exactly: the test figure on the whole split, the search's on its first 100 validation images.
    ev = run("evaluate", *common, "--policy", str(policy_path), "--split", "test", "--json", cache=cli_cache)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["accuracy"] == stored["test_accuracy"]
    ev = run("evaluate", *common, "--policy", str(policy_path), "--limit", "100", "--json", cache=cli_cache)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["accuracy"] == stored["search_accuracy"]
    missing = run("export", "--study", "nope", "-o", str(policy_path), cache=cli_cache)
    assert missing.returncode == 2 and "no finished study in studies/nope" in missing.stderr
    resumed = run("optimize", "--config", str(folder / "config.yaml"), "--no-progress", cache=cli_cache)
    assert resumed.returncode == 0 and "resuming study 'cli': 8 of 8 trials recorded" in resumed.stderr

    port = free_port()
    cmd = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "mpsearch.cli"]
    server = subprocess.Popen(cmd + ["dashboard", "--study", str(folder), "--port", str(port)],
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


def test_output_flags_follow_one_rule_and_optimize_stays_small():
    """-o/--output names a file, --out-dir a folder, in every command; optimize lists at most 32
    options, six of them where it runs (Ray and storage); everything else is a config field
    (--config, --set); compare is optimize."""
    import argparse

    from mpsearch.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        options = {s for action in command._actions for s in action.option_strings}
        assert not options & {"--out", "--out-root", "--save-policy", "--output-dir"}, name
        for action in command._actions:
            if action.dest == "output":
                assert action.option_strings == ["-o", "--output"], name
            if action.dest == "out_dir":
                assert action.option_strings == ["--out-dir"], name
    assert commands["compare"].get_default("handler") is commands["optimize"].get_default("handler")
    help_text = subprocess.run([*([str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "mpsearch.cli"]),
                                "optimize", "--help"], capture_output=True, text=True, check=True).stdout
    listed = [line for line in help_text.splitlines() if line.lstrip().startswith("-")]
    assert 20 <= len(listed) <= 32, listed
    for dead in ("--epochs", "--batch-size", "--lr", "--keep-fraction", "--pretrained", "--out-root"):
        assert dead not in help_text


def test_study_examples_load_and_the_tour_runs(cli_cache, trained, tmp_path):
    from mpsearch.config import StudyConfig, with_overrides

    studies = Path(__file__).resolve().parents[1] / "studies"
    examples = sorted(studies.glob("*.yaml"))
    assert {p.name for p in examples} >= {"resnet18.yaml", "deit_tiny.yaml", "digits-tour.yaml"}
    configs = {p.stem: StudyConfig.load(p) for p in examples}
    assert configs["resnet18"] == with_overrides(StudyConfig(), {"name": "resnet18-fashion-mnist"})  # the default, written out
    assert configs["deit_tiny"].quant.attention_calibration == "ranking" and configs["deit_tiny"].search.space == "deit_tiny"
    out = run("optimize", "--config", str(studies / "digits-tour.yaml"), "--checkpoint", trained[-1], "--budget", "8",
              "--out-dir", str(tmp_path / "tour"), "--set", "latency=null", "--no-progress", cache=cli_cache)
    assert out.returncode == 0, out.stderr
    ran = StudyConfig.load(tmp_path / "tour" / "config.yaml")
    assert ran.search.budget == 8 and ran.search.algorithm == "nsga2+mf" and ran.name == "digits-tour"
