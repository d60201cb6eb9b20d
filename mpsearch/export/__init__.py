"""A model out: the quantized model as a file that runs on integer kernels.

    import mpsearch
    path = mpsearch.export_onnx(model, "model.onnx", calibration, policy=policy)   # mpsearch.api

:mod:`mpsearch.export.integer` rewrites a fake-quantized model with integer operators (same
values, checked in PyTorch); :mod:`mpsearch.export.onnx` writes them as standard ONNX in the QDQ
form that onnxruntime fuses into ``MatMulIntegerToFloat`` / ``QLinearMatMul`` (convolutions as
matmuls on their integer patches, :mod:`mpsearch.export.im2col`; grouped ones into
``QLinearConv`` with the output grids of :mod:`mpsearch.export.qdq`) and runs the file in
onnxruntime.
"""

from __future__ import annotations

from mpsearch.export.integer import to_integer_model
from mpsearch.export.onnx import INTEGER_KERNELS, OnnxClassifier, integer_kernel_ops, onnx_operator_counts, read_metadata, save_onnx

__all__ = ["to_integer_model", "save_onnx", "read_metadata", "OnnxClassifier", "integer_kernel_ops", "onnx_operator_counts", "INTEGER_KERNELS"]
