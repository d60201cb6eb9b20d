"""PTQ weight-rounding methods: one contract for all, and each one beats round-to-nearest on the
error it exists to reduce (the layer's output error on calibration inputs), deterministically."""

from __future__ import annotations

import pytest
import torch

from mpsearch.config import QuantConfig
from mpsearch.errors import UserError
from mpsearch.quant import QuantizedModel, quantize_weight
from mpsearch.quant.ptq import PTQ_METHODS, get_ptq, input_columns
from mpsearch.quant.ptq.adaround import AdaRound
from mpsearch.quant.ptq.base import grid_of

METHODS = PTQ_METHODS.names()


@pytest.fixture(scope="module")
def calibrated(digits_baseline, digits):
    """test_resnet on digits with every layer's calibration input columns captured."""
    qm = QuantizedModel(digits_baseline.model, config=QuantConfig(ptq="gptq", ptq_columns=512))
    qm.calibrate(x for x, _ in digits.calibration.batches(128))
    return qm


def _grid(layer, bits):
    return quantize_weight(layer.weight, bits, per_channel=True, symmetric=True, observer="minmax")[0]


def _output_error(layer, wq, columns):
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    return float(((w - wq.reshape(w.shape)) @ columns).pow(2).sum())


def test_registry_and_unknown_names():
    assert {"rtn", "gptq", "adaround"} <= set(METHODS)
    with pytest.raises(UserError, match="unknown PTQ method 'brecq2'"):
        get_ptq("brecq2")


def test_columns_are_what_the_weight_multiplies(calibrated):
    name = next(n for n in calibrated.layer_names if isinstance(calibrated.wrappers[n].layer, torch.nn.Conv2d))
    conv = calibrated.wrappers[name].layer
    x = torch.randn(2, conv.in_channels, 8, 8)
    out = torch.nn.functional.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation)
    cols = input_columns(conv, x)
    flat = conv.weight.reshape(conv.out_channels, -1) @ cols  # (out, batch * positions)
    assert torch.allclose(flat.reshape(conv.out_channels, 2, -1).transpose(0, 1).reshape(out.shape), out, atol=1e-5)
    assert calibrated.layer_columns[name].shape == (conv.weight[0].numel(), 512)


@pytest.mark.parametrize("method", METHODS)
def test_contract_weights_on_the_grid_same_shape_deterministic(calibrated, method):
    rounding, bits = get_ptq(method, seed=0), 3
    names = calibrated.layer_names
    for name in names[:2] + names[-1:]:  # the stem, a block conv, the linear head
        layer = calibrated.wrappers[name].layer
        qp = _grid(layer, bits)
        wq = rounding.quantize(layer, qp, calibrated.layer_columns[name])
        assert wq.shape == layer.weight.shape and wq.dtype == layer.weight.dtype
        scale, zero = grid_of(qp, wq.shape[0])
        levels = wq.reshape(wq.shape[0], -1) / scale + zero
        assert torch.allclose(levels, levels.round(), atol=1e-3), f"{method} left {name} off its grid"
        assert levels.min() >= qp.qmin - 1e-3 and levels.max() <= qp.qmax + 1e-3
        assert torch.equal(wq, get_ptq(method, seed=0).quantize(layer, qp, calibrated.layer_columns[name]))


@pytest.mark.slow
# brecq's layer-wise path is AdaRound. AdaRound at 4 bits only and 900 iterations a layer instead
# of 1,500: 16-23 s instead of 30-40 s a case, and still 0.39x round-to-nearest's error (0.29x at
# 1,500; at 2 bits it gains least, 0.89x at 1,500 and 0.95x at 400).
@pytest.mark.parametrize(("method", "bits"), [(m, b) for m in METHODS if m not in ("rtn", "brecq")
                                              for b in ((4,) if m == "adaround" else (2, 4))])
def test_each_method_lowers_the_output_error_of_round_to_nearest(calibrated, method, bits):
    rtn, other = get_ptq("rtn"), (AdaRound(iters=900) if method == "adaround" else get_ptq(method))
    ours = nearest = 0.0
    for name in calibrated.layer_names:
        layer, columns = calibrated.wrappers[name].layer, calibrated.layer_columns[name]
        qp = _grid(layer, bits)
        e_rtn = _output_error(layer, rtn.quantize(layer, qp, None), columns)
        e_ours = _output_error(layer, other.quantize(layer, qp, columns), columns)
        assert e_ours <= e_rtn * 1.02 + 1e-9, f"{method} at {bits} bits: {name} error {e_ours:.4g} > round-to-nearest {e_rtn:.4g}"
        ours, nearest = ours + e_ours, nearest + e_rtn
    # Measured on this model: GPTQ 0.18 / 0.16 of round-to-nearest's error at 2 / 4 bits, AdaRound 0.39 at 4 bits.
    assert ours < (0.95 if bits == 2 else 0.5) * nearest, \
        f"{method} at {bits} bits: total output error {ours:.4g} vs round-to-nearest {nearest:.4g}"


