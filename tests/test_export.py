"""ONNX export: the file computes what the fake-quantized model computes, on integer kernels."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import mpsearch
from mpsearch.cli import main
from mpsearch.config import QuantConfig
from mpsearch.export import INTEGER_KERNELS, OnnxClassifier, integer_kernel_ops, read_metadata, to_integer_model
from mpsearch.export.im2col import MATMUL_SUFFIX
from mpsearch.export.onnx import graph_signature
from mpsearch.policy import LayerPrecision, Policy
from mpsearch.quant import QuantizedModel


def _policy(model: torch.nn.Module, shorthand: str, digits) -> Policy:
    """``shorthand`` resolved for ``model`` (every layer listed, ends at 8 bits), by mpsearch.quantize's rules."""
    from mpsearch.api import _quantized

    return _quantized(model, shorthand, digits, None).policy


def _test_images(digits, n: int = 256) -> torch.Tensor:
    return torch.cat([x for x, _ in digits.test.subset(n).batches(128)])


@pytest.fixture(scope="module")
def models(digits_baseline, digits_vit_baseline):
    return {"cnn": digits_baseline.model, "vit": digits_vit_baseline.model}


@pytest.mark.parametrize("kind", ["cnn", "vit"])
@pytest.mark.parametrize("shorthand", ["w8a8", "w4a4"])
def test_the_integer_form_computes_the_fake_quantized_model(models, digits, kind, shorthand):
    quantized = mpsearch.quantize(models[kind], shorthand, digits)
    integer = to_integer_model(quantized)
    x = _test_images(digits)
    with torch.no_grad():
        expected, got = quantized(x), integer(x)
    # Equal up to float32 rounding: batch norms folded into the convolutions' scales, and
    # convolutions in other memory layouts adding in other orders, so an input that lands on a
    # rounding tie can move one step at a quantizer, and that image's logits move a little. Every
    # other image's logits agree to float precision.
    moved = (got - expected).abs().amax(dim=1) > 1e-4 * float(expected.abs().max())
    assert float(moved.float().mean()) <= 0.08
    assert float((got.argmax(1) == expected.argmax(1)).float().mean()) >= 0.99
    assert not torch.allclose(expected, models[kind](x), atol=1e-3)  # quantization changed something


@pytest.mark.parametrize("quant", [{"ptq": "gptq"}, {"bias_correction": True, "smoothquant_alpha": 0.5}],
                         ids=["gptq", "bias-correction+smoothquant"])
def test_the_integer_form_keeps_ptq_weights_and_smoothing(digits_baseline, digits, quant):
    """Rounded by GPTQ, biases corrected, inputs smoothed: the integer form still computes what
    the fake-quantized model computes (its weights are that method's integers)."""
    model = digits_baseline.model
    quantized = mpsearch.quantize(model, "w4a8", digits, quant=QuantConfig(**quant))
    integer = to_integer_model(quantized)
    x = _test_images(digits)
    with torch.no_grad():
        expected, got, rtn = quantized(x), integer(x), mpsearch.quantize(model, "w4a8", digits)(x)
    moved = (got - expected).abs().amax(dim=1) > 1e-4 * float(expected.abs().max())
    # Summed in another order, smoothed inputs land on the other side of a rounding tie a little
    # more often: 7 of 128 images moved on an AMD EPYC, fewer on an Intel Xeon. A lost smoothing or
    # rounding method would move most of them.
    assert float(moved.float().mean()) <= 0.1
    assert float((expected - rtn).abs().max()) > 1e-3  # the method changed the model, and the export kept it


