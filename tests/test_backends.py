"""Evaluation backends: every registered backend measures what fake quantization measures.

The contract: on a CNN and a ViT, for uniform and mixed policies, a backend's predictions agree
with fake quantization on >= 99.5 % of the images and its accuracy is within 0.5 pp. The int8
backend must also really run integer kernels (oneDNN's int8 ops appear in the profile) on every
layer whose weight and input are both quantized, and nowhere else.
"""

from __future__ import annotations

import pytest
import torch

from mpsearch.errors import UserError
from mpsearch.evaluation.evaluator import Evaluator
from mpsearch.policy import LayerPrecision, Policy
from mpsearch.quant.backends import BACKENDS, int8_unavailable, resolve_backend

IMAGES = 1000


def _mixed(ev: Evaluator, seed: int) -> Policy:
    """Random widths per layer; some layers fp32, some quantizing only weights or only inputs,
    some with asymmetric weight grids."""
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name in ev.policy_layers:
        kind = int(torch.randint(0, 8, (1,), generator=gen))
        w = int(torch.randint(2, 9, (1,), generator=gen))
        a = int(torch.randint(4, 9, (1,), generator=gen))
        if kind == 0:
            continue  # fp32
        granularity = "per-tensor" if name in ev.qmodel.matmul_names else "per-channel"
        layers[name] = LayerPrecision(w if kind != 1 else None, a if kind != 2 else None, granularity, symmetric=kind != 3)
    template = ev.resolve_policy("fp32")
    return Policy(model=template.model, dataset=template.dataset, layers=layers,
                  checkpoint_sha256=template.checkpoint_sha256, architecture=template.architecture)


def _available(name: str) -> None:
    problem = BACKENDS.get(name)().unavailable()
    if problem:
        pytest.skip(f"backend {name}: {problem}")


@pytest.fixture(scope="module")
def cnn(fmnist_baseline, fmnist_small):
    ev = Evaluator(fmnist_baseline, fmnist_small, quant=_quant("fake"), prefix_cache=False)
    ev.calibrate()
    return ev


@pytest.fixture(scope="module")
def vit(digits_vit_baseline, digits):
    ev = Evaluator(digits_vit_baseline, digits, quant=_quant("fake"), prefix_cache=False)
    ev.calibrate()
    return ev


def _quant(backend: str):
    from mpsearch.config import QuantConfig

    return QuantConfig(backend=backend)


def _with_backend(reference: Evaluator, backend: str) -> Evaluator:
    """An evaluator on ``backend`` sharing ``reference``'s calibrated quantizers (same grids)."""
    ev = Evaluator(reference.baseline, reference.data, quant=_quant(backend), prefix_cache=False)
    ev.qmodel = reference.qmodel
    ev._calibration_s = reference._calibration_s
    return ev


@pytest.mark.parametrize("backend", BACKENDS.names())
@pytest.mark.parametrize("model", ["cnn", "vit"])
def test_backend_agrees_with_fake_quantization(backend, model, request):
    _available(backend)
    reference = request.getfixturevalue(model)
    ev = _with_backend(reference, backend)
    limit = min(IMAGES, len(reference.data.val))
    for spec in ["w8a8", "w4a8", "w4a4", _mixed(reference, 0), _mixed(reference, 1)]:
        policy = reference.resolve_policy(spec)
        reference.backend.install(reference.qmodel)  # fake: clears any kernel the other evaluator left
        expected, labels = _predictions(reference, policy, limit)
        got, _ = _predictions(ev, policy, limit)
        agreement = float((expected == got).float().mean())
        assert agreement >= 0.995, (backend, model, policy.summary(), agreement)
        drift = abs(float((got == labels).float().mean()) - float((expected == labels).float().mean()))
        assert drift <= 0.005, (backend, model, policy.summary(), drift)


