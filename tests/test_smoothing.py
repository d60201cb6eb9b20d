"""SmoothQuant: smoothing is exact in float, and it lowers the error of per-tensor activation
quantization when a few input channels are outliers; the outlier report sees them."""

from __future__ import annotations

import torch
from torch import nn

from mpsearch.config import QuantConfig
from mpsearch.policy import LayerPrecision, Policy
from mpsearch.quant import QuantizedModel
from mpsearch.quant.smoothing import input_divisor, outlier_table, smoothed_weight, smoothing_scales


def test_smoothing_is_exact_in_float():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1)
    x = torch.randn(2, 6, 7, 7) * torch.tensor([1, 40, 1, 1, 3, 1.0]).reshape(1, -1, 1, 1)
    s = smoothing_scales(x.abs().transpose(0, 1).reshape(6, -1).amax(1), conv.weight, 0.5)
    smoothed = nn.functional.conv2d(x / input_divisor(conv, s), smoothed_weight(conv.weight, s), conv.bias, padding=1)
    assert torch.allclose(smoothed, conv(x), atol=1e-5)
    assert s[1] > 3 * s[0]  # the outlier channel is divided the most


def _outlier_model_and_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(512, 16)
    x[:, 3] *= 60.0  # one outlier channel, as in the activations SmoothQuant was made for
    return model, x


def _error(alpha):
    model, x = _outlier_model_and_inputs()
    qm = QuantizedModel(model, config=QuantConfig(act_observer="minmax", smoothquant_alpha=alpha))
    qm.calibrate([x[:256]])
    spec = LayerPrecision(weight_bits=8, act_bits=6)
    qm.apply(Policy(model="m", dataset="d", layers={"0": spec, "2": LayerPrecision(weight_bits=None, act_bits=None)}))
    with torch.no_grad():
        return float((qm(x[256:]) - model(x[256:])).pow(2).mean()), qm


def test_smoothing_lowers_the_error_of_outlier_inputs():
    plain, _ = _error(None)
    smooth, qm = _error(0.5)
    assert smooth < 0.7 * plain, (smooth, plain)  # measured: 0.57 of the unsmoothed error
    assert qm.wrappers["0"].input_divisor is not None and qm.wrappers["2"].input_divisor is None
    table = outlier_table(qm.channel_absmax, {"0": qm.wrappers["0"].layer}, 0.5)
    row = table.iloc[0]
    assert row["top_channel"] == 3 and row["outlier_ratio"] > 30
    assert row["smoothed_outlier_ratio"] < row["outlier_ratio"] / 4