def _all_images(digits) -> torch.Tensor:
    """Every digits image (train, validation, test): agreement between two models of one policy
    needs no held-out images, and 1,797 of them resolve 99.5 % to about 9 images."""
    return torch.cat([x for split in (digits.train, digits.val, digits.test) for x, _ in split.batches(256)])


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_onnxruntime_runs_the_qdq_file_on_integer_kernels_and_agrees_with_fake_quant(models, digits, kind, tmp_path):
    model = models[kind]
    policy = _policy(model, "w4a8", digits)
    off, weight_only = list(policy.layers)[:2]  # the first layer stays fp32: its conv / matmul must stay float
    policy = replace(policy, layers={**policy.layers, off: LayerPrecision(weight_bits=None, act_bits=None),
                                     weight_only: LayerPrecision(weight_bits=4, act_bits=None)})
    quantized = mpsearch.quantize(model, policy, digits)
    path = mpsearch.export_onnx(quantized, tmp_path / f"{kind}.onnx", digits)  # what quantize returned, as it is
    onnx.checker.check_model(str(path), full_check=True)
    assert read_metadata(path)["policy"]["layers"] == policy.to_dict()["layers"]

    x = _all_images(digits)
    with torch.no_grad():
        fake = quantized(x)
    logits = OnnxClassifier(path, threads=1).logits(x)
    assert float((logits.argmax(1) == fake.argmax(1)).float().mean()) >= 0.995
    assert not torch.allclose(logits, model(x).detach(), atol=1e-3)  # the file is quantized, not the float model

    ops = integer_kernel_ops(path, tmp_path / "optimized.onnx")
    modules = dict(model.named_modules())
    quantized = [name for name, p in policy.layers.items() if p.weight_bits and p.act_bits]  # attention matmuls too
    convs = [name for name in quantized if isinstance(modules.get(name), torch.nn.Conv2d)]
    # Every quantized convolution an integer matmul with a float output (mpsearch.export.im2col).
    assert read_metadata(path)["convolutions_as_matmuls"] == len(convs) and not ops.get("QLinearConv")
    assert ops.get("MatMulIntegerToFloat", 0) >= len(convs)
    assert not ops.get("ConvInteger") and not ops.get("MatMulInteger")
    # Every quantized layer and attention matmul on an integer kernel, but the classifier's head
    # (onnxruntime makes a 2-D MatMul with a bias a float Gemm: docs/export.md).
    assert sum(ops.get(op, 0) for op in INTEGER_KERNELS) == len(quantized) - 1
    assert ops.get("QLinearMatMul", 0) + ops.get("MatMulIntegerToFloat", 0) >= (12 if kind == "vit" else 0)
    assert sum(ops.get(op, 0) for op in ("Conv", "FusedConv", "NchwcConv")) >= 1  # the fp32 layer
    assert ops.get("DequantizeLinear", 0) >= 1  # the weight-only layer's integers, dequantized per channel


