from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import pandas as pd
import pytest
import torch
from torch import nn

from mpsearch.config import QuantConfig
from mpsearch.errors import UserError
from mpsearch.policy import LayerPrecision, Policy
from mpsearch.quant import QuantizedModel, quantizable_layers, quantize_weight
from mpsearch.sensitivity import (
    ESTIMATORS,
    EmpiricalEstimator,
    HessianEstimator,
    SensitivityConfig,
    canonical_frame,
    compute_sensitivity,
    hutchinson_trace,
    read_sensitivity,
    sensitivity_cache_path,
    sensitivity_table,
    write_sensitivity,
)

# Small enough for a few seconds on 2 CPU cores: 2 batches of 64 digits, at most 12 probes.
FAST = SensitivityConfig(bits=(2, 4, 8), batches=2, batch_size=64, max_probes=12, min_probes=4, tolerance=0.05)
# The shared contract runs every estimator twice: smaller still.
TINY = SensitivityConfig(bits=(2, 8), batches=1, batch_size=64, max_probes=6, min_probes=2, tolerance=0.05)
QUANT = QuantConfig()


@pytest.fixture(scope="module", autouse=True)
def _one_thread(digits_baseline):
    """One torch thread for this module's thousands of tiny autograd ops.

    The digits model gains nothing from a second thread, and on a shared 2-core machine a busy
    neighbour makes each multi-threaded op wait for a descheduled worker (seen: 95 s instead of
    2 s for one Hessian estimate). The baseline is trained first, under the session's setting.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# -- config -----------------------------------------------------------------------------------
def test_config_round_trips_through_json_and_keys_change_with_settings():
    cfg = SensitivityConfig(estimator="empirical", bits=(3, 5), metric="loss", seed=7)
    again = SensitivityConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.key() == cfg.key()
    assert SensitivityConfig.from_dict(SensitivityConfig().to_dict()) == SensitivityConfig()
    assert replace(cfg, seed=8).key() != cfg.key()
    assert replace(cfg, bits=(3, 6)).key() != cfg.key()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"estimator": "pyhessian"}, "unknown sensitivity estimator 'pyhessian'; choose one of"),
        ({"bits": (8, 4)}, "strictly increasing"),
        ({"bits": (1, 4)}, "from 2 to 8"),
        ({"bits": ()}, "non-empty"),
        ({"metric": "accuracy"}, "metric: must be one of ['kl', 'loss']"),
        ({"min_probes": 10, "max_probes": 5}, "min_probes <= max_probes"),
        ({"batches": 0}, "batches: must be >= 1"),
        ({"tolerance": -0.1}, "tolerance: must be >= 0"),
    ],
)
def test_config_rejects_bad_values_in_one_line(fields, message):
    with pytest.raises(UserError) as exc:
        SensitivityConfig(**fields)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_config_from_dict_rejects_unknown_fields_and_versions():
    with pytest.raises(UserError, match="sensitivity.probes: unknown field"):
        SensitivityConfig.from_dict({"probes": 3})
    with pytest.raises(UserError, match="version 1"):
        SensitivityConfig.from_dict({"version": 2})
    with pytest.raises(UserError, match="bits"):
        SensitivityConfig.from_dict({"bits": "4"})


# -- Hutchinson on Hessians known in closed form ---------------------------------------------------
def test_hutchinson_is_exact_per_probe_for_a_diagonal_hessian():
    # loss = 0.5 * sum(a * w^2): H = diag(a). For Rademacher v, v^T diag(a) v = sum(a) exactly, so
    # the running mean never moves and the estimator stops after min_probes.
    g = torch.Generator().manual_seed(1)
    w1 = torch.randn(3, 4, generator=g).requires_grad_()
    w2 = torch.randn(5, generator=g).requires_grad_()
    a1 = torch.rand(3, 4, generator=g) + 0.5
    a2 = torch.rand(5, generator=g) * 3
    est = hutchinson_trace(
        lambda: 0.5 * (a1 * w1**2).sum() + 0.5 * (a2 * w2**2).sum(), [w1, w2], min_probes=4, max_probes=50, tolerance=0.01
    )
    assert est.traces == pytest.approx((float(a1.sum()), float(a2.sum())), rel=1e-6)
    assert est.probes == 4 and est.converged
    assert est.stderr == pytest.approx((0.0, 0.0), abs=1e-6)


def test_hutchinson_matches_the_exact_trace_of_a_linear_layer_with_quadratic_loss():
    # loss = sum_n 0.5 * ||W x_n||^2 with W 3x4: the Hessian w.r.t. W is I_3 (x) X^T X, trace
    # 3 * ||X||_F^2. It is not diagonal, so single probes scatter; 1000 probes average them out.
    # Two closures (two "batches") whose sum is the loss: their Hessians add.
    torch.manual_seed(0)
    lin = nn.Linear(4, 3, bias=False)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    halves = [x[:3], x[3:]]
    exact = 3 * float((x**2).sum())
    est = hutchinson_trace(
        [lambda h=h: 0.5 * (lin(h) ** 2).sum() for h in halves], [lin.weight], min_probes=1000, max_probes=1000, tolerance=0.0
    )
    assert est.probes == 1000 and not est.converged  # tolerance 0: runs to max_probes
    assert est.traces[0] == pytest.approx(exact, rel=0.05)
    assert abs(est.traces[0] - exact) < 4 * est.stderr[0]  # the reported error bar is honest
    assert est.stderr[0] > 0
    # same seed, same probes, same number; another seed, another number
    again = hutchinson_trace([lambda h=h: 0.5 * (lin(h) ** 2).sum() for h in halves], [lin.weight],
                             min_probes=20, max_probes=20, seed=0)
    other = hutchinson_trace([lambda h=h: 0.5 * (lin(h) ** 2).sum() for h in halves], [lin.weight],
                             min_probes=20, max_probes=20, seed=1)
    first20 = hutchinson_trace([lambda h=h: 0.5 * (lin(h) ** 2).sum() for h in halves], [lin.weight],
                               min_probes=20, max_probes=20, seed=0)
    assert again == first20 and other.traces != again.traces


def test_hutchinson_cross_layer_terms_vanish_in_expectation():
    # loss = 0.5 a ||w1||^2 + 0.5 b ||w2||^2 + c (w1 . w2): the off-diagonal block c*I adds
    # +-c per element and probe to each layer's v^T (Hv), zero on average.
    w1 = torch.randn(8, generator=torch.Generator().manual_seed(3)).requires_grad_()
    w2 = torch.randn(8, generator=torch.Generator().manual_seed(4)).requires_grad_()
    a, b, c = 2.0, 0.5, 1.0
    est = hutchinson_trace(
        lambda: 0.5 * a * (w1**2).sum() + 0.5 * b * (w2**2).sum() + c * (w1 * w2).sum(),
        [w1, w2], min_probes=600, max_probes=600,
    )
    assert est.traces[0] == pytest.approx(8 * a, abs=4 * est.stderr[0])
    assert est.traces[1] == pytest.approx(8 * b, abs=4 * est.stderr[1])
    assert max(est.stderr) < 0.3  # sqrt(8) / sqrt(600) ~ 0.12: the check above is not vacuous


def test_hutchinson_parameter_outside_the_loss_has_zero_trace():
    w = torch.randn(4).requires_grad_()
    unused = torch.randn(3).requires_grad_()
    est = hutchinson_trace(lambda: (w**2).sum(), [w, unused], min_probes=2, max_probes=5)
    assert est.traces == pytest.approx((8.0, 0.0))


def test_finite_difference_hessian_vector_products_match_autograd_on_a_smooth_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    params = [net[0].weight, net[2].weight]

    def loss():
        return nn.functional.cross_entropy(net(x), y)

    exact = hutchinson_trace(loss, params, min_probes=4, max_probes=4, hvp="autograd")
    by_differences = hutchinson_trace(loss, params, min_probes=4, max_probes=4, hvp="finite-difference")
    assert all(abs(t) > 1e-3 for t in exact.traces)
    assert by_differences.traces == pytest.approx(exact.traces, rel=1e-6)
    assert all(torch.equal(p, q) for p, q in zip(params, [net[0].weight, net[2].weight]))  # weights restored
    with pytest.raises(ValueError, match="hvp must be one of"):
        hutchinson_trace(loss, params, hvp="exact")


class _ClampHardsigmoid(nn.Module):
    """Hard-sigmoid written with clamp, whose double backward exists: the same function as nn.Hardsigmoid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x + 3, 0, 6) / 6


