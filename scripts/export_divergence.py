"""Where an exported ONNX file rounds differently from the search's measurement, layer by layer.

For one policy: export the file; run the same test images through the model the search measures
(PyTorch, its evaluation backend) and through the file in onnxruntime (no graph optimizations:
the file's own operators, every tensor kept); at each quantized layer's input quantizer, count the
values that land on another level of its grid. A value moves where the two sums differ in the
last bits right at a rounding boundary, or where the file rounds something the search does not
(the output grid and int32 bias of a grouped convolution on ``QLinearConv``,
:mod:`mpsearch.export.qdq`); a moved value moves the next layers' sums by a whole step, so the
count grows with depth, faster on narrow grids. Then the share of test images on which the file
(onnxruntime's optimized graph, as users run it) and the search predict the same class.

    python scripts/export_divergence.py --model resnet18 --policy w4a4 --out docs/export_divergence.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mpsearch.evaluation.prepared import prepare_measurement
from mpsearch.export.deploy import compare_exported, export_policy
from mpsearch.export.im2col import PATCH_OPS
from mpsearch.export.qdq import _session_exposing, quantized_layers  # inspects what the export writes
from mpsearch.host.machine import describe_machine
from mpsearch.quant.modules import QuantWrapper
from mpsearch.quant.primitives import fake_quantize


def _input_quantizers(model) -> list[str]:
    """In node order, for each layer with a dequantized constant weight and a quantized input,
    the float tensor its input ``QuantizeLinear`` reads (after a narrow grid's Clip)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    found = []
    for node in quantized_layers(model.graph, producers):
        dequantized = producers.get(node.input[0])
        if dequantized is None or dequantized.op_type != "DequantizeLinear":
            continue
        quantizer = producers.get(dequantized.input[0])
        while quantizer is not None and quantizer.op_type in PATCH_OPS:
            quantizer = producers.get(quantizer.input[0])
        if quantizer is not None and quantizer.op_type == "QuantizeLinear":
            found.append(quantizer.input[0])
    return found


def _onnx_inputs(model, tensors: list[str], images: np.ndarray) -> list[np.ndarray]:
    """The named tensors of ``model`` on ``images``, without graph optimizations: the file's own
    operators in float32 (even basic optimizations change a few roundings)."""
    import onnxruntime as ort

    input_name = model.graph.input[0].name
    inside = [t for t in tensors if t != input_name]
    session = _session_exposing(model, inside, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    values = dict(zip(inside, session.run(inside, {input_name: images})))
    return [images if t == input_name else values[t] for t in tensors]


def _torch_inputs(model: str, dataset: str, policy: str, count: int) -> tuple[torch.Tensor, list[tuple[str, object, torch.Tensor]]]:
    """The first ``count`` test images, and (layer, its input QParams, the input it got) for each
    layer quantized on both sides, in the order the search's model runs them."""
    prepared = prepare_measurement(model, dataset, policy, None, calibration_size=None, seed=None, checkpoint=None,
                                   data_dir=None, image_size=None, pretrained=False, progress=False)
    evaluator = prepared.evaluator
    evaluator.calibrate()
    evaluator.qmodel.apply(prepared.policy)
    images = next(iter(evaluator.data.split("test").batches(count)))[0]
    names = {module: name for name, module in evaluator.qmodel.module.named_modules()}
    seen: list[tuple[str, object, torch.Tensor]] = []

    def record(module, args, _output):
        x = args[0] if module.input_divisor is None else args[0] / module.input_divisor
        seen.append((names[module], module.act_qparams, x.detach().clone()))

    hooks = [m.register_forward_hook(record) for m in evaluator.qmodel.module.modules()
             if isinstance(m, QuantWrapper) and m.weight_qparams is not None and m.act_qparams is not None]
    with torch.inference_mode():
        evaluator.qmodel.module(images.contiguous(memory_format=torch.channels_last))
    for hook in hooks:
        hook.remove()
    return images, seen


def _on_grid(x: np.ndarray | torch.Tensor, qparams) -> torch.Tensor:
    """``x`` rounded to its grid as the search rounds it (one value per level)."""
    return fake_quantize(torch.as_tensor(x).float(), qparams)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--policy", default="w4a4", help="a shorthand (w8a8, w4a4, ...) or a policy JSON file")
    ap.add_argument("--images", type=int, default=256, help="test images for the per-layer count")
    ap.add_argument("--limit", type=int, default=None, help="first N test images for the agreement (default: all)")
    ap.add_argument("--out", default="", help="markdown file to write (default: print only)")
    args = ap.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="export-divergence-") as tmp:
        path, resolved = export_policy(args.model, args.dataset, args.policy, Path(tmp) / "model.onnx")
        import onnx

        images, layers = _torch_inputs(args.model, args.dataset, args.policy, args.images)
        exported_model = onnx.load(str(path))
        tensors = _input_quantizers(exported_model)
        if len(tensors) != len(layers):
            raise SystemExit(f"the file has {len(tensors)} input quantizers, the search's model {len(layers)}: no layer-by-layer match")
        lines = [f"### {args.model} on {args.dataset}, {resolved.summary()}", "",
                 "| layer | input grid | values on another level |", "|---|---|---:|"]
        for (name, qparams, x), value in zip(layers, _onnx_inputs(exported_model, tensors, images.numpy())):
            if value.shape != tuple(x.shape):  # matched by order: a layer run in another order shows here
                raise SystemExit(f"{name}: the file's input has shape {value.shape}, the search's {tuple(x.shape)}: "
                                 "the layers run in another order")
            moved = float((_on_grid(value, qparams) != _on_grid(x, qparams)).float().mean())
            lines.append(f"| {name} | {qparams.bits} bits | {moved:.2e} |")
        exported = compare_exported(path, split="test", limit=args.limit)
    lines += ["", f"Same class on the {exported.images} test images: {exported.agreement:.2%}; accuracy {exported.exported_accuracy:.2%} "
              f"in onnxruntime, {exported.fake_quant_accuracy:.2%} as the search measures it.", "",
              f"{args.images} test images for the per-layer count; onnxruntime without graph optimizations there, all "
              f"optimizations for the agreement; machine: {describe_machine()}; {(time.perf_counter() - start) / 60:.1f} min. "
              f"Command: `python scripts/export_divergence.py --model {args.model} --dataset {args.dataset} --policy {args.policy}`"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
