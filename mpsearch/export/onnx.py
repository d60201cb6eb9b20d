"""ONNX export of a quantized model, and running the file in onnxruntime.

:func:`save_onnx` exports the integer form of a model (:mod:`mpsearch.export.integer`) with
PyTorch's ONNX exporter, translating mpsearch's integer operators into standard ONNX in the QDQ
form, which onnxruntime's graph optimizer fuses into its integer kernels:

- ``integer_conv2d`` / ``integer_linear``: the input on its grid (``QuantizeLinear ->
  DequantizeLinear``, uint8 or int8 with the calibrated zero point; a grid narrower than 8 bits
  ``Clip``-ped to its own levels first), the integer weight behind a per-output-channel
  ``DequantizeLinear``, a float ``Conv`` / ``MatMul`` and the bias. A convolution is then written
  as a matmul on its input's integer patches (:mod:`mpsearch.export.im2col`; a grouped one gets
  the output grid ``QLinearConv`` needs instead, :mod:`mpsearch.export.qdq`). onnxruntime runs
  them as ``MatMulIntegerToFloat`` (int8 dot products: VNNI or AMX where the CPU has them).
  A layer with a float input keeps its weight's integers behind ``DequantizeLinear`` and runs
  float.
- ``integer_matmul``: both operands on their grids, ``MatMul`` (``QLinearMatMul``).
- ``quantize_dequantize``: the input on its grid, the layer float.

What the file is (model, data set, baseline, the policy with its quantization settings) is written into its metadata,
so that ``mpsearch evaluate --onnx`` can rebuild the same policy in PyTorch and compare.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpsearch.errors import UserError, model_stage
from mpsearch.export.formats import check_output, model_name
from mpsearch.export.im2col import convolutions_as_matmuls
from mpsearch.export.integer import INTEGER_OPERATORS, to_integer_model
from mpsearch.export.qdq import OUTPUT_GRID_SUFFIX, quantize_layer_outputs
from mpsearch.quant.attention import MatmulQuantizer
from mpsearch.quant.modules import QuantWrapper

__all__ = ["save_onnx", "read_metadata", "OnnxClassifier", "integer_kernel_ops", "onnx_operator_counts", "kernel_summary",
           "graph_signature", "INTEGER_KERNELS", "METADATA_PREFIX", "OPSET"]

logger = logging.getLogger(__name__)

METADATA_PREFIX = "mpsearch."
OPSET = 18
# ONNX element types of the integer containers.
_UINT8, _INT8 = 2, 3
# Operators that run a layer's products on integers in onnxruntime's optimized graph.
INTEGER_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul")


def _translations() -> dict[Any, Any]:
    """onnxscript functions for mpsearch's operators (imported here: onnxscript is needed only to
    export), in the QDQ form: integers behind ``DequantizeLinear`` in front of float operators,
    which onnxruntime's optimizer fuses into its integer kernels."""
    from onnxscript import opset18 as op

    def zero_point(value: int, signed: bool):
        return op.Cast(op.Constant(value_int=value), to=_INT8 if signed else _UINT8)

    def on_grid(x, scale: float, zp: int, qmin: int, qmax: int):
        """x quantized and dequantized; a grid narrower than its 8-bit container is clipped to its
        own levels first (QuantizeLinear saturates at the container's)."""
        container = (-128, 127) if qmin < 0 else (0, 255)
        if (qmin, qmax) != container:
            x = op.Clip(x, op.Constant(value_float=float((qmin - zp) * scale)), op.Constant(value_float=float((qmax - zp) * scale)))
        s, z = op.Constant(value_float=scale), zero_point(zp, qmin < 0)
        return op.DequantizeLinear(op.QuantizeLinear(x, s, z), s, z)

    def dequantized_weight(weight, weight_scale, weight_zero_point, axis: int):
        # Per-axis DequantizeLinear takes one zero point per channel: the tensor's one, repeated.
        return op.DequantizeLinear(weight, weight_scale, op.Expand(weight_zero_point, op.Shape(weight_scale)), axis=axis)

    def integer_conv2d(x, weight, weight_scale, weight_zero_point, bias, act_scale: float, act_zero_point: int,
                       act_qmin: int, act_qmax: int, stride, padding, dilation, groups: int):
        attrs = dict(strides=list(stride), pads=list(padding) + list(padding), dilations=list(dilation), group=groups)
        if act_scale != 0.0:
            x = on_grid(x, act_scale, act_zero_point, act_qmin, act_qmax)
        w = dequantized_weight(weight, weight_scale, weight_zero_point, 0)
        return op.Conv(x, w, bias, **attrs) if bias is not None else op.Conv(x, w, **attrs)

    def integer_linear(x, weight, weight_scale, weight_zero_point, bias, act_scale: float, act_zero_point: int,
                       act_qmin: int, act_qmax: int):
        if act_scale != 0.0:
            x = on_grid(x, act_scale, act_zero_point, act_qmin, act_qmax)
        # The weight stored as (in, out), so that its DequantizeLinear feeds the MatMul directly.
        y = op.MatMul(x, dequantized_weight(op.Transpose(weight, perm=[1, 0]), weight_scale, weight_zero_point, 1))
        return op.Add(y, bias) if bias is not None else y

    def integer_matmul(a, b, a_scale: float, a_zero_point: int, a_qmin: int, a_qmax: int,
                       b_scale: float, b_zero_point: int, b_qmin: int, b_qmax: int):
        return op.MatMul(on_grid(a, a_scale, a_zero_point, a_qmin, a_qmax), on_grid(b, b_scale, b_zero_point, b_qmin, b_qmax))

    def quantize_dequantize(x, scale: float, zero_point_: int, qmin: int, qmax: int):
        return on_grid(x, scale, zero_point_, qmin, qmax)

    functions = {"integer_conv2d": integer_conv2d, "integer_linear": integer_linear,
                 "integer_matmul": integer_matmul, "quantize_dequantize": quantize_dequantize}
    return {INTEGER_OPERATORS[name]: fn for name, fn in functions.items()}