class _DepthwiseBlock(torch.nn.Module):
    """A stem, a depthwise convolution whose output feeds a residual add, a pointwise projection."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.depthwise = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.project = torch.nn.Conv2d(16, 32, 1)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.project(self.depthwise(x) + x))
        return self.head(x.mean(dim=(2, 3)))


def test_a_grouped_convolution_keeps_qlinearconv_with_a_calibrated_output_grid(digits, tmp_path):
    """The stem and the projection become integer matmuls; the depthwise convolution stays a Conv
    that onnxruntime runs on QLinearConv, its output (into the add) on a calibrated 8-bit grid."""
    torch.manual_seed(0)
    model = _DepthwiseBlock().eval()
    quantized = mpsearch.quantize(model, "w8a8", digits)
    path = mpsearch.export_onnx(quantized, tmp_path / "depthwise.onnx", digits)
    meta = read_metadata(path)
    assert meta["convolutions_as_matmuls"] == 2 and meta["calibrated_output_grids"] == 1
    ops = integer_kernel_ops(path, tmp_path / "optimized.onnx")
    assert ops.get("QLinearConv", 0) == 1 and ops.get("MatMulIntegerToFloat", 0) >= 2 and not ops.get("ConvInteger")
    x = _all_images(digits)
    with torch.no_grad():
        fake = quantized(x)
    logits = OnnxClassifier(path, threads=1).logits(x)
    assert float((logits.argmax(1) == fake.argmax(1)).float().mean()) >= 0.995


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation"),
                         [(3, 1, 1, 1), (3, 2, 1, 1), (1, 2, 0, 1), (3, 1, 2, 2), (4, 4, 0, 1), ((5, 3), (2, 1), (2, 0), 1)])
def test_a_convolution_as_a_matmul_on_integer_patches_computes_the_convolution(kernel, stride, padding, dilation):
    """Every kernel position of every output pixel gathered from the padded integer image: the
    rewrite computes the Conv it replaces (exact integer sums against float ones)."""
    from mpsearch.export.im2col import convolutions_as_matmuls

    rng = np.random.default_rng(0)
    conv = torch.nn.Conv2d(6, 5, kernel, stride=stride, padding=padding, dilation=dilation)
    weight = rng.integers(-127, 128, size=tuple(conv.weight.shape)).astype(np.int8)
    scale, weight_scale = np.float32(0.05), rng.uniform(0.001, 0.01, size=5).astype(np.float32)
    bias = rng.normal(size=5).astype(np.float32)
    h = onnx.helper
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), h.make_node("DequantizeLinear", ["q", "s", "z"], ["xd"]),
             h.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             h.make_node("Conv", ["xd", "wd", "b"], ["y"], strides=list(conv.stride), pads=list(conv.padding) * 2,
                         dilations=list(conv.dilation))]
    stored = [numpy_helper.from_array(v, n) for n, v in
              [("s", np.array(scale)), ("z", np.array(128, np.uint8)), ("w", weight), ("ws", weight_scale),
               ("wz", np.zeros(5, np.int8)), ("b", bias)]]
    graph = h.make_graph(nodes, "conv", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 6, 11, 9])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 5, "h", "w"])], stored)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    x = rng.normal(size=(3, 6, 11, 9)).astype(np.float32) * 3
    import onnxruntime as ort

    def run(proto: onnx.ModelProto) -> np.ndarray:
        return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    expected = run(model)
    assert convolutions_as_matmuls(model) == ["y"]
    onnx.checker.check_model(model, full_check=True)
    assert not any(node.op_type == "Conv" for node in model.graph.node)
    got = run(model)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


def test_export_takes_what_quantize_returned_without_calibrating_again(models, digits, tmp_path, monkeypatch):
    """A quantized module is written as it is (same file as quantizing on export); a float model
    needs a policy, and a quantized one takes none."""
    model = models["cnn"]
    quantized = mpsearch.quantize(model, "w4a4", digits)

    def no_second_calibration(*args, **kwargs):
        raise AssertionError("calibrated again")

    with monkeypatch.context() as patch:
        patch.setattr(QuantizedModel, "calibrate", no_second_calibration)
        direct = mpsearch.export_onnx(quantized, tmp_path / "direct.onnx", digits)
    again = mpsearch.export_onnx(model, tmp_path / "again.onnx", digits, policy="w4a4")
    x = _all_images(digits)[:256]
    assert torch.equal(OnnxClassifier(direct, threads=1).logits(x), OnnxClassifier(again, threads=1).logits(x))
    with pytest.raises(mpsearch.UserError, match="already quantized"):
        mpsearch.export_onnx(quantized, tmp_path / "x.onnx", digits, policy="w8a8")
    with pytest.raises(mpsearch.UserError, match="needs policy="):
        mpsearch.export_onnx(model, tmp_path / "x.onnx", digits)


def test_one_graph_signature_per_set_of_layers_on_integer_kernels(models, digits, tmp_path):
    """Widths <= 8 share the int8 kernels: W8A8 and W4A4 files time alike; a layer left fp32 does not."""
    model = models["cnn"]
    w8a8 = mpsearch.export_onnx(model, tmp_path / "w8a8.onnx", digits, policy="w8a8")
    w4a4 = mpsearch.export_onnx(model, tmp_path / "w4a4.onnx", digits, policy="w4a4")
    policy = _policy(model, "w8a8", digits)
    off = list(policy.layers)[1]
    policy = replace(policy, layers={**policy.layers, off: LayerPrecision(weight_bits=None, act_bits=None)})
    one_float = mpsearch.export_onnx(model, tmp_path / "one-float.onnx", digits, policy=policy)
    assert graph_signature(w8a8) == graph_signature(w4a4) != graph_signature(one_float)


def test_weights_and_inputs_stay_on_the_policys_grid(models, digits, tmp_path):
    """A W4A4 layer holds 16 levels per channel in its int8 container, spread to -64..56 (steps of
    8: a finer int32 bias), and clips its input to 16 levels."""
    model = models["cnn"]
    path = mpsearch.export_onnx(model, tmp_path / "w4a4.onnx", digits, policy="w4a4")
    graph = onnx.load(str(path)).graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}
    # The convolutions' integers, as the matmuls hold them (kh*kw*C rows, a column per channel).
    weights = [initializers[producers[n.input[1]].input[0]].T for n in graph.node if n.op_type == "MatMul" and MATMUL_SUFFIX in n.name]
    assert all(w.dtype == np.int8 for w in weights)
    def four_bit(w: np.ndarray) -> bool:
        """Each channel's integers, divided by their spread (a power of two), lie in [-8, 8]."""
        channels = w.reshape(w.shape[0], -1).astype(int)
        spread = np.gcd.reduce(np.abs(channels), axis=1).clip(min=1)
        return bool(np.all(np.abs(channels) <= 8 * spread[:, None]))

    narrow = [w for w in weights if four_bit(w)]
    assert len(narrow) == len(weights) - 1  # every conv but the first (8 bits) is 4-bit
    for w in narrow:
        channel_max = np.abs(w.reshape(w.shape[0], -1).astype(int)).max(axis=1)
        assert np.all((channel_max > 32) & (channel_max <= 64))  # spread as far as +-64 allows

    constants = {}
    for node in graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = float(numpy_helper.to_array(node.attribute[0].t))
    levels = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            clip = producers.get(node.input[0])
            if clip is not None and clip.op_type == "Clip":
                lo, hi = (constants.get(name, initializers.get(name)) for name in clip.input[1:3])
                levels.append(round(float((hi - lo) / constants.get(node.input[1], initializers.get(node.input[1])))))
    assert levels.count(15) == len(weights) - 1  # 4-bit inputs: 16 levels, 15 steps


