from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mpsearch.config import QuantConfig
from mpsearch.errors import UserError
from mpsearch.policy import LayerPrecision, Policy, uniform_policy
from mpsearch.quant import (
    ActivationStats,
    QuantizedModel,
    fake_quantize,
    get_observer,
    integer_range,
    qparams_from_range,
    quantize_weight,
    register_observer,
)


def test_integer_ranges():
    assert integer_range(8, True) == (-128, 127)
    assert integer_range(4, False) == (0, 15)
    assert integer_range(2, True) == (-2, 1)
    with pytest.raises(ValueError):
        integer_range(1, True)
    with pytest.raises(ValueError):
        integer_range(9, False)


def test_fake_quantize_symmetric_signed_by_hand():
    # 4-bit signed symmetric over [-1.4, 1.4]: scale = 1.4 / 7 = 0.2, grid -8..7.
    qp = qparams_from_range(torch.tensor(-1.0), torch.tensor(1.4), 4, symmetric=True, signed=True)
    assert qp.scale.item() == pytest.approx(0.2)
    assert qp.zero_point.item() == 0
    x = torch.tensor([0.0, 0.29, -0.31, 1.39, 2.0, -3.0])
    # 0.29/0.2=1.45->1 -> 0.2 ; -0.31/0.2=-1.55->-2 -> -0.4 ; 1.39/0.2=6.95->7 -> 1.4 ;
    # 2.0 -> 10 clamps to 7 -> 1.4 ; -3.0 -> -15 clamps to -8 -> -1.6
    expected = torch.tensor([0.0, 0.2, -0.4, 1.4, 1.4, -1.6])
    assert torch.allclose(fake_quantize(x, qp), expected, atol=1e-6)


def test_fake_quantize_asymmetric_unsigned_by_hand():
    # 2-bit asymmetric over [-0.5, 1.0]: scale = 1.5 / 3 = 0.5, zero point = round(0 - (-0.5)/0.5) = 1.
    qp = qparams_from_range(torch.tensor(-0.5), torch.tensor(1.0), 2, symmetric=False, signed=False)
    assert qp.scale.item() == pytest.approx(0.5)
    assert qp.zero_point.item() == 1
    x = torch.tensor([-0.6, -0.2, 0.3, 0.8, 5.0])
    # q = clamp(round(x/0.5)+1, 0, 3): -0.2 -> 1 -> 0.0 ; 0.3 -> round(0.6)=1 -> 2 -> 0.5 ; 0.8 -> 2+1=3 -> 1.0
    expected = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.0])
    assert torch.allclose(fake_quantize(x, qp), expected, atol=1e-6)


def test_unsigned_grid_uses_every_level_for_non_negative_inputs():
    # A post-ReLU input at 2 bits: unsigned symmetric scale = 3/3 = 1 -> levels 0,1,2,3 (a signed
    # grid would keep only 0 and 1 positive levels: the bit the research project wasted).
    qp = qparams_from_range(torch.tensor(0.0), torch.tensor(3.0), 2, symmetric=True, signed=False)
    assert torch.equal(fake_quantize(torch.tensor([0.0, 1.2, 2.2, 3.0]), qp), torch.tensor([0.0, 1.0, 2.0, 3.0]))


@pytest.mark.parametrize("bits", [2, 4, 5, 8])
@pytest.mark.parametrize("symmetric,signed", [(True, True), (True, False), (False, False)])
def test_evaluation_kernel_is_bit_identical_to_pytorchs(bits, symmetric, signed):
    # The no-grad path (vectorized, into a reused buffer) must give exactly PyTorch's fake-quant
    # values, including at rounding ties (x exactly halfway between two levels).
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 5, 7, 11, generator=g) * 2
    qp = qparams_from_range(x.min() * 0.6, x.max() * 0.7, bits, symmetric=symmetric, signed=signed)
    ties = (torch.arange(-40, 40) + 0.5) * qp.scale
    for t in (x, ties):
        ref = torch.fake_quantize_per_tensor_affine(t, float(qp.scale), int(qp.zero_point), qp.qmin, qp.qmax)
        with torch.no_grad():
            buffer = torch.full_like(t, float("nan"))
            out = fake_quantize(t, qp, out=buffer)
            assert out.data_ptr() == buffer.data_ptr()  # written in place into the buffer given
            assert torch.equal(out, ref)
            assert torch.equal(fake_quantize(t, qp, out=torch.empty(1)), ref)  # a mismatched buffer is not used


def test_per_channel_weight_quantization_by_hand():
    w = torch.tensor([[0.5, -1.0], [0.02, 0.04]])
    qp, wq = quantize_weight(w, 2, per_channel=True, symmetric=True, observer="minmax")
    # row 0: scale 1.0/1 = 1 -> [round(0.5)=0 (half to even), -1] ; row 1: scale 0.04 -> [round(0.5)=0, 1]
    assert torch.allclose(qp.scale, torch.tensor([1.0, 0.04]))
    assert torch.allclose(wq, torch.tensor([[0.0, -1.0], [0.0, 0.04]]))


def test_straight_through_estimator_passes_gradients_inside_the_range():
    qp = qparams_from_range(torch.tensor(-1.0), torch.tensor(1.0), 4, symmetric=True, signed=True)
    x = torch.tensor([0.33, -0.5, 3.0], requires_grad=True)
    fake_quantize(x, qp).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]  # clipped values get no gradient


