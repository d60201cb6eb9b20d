"""Bad input, case by case: one line saying what is wrong and how to fix it, exit code 2, no
traceback, and an existing study left exactly as it was.

The cases run through ``mpsearch.cli.main`` in this process (fast); tests/test_cli.py runs a few
of them through a real subprocess, and shows that ``--debug`` brings the traceback back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from mpsearch.cli import main

EVAL = ["evaluate", "--model", "test_resnet", "--dataset", "digits", "--no-progress"]
FT = ["finetune", "--model", "test_resnet", "--dataset", "digits", "--no-progress"]
ABL = ["ablate", "--model", "test_resnet", "--dataset", "digits", "--no-progress"]
# No accuracy floor: at 60 images a front point can hold it on the search's images and not on the
# full splits, and the export cases need a point to pick.
OPT = ["optimize", "--model", "test_resnet", "--dataset", "digits", "--budget", "6", "--population", "3",
       "--eval-images", "60", "--workers", "0", "--sensitivity", "none", "--set", "latency=null", "--max-drop", "none",
       "--no-progress"]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, digits_baseline, digits):
    """Files for the cases, and one finished study (``kept``) that refused runs must not touch."""
    root = tmp_path_factory.mktemp("bad-input")
    ckpt = str(digits_baseline.checkpoint)
    files = {
        "ckpt": ckpt,
        "root": str(root / "studies"),
        "not_json": _write(root / "not_json.json", "{not json"),
        "array": _write(root / "array.json", "[1, 2]"),
        "binary": _write(root / "binary.json", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe"),
        "unknown_layer": _policy(root, "unknown_layer", layers={"layer9.conv": {"weight_bits": 4, "act_bits": 4}}),
        "bits9": _policy(root, "bits9", layers={"fc": {"weight_bits": 9, "act_bits": 8}}),
        "act1": _policy(root, "act1", layers={"fc": {"weight_bits": 8, "act_bits": 1}}),
        "other_model": _policy(root, "other_model", model="resnet50"),
        "version": _policy(root, "version", version=99),
        "granularity": _policy(root, "granularity", layers={"fc": {"weight_bits": 8, "act_bits": 8, "granularity": "per-pixel"}}),
        "yaml_syntax": _write(root / "syntax.yaml", "version: 1\nweight_bits: [2, 4\n"),
        "yaml_unknown_layer": _write(root / "unknown.yaml", "version: 1\nweight_bits: [4, 8]\nact_bits: [8]\nlayers: [nosuch.layer]\n"),
        "yaml_empty": _write(root / "empty.yaml", "version: 1\nweight_bits: []\nact_bits: [8]\n"),
        "yaml_bits": _write(root / "bits.yaml", "version: 1\nweight_bits: [4, 9]\nact_bits: [8]\n"),
        "yaml_list": _write(root / "list.yaml", "- 1\n- 2\n"),
        "yaml_field": _write(root / "field.yaml", "version: 1\nweight_bits: [4, 8]\nact_bits: [8]\nbudget: 3\n"),
        "corrupt_ckpt": _write(root / "corrupt.pt", b"PK\x03\x04 this is not a zip archive" * 10),
        "other_ckpt": _save(root / "other.pt", {"fc.weight": torch.zeros(3, 3)}),
        "pickle_ckpt": _save(root / "code.pt", {"model": _Custom()}),
        "a_file": _write(root / "a_file", "x"),
        "not_pt2": _write(root / "not_a_program.pt2", "x"),
        "ft_missing": _policy(root, "ft_missing", provenance={"finetune": {"checkpoint": "nope.pt", "sha256": "0" * 64}}),
        "ft_malformed": _policy(root, "ft_malformed", provenance={"finetune": {"checkpoint": 3}}),
        "space_ok": _write(root / "ok.yaml", "version: 1\nweight_bits: [4, 8]\nact_bits: [8]\n"),
        "yaml_matmul_bits": _write(root / "matmul.yaml", "version: 1\nweight_bits: [4, 8]\nact_bits: [8]\nmatmul_bits: [1, 8]\n"),
        # the same architecture with other weights: loads fine, but is not the study's baseline
        "config_bad_field": _write(root / "study.yaml", "model: test_resnet\nsearch:\n  budgt: 3\n"),
        "retrained_ckpt": _save(root / "retrained.pt", {k: v + 0.01 if v.is_floating_point() else v
                                                        for k, v in torch.load(ckpt, weights_only=True).items()}),
        "weak_ckpt": _save(root / "untrained.pt", _untrained_state(digits.info)),
        "small_images": _image_folder(root / "small-images", size=28),
    }
    assert main([*OPT, "--checkpoint", ckpt, "--out-dir", files["root"] + "/kept", "--name", "kept"]) == 0
    return files


def _untrained_state(info) -> dict[str, torch.Tensor]:
    """test_resnet as initialized, not trained: chance accuracy on digits."""
    from mpsearch.models.zoo import create_model

    torch.manual_seed(0)
    return create_model("test_resnet", info).state_dict()


def _image_folder(root: Path, size: int) -> str:
    """Two classes of three gray images each: the smallest image folder."""
    from PIL import Image

    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (size, size), color=(40 * i, 100 if label == "a" else 200, 0)).save(root / label / f"{i}.png")
    return str(root)


class _Custom:
    """Not a tensor: a checkpoint holding it needs pickle's code execution to load."""


