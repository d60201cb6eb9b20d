"""Output grids that let onnxruntime run a grouped quantized convolution of an ONNX file on its integer kernel.

Every other quantized convolution is written as an integer matmul with a float output
(:mod:`mpsearch.export.im2col`). A grouped one (depthwise) stays a ``Conv`` between dequantized
operands, which onnxruntime's optimizer fuses into ``QLinearConv`` only when a ``QuantizeLinear``
reads its output too: ``QLinearConv`` returns integers. :func:`quantize_layer_outputs` gives each
such output that grid (``QuantizeLinear -> DequantizeLinear``):

- where the output goes (through a ReLU, and the ``Clip`` of a narrow grid) to the next layer's
  input quantizer, that quantizer's grid, which changes nothing (onnxruntime then drops the ReLU
  and the duplicate quantizer);
- anywhere else (a residual add, a pooling, a float layer), an 8-bit grid over the range the
  output takes on calibration images (from 0 where a ReLU alone follows: that grid is the ReLU).

A calibrated grid is rounding the file adds to what the search measured, and so is the int32 bias
``QLinearConv`` takes (the float bias rounded to the input x weight scale); ``mpsearch evaluate
--onnx`` measures what they change.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["OUTPUT_GRID_SUFFIX", "constant_array", "quantize_layer_outputs", "quantized_layers"]

OUTPUT_GRID_SUFFIX = "_output_grid"  # names of what quantize_layer_outputs adds end with this
_UINT8 = 2


def _consumers(graph: Any) -> dict[str, list[Any]]:
    users: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
    return users


def _single_user(tensor: str, users: dict[str, list[Any]], op_type: str) -> Any | None:
    following = users.get(tensor, [])
    return following[0] if len(following) == 1 and following[0].op_type == op_type else None


def _output_grid(node: Any, producers: dict[str, Any], users: dict[str, list[Any]]) -> tuple[str, Any | None] | None:
    """Where this quantized Conv's output needs a grid: ``(tensor, quantizer)``, the quantizer being
    the next layer's input ``QuantizeLinear`` whose grid it takes, or None for a calibrated one.
    None where no grid is needed (a ``QuantizeLinear`` reads the output already) or ``node`` is
    no quantized Conv."""
    if node.op_type != "Conv":
        return None
    if not all(name in producers and producers[name].op_type == "DequantizeLinear" for name in node.input[:2]):
        return None
    out = node.output[0]
    if _single_user(out, users, "QuantizeLinear") is not None:
        return None
    # Through a ReLU and the Clip of a narrow grid to the next layer's input quantizer: the output
    # takes that quantizer's grid. Exact: both its clip bounds and 0 are on the grid, and ReLU and
    # Clip commute with rounding to a grid holding their thresholds.
    tensor = out
    relu = _single_user(tensor, users, "Relu")
    if relu is not None:
        tensor = relu.output[0]
    clip = _single_user(tensor, users, "Clip")
    if clip is not None:
        tensor = clip.output[0]
    return out, _single_user(tensor, users, "QuantizeLinear")


def _session_exposing(model: Any, names: list[str], optimization: Any = None) -> Any:
    """An onnxruntime CPU session on a copy of ``model`` that returns the named inner tensors as
    outputs too, at graph ``optimization`` (default basic: every named tensor still exists)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {output.name for output in probe.graph.output}
    for name in names:
        if name not in outputs:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimization is None else optimization
    options.log_severity_level = 3
    return ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _ranges(model: Any, names: list[str], images: Iterable[np.ndarray]) -> dict[str, tuple[float, float]]:
    """(min, max) of each named tensor over ``images``, from onnxruntime (basic optimizations, so
    that every named tensor still exists)."""
    session = _session_exposing(model, names)
    input_name = session.get_inputs()[0].name
    low = dict.fromkeys(names, 0.0)
    high = dict.fromkeys(names, 0.0)
    for batch in images:
        outputs = session.run(names, {input_name: batch})
        for name, value in zip(names, outputs):
            low[name] = min(low[name], float(value.min()))
            high[name] = max(high[name], float(value.max()))
    return {name: (low[name], high[name]) for name in names}