def _gated_net(activation: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), activation, nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         activation, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


def test_hessian_of_a_net_without_double_backward_falls_back_to_finite_differences(digits, messages):
    """nn.Hardsigmoid has no double backward (MobileNetV3's squeeze-excite gates): the estimator
    takes differences of gradients instead, and gets the traces autograd gets for the same
    function written with clamp."""
    layers = ["0", "2", "6"]
    config = replace(FAST, bits=(4,), max_probes=6, min_probes=6)
    fallback = HessianEstimator().estimate(_gated_net(nn.Hardsigmoid()), layers, digits.calibration, config, quant=QUANT)
    assert any("finite differences" in m and "hardsigmoid" in m.lower() for m in messages)
    exact = HessianEstimator().estimate(_gated_net(_ClampHardsigmoid()), layers, digits.calibration, config, quant=QUANT)
    assert fallback["trace"].abs().min() > 0
    assert list(fallback["trace"]) == pytest.approx(list(exact["trace"]), rel=1e-3)


# -- the digits model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(digits_baseline):
    return digits_baseline.model


@pytest.fixture(scope="module")
def layers(model):
    return quantizable_layers(model)


def _state(model: nn.Module):
    return (
        model.training,
        [(n, p.requires_grad, p.grad is None) for n, p in model.named_parameters()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


@pytest.fixture(scope="module")
def hessian_df(model, layers, digits):
    before = _state(model)
    df = HessianEstimator().estimate(model, layers, digits.calibration, FAST, quant=QUANT)
    after = _state(model)
    assert before[:2] == after[:2]  # requires_grad, .grad and train/eval mode untouched
    assert all(torch.equal(before[2][k], after[2][k]) for k in before[2])
    return canonical_frame(df)


@pytest.fixture(scope="module")
def empirical_df(model, layers, digits):
    df = EmpiricalEstimator().estimate(model, layers, digits.calibration, replace(FAST, estimator="empirical"), quant=QUANT)
    return canonical_frame(df)


def test_hessian_frame_columns_and_hawq_v2_score(hessian_df, model, layers):
    assert list(hessian_df.columns) == [
        "layer", "bits", "score", "trace", "trace_per_param", "trace_stderr", "weight_error", "params", "probes"
    ]
    assert len(hessian_df) == len(layers) * 3
    probes = hessian_df["probes"].iloc[0]
    assert FAST.min_probes <= probes <= FAST.max_probes
    for row in hessian_df.itertuples(index=False):
        w = model.get_submodule(row.layer).weight.detach()
        assert row.params == w.numel()
        assert row.score == pytest.approx(abs(row.trace) / row.params * row.weight_error, rel=1e-12)
        assert row.trace_per_param == pytest.approx(row.trace / row.params, rel=1e-12)
    # the weight error is that of the quantizer policies install (per-channel symmetric minmax)
    first = hessian_df.iloc[0]
    w = model.get_submodule(first["layer"]).weight.detach()
    _, q = quantize_weight(w, int(first["bits"]), per_channel=True, symmetric=True, observer="minmax")
    assert first["weight_error"] == pytest.approx(float(((q - w) ** 2).sum()), rel=1e-5)
    # a trained network sits near a minimum of the loss: the total curvature is positive
    assert hessian_df.drop_duplicates("layer")["trace"].sum() > 0


def test_hessian_score_falls_with_more_bits_for_every_layer(hessian_df):
    table = sensitivity_table(hessian_df)
    assert list(table.columns) == [2, 4, 8]
    nonzero = table[table[8] > 0]
    assert len(nonzero) == len(table)  # every layer has curvature and a quantization error
    assert ((table[2] > table[4]) & (table[4] > table[8])).all(), table
    # halving the bits scales the error by ~4^(bits saved): orders of magnitude between 2 and 8
    assert (table[2] / table[8]).min() > 100


def test_hessian_is_deterministic_for_a_seed(hessian_df, model, layers, digits):
    again = canonical_frame(HessianEstimator().estimate(model, layers, digits.calibration, FAST, quant=QUANT))
    pd.testing.assert_frame_equal(again, hessian_df, check_exact=True)


def test_empirical_kl_is_non_negative_and_larger_at_2_bits(empirical_df, layers):
    assert list(empirical_df.columns) == ["layer", "bits", "score", "kl", "weight_error", "params"]
    assert (empirical_df["kl"] >= 0).all() and (empirical_df["score"] == empirical_df["kl"]).all()
    table = sensitivity_table(empirical_df)
    assert (table[2] > table[8]).mean() >= 0.8, table
    assert table[2].max() > 1e-3  # 2-bit weights visibly change some layer's outputs
    assert table[8].max() < 1e-2  # 8-bit weights barely do


def test_empirical_and_hessian_scores_agree_in_rank(hessian_df, empirical_df):
    rho = hessian_df["score"].corr(empirical_df["score"], method="spearman")
    assert rho > 0.6, rho


def test_empirical_reuses_a_calibrated_qmodel_and_restores_its_policy(model, layers, digits, empirical_df):
    qm = QuantizedModel(model, config=QUANT, layers=layers)
    qm.calibrate(x for x, _ in digits.calibration.batches(128))
    policy = Policy(model="test_resnet", dataset="digits", layers={layers[1]: LayerPrecision(4, 4)})
    qm.apply(policy)
    x = next(digits.val.batches(32))[0]
    before = qm(x)
    df = EmpiricalEstimator().estimate(
        model, layers, digits.calibration, replace(FAST, estimator="empirical"), quant=QUANT, qmodel=qm
    )
    pd.testing.assert_frame_equal(canonical_frame(df), empirical_df, check_exact=True)
    assert qm.policy is policy and torch.equal(qm(x), before)


def test_empirical_loss_metric(model, layers, digits):
    cfg = replace(TINY, estimator="empirical", metric="loss")
    df = canonical_frame(EmpiricalEstimator().estimate(model, layers, digits.calibration, cfg, quant=QUANT))
    assert "loss_increase" in df.columns
    assert (df["score"] == df["loss_increase"].clip(lower=0)).all()
    table = sensitivity_table(df, values="loss_increase")
    assert table[2].mean() > table[8].mean() and table[2].max() > 0.01


@pytest.fixture(scope="module")
def vit(digits):
    """An untrained timm test_vit for the digits images (2x2 patches, 16 tokens)."""
    from mpsearch.models.zoo import create_model

    torch.manual_seed(0)
    return create_model("test_vit", digits.info).eval()


@pytest.mark.parametrize("name", ESTIMATORS.names())
def test_estimator_contract(name, model, layers, digits, vit):
    """Every registered estimator: columns, layers x bits in order, finite >= 0 scores, deterministic."""
    cfg = replace(TINY, estimator=name)
    est = ESTIMATORS.get(name)()
    if est.needs_attention:  # a CNN is refused in one line; the contract is checked on a ViT
        with pytest.raises(UserError, match="needs a model with attention"):
            est.estimate(model, layers, digits.calibration, cfg, quant=QUANT)
        model, layers = vit, quantizable_layers(vit)[:4]
    first = canonical_frame(est.estimate(model, layers, digits.calibration, cfg, quant=QUANT))
    second = canonical_frame(est.estimate(model, layers, digits.calibration, cfg, quant=QUANT))
    assert list(first.columns[:3]) == ["layer", "bits", "score"]
    assert list(zip(first["layer"], first["bits"])) == list(itertools.product(layers, cfg.bits))
    assert first["score"].map(math.isfinite).all() and (first["score"] >= 0).all()
    pd.testing.assert_frame_equal(first, second, check_exact=True)


# -- cache ---------------------------------------------------------------------------------------
def test_compute_sensitivity_caches_per_checkpoint(model, layers, digits, hessian_df, tmp_path, monkeypatch):
    monkeypatch.setenv("MPSEARCH_CACHE", str(tmp_path))
    calls = []

    def fake_estimate(self, *args, **kwargs):
        calls.append(args[3])
        return hessian_df.copy()

    monkeypatch.setattr(HessianEstimator, "estimate", fake_estimate)
    sha = "ab" * 32
    first = compute_sensitivity(model, layers, digits.calibration, FAST, quant=QUANT, checkpoint_sha256=sha)
    path = sensitivity_cache_path(sha, layers, digits.calibration, FAST, QUANT)
    assert path.exists() and path.parent == tmp_path / "sensitivity" / sha
    assert path.name.startswith(f"hessian-{FAST.key()[:12]}-{QUANT.key()[:12]}-")
    second = compute_sensitivity(model, layers, digits.calibration, FAST, quant=QUANT, checkpoint_sha256=sha)
    assert len(calls) == 1  # the second call was a cache hit
    pd.testing.assert_frame_equal(first, second, check_exact=True)  # same dtypes, order, floats
    pd.testing.assert_frame_equal(second, hessian_df, check_exact=True)
    # another seed, layer list or quant config is another entry
    compute_sensitivity(model, layers, digits.calibration, replace(FAST, seed=1), quant=QUANT, checkpoint_sha256=sha)
    assert len(calls) == 2
    assert sensitivity_cache_path(sha, layers[:-1], digits.calibration, FAST, QUANT) != path
    assert sensitivity_cache_path(sha, layers, digits.calibration, FAST, replace(QUANT, weight_observer="mse")) != path
    # without a checkpoint hash nothing identifies the model: computed every time, never stored
    files = sorted(tmp_path.rglob("*"))
    compute_sensitivity(model, layers, digits.calibration, FAST, quant=QUANT, checkpoint_sha256=None)
    assert len(calls) == 3 and sorted(tmp_path.rglob("*")) == files
    assert not [p for p in files if p.name.endswith(".tmp")]


def test_compute_sensitivity_rejects_bad_input(model, layers, digits):
    with pytest.raises(UserError, match="'nope' is not a quantizable"):
        compute_sensitivity(model, ["nope"], digits.calibration, TINY, quant=QUANT, checkpoint_sha256=None)
    with pytest.raises(UserError, match="at least one layer"):
        compute_sensitivity(model, [], digits.calibration, TINY, quant=QUANT, checkpoint_sha256=None)
    with pytest.raises(UserError, match="hex digits"):
        compute_sensitivity(model, layers, digits.calibration, TINY, quant=QUANT, checkpoint_sha256="../x")


# -- report --------------------------------------------------------------------------------------
def test_sensitivity_table_keeps_layer_order(hessian_df, layers):
    table = sensitivity_table(hessian_df)
    assert list(table.index) == layers and table.shape == (len(layers), 3)
    row = hessian_df.iloc[4]
    assert table.loc[row["layer"], row["bits"]] == row["score"]


def test_write_sensitivity_writes_a_chart_and_a_csv_that_reads_back(hessian_df, tmp_path):
    paths = write_sensitivity(hessian_df, tmp_path / "out", "Hessian sensitivity: test_resnet / digits")
    assert paths["csv"].name == "hessian-sensitivity-test-resnet-digits.csv"
    png = paths["png"].read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    pd.testing.assert_frame_equal(read_sensitivity(paths["csv"]), hessian_df, check_exact=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths.values())