def save_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, *, metadata: Mapping[str, Any] | None = None,
              calibration: Iterable[torch.Tensor] | None = None) -> Path:
    """Export ``model`` to ``path``; returns the path. A quantized model (a policy applied) is
    written in integer form (:func:`~mpsearch.export.integer.to_integer_model`), in the QDQ form
    onnxruntime runs on integer kernels; a float one as it is.

    ``example`` is one input batch (its batch size is exported as dynamic). The output grids that
    grouped convolutions need (:mod:`mpsearch.export.qdq`) are calibrated on ``calibration``
    (batches of images; default ``example``). ``metadata`` values (JSON-serialized where not strings) are
    stored as ``mpsearch.<key>`` metadata properties. The file passes ``onnx.checker``.
    """
    import onnx

    path = check_output(path, "onnx")
    quantized = any(isinstance(m, (QuantWrapper, MatmulQuantizer)) for m in model.modules())
    exported = to_integer_model(model) if quantized else model.eval()
    calibration = [example] if calibration is None else calibration
    example = example[:2].float().contiguous()
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter prints its progress with print(): keep it out of mpsearch's output.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            model_stage(model_name(model, metadata), "exporting it to ONNX", "it does not export to ONNX: try --format pt2e or another model"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            exported, (example,), dynamo=True, opset_version=OPSET, custom_translation_table=_translations(),
            dynamic_shapes=({0: batch},), optimize=True, verbose=False,
        )
    proto = program.model_proto
    if quantized:
        matmuls = convolutions_as_matmuls(proto)
        images = [x.float().contiguous().numpy() for x in calibration]
        grids = quantize_layer_outputs(proto, images)
        metadata = {**(metadata or {}), "convolutions_as_matmuls": len(matmuls),
                    "calibrated_output_grids": sum(1 for how in grids.values() if how == "calibrated")}
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key = METADATA_PREFIX + key
        entry.value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    onnx.checker.check_model(proto, full_check=True)
    try:
        onnx.save(proto, str(path))
    except OSError as e:
        raise UserError(f"output: cannot write {path} ({e.strerror}); choose a writable path", fields=("output",)) from None
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``mpsearch.*`` metadata of an ONNX file (values JSON-decoded where they parse)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise UserError(f"onnx: no file {path}", fields=("onnx",)) from None
    except Exception as e:  # noqa: BLE001 - onnx raises DecodeError and others for a non-ONNX file
        raise UserError(f"onnx: {path} is not an ONNX model ({type(e).__name__})", fields=("onnx",)) from None
    out: dict[str, Any] = {}
    for entry in proto.metadata_props:
        if entry.key.startswith(METADATA_PREFIX):
            try:
                out[entry.key[len(METADATA_PREFIX):]] = json.loads(entry.value)
            except json.JSONDecodeError:
                out[entry.key[len(METADATA_PREFIX):]] = entry.value
    return out