def _grid(low: float, high: float) -> tuple[float, int]:
    """An asymmetric uint8 grid holding [low, high] and 0 exactly: (scale, zero point)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255 if high > low else 1.0
    return scale, int(np.clip(round(-low / scale), 0, 255))


def quantized_layers(graph: Any, producers: dict[str, Any]) -> list[Any]:
    """The Conv and MatMul nodes whose weight (second input) is a dequantized constant (not an
    attention matmul's dequantized activation)."""
    constants = {init.name for init in graph.initializer} | {node.output[0] for node in graph.node if node.op_type == "Constant"}
    return [node for node in graph.node if node.op_type in ("Conv", "MatMul") and len(node.input) > 1
            and node.input[1] in producers and producers[node.input[1]].op_type == "DequantizeLinear"
            and producers[node.input[1]].input[0] in constants]


def constant_array(graph: Any, name: str) -> np.ndarray:
    """The value of the stored tensor (initializer or ``Constant`` node) ``name`` of ``graph``."""
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    raise KeyError(name)


def quantize_layer_outputs(model: Any, images: Iterable[np.ndarray]) -> dict[str, str]:
    """Add an 8-bit output grid (``QuantizeLinear -> DequantizeLinear``) to each quantized Conv of
    the ONNX ``model`` that needs one: the next layer's input grid where its output reaches only
    that, else a grid calibrated on ``images`` (float32 batches). Edits ``model`` in place; returns
    each quantized Conv's output that needed a grid with where it came from (``next layer`` or
    ``calibrated``)."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    users = _consumers(graph)
    grids: dict[str, tuple[float, int, int]] = {}  # tensor -> (scale, zero point, ONNX type)
    calibrate: dict[str, str] = {}  # tensor -> the tensor whose range sets its grid
    for node in graph.node:
        found = _output_grid(node, producers, users)
        if found is None:
            continue
        tensor, quantizer = found
        if quantizer is not None:
            zero_point = constant_array(graph, quantizer.input[2])
            dtype = onnx.helper.np_dtype_to_tensor_dtype(zero_point.dtype)
            grids[tensor] = (float(constant_array(graph, quantizer.input[1])), int(zero_point), dtype)
            continue
        # A lone ReLU after the layer: calibrate after it, and the grid (zero point 0) is the ReLU.
        relu = _single_user(tensor, users, "Relu")
        calibrate[tensor] = relu.output[0] if relu is not None else tensor
    if calibrate:
        ranges = _ranges(model, sorted(set(calibrate.values())), images)
        for tensor, measured in calibrate.items():
            grids[tensor] = (*_grid(*ranges[measured]), _UINT8)
    after: dict[str, list[Any]] = {}  # a layer's (new) output -> the grid nodes that read it
    for tensor, (scale, zero_point, dtype) in grids.items():
        base = tensor + OUTPUT_GRID_SUFFIX
        container = onnx.helper.tensor_dtype_to_np_dtype(dtype)
        graph.initializer.extend([numpy_helper.from_array(np.array(scale, dtype=np.float32), base + "_scale"),
                                  numpy_helper.from_array(np.array(zero_point, dtype=container), base + "_zero_point")])
        # The layer writes a new tensor; the grid's DequantizeLinear writes the old name, so that
        # every reader now reads the output on its grid.
        producers[tensor].output[0] = base + "_raw"
        after[base + "_raw"] = [
            onnx.helper.make_node("QuantizeLinear", [base + "_raw", base + "_scale", base + "_zero_point"], [base + "_q"],
                                  name=base + "_quantize"),
            onnx.helper.make_node("DequantizeLinear", [base + "_q", base + "_scale", base + "_zero_point"], [tensor],
                                  name=base + "_dequantize"),
        ]
    # Each grid right after its layer: the graph stays in topological order, as ONNX requires.
    ordered = [added for node in graph.node for added in (node, *after.get(node.output[0] if node.output else "", ()))]
    del graph.node[:]
    graph.node.extend(ordered)
    return {tensor: "calibrated" if tensor in calibrate else "next layer" for tensor in grids}