def test_the_quantizer_uses_the_configured_method_and_caches_it(calibrated, digits_baseline, digits):
    from mpsearch.policy import uniform_policy

    policy = uniform_policy("w2a8", model="test_resnet", dataset="digits", layers=calibrated.layer_names, checkpoint_sha256=None)
    calibrated.apply(policy)
    name = calibrated.layer_names[1]
    layer = calibrated.wrappers[name].layer
    expected = get_ptq("gptq").quantize(layer, _grid(layer, 2), calibrated.layer_columns[name])
    assert torch.equal(calibrated.wrappers[name].quantized_weight, expected)
    before = calibrated.cache_sizes()["weights"]
    calibrated.apply(policy)
    assert calibrated.cache_sizes()["weights"] == before  # switching back costs no re-quantization


def test_bias_correction_cancels_the_mean_output_error(digits_baseline, digits):
    from mpsearch.policy import uniform_policy

    qm = QuantizedModel(digits_baseline.model, config=QuantConfig(bias_correction=True))
    batches = [x for x, _ in digits.calibration.batches(128)]
    name = next(n for n in qm.layer_names if isinstance(qm.wrappers[n].layer, torch.nn.Conv2d) and qm.wrappers[n].layer.padding != (0, 0))
    seen = []
    hook = qm.wrappers[name].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    qm.calibrate(batches)
    hook.remove()
    layer = qm.wrappers[name].layer
    X = torch.cat([input_columns(layer, x) for x in seen], dim=1)  # every calibration column, padding included
    assert torch.allclose(qm.mean_columns[name], X.mean(dim=1), atol=1e-5)

    qm.apply(uniform_policy("w3:all", model="test_resnet", dataset="digits", layers=qm.layer_names))
    wrapper = qm.wrappers[name]
    W = layer.weight.detach().reshape(layer.out_channels, -1)
    error = (W - wrapper.quantized_weight.reshape(W.shape)) @ X  # output error before the bias shift
    shift = wrapper.quantized_bias - (layer.bias.detach() if layer.bias is not None else 0)
    corrected = error - shift[:, None]
    assert corrected.mean(dim=1).abs().max() < 1e-4 < error.mean(dim=1).abs().max()
    assert corrected.pow(2).sum() < error.pow(2).sum()
    # Off by default: the layer's own bias is used.
    plain = QuantizedModel(digits_baseline.model)
    plain.calibrate(batches)
    plain.apply(uniform_policy("w3:all", model="test_resnet", dataset="digits", layers=plain.layer_names))
    assert plain.wrappers[name].quantized_bias is None and not plain.mean_columns


@pytest.mark.slow
def test_brecq_reconstructs_blocks_better_than_round_to_nearest(digits_baseline, digits):
    from mpsearch.policy import uniform_policy
    from mpsearch.quant.ptq.brecq import BRECQ

    batches = [x for x, _ in digits.calibration.batches(128)]

    def block_errors(ptq):
        qm = QuantizedModel(digits_baseline.model, config=QuantConfig(ptq=ptq, ptq_columns=512))
        if ptq == "brecq":
            qm.rounding = BRECQ(seed=0, iters=300, block_iters=150)  # shorter than the defaults, same algorithm
        qm.calibrate(batches)
        errors, seen = [], []
        qm.apply(uniform_policy("w3:all", model="test_resnet", dataset="digits", layers=qm.layer_names))
        weights = {n: w.quantized_weight.clone() for n, w in qm.wrappers.items()}
        for block in ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]:
            module = qm.module.get_submodule(block)
            x = torch.cat(batches)
            hook = module.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
            saved = {n: (w.weight_qparams, w.quantized_weight) for n, w in qm.wrappers.items()}  # weights only: w3:all
            for w in qm.wrappers.values():
                w.set_quantizers(None, None)
            with torch.no_grad():
                qm(x)
                reference = module(seen[-1])
                for n, w in qm.wrappers.items():
                    w.set_quantizers(saved[n], None)
                errors.append(float((module(seen[-1]) - reference).pow(2).sum()))
            hook.remove()
        return errors, weights, qm

    nearest, _, _ = block_errors("rtn")
    ours, weights, qm = block_errors("brecq")
    assert set(qm.blocks) == {"layer1.0", "layer2.0", "layer3.0", "layer4.0"}
    # Measured: 0.75 of round-to-nearest's block-output error summed over the blocks with this short
    # schedule (0.49 with the default 1500 AdaRound steps per layer).
    assert sum(ours) < 0.85 * sum(nearest), (ours, nearest)
    assert all(o <= n * 1.001 for o, n in zip(ours, nearest))
    again, weights_again, _ = block_errors("brecq")
    assert again == ours and all(torch.equal(weights[n], weights_again[n]) for n in weights)