def test_mse_observer_beats_minmax_at_low_bits_on_heavy_tails():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(1, 20000, generator=g) ** 3  # heavy tails: a few large outliers
    errs = {}
    for name in ("minmax", "mse", "percentile"):
        lo, hi = get_observer(name)(values, 4, True, True)
        qp = qparams_from_range(lo[0], hi[0], 4, symmetric=True, signed=True)
        errs[name] = float((fake_quantize(values[0], qp) - values[0]).pow(2).mean())
    assert errs["mse"] < 0.5 * errs["minmax"]
    assert errs["percentile"] < errs["minmax"]


def test_observer_registry_rejects_duplicates_and_unknown_names():
    with pytest.raises(ValueError):
        register_observer("minmax")(lambda *a: None)
    with pytest.raises(UserError, match="unknown observer"):
        get_observer("nope")


def test_activation_stats_keep_exact_extremes_and_bounded_sample():
    stats = ActivationStats(max_samples=100, seed=0)
    stats.update(torch.arange(1000.0))
    stats.update(-torch.ones(10))
    v = stats.values()
    assert v.shape == (1, 102)
    assert (stats.lo, stats.hi) == (-1.0, 999.0)
    assert not stats.non_negative


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_quantized_model_leaves_the_original_untouched_and_fp32_policy_is_exact():
    net = _tiny_net()
    before = copy.deepcopy(net.state_dict())
    qm = QuantizedModel(net)
    assert qm.layer_names == ["0", "3"]
    x = torch.randn(8, 1, 6, 6)
    qm.calibrate([x])
    qm.apply(uniform_policy("w4a4:all", model="m", dataset="d", layers=qm.layer_names))
    assert not torch.allclose(qm(x), net(x))
    qm.apply(uniform_policy("fp32", model="m", dataset="d", layers=qm.layer_names))
    assert torch.equal(qm(x), net(x))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert isinstance(net[0], nn.Conv2d)  # not wrapped in place


def test_linear_input_after_relu_is_quantized_on_an_unsigned_grid():
    net = _tiny_net()
    qm = QuantizedModel(net)
    qm.calibrate([torch.randn(16, 1, 6, 6)])
    qm.apply(uniform_policy("w8a4:all", model="m", dataset="d", layers=qm.layer_names))
    assert qm.wrappers["3"].act_qparams.qmin == 0 and qm.wrappers["3"].act_qparams.qmax == 15
    assert qm.wrappers["0"].act_qparams.qmin == 0  # asymmetric signed input: unsigned grid + zero point
    assert qm.wrappers["0"].act_qparams.zero_point.item() > 0
    symmetric = Policy(model="m", dataset="d", layers={
        name: LayerPrecision(8, 4, act_symmetric=True) for name in qm.layer_names})
    qm.apply(symmetric)
    assert (qm.wrappers["3"].act_qparams.qmin, qm.wrappers["3"].act_qparams.qmax) == (0, 15)  # post-ReLU: unsigned
    assert (qm.wrappers["0"].act_qparams.qmin, qm.wrappers["0"].act_qparams.qmax) == (-8, 7)  # signed image input
    assert qm.wrappers["0"].act_qparams.zero_point.item() == 0


def test_switching_policies_reuses_cached_weights():
    qm = QuantizedModel(_tiny_net())
    qm.calibrate([torch.randn(8, 1, 6, 6)])
    p4 = uniform_policy("w4a8:all", model="m", dataset="d", layers=qm.layer_names)
    p8 = uniform_policy("w8a8:all", model="m", dataset="d", layers=qm.layer_names)
    qm.apply(p4)
    first = qm.wrappers["0"].quantized_weight
    qm.apply(p8)
    qm.apply(p4)
    assert qm.wrappers["0"].quantized_weight is first  # the same tensor object: no re-quantization
    assert qm.cache_sizes() == {"weights": 4, "activations": 2}


def test_mixed_policy_sets_each_layer_to_its_own_bits():
    qm = QuantizedModel(_tiny_net())
    qm.calibrate([torch.randn(8, 1, 6, 6)])
    policy = Policy(model="m", dataset="d", layers={"0": LayerPrecision(3, 6), "3": LayerPrecision(None, 5)})
    qm.apply(policy)
    assert qm.wrappers["0"].weight_qparams.bits == 3 and qm.wrappers["0"].act_qparams.bits == 6
    assert qm.wrappers["3"].weight_qparams is None and qm.wrappers["3"].act_qparams.bits == 5


def test_training_mode_fake_quantizes_weights_with_gradients():
    qm = QuantizedModel(_tiny_net())
    qm.calibrate([torch.randn(8, 1, 6, 6)])
    qm.apply(uniform_policy("w4a8:all", model="m", dataset="d", layers=qm.layer_names))
    qm.module.train()
    qm(torch.randn(4, 1, 6, 6)).sum().backward()
    assert qm.wrappers["0"].layer.weight.grad is not None


def test_eight_bit_per_channel_keeps_a_trained_tiny_model_within_half_a_point(fmnist_baseline, fmnist_small):
    from mpsearch.evaluation.evaluator import Evaluator

    ev = Evaluator(fmnist_baseline, fmnist_small, quant=QuantConfig())
    result = ev.evaluate(ev.resolve_policy("w8a8:all"), split="val")
    assert result.images == 5000
    assert result.fp32_accuracy > 0.6  # a trained model, not chance (10 %)
    assert abs(result.drop) <= 0.005
    w2 = ev.evaluate(ev.resolve_policy("w2a8:all"), split="val", limit=1000)
    assert w2.accuracy < result.accuracy - 0.05  # and quantization is really applied