def _write(path: Path, content) -> str:
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return str(path)


def _save(path: Path, obj) -> str:
    torch.save(obj, path)
    return str(path)


def _policy(root: Path, name: str, **fields) -> str:
    doc = {"format": "mpsearch-policy", "version": 1, "model": "test_resnet", "dataset": "digits", "layers": {}}
    return _write(root / f"{name}.json", json.dumps({**doc, **fields}))


def _study_fingerprint(root: str, name: str) -> dict[str, str]:
    """Every file of a study (its SQLite database included) by content hash."""
    folder = Path(root) / name
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith((".lock", ".driver"))}  # who held the study last


# (id, argv with {placeholders} from ctx, what the one line must say)
CASES = [
    # policy files and shorthands
    ("policy-not-json", [*EVAL, "--checkpoint", "{ckpt}", "--policy", "{not_json}"], "not valid JSON"),
    ("policy-not-object", [*EVAL, "--checkpoint", "{ckpt}", "--policy", "{array}"], "JSON object"),
    ("policy-binary", [*EVAL, "--checkpoint", "{ckpt}", "--policy", "{binary}"], "not a text"),
    ("policy-unknown-layer", [*EVAL, "--checkpoint", "{ckpt}", "--policy", "{unknown_layer}"], "policy.layers.layer9.conv"),
    ("policy-weight-bits", [*EVAL, "--checkpoint", "{ckpt}", "--policy", "{bits9}"], "weight_bits"),
    ("policy-act-bits", [*EVAL, "--checkpoint", "{ckpt}", "--policy", "{act1}"], "act_bits"),
    ("policy-other-model", [*EVAL, "--checkpoint", "{ckpt}", "--policy", "{other_model}"], "resnet50"),
    ("policy-version", [*EVAL, "--checkpoint", "{ckpt}", "--policy", "{version}"], "version"),
    ("policy-granularity", [*EVAL, "--checkpoint", "{ckpt}", "--policy", "{granularity}"], "granularity"),
    ("policy-missing-file", [*EVAL, "--checkpoint", "{ckpt}", "--policy", "/nonexistent/p.json"], "not a file or a shorthand"),
    ("policy-bad-shorthand", [*EVAL, "--checkpoint", "{ckpt}", "--policy", "w9a9"], "from 2 to 8"),
    # search spaces
    ("space-yaml-syntax", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/new", "--space", "{yaml_syntax}"], "not valid YAML"),
    ("space-unknown-layer", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/new", "--space", "{yaml_unknown_layer}"], "nosuch.layer"),
    ("space-empty-choices", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/new", "--space", "{yaml_empty}"], "empty"),
    ("space-bad-bits", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/new", "--space", "{yaml_bits}"], "9"),
    ("space-not-mapping", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/new", "--space", "{yaml_list}"], "expected a mapping"),
    ("space-unknown-field", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/new", "--space", "{yaml_field}"], "space.budget"),
    ("space-missing-file", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/new", "--space", "/nonexistent/space.yaml"], "space.yaml"),
    # models and data
    ("unknown-model", ["evaluate", "--model", "nosuchnet", "--dataset", "digits", "--policy", "w8a8"], "unknown model"),
    ("unknown-dataset", ["evaluate", "--model", "test_resnet", "--dataset", "mnist-color", "--policy", "w8a8"], "unknown dataset"),
    ("missing-data", ["evaluate", "--model", "test_resnet", "--dataset", "imagefolder:/nonexistent/images", "--policy", "w8a8"],
     "/nonexistent/images"),
    ("optimize-unknown-model", ["optimize", "--model", "nosuchnet", "--dataset", "digits", "--out-dir", "{root}/new"], "unknown model"),
    # checkpoints
    ("checkpoint-corrupt", [*EVAL, "--checkpoint", "{corrupt_ckpt}", "--policy", "w8a8"], "not a readable PyTorch state dict"),
    ("checkpoint-other-model", [*EVAL, "--checkpoint", "{other_ckpt}", "--policy", "w8a8"], "does not fit"),
    ("checkpoint-with-code", [*EVAL, "--checkpoint", "{pickle_ckpt}", "--policy", "w8a8"], "not a readable PyTorch state dict"),
    ("checkpoint-missing", [*EVAL, "--checkpoint", "/nonexistent/model.pt", "--policy", "w8a8"], "file not found"),
    # flags
    ("budget-zero", [*OPT, "--out-dir", "{root}/new", "--budget", "0"], "--budget: must be >= 1"),
    ("budget-not-a-number", [*OPT, "--out-dir", "{root}/new", "--budget", "lots"], "invalid int value"),
    ("workers-negative", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/new", "--workers", "-5"], "--workers: -1"),
    ("objectives-order", [*OPT, "--out-dir", "{root}/new", "--objectives", "energy,accuracy"], "--objectives: accuracy first"),
    ("unknown-algorithm", [*OPT, "--out-dir", "{root}/new", "--algorithm", "annealing"], "unknown search algorithm"),
    ("population-one", [*OPT, "--out-dir", "{root}/new", "--population", "1"], "--population: must be >= 2"),
    ("threads-zero", [*OPT, "--out-dir", "{root}/new", "--threads", "0"], "--threads: must be >= 1"),
    ("eval-images-zero", [*OPT, "--out-dir", "{root}/new", "--eval-images", "0"], "--eval-images: must be >= 1"),
    ("max-drop-negative", [*OPT, "--out-dir", "{root}/new", "--max-drop", "-1"], "--max-drop: percentage points of accuracy"),
    ("max-drop-nan", [*OPT, "--out-dir", "{root}/new", "--max-drop", "nan"], "--max-drop: percentage points of accuracy"),
    ("max-drop-word", [*OPT, "--out-dir", "{root}/new", "--max-drop", "small"], "expected percentage points (e.g. 2) or none"),
    ("unknown-ptq-method", [*EVAL, "--checkpoint", "{ckpt}", "--policy", "w8a8", "--ptq", "brecq2"], "unknown PTQ method"),
    ("optimize-unknown-ptq-method", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/new", "--ptq", "brecq2"], "unknown PTQ method"),
    ("limit-zero", [*EVAL, "--checkpoint", "{ckpt}", "--policy", "w8a8", "--limit", "0"], "--limit: must be >= 1"),
    ("split-train", [*EVAL, "--policy", "w8a8", "--split", "train"], "invalid choice"),
    ("keep-fraction-zero", ["train", "--model", "test_resnet", "--dataset", "digits", "--keep-fraction", "0"],
     "--keep-fraction: must be in (0, 1]"),
    ("unknown-flag", [*EVAL, "--policy", "w8a8", "--frobnicate"], "unrecognized arguments"),
    ("unknown-command", ["frobnicate"], "invalid choice"),
    # storage, outputs and existing studies
    ("storage-url", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/s-url", "--name", "s-url", "--storage", "notaurl://x"],
     "storage"),
    ("out-dir-not-writable", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{a_file}/studies"], "choose a writable --out-dir"),
    ("existing-study-other-seed", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/kept", "--name", "kept", "--seed", "1"],
     "--seed is 0 in the study, 1 now"),
    ("existing-study-other-population", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/kept", "--name", "kept", "--population", "4"],
     "--population is 3 in the study, 4 now"),
    ("existing-study-other-space", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/kept", "--name", "kept", "--space", "{space_ok}"],
     "--space is '' in the study"),
    ("existing-study-other-floor", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/kept", "--name", "kept", "--max-drop", "2"],
     "--max-drop is None in the study, 2.0 now"),
    ("existing-study-smaller-budget", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/kept", "--name", "kept", "--budget", "3"],
     "--budget 6 or more"),
    ("existing-study-other-checkpoint", [*OPT, "--checkpoint", "{retrained_ckpt}", "--out-dir", "{root}/kept", "--name", "kept"],
     "measured on a baseline with sha256"),
    ("export-unknown-study", ["export", "--study", "{root}/nope", "-o", "{root}/p.json"], "no finished study"),
    ("export-bad-pick", ["export", "--study", "{root}/kept", "--pick", "best", "-o", "{root}/p.json"], "use knee"),
    ("export-unknown-format", ["export", "--study", "{root}/kept", "--format", "tflite", "-o", "{root}/m.tflite"], "invalid choice"),
    ("export-output-suffix", ["export", "--study", "{root}/kept", "-o", "{root}/m.bin"], "name a .json (policy), .onnx or .pt2"),
    ("export-onnx-unwritable", ["export", "--study", "{root}/kept", "-o", "{a_file}/m.onnx"], "is not a folder"),
    ("export-study-and-policy", ["export", "--study", "{root}/kept", "--policy", "w8a8", "-o", "{root}/m.onnx"], "exactly one"),
    ("export-policy-other-model", ["export", "--model", "test_resnet", "--dataset", "digits", "--checkpoint", "{ckpt}",
                                   "--policy", "{other_model}", "-o", "{root}/m.onnx"], "resnet50"),
    ("evaluate-onnx-not-onnx", ["evaluate", "--onnx", "{not_json}"], "is not an ONNX model"),
    ("evaluate-onnx-missing", ["evaluate", "--onnx", "/nonexistent/m.onnx"], "no file /nonexistent/m.onnx"),
    ("latency-too-few-runs", ["latency", "--onnx", "{not_json}", "--runs", "5"], "--runs: at least 30 timings per batch size"),
    ("latency-not-onnx", ["latency", "--onnx", "{not_json}"], "is not an ONNX model"),
    ("latency-onnx-and-pt2e", ["latency", "--onnx", "{not_json}", "--pt2e", "{root}/m.pt2"], "exactly one"),
    ("latency-pt2-as-onnx", ["latency", "--onnx", "{root}/m.pt2"], "pass them with --pt2e"),
    ("evaluate-pt2e-missing", ["evaluate", "--pt2e", "/nonexistent/m.pt2"], "no file /nonexistent/m.pt2"),
    ("evaluate-pt2e-not-a-program", ["evaluate", "--pt2e", "{not_pt2}"], "is not a torch.export program"),
    ("export-pt2e-suffix", ["export", "--study", "{root}/kept", "--format", "pt2e", "-o", "{root}/m.onnx"], "a pt2e file's name ends in .pt2"),
    ("dashboard-unknown-study", ["dashboard", "--study", "{root}/nope"], "no finished study"),
    # fine-tuning, ablation, SmoothQuant
    ("finetune-steps-zero", [*FT, "--checkpoint", "{ckpt}", "--policy", "w4a4", "--steps", "0"], "--steps: must be >= 1"),
    ("finetune-fp32-policy", [*FT, "--checkpoint", "{ckpt}", "--policy", "fp32", "-o", "{root}/f.json"], "nothing to fine-tune"),
    ("finetune-output-suffix", [*FT, "--checkpoint", "{ckpt}", "--policy", "w4a4", "-o", "{root}/f.txt"], ".json suffix"),
    ("finetune-with-smoothquant", [*FT, "--checkpoint", "{ckpt}", "--policy", "w4a4", "--smoothquant", "-o", "{root}/f.json"],
     "SmoothQuant"),
    ("evaluate-finetuned-checkpoint-missing", [*EVAL, "--checkpoint", "{ckpt}", "--policy", "{ft_missing}"], "nope.pt not found"),
    ("evaluate-finetuned-provenance-malformed", [*EVAL, "--checkpoint", "{ckpt}", "--policy", "{ft_malformed}"],
     "provenance.finetune"),
    ("smoothquant-alpha", [*EVAL, "--checkpoint", "{ckpt}", "--policy", "w8a8", "--smoothquant", "2"],
     "--smoothquant: a migration strength in [0, 1]"),
    ("brecq-with-smoothquant", [*EVAL, "--checkpoint", "{ckpt}", "--policy", "w8a8", "--ptq", "brecq", "--smoothquant"],
     "cannot be combined"),
    ("ablate-unknown-variant", [*ABL, "--checkpoint", "{ckpt}", "--variants", "nope", "--out-dir", "{root}/abl"],
     "unknown ablation variant"),
    ("ablate-bad-seeds", [*ABL, "--seeds", "a,b"], "--seeds must be"),
    ("optimize-finetune-front-smoothquant", [*OPT, "--out-dir", "{root}/new", "--set", "finetune.steps=5",
                                             "--set", "quant.smoothquant_alpha=0.5"], "SmoothQuant"),
    ("outliers-alpha", ["outliers", "--model", "test_resnet", "--dataset", "digits", "--alpha", "-1"], "smoothquant_alpha"),
    # attention (vision transformers)
    ("attention-calibration-unknown", [*EVAL, "--checkpoint", "{ckpt}", "--policy", "w8a8", "--attention-calibration", "ranks"],
     "unknown attention calibration method 'ranks'"),
    ("optimize-attention-calibration-unknown",
     [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/new", "--set", "quant.attention_calibration=ranks"],
     "unknown attention calibration method 'ranks'"),
    ("ablate-attention-variant-on-a-cnn", [*ABL, "--checkpoint", "{ckpt}", "--variants", "ranking-aware", "--out-dir", "{root}/abl"],
     "needs a model with attention"),
    ("sensitivity-attention-ranking-on-a-cnn", ["sensitivity", "--model", "test_resnet", "--dataset", "digits", "--checkpoint",
                                                "{ckpt}", "--estimator", "attention-ranking", "--out-dir", "{root}/sens"],
     "needs a model with attention"),
    ("space-matmul-bits", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/new", "--space", "{yaml_matmul_bits}"],
     "space.matmul_bits[0]"),
    # methods, multi-fidelity, seeds, compare
    ("optimize-confidence", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/new", "--confidence", "1"],
     "--confidence: the probability each answer holds, strictly between 0 and 1"),
    ("optimize-confidence-zero", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/new", "--confidence", "0"],
     "--confidence: the probability each answer holds, strictly between 0 and 1"),
    ("optimize-tolerance-above-floor", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/new", "--max-drop", "2",
                                        "--tolerances", "0.5,3"], "--tolerances: 3 pp lies beyond the accuracy floor"),
    ("optimize-tolerances-order", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/new", "--tolerances", "2,1"],
     "--tolerances: percentage points below fp32, each above 0, increasing"),
    ("optimize-method-twice", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/new", "--algorithm", "random,random"],
     "--algorithm lists 'random' twice"),
    ("optimize-ilp-without-sensitivity", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/new", "--algorithm", "ilp"],
     "use --sensitivity hessian"),
    ("optimize-unknown-setting", [*OPT, "--out-dir", "{root}/new", "--set", "search.budgt=3"], "search.budgt: unknown field"),
    ("optimize-malformed-setting", [*OPT, "--out-dir", "{root}/new", "--set", "budget"], "write FIELD=VALUE"),
    ("optimize-config-missing", ["optimize", "--config", "/nonexistent/study.yaml"], "cannot read it"),
    ("optimize-config-unknown-field", ["optimize", "--config", "{config_bad_field}"], "search.budgt: unknown field"),
    ("optimize-bad-seeds", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/new", "--seeds", "0,x"], "--seeds must be"),
    ("optimize-repeated-seeds", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/new", "--seeds", "1,1"], "each seed once"),
    ("optimize-multi-fidelity-images", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/new", "--algorithm", "nsga2+mf",
                                        "--set", "search.multi_fidelity_images=0"], "search.multi_fidelity_images: must be >= 1"),
    # kernel profiles and calibration
    ("profile-unknown-device", ["profile", "--model", "test_resnet", "--dataset", "digits", "--device", "tpu"], "use cpu, cuda or cuda:N"),
    ("profile-unknown-precision", ["profile", "--model", "test_resnet", "--dataset", "digits", "--precisions", "fp32,fp64"],
     "unknown kernel precision 'fp64'"),
    ("profile-window", ["profile", "--model", "test_resnet", "--dataset", "digits", "--window", "0"], "--window: must be > 0"),
    ("profile-energy-meter", ["profile", "--model", "test_resnet", "--dataset", "digits", "--energy-meter", "watts"],
     "use auto, rapl, nvml or none"),
    ("calibrate-missing-table", ["calibrate-energy", "--table", "{root}/nope.json"], "write one with `mpsearch profile"),
    ("calibrate-table-not-json", ["calibrate-energy", "--table", "{not_json}"], "is not JSON"),
    ("calibrate-table-array", ["calibrate-energy", "--table", "{array}"], "reads version 1"),
    # models: one that cannot run on the images, a baseline that has not learned
    ("optimize-model-refused-at-this-size", [*OPT, "--model", "test_maxvit", "--dataset", "imagefolder:{small_images}",
                                             "--image-size", "28", "--out-dir", "{root}/new"],
     "model test_maxvit cannot run on 28 px images"),
    ("layers-model-refused-at-this-size", ["layers", "--model", "test_coatnet", "--dataset", "imagefolder:{small_images}",
                                           "--image-size", "28"], "it runs on 8, 16, 24, 32"),
    ("optimize-weak-baseline", [*OPT, "--checkpoint", "{weak_ckpt}", "--out-dir", "{root}/new"],
     "within 10 points of chance (10.0% for 10 classes)"),
    ("optimize-image-size-on-fixed-data", [*OPT, "--checkpoint", "{ckpt}", "--out-dir", "{root}/new", "--image-size", "16"],
     "--image-size applies to imagefolder:PATH data sets"),
    ("compare-unknown-method", ["compare", "--model", "test_resnet", "--dataset", "digits", "--checkpoint", "{ckpt}",
                                "--out-dir", "{root}/new", "--algorithm", "nsga2+mf,nsga3"], "unknown search algorithm 'nsga3'"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_the_study_untouched(ctx, capsys, argv, message):
    before = _study_fingerprint(ctx["root"], "kept")
    try:
        code = main([a.format(**ctx) for a in argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0], lines[0]
    assert _study_fingerprint(ctx["root"], "kept") == before


def test_the_battery_is_at_least_thirty_cases():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)
