"""Quantized convolutions written as integer matmuls with a float output, so that onnxruntime runs
them on its int8 kernels and returns what the search measured.

onnxruntime fuses a ``Conv`` between dequantized operands into ``QLinearConv`` only where a
``QuantizeLinear`` reads its output (it returns integers), and then rounds the bias to an int32 at
the accumulator's scale. Both round what the search never rounds: a residual add's input on an
8-bit grid, a bias moved by up to half an accumulator step. A value that lands near a rounding
boundary of a later layer moves a whole step, and on 4-bit grids enough of them move to change
0.7 % of the predictions (ResNet-18 W4A4 on Fashion-MNIST).

``MatMul`` between dequantized operands is fused into ``MatMulIntegerToFloat``: int8 dot products
summed in int32, then the scales and the float bias, a float output. That is what the search's
``int8`` backend computes, and what fake quantization computes up to the order of float32 sums.
:func:`convolutions_as_matmuls` writes each quantized convolution that way, on its input's
integers, in channels-last order:

    integers (N, C, H, W) -> Transpose -> Pad (with the zero point) -> Reshape (N, Hp*Wp, C)
      -> Gather (every kernel position of every output pixel) -> Reshape (N, Ho, Wo, kh*kw*C)
      -> DequantizeLinear -> MatMul with the weight's integers as (kh*kw*C, Cout)
      -> Add (bias) -> Transpose (N, Cout, Ho, Wo)

The integers are gathered, not dequantized values, so the patches cost a quarter of the memory
of float ones. Grouped convolutions (depthwise) keep the ``Conv``, and the output grids of
:mod:`mpsearch.export.qdq`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["MATMUL_SUFFIX", "PATCH_OPS", "convolutions_as_matmuls"]

MATMUL_SUFFIX = "_as_matmul"  # names of what convolutions_as_matmuls adds contain this
# What the rewrite puts between an input's integers and their DequantizeLinear: it moves integers,
# it makes no new values.
PATCH_OPS = ("Transpose", "Pad", "Reshape", "Gather")


def _spatial_shapes(model: Any) -> dict[str, tuple[int, int]]:
    """(H, W) of every 4-D tensor whose spatial dimensions ONNX shape inference fixes."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, tuple[int, int]] = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input]:
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[2].HasField("dim_value") and dims[3].HasField("dim_value"):
            shapes[value.name] = (dims[2].dim_value, dims[3].dim_value)
    return shapes