def test_export_and_evaluate_onnx_on_the_command_line(digits_baseline, digits, tmp_path, capsys):
    checkpoint = digits_baseline.checkpoint  # the cached baseline's state dict, named as a user would
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", "test_resnet", "--dataset", "digits", "--checkpoint", str(checkpoint),
                 "--policy", "w4a8", "-o", str(out), "--no-progress"]) == 0
    assert "integer convolutions/matmuls" in capsys.readouterr().out
    assert main(["evaluate", "--onnx", str(out), "--split", "test", "--checkpoint", str(checkpoint), "--json",
                 "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == "test_resnet" and result["images"] == len(digits.test)
    assert result["agreement"] >= 0.99
    assert abs(result["exported_accuracy"] - result["fake_quant_accuracy"]) <= 0.01
    assert result["exported_accuracy"] > 0.5  # a trained model, not chance

    assert main(["latency", "--onnx", str(out), "--checkpoint", str(checkpoint), "--runs", "30", "--warmup", "2",
                 "--batch-sizes", "1,4", "--threads", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["label"].split(" ")[0], r["batch_size"]) for r in rows] == [("fp32", 1), ("fp32", 4), ("m.onnx", 1), ("m.onnx", 4)]
    for row in rows:
        assert row["runs"] == 30 and row["threads"] == 1 and 0 < row["q1_ms"] <= row["median_ms"] <= row["q3_ms"]
    fp32, quantized = rows[1], rows[3]
    assert quantized["speedup_vs_fp32"] == pytest.approx(fp32["median_ms"] / quantized["median_ms"])


def test_a_file_exported_from_python_is_evaluated_on_the_model_and_data_named(digits_baseline, digits, tmp_path, capsys):
    """mpsearch.export_onnx records no data set, and the model by its class: --model/--dataset say which."""
    checkpoint = digits_baseline.checkpoint  # the cached baseline's state dict, named as a user would
    path = mpsearch.export_onnx(digits_baseline.model, tmp_path / "api.onnx", digits, policy="w8a8")
    assert main(["evaluate", "--onnx", str(path), "--split", "test", "--no-progress"]) == 2
    assert "pass --model and --dataset" in capsys.readouterr().err
    assert main(["evaluate", "--onnx", str(path), "--model", "test_resnet", "--dataset", "digits", "--checkpoint",
                 str(checkpoint), "--split", "test", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["policy"] == "W8 A8" and result["images"] == len(digits.test) and result["agreement"] >= 0.99


class _DataDependent(torch.nn.Module):
    """A branch on the values of a tensor: torch.export, which both formats trace with, cannot follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(1, 4, 3), torch.nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).mean((2, 3))
        if x.sum() > 0:
            x = x * 2
        return self.fc(x)


@pytest.mark.parametrize(("export", "stage"), [(mpsearch.export_onnx, "exporting it to ONNX"),
                                               (mpsearch.export_pt2e, "exporting it as PT2E")])
def test_a_model_the_exporter_cannot_trace_is_one_line(digits, tmp_path, export, stage):
    if export is mpsearch.export_pt2e:
        pytest.importorskip("torchao")
    quantized = mpsearch.quantize(_DataDependent(), "w8a8", digits)
    with pytest.raises(mpsearch.UserError) as failed:
        export(quantized, tmp_path / ("m.pt2" if export is mpsearch.export_pt2e else "m.onnx"), digits)
    message = str(failed.value)
    assert message.startswith(f"model _DataDependent failed while {stage} (GuardOnDataDependentSymNode: ")
    assert "\n" not in message and "\x1b" not in message and "--debug" in message
    assert not list(tmp_path.iterdir())  # no half-written file