def _predictions(ev: Evaluator, policy: Policy, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true labels of the first ``limit`` validation images."""
    ev.apply(policy)
    predicted, labels = [], []
    with torch.inference_mode():
        for x, y in ev.data.val.subset(limit).batches(256):
            predicted.append(ev.qmodel.module(x).argmax(dim=1))
            labels.append(y)
    return torch.cat(predicted), torch.cat(labels)


def test_int8_runs_integer_kernels_where_both_sides_are_quantized(cnn, vit):
    _available("int8")
    for reference in (cnn, vit):
        ev = _with_backend(reference, "int8")
        ev.apply(ev.resolve_policy("w8a8"))
        assert ev.integer_layers == len(ev.layer_names)  # every Conv2d / Linear
        mixed = _mixed(reference, 2)
        ev.apply(mixed)
        both = [n for n in ev.layer_names if mixed.precision(n).weight_bits and mixed.precision(n).act_bits]
        assert 0 < ev.integer_layers == len(both) < len(ev.layer_names)
        ev.apply(ev.resolve_policy("fp32"))
        assert ev.integer_layers == 0
    ev = _with_backend(cnn, "int8")
    ev.apply(ev.resolve_policy("w4a4"))
    x = next(iter(cnn.data.val.subset(64).batches(64)))[0]
    with torch.inference_mode(), torch.profiler.profile() as prof:
        ev.qmodel.module(x)
    ops = {e.key for e in prof.key_averages()}
    assert "onednn::qconv_pointwise" in ops and "onednn::qlinear_pointwise" in ops, sorted(ops)
    assert "aten::convolution" not in ops and "aten::linear" not in ops  # no layer left in float


def test_int8_kernels_are_packed_once_per_grid(cnn):
    _available("int8")
    ev = _with_backend(cnn, "int8")
    ev.apply(ev.resolve_policy("w4a8"))
    kernels = {n: w.kernel for n, w in ev.qmodel.wrappers.items()}
    ev.apply(ev.resolve_policy("w8a8"))
    ev.apply(ev.resolve_policy("w4a8"))
    assert all(ev.qmodel.wrappers[n].kernel is k for n, k in kernels.items())
    ev.qmodel.apply(ev.resolve_policy("w4a8"))  # new quantizers without the backend: no stale kernel stays
    assert all(w.kernel is None for w in ev.qmodel.wrappers.values())


def test_auto_resolves_by_cpu_and_a_missing_backend_is_one_line(monkeypatch):
    assert resolve_backend("auto") == ("int8" if int8_unavailable() is None else "fake")
    assert resolve_backend("fake") == "fake"
    monkeypatch.setattr("mpsearch.quant.backends.int8_unavailable", lambda: "this CPU has no int8 dot-product instructions")
    assert resolve_backend("auto") == "fake"
    with pytest.raises(UserError, match="backend 'int8' cannot run here: this CPU has no int8 dot-product.*--backend fake"):
        resolve_backend("int8")
    with pytest.raises(UserError, match="unknown evaluation backend 'int4'"):
        resolve_backend("int4")


def test_a_study_records_its_backend_and_a_resume_cannot_change_it(reference_study, digits_baseline, tmp_path):
    import shutil

    import pandas as pd
    from study_checks import study_config

    from mpsearch.config import StudyConfig
    from mpsearch.study import run_study

    backend = resolve_backend("auto")
    trials = pd.read_csv(reference_study / "trials.csv")
    assert set(trials["attr_backend"]) == {backend}
    assert StudyConfig.load(reference_study / "config.yaml").quant.backend == backend  # resolved, not "auto"
    report = (reference_study / "report.md").read_text()
    assert f"measured with the **{backend}** backend" in report
    assert "time by phase: baseline" in report and "search" in report and "re-measurement" in report
    if backend != "int8":
        pytest.skip(f"the other backend cannot run here: {int8_unavailable()}")
    shutil.copytree(reference_study, tmp_path / "ref")
    before = (tmp_path / "ref" / "study.db").read_bytes() if (tmp_path / "ref" / "study.db").exists() else None
    with pytest.raises(UserError, match="other settings.*quant.backend"):
        run_study(study_config(tmp_path, "ref", digits_baseline, **{"quant.backend": "fake"}), progress=False)
    if before is not None:
        assert (tmp_path / "ref" / "study.db").read_bytes() == before  # refused before anything was written
    resumed = run_study(study_config(tmp_path, "ref", digits_baseline), progress=False)  # "auto" is int8 again here
    assert len(resumed.trials) == len(trials)


def test_sensitivity_is_shared_between_backends(digits):
    from mpsearch.config import QuantConfig
    from mpsearch.sensitivity import SensitivityConfig
    from mpsearch.sensitivity.compute import sensitivity_cache_path

    config = SensitivityConfig()
    paths = {backend: sensitivity_cache_path("0" * 64, ["conv1"], digits.calibration, config, QuantConfig(backend=backend))
             for backend in ("auto", "fake", "int8")}
    assert len(set(paths.values())) == 1, paths  # estimators fake-quantize whatever measures the candidates
    other = sensitivity_cache_path("0" * 64, ["conv1"], digits.calibration, config, QuantConfig(act_observer="minmax"))
    assert other != paths["fake"]