def _patch_indices(padded: tuple[int, int], kernel: tuple[int, int], strides: list[int], dilations: list[int]) -> np.ndarray:
    """For each output pixel (Ho, Wo) and kernel position (kh*kw, row-major), its pixel's index in
    the padded image flattened row-major."""
    (hp, wp), (kh, kw) = padded, kernel
    ho = (hp - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    wo = (wp - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    rows = (np.arange(ho)[:, None] * strides[0] + np.arange(kh)[None, :] * dilations[0])  # (Ho, kh)
    cols = (np.arange(wo)[:, None] * strides[1] + np.arange(kw)[None, :] * dilations[1])  # (Wo, kw)
    index = rows[:, None, :, None] * wp + cols[None, :, None, :]  # (Ho, Wo, kh, kw)
    return index.reshape(ho, wo, kh * kw).astype(np.int64)


class _Rewrite:
    """The nodes and stored tensors that replace one quantized ``Conv``."""

    def __init__(self, conv: Any) -> None:
        self.base = (conv.name or conv.output[0]) + MATMUL_SUFFIX
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []

    def store(self, suffix: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(value, self.base + suffix))
        return self.base + suffix

    def add(self, op_type: str, inputs: list[str], suffix: str, output: str | None = None, **attributes: Any) -> str:
        import onnx

        output = output or self.base + suffix
        self.nodes.append(onnx.helper.make_node(op_type, inputs, [output], name=self.base + suffix, **attributes))
        return output


def _patch_rows(rewrite: _Rewrite, integers: str, zero_point: str, size: tuple[int, int], kernel: tuple[int, int],
                attributes: dict[str, Any], in_channels: int) -> str:
    """Add the nodes that turn the integer image ``integers`` (N, C, H, W) into one row of
    kh*kw*C integers per output pixel, (N, Ho, Wo, kh*kw*C); returns that tensor."""
    strides, dilations = attributes.get("strides", [1, 1]), attributes.get("dilations", [1, 1])
    pads = attributes.get("pads", [0, 0, 0, 0])
    tensor = rewrite.add("Transpose", [integers], "_nhwc", perm=[0, 2, 3, 1])
    if any(pads):  # padded with the zero point: the integer that dequantizes to 0
        tensor = rewrite.add("Pad", [tensor, rewrite.store("_pads", np.array([0, pads[0], pads[1], 0, 0, pads[2], pads[3], 0])),
                                     zero_point], "_padded")
    if (*kernel, *strides) == (1, 1, 1, 1):
        return tensor
    padded = (size[0] + pads[0] + pads[2], size[1] + pads[1] + pads[3])
    index = _patch_indices(padded, kernel, strides, dilations)
    tensor = rewrite.add("Reshape", [tensor, rewrite.store("_pixels_shape", np.array([0, padded[0] * padded[1], in_channels]))], "_pixels")
    tensor = rewrite.add("Gather", [tensor, rewrite.store("_index", index)], "_patches", axis=1)
    row = kernel[0] * kernel[1] * in_channels
    return rewrite.add("Reshape", [tensor, rewrite.store("_rows_shape", np.array([0, *index.shape[:2], row]))], "_rows")


def _as_matmul(conv: Any, graph: Any, producers: dict[str, Any], size: tuple[int, int]) -> _Rewrite | None:
    """The rewrite of ``conv`` (input dequantized from ``QuantizeLinear``, weight a dequantized
    int8 constant, ``size`` its input's (H, W)), or None where it has groups or its weight's
    zero point is not a stored 0."""
    import onnx

    from mpsearch.export.qdq import constant_array

    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    if attributes.get("group", 1) != 1 or attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    dequantize_input, dequantize_weight = producers[conv.input[0]], producers[conv.input[1]]
    weight = constant_array(graph, dequantize_weight.input[0])
    try:
        weight_zero_point = constant_array(graph, dequantize_weight.input[2])
    except KeyError:  # computed in the graph: not a weight this export wrote
        return None
    if weight.ndim != 4 or np.any(weight_zero_point != 0):
        return None
    out_channels, in_channels, kh, kw = weight.shape
    rewrite = _Rewrite(conv)
    integers, scale, zero_point = dequantize_input.input[:3]
    rows = _patch_rows(rewrite, integers, zero_point, size, (kh, kw), attributes, in_channels)
    rows = rewrite.add("DequantizeLinear", [rows, scale, zero_point], "_dequantized")
    # (Cout, C, kh, kw) -> (kh, kw, C, Cout): row (i*kw + j)*C + c meets the patch's value there.
    matrix = np.ascontiguousarray(weight.transpose(2, 3, 1, 0).reshape(kh * kw * in_channels, out_channels))
    weight_scale = np.broadcast_to(constant_array(graph, dequantize_weight.input[1]).astype(np.float32).reshape(-1), (out_channels,))
    dequantized = rewrite.add("DequantizeLinear", [rewrite.store("_weight", matrix), rewrite.store("_weight_scale", weight_scale.copy()),
                                                   rewrite.store("_weight_zero_point", np.zeros(out_channels, weight.dtype))],
                              "_weight_dequantized", axis=1)
    tensor = rewrite.add("MatMul", [rows, dequantized], "_matmul")
    # Always an Add, of zeros where the layer has no bias: onnxruntime leaves a MatMul whose output
    # goes straight into a narrow grid's Clip in float, instead of fusing it.
    bias = conv.input[2] if len(conv.input) > 2 and conv.input[2] else rewrite.store("_no_bias", np.zeros(out_channels, np.float32))
    tensor = rewrite.add("Add", [tensor, bias], "_bias")
    rewrite.add("Transpose", [tensor], "_nchw", output=conv.output[0], perm=[0, 3, 1, 2])
    return rewrite


def _drop_unused(graph: Any) -> None:
    """Remove nodes whose outputs nothing reads and stored tensors no node reads."""
    while True:
        read = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
        kept = [node for node in graph.node if any(name in read for name in node.output)]
        if len(kept) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(kept)
    unused = [init for init in graph.initializer if init.name not in read]
    for init in unused:
        graph.initializer.remove(init)


def convolutions_as_matmuls(model: Any) -> list[str]:
    """Rewrite, in the ONNX ``model`` (edited in place), every ``Conv`` whose input comes from a
    ``QuantizeLinear -> DequantizeLinear`` pair and whose weight is a dequantized int8 constant
    into an integer matmul on its input's patches with a float output (module docstring). Returns
    the outputs of the convolutions rewritten; grouped ones and those whose input size shape
    inference leaves open stay."""
    from mpsearch.export.qdq import quantized_layers

    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    sizes = _spatial_shapes(model)
    rewritten: dict[int, _Rewrite] = {}
    for node in quantized_layers(graph, producers):
        dequantize_input = producers.get(node.input[0])
        if node.op_type != "Conv" or dequantize_input is None or dequantize_input.op_type != "DequantizeLinear":
            continue
        quantize = producers.get(dequantize_input.input[0])
        if quantize is None or quantize.op_type != "QuantizeLinear" or dequantize_input.input[0] not in sizes:
            continue
        rewrite = _as_matmul(node, graph, producers, sizes[dequantize_input.input[0]])
        if rewrite is not None:
            rewritten[id(node)] = rewrite
    graph.initializer.extend(init for rewrite in rewritten.values() for init in rewrite.initializers)
    outputs = [node.output[0] for node in graph.node if id(node) in rewritten]
    # Each rewrite where its Conv was: the graph stays in topological order, as ONNX requires.
    ordered = [new for node in graph.node for new in (rewritten[id(node)].nodes if id(node) in rewritten else [node])]
    del graph.node[:]
    graph.node.extend(ordered)
    _drop_unused(graph)
    return outputs
