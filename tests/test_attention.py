"""Vision transformers: quantizable attention, matmul policies, ranking-aware calibration,
attention-ranking sensitivity, the matmul genes of a search space and the ViT training recipe."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from timm.layers import Attention

from mpsearch.algorithms.space import BoundSpace, SearchSpace
from mpsearch.config import SIX_EPOCH_SCALES, QuantConfig, TrainConfig
from mpsearch.errors import UserError
from mpsearch.models.zoo import VIT_RECIPE, create_model, default_recipe, is_vision_transformer
from mpsearch.policy import LayerPrecision, Policy, is_matmul, uniform_policy
from mpsearch.quant import QuantizedModel, fake_quantize, quantizable_layers, quantizable_matmuls
from mpsearch.quant.attention import QuantAttention, swap_attention
from mpsearch.quant.qk_calibration import QK_CALIBRATIONS, RankingAwareQK, score_losses
from mpsearch.sensitivity import AttentionRankingEstimator, SensitivityConfig, kendall_tau_rows


@pytest.fixture(scope="module")
def vit(digits):
    """An untrained test_vit for 8x8 digits (2x2 patches: 16 tokens + class token, 6 blocks)."""
    torch.manual_seed(0)
    return create_model("test_vit", digits.info).eval()


@pytest.fixture(scope="module")
def images(digits):
    return torch.cat([x for x, _ in digits.calibration.batches(64)])[:64]


@pytest.fixture(scope="module")
def calibrated(vit, digits):
    qm = QuantizedModel(vit)
    qm.calibrate(x for x, _ in digits.calibration.batches(128))
    return qm


def _policy(layers: dict[str, LayerPrecision]) -> Policy:
    return Policy(model="test_vit", dataset="digits", layers=layers)


# -- the quantizable attention module --------------------------------------------------------------
def test_quant_attention_computes_what_timm_attention_computes():
    torch.manual_seed(0)
    timm_attn = Attention(dim=48, num_heads=3, qkv_bias=True).eval()
    x = torch.randn(4, 17, 48)
    reference = timm_attn(x)
    ours = QuantAttention(timm_attn).eval()
    assert torch.equal(ours(x), reference)  # nothing to quantize: timm's fused kernel, bit-identical
    ours.record = []  # forces the explicit path (q·kᵀ, softmax, ·v), which quantization uses
    explicit = ours(x)
    assert torch.allclose(explicit, reference, atol=1e-6, rtol=1e-5)
    assert ours.record[0].shape == (4, 3, 17, 17)
    assert torch.allclose(ours.record[0].sum(-1), torch.ones(4, 3, 17))
    with pytest.raises(TypeError):
        QuantAttention(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def test_swapping_keeps_names_outputs_and_the_original_model(vit, images):
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    reference = vit(images)
    qm = QuantizedModel(vit)
    assert all(type(m) is Attention for m in vit.modules() if "Attention" in type(m).__name__)  # original untouched
    assert sum(isinstance(m, QuantAttention) for m in qm.module.modules()) == len(vit.blocks)
    assert set(qm.float_state_dict()) == set(before)  # every parameter keeps its name
    assert torch.equal(qm(images), reference)
    # the matmuls are policy layers, in execution order between qkv and proj
    assert qm.policy_layers[:5] == ["patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.attn.matmul_qk",
                                    "blocks.0.attn.matmul_av", "blocks.0.attn.proj"]
    assert qm.matmul_names == quantizable_matmuls(vit) and qm.layer_names == quantizable_layers(vit)
    attentions = [f"blocks.{i}.attn" for i in range(len(vit.blocks))]
    assert swap_attention(qm.module) == {n: qm.module.get_submodule(n) for n in attentions}  # already swapped: kept


def test_a_quantized_matmul_fake_quantizes_both_operands(calibrated, images):
    name = "blocks.0.attn.matmul_qk"
    calibrated.apply(_policy({name: LayerPrecision(weight_bits=4, act_bits=6, granularity="per-tensor")}))
    matmul = calibrated.matmuls[name]
    assert matmul.first.bits == 6 and matmul.second.bits == 4
    seen = []
    matmul.hooks.append(lambda q, k: seen.append((q, k)))
    try:
        calibrated(images)
    finally:
        matmul.hooks.clear()
    q, k = seen[0]
    out_q, out_k = matmul(q, k)
    assert torch.equal(out_q, fake_quantize(q, matmul.first)) and torch.equal(out_k, fake_quantize(k, matmul.second))
    assert (out_q - q).abs().max() > 0
    # attention probabilities are never negative: their quantizer uses the unsigned grid
    calibrated.apply(_policy({"blocks.0.attn.matmul_av": LayerPrecision(8, 8, granularity="per-tensor")}))
    first = calibrated.matmuls["blocks.0.attn.matmul_av"].first
    assert (first.qmin, first.qmax) == (0, 255) and int(first.zero_point) == 0
    assert calibrated.matmuls[name].first is None  # a layer the policy does not list runs float32


def test_matmul_quantization_moves_the_output_and_per_channel_is_refused(calibrated, images, vit):
    with torch.no_grad():
        reference = vit(images)
    errors = {}
    for bits in (8, 4):
        layers = {n: LayerPrecision(bits, bits, granularity="per-tensor") for n in calibrated.matmul_names}
        calibrated.apply(_policy(layers))
        with torch.no_grad():
            errors[bits] = float((calibrated(images) - reference).pow(2).mean())
    assert 0 < errors[8] < errors[4]
    with pytest.raises(UserError, match=r"policy.layers.blocks.0.attn.matmul_qk.granularity: .*per tensor"):
        calibrated.apply(_policy({"blocks.0.attn.matmul_qk": LayerPrecision(8, 8)}))


def test_uniform_policies_run_matmuls_at_the_activation_width(calibrated):
    layers = calibrated.policy_layers
    w4a8 = uniform_policy("w4a8", model="test_vit", dataset="digits", layers=layers)
    assert w4a8.layers["blocks.1.attn.matmul_av"] == LayerPrecision(8, 8, granularity="per-tensor")
    assert w4a8.layers["blocks.1.attn.qkv"] == LayerPrecision(4, 8)
    weights_only = uniform_policy("w8", model="test_vit", dataset="digits", layers=layers)
    assert not any(is_matmul(n) for n in weights_only.layers)  # no activations quantized, matmuls float
    assert w4a8.layers[layers[0]] == LayerPrecision(8, 8) and w4a8.layers[layers[-1]] == LayerPrecision(8, 8)


# -- q/k calibration methods -----------------------------------------------------------------------
def _qk_samples():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(8, 2, 16, 8, generator=gen)
    k = torch.randn(8, 2, 16, 8, generator=gen)
    k[..., 0] *= 4  # one outlier channel: a min-max grid wastes levels on it
    return q * 8**-0.5, k


def _start(x: torch.Tensor, bits: int):
    from mpsearch.quant import qparams_from_range

    return qparams_from_range(x.min(), x.max(), bits, symmetric=True, signed=True)


@pytest.mark.parametrize("name", QK_CALIBRATIONS.names())
def test_qk_calibration_contract(name):
    """Every method: per-tensor qparams at the asked widths, deterministic, no worse than its start."""
    q, k = _qk_samples()
    method = QK_CALIBRATIONS.get(name)()
    start = (_start(q, 4), _start(k, 4))
    samples = (q, k) if method.needs_samples else (None, None)
    chosen = method.choose(*samples, *start)
    again = QK_CALIBRATIONS.get(name)().choose(*samples, *start)
    scores = q @ k.transpose(-2, -1)
    for qp, ref in zip(chosen, start):
        assert qp.axis is None and qp.bits == ref.bits and (qp.qmin, qp.qmax) == (ref.qmin, ref.qmax)
    assert all(torch.equal(a.scale, b.scale) for a, b in zip(chosen, again))

    def loss(qq, kq):
        mse, hinge = score_losses(scores, fake_quantize(q, qq) @ fake_quantize(k, kq).transpose(-2, -1))
        return mse + hinge

    assert loss(*chosen) <= loss(*start) + 1e-12


def test_ranking_aware_calibration_keeps_more_pairs_in_order():
    q, k = _qk_samples()
    start = (_start(q, 4), _start(k, 4))
    scores = q @ k.transpose(-2, -1)

    def measured(qparams):
        approx = fake_quantize(q, qparams[0]) @ fake_quantize(k, qparams[1]).transpose(-2, -1)
        return score_losses(scores, approx)[1], float(kendall_tau_rows(scores, approx).mean())

    method = RankingAwareQK()
    hinge_start, tau_start = measured(start)
    hinge_ranked, tau_ranked = measured(method.choose(q, k, *start))
    hinge_mse, tau_mse = measured(RankingAwareQK(ranking_weight=0.0).choose(q, k, *start))  # squared error alone
    assert tau_ranked > tau_start + 0.05 and hinge_ranked < 0.5 * hinge_start  # min-max ranges: 0.74 -> 0.84
    assert hinge_ranked < hinge_mse and tau_ranked > tau_mse  # the ranking term, not only the search, helps
    assert method.last_loss[1] < method.last_loss[0]


def test_ranking_aware_calibration_in_a_quantized_model(vit, digits, images):
    batches = [x for x, _ in digits.calibration.batches(128)]
    models = {}
    for method in ("observer", "ranking"):
        qm = QuantizedModel(vit, config=QuantConfig(attention_calibration=method, qk_images=16))
        qm.calibrate(batches)
        qm.apply(uniform_policy("w8a4", model="test_vit", dataset="digits", layers=qm.policy_layers))
        models[method] = qm
    name = "blocks.0.attn.matmul_qk"
    assert models["ranking"].qk_samples[name][0].shape[0] == 16 and not models["observer"].qk_samples
    ranked, plain = models["ranking"].matmuls[name], models["observer"].matmuls[name]
    assert (ranked.first.scale, ranked.second.scale) != (plain.first.scale, plain.second.scale)
    # the softmax·v matmul is calibrated the same way by both
    assert torch.equal(models["ranking"].matmuls["blocks.0.attn.matmul_av"].first.scale,
                       models["observer"].matmuls["blocks.0.attn.matmul_av"].first.scale)
    assert torch.isfinite(models["ranking"](images)).all()
    with pytest.raises(UserError, match="unknown attention calibration method 'rank'"):
        QuantizedModel(vit, config=QuantConfig(attention_calibration="rank"))


# -- attention-ranking sensitivity ------------------------------------------------------------------
def test_kendall_tau_matches_its_definition():
    scipy_stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(1)
    a, b = torch.rand(6, 9, generator=gen), torch.rand(6, 9, generator=gen)
    expected = [scipy_stats.kendalltau(a[i], b[i]).statistic for i in range(6)]
    assert kendall_tau_rows(a, b).tolist() == pytest.approx(expected, abs=1e-12)
    assert kendall_tau_rows(a, a).tolist() == [1.0] * 6 and kendall_tau_rows(a, -a).tolist() == [-1.0] * 6
    tied = torch.tensor([[0.5, 0.5, 0.2, 0.1]])  # τ-b: ties do not keep a row from matching itself
    assert kendall_tau_rows(tied, tied).item() == 1.0
    assert kendall_tau_rows(tied, torch.tensor([[0.6, 0.5, 0.2, 0.1]])).item() == pytest.approx(
        scipy_stats.kendalltau([0.5, 0.5, 0.2, 0.1], [0.6, 0.5, 0.2, 0.1]).statistic)
    assert kendall_tau_rows(torch.full((1, 4), 0.25), torch.full((1, 4), 0.25)).item() == 1.0


def test_attention_ranking_sensitivity_on_a_vit(vit, digits):
    last = f"blocks.{len(vit.blocks) - 1}"
    layers = ["blocks.0.attn.qkv", "blocks.0.mlp.fc2", f"{last}.attn.proj", f"{last}.mlp.fc2"]
    config = SensitivityConfig(estimator="attention-ranking", bits=(2, 8), batches=1, batch_size=64)
    df = AttentionRankingEstimator().estimate(vit, layers, digits.calibration, config, quant=QuantConfig())
    table = df.pivot(index="layer", columns="bits", values="score")
    assert (df["score"] == 1 - df["kendall_tau"]).all()
    # block 0's layers reorder the later blocks' attention (qkv also its own); 2 bits more than 8
    assert table.loc["blocks.0.attn.qkv", 2] > table.loc["blocks.0.attn.qkv", 8] > 0
    assert table.loc["blocks.0.mlp.fc2", 2] > table.loc["blocks.0.mlp.fc2", 8] > 0
    # layers after the last attention map reorder nothing
    assert table.loc[f"{last}.attn.proj"].tolist() == [0.0, 0.0]
    assert table.loc[f"{last}.mlp.fc2"].tolist() == [0.0, 0.0]


def test_hessian_and_empirical_sensitivity_run_on_a_vit(vit, digits):
    """The fused attention kernel has no double backward; the Hessian estimator must not need it."""
    from mpsearch.sensitivity import EmpiricalEstimator, HessianEstimator

    layers = ["blocks.0.attn.qkv", "blocks.1.mlp.fc1"]
    config = SensitivityConfig(bits=(2, 8), batches=1, batch_size=32, min_probes=2, max_probes=4)
    for estimator in (HessianEstimator(), EmpiricalEstimator()):
        table = estimator.estimate(vit, layers, digits.calibration, config, quant=QuantConfig())
        table = table.pivot(index="layer", columns="bits", values="score")
        assert (table[2] > table[8]).all() and (table[8] > 0).all(), type(estimator).__name__


# -- search space ----------------------------------------------------------------------------------
def _vit_space(**fields) -> SearchSpace:
    base = dict(weight_bits=(4, 8), act_bits=(8,), matmul_bits=(4, 8),
                pinned={"first": LayerPrecision(8, 8), "last": LayerPrecision(8, 8)})
    return SearchSpace(**{**base, **fields})


def test_a_space_gives_each_matmul_one_gene(calibrated):
    layers = calibrated.policy_layers
    space = BoundSpace(_vit_space(), layers)
    matmul_genes = [g for g in space.genes if g.operand == "matmul"]
    assert [g.name for g in matmul_genes] == [f"m:{n}" for n in calibrated.matmul_names]
    x = space.uniform(8, 8)
    x[[i for i, g in enumerate(space.genes) if g.name == "m:blocks.1.attn.matmul_qk"][0]] = 0
    decoded = space.decode(x)
    assert decoded["blocks.1.attn.matmul_qk"] == LayerPrecision(4, 4, granularity="per-tensor")
    assert decoded["blocks.1.attn.matmul_av"] == LayerPrecision(8, 8, granularity="per-tensor")
    assert space.encode(decoded).tolist() == x.tolist()
    # the decoded policy runs
    calibrated.apply(_policy(decoded))
    assert calibrated.matmuls["blocks.1.attn.matmul_qk"].first.bits == 4
    # without matmul_bits the matmuls are not searched and stay float32
    plain = BoundSpace(_vit_space(matmul_bits=()), layers)
    assert not any(g.operand == "matmul" for g in plain.genes)
    assert plain.decode(plain.uniform(4, 8))["blocks.0.attn.matmul_qk"].is_float
    assert SearchSpace.from_dict(_vit_space().to_dict()) == _vit_space()
    assert "matmul_bits" not in _vit_space(matmul_bits=()).to_dict()


def test_space_errors_for_matmuls(calibrated):
    layers = calibrated.policy_layers
    with pytest.raises(UserError, match="mixes attention matmuls with layers that have weights"):
        BoundSpace(_vit_space(groups=(("re:blocks\\.0\\.attn\\..*",),)), layers)
    with pytest.raises(UserError, match="attention matmul, which the space does not search"):
        BoundSpace(_vit_space(matmul_bits=(), groups=(("re:.*matmul_qk",),)), layers)
    grouped = BoundSpace(_vit_space(groups=(("re:.*matmul_qk",),)), layers)
    blocks = len(calibrated.matmul_names) // 2
    assert [g.name for g in grouped.genes if g.operand == "matmul"] == [
        "m:group0", *(f"m:blocks.{i}.attn.matmul_av" for i in range(blocks))]
    with pytest.raises(UserError, match=r"space.matmul_bits\[0\]: bits must be an integer from 2 to 8"):
        _vit_space(matmul_bits=(1, 8))


def test_shipped_deit_space_binds_to_deit_tiny(fmnist_small):
    model = create_model("deit_tiny", fmnist_small.info)
    qm_layers = [*quantizable_layers(model), *quantizable_matmuls(model)]
    order = {n: i for i, (n, _) in enumerate(QuantizedModel(model).module.named_modules())}
    space = BoundSpace(SearchSpace.load("deit_tiny"), sorted(qm_layers, key=order.__getitem__))
    assert sum(g.operand == "matmul" for g in space.genes) == 24
    assert sum(g.operand in ("weight", "act") for g in space.genes) == 96


# -- the ViT training recipe -----------------------------------------------------------------------
def test_vision_transformers_get_the_adamw_recipe_and_every_setting_keys_the_cache():
    assert is_vision_transformer("deit_tiny") and is_vision_transformer("test_vit")
    assert not is_vision_transformer("resnet18")
    assert default_recipe("deit_tiny") is VIT_RECIPE and VIT_RECIPE.optimizer == "adamw"
    assert default_recipe("resnet18") == TrainConfig()
    # Cached baselines and sensitivity tables are found by these keys: a changed key retrains
    # every cached baseline, so it changes only on purpose.
    assert TrainConfig().key().startswith("2cee4c30b43a0363")
    assert QuantConfig().key().startswith("bc3fd5bae94cbace")
    six_epochs = {"epochs": 6, "image_scales": SIX_EPOCH_SCALES, "keep_fraction": 1.0}
    changed = [replace(TrainConfig(), optimizer="adamw"), replace(TrainConfig(), **six_epochs),
               replace(TrainConfig(), batch_norm_images=128)]
    assert len({TrainConfig().key(), *(r.key() for r in changed)}) == 1 + len(changed)
    assert QuantConfig(attention_calibration="ranking").key() != QuantConfig().key()
    assert QuantConfig(qk_images=4).key() != QuantConfig().key()
    assert QuantConfig(backend="fake").key() == QuantConfig(backend="int8").key() == QuantConfig().key()
    with pytest.raises(UserError, match="recipe.optimizer"):
        TrainConfig(optimizer="adam")


def test_adamw_recipe_trains_a_vit(digits_vit_baseline, digits):
    from mpsearch.evaluation.metrics import correct_mask

    assert digits_vit_baseline.meta["recipe"]["optimizer"] == "adamw"
    measured = float(correct_mask(digits_vit_baseline.model, digits.val).float().mean())
    assert measured == pytest.approx(digits_vit_baseline.meta["val_accuracy"])
    assert measured > 0.8  # 10 classes: chance is 0.1