class OnnxClassifier:
    """An ONNX image classifier in an onnxruntime CPU session (all graph optimizations on)."""

    runtime = "onnxruntime"

    def __init__(self, path: str | Path, *, threads: int | None = None, optimized_path: str | Path | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # A weight-only layer (int8 weights -> DequantizeLinear -> MatMul) is fused into MatMulNBits,
        # which by default quantizes its input to int8 as well: the policy leaves that input float.
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if optimized_path is not None:
            options.optimized_model_filepath = str(optimized_path)
        self.path = Path(path)
        self.threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One image's shape (the input's dimensions after the batch)."""
        dims = self.session.get_inputs()[0].shape[1:]
        if not all(isinstance(d, int) for d in dims):
            raise UserError(f"onnx: {self.path}'s input has no fixed image shape ({dims}); export it with mpsearch export")
        return tuple(dims)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.float().contiguous().numpy()})[0])

    def predict(self, batches: Iterable[torch.Tensor]) -> torch.Tensor:
        """Predicted classes of every image in ``batches``, in order."""
        return torch.cat([self.logits(x).argmax(dim=-1) for x in batches])


def onnx_operator_counts(path: str | Path) -> dict[str, int]:
    """How many nodes of each operator type the ONNX file ``path`` holds."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def graph_signature(path: str | Path) -> str:
    """A hash of what decides the ONNX file ``path``'s speed, not of its numbers: each node's
    operator, its integer and string attributes (strides, groups, the integer types it casts
    to), and the types and shapes of the tensors it reads from the file. Float values (scales,
    clip bounds) are left out, and so is which node shares which stored constant (the exporter
    merges equal ones), and so are ReLUs, a narrow grid's ``Clip`` and the output grids of
    :mod:`mpsearch.export.qdq` (elementwise, next to a convolution), and the nodes' order. Two policies that put the
    same layers on integer kernels get the same signature whatever their widths (<= 8 bits share
    one int8 kernel), so one timing serves both."""
    import hashlib

    import onnx

    graph = onnx.load(str(path)).graph
    stored = {init.name: f"{init.data_type}{list(init.dims)}" for init in graph.initializer}
    parts = []
    for node in graph.node:
        if node.op_type in ("Clip", "Relu") or OUTPUT_GRID_SUFFIX in node.name:
            continue  # elementwise: a narrow grid's clip (which a ReLU before it joins), a convolution's output grid
        attributes = []
        for attr in node.attribute:
            value = onnx.helper.get_attribute_value(attr)
            if attr.type == onnx.AttributeProto.TENSOR:
                value = f"{value.data_type}{list(value.dims)}"
            elif attr.type in (onnx.AttributeProto.FLOAT, onnx.AttributeProto.FLOATS):
                value = "float"
            attributes.append(f"{attr.name}={value}")
        inputs = [stored.get(name, "") for name in node.input]
        parts.append(f"{node.domain}:{node.op_type}({','.join(inputs)}){';'.join(attributes)}")
    return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()  # sorted: where a grid went moves nodes


def integer_kernel_ops(path: str | Path, optimized_path: str | Path) -> dict[str, int]:
    """:func:`onnx_operator_counts` of onnxruntime's optimized graph of ``path`` (written to
    ``optimized_path``): what the session runs; :data:`INTEGER_KERNELS` are the integer operators."""
    OnnxClassifier(path, optimized_path=optimized_path)
    return onnx_operator_counts(optimized_path)


FLOAT_KERNELS = ("Conv", "FusedConv", "NchwcConv", "MatMul", "Gemm", "FusedGemm", "FusedMatMul", "MatMulNBits")


def kernel_summary(path: str | Path) -> str:
    """What onnxruntime's optimized graph of ``path`` runs its convolutions and matmuls on, in
    words: "12 integer convolutions/matmuls (QLinearConv 11, QGemm 1), 1 float"."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mpsearch-onnx-") as tmp:
        ops = integer_kernel_ops(path, Path(tmp) / "optimized.onnx")
    integer = {op: ops[op] for op in INTEGER_KERNELS if ops.get(op)}
    detail = f" ({', '.join(f'{op} {n}' for op, n in integer.items())})" if integer else ""
    return f"{sum(integer.values())} integer convolutions/matmuls{detail}, {sum(ops.get(op, 0) for op in FLOAT_KERNELS)} float"
