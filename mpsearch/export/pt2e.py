"""PyTorch-native int8: a quantized model through torchao's PT2E flow, run by ``torch.compile``.

:func:`save_pt2e` writes the policy's model as a ``torch.export`` program (``.pt2``) whose
quantized Conv2d / Linear layers compile to oneDNN int8 kernels (``onednn.qconv_pointwise``,
``onednn.qlinear_pointwise``) under inductor with ``freezing`` on. How the policy gets there:

1. The fake-quantized model's layers go back to plain ``nn.Conv2d`` / ``nn.Linear`` holding the
   policy's weights (already on their grids, PTQ and fine-tuned weights included), each with an
   input clamp to its activation grid's range: inductor's int8 kernels take the full uint8 range,
   so a 4-bit input is kept on its 16 levels by the clamp, not by the quantizer's range.
2. ``torch.export`` traces it (batch size dynamic) and ``X86InductorQuantizer`` annotates exactly
   the policy's layers by module name (uint8 per-tensor inputs, int8 per-channel symmetric
   weights); ``prepare_pt2e`` folds batch norms into the convolutions.
3. The observers are set to the policy's calibrated scales and zero points instead of what they
   saw (each weight scale times its batch norm's per-channel factor, read from the folded
   weight), so ``convert_pt2e`` stores the same integers fake quantization computes with.

What the flow cannot express is refused in one line (layers quantizing only weights or only
inputs, per-channel activation or asymmetric weight grids, SmoothQuant, learned quantizers), and
ViT attention matmuls stay float (``X86InductorQuantizer`` has no matmul-by-name config): the
summary of the export says how many there are, and ``mpsearch evaluate --pt2e`` measures the
difference.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpsearch.errors import UserError, model_stage
from mpsearch.export.formats import check_output, model_name
from mpsearch.export.integer import check_frozen
from mpsearch.host.machine import torch_threads
from mpsearch.quant.attention import MatmulQuantizer
from mpsearch.quant.modules import QuantConv2d, QuantLinear, QuantWrapper

__all__ = ["save_pt2e", "read_pt2e_metadata", "Pt2eClassifier", "compiled_int8_ops", "torchao_problem", "require_torchao",
           "METADATA_FILE", "INT8_KERNELS"]

logger = logging.getLogger(__name__)

METADATA_FILE = "mpsearch.json"  # extra file inside the .pt2 archive
INT8_KERNELS = ("onednn.qconv_pointwise", "onednn.qconv2d_pointwise", "onednn.qlinear_pointwise")
_MAX_BATCH = 4096
_TINY = torch.finfo(torch.float32).tiny


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Silence torch's warnings logged while torchao imports (a deprecation notice about its own
    enum) or while torch.export tries its loaders one after the other."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for log, _ in saved:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in saved:
            log.setLevel(level)


def torchao_problem() -> str | None:
    """Why the PT2E flow cannot run here (torchao missing or too old), or None."""
    try:
        with _quiet("torch.utils._pytree"):
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: F401
            from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer  # noqa: F401
    except ImportError as e:
        return (f"--format pt2e needs torchao's PT2E flow ({e}); install it with pip install 'mpsearch[pt2e]' "
                "(scripts/setup.sh does)")
    return None


def require_torchao() -> None:
    """Refuse, in one line, to run the PT2E flow without torchao."""
    problem = torchao_problem()
    if problem:
        raise UserError(problem, fields=("format",))


# -- step 1: the policy's layers as plain layers with clamped inputs ------------------------------
def _plain_layer(name: str, wrapper: QuantWrapper) -> nn.Module:
    """``wrapper``'s layer holding its quantized weight and bias, its input clamped to its grid."""
    check_frozen(wrapper)
    if wrapper.input_divisor is not None:
        raise UserError(f"export: {name} is smoothed (SmoothQuant); PT2E has no per-channel input divisor: use --format onnx")
    if not isinstance(wrapper, (QuantConv2d, QuantLinear)):
        raise UserError(f"export: {name} ({type(wrapper).__name__}) has no int8 kernel in PT2E; leave it at fp32 in the policy")
    weight_qp, act_qp = wrapper.weight_qparams, wrapper.act_qparams
    if weight_qp is None and act_qp is None:
        return wrapper.layer
    if weight_qp is None or act_qp is None:
        raise UserError(f"export: {name} quantizes only its {'inputs' if weight_qp is None else 'weights'}; PT2E's int8 "
                        "kernels need both (use --format onnx, or give the layer both widths)")
    if act_qp.axis is not None:
        raise UserError("export: per-channel activation quantizers have no int8 kernel; use per-tensor activations")
    if bool((weight_qp.zero_point != 0).any()) or weight_qp.qmin >= 0:
        raise UserError("export: PT2E's int8 kernels take symmetric signed weights; quantize weights symmetrically "
                        "(quant.weight_symmetric) or use --format onnx")
    layer = copy.deepcopy(wrapper.layer)
    with torch.no_grad():
        layer.weight.copy_(wrapper.current_weight())
        bias = wrapper.current_bias()
        if bias is not None:
            layer.bias.copy_(bias)
    zero_point, scale = int(act_qp.zero_point), float(act_qp.scale)
    low, high = (act_qp.qmin - zero_point) * scale, (act_qp.qmax - zero_point) * scale
    layer.register_forward_pre_hook(lambda _module, args: (args[0].clamp(low, high), *args[1:]))
    return layer


def _plain_model(quantized: nn.Module) -> tuple[nn.Module, dict[str, QuantWrapper], int]:
    """A copy of ``quantized`` with plain layers (see :func:`_plain_layer`), the wrappers of the
    layers PT2E quantizes by name, and how many quantized attention matmuls stay float."""
    model = copy.deepcopy(quantized).eval()
    quantized_layers: dict[str, QuantWrapper] = {}
    float_matmuls = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, MatmulQuantizer):  # passes its operands through: the float matmul runs as traced
            float_matmuls += int(module.first is not None or module.second is not None)
            module.first = module.second = None
            continue
        if not isinstance(module, QuantWrapper):
            continue
        plain = _plain_layer(name, module)
        if module.weight_qparams is not None:
            quantized_layers[name] = module
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    return model, quantized_layers, float_matmuls


# -- steps 2 and 3: PT2E with the policy's quantizers ---------------------------------------------
def _layer_config(wrapper: QuantWrapper) -> Any:
    """X86InductorQuantizer's config for one layer: its grids' integer ranges, min/max observers
    (whose ranges :func:`_set_observers` overwrites with the policy's)."""
    from torchao.quantization.pt2e import MinMaxObserver, PerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec

    act_qp, weight_qp = wrapper.act_qparams, wrapper.weight_qparams
    bits = weight_qp.bits
    # One level more than the grid below 8 bits: a batch norm with a negative factor flips the
    # sign of the folded integers, and -2^(b-1) becomes +2^(b-1), which int8 still holds.
    weight_range = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if bits < 8 else (-128, 127)
    activation = QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=act_qp.qmax - act_qp.qmin,
                                  qscheme=torch.per_tensor_affine, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=_TINY))
    weight = QuantizationSpec(dtype=torch.int8, quant_min=weight_range[0], quant_max=weight_range[1], qscheme=torch.per_channel_symmetric,
                              ch_axis=0, observer_or_fake_quant_ctr=PerChannelMinMaxObserver.with_args(eps=_TINY))
    return QuantizationConfig(activation, activation, weight, None, False)


def _attribute(module: nn.Module, target: str) -> torch.Tensor:
    for part in target.split("."):
        module = getattr(module, part)
    return module  # type: ignore[return-value]


def _folding_factor(folded: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per output channel, what ``prepare_pt2e``'s batch-norm folding multiplied ``weight`` by
    (read where the channel's weight is largest; 1 for an all-zero channel)."""
    folded, weight = folded.detach().flatten(1).float(), weight.detach().flatten(1).float()
    rows = torch.arange(weight.shape[0])
    largest = weight.abs().argmax(dim=1)
    numerator, denominator = folded[rows, largest], weight[rows, largest]
    zero = denominator == 0
    return torch.where(zero, torch.ones_like(denominator), numerator / torch.where(zero, torch.ones_like(denominator), denominator))


def _set_observers(prepared: torch.fx.GraphModule, wrappers: Mapping[str, QuantWrapper]) -> None:
    """Set every quantized layer's observers so that they compute the policy's scales and zero points."""
    done = set()
    for node in prepared.graph.nodes:
        if node.op != "call_function" or node.target not in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        name = list(stack.values())[-1][0] if stack else None
        if name not in wrappers or not all(getattr(a, "op", None) == "call_module" for a in node.args[:2]):
            continue
        wrapper = wrappers[name]
        act_observer, weight_observer = (prepared.get_submodule(a.target) for a in node.args[:2])
        weight = wrapper.current_weight()
        factor = _folding_factor(_attribute(prepared, node.args[1].args[0].target), weight)
        scale = wrapper.weight_qparams.scale.float().reshape(-1).expand(weight.shape[0]) * factor.abs()
        # per_channel_symmetric: scale = max(|min|, |max|) / ((quant_max - quant_min) / 2)
        half_range = (weight_observer.quant_max - weight_observer.quant_min) / 2
        weight_observer.max_val = (scale * half_range).clone()
        weight_observer.min_val = -(scale * half_range)
        act = wrapper.act_qparams
        zero_point, act_scale = int(act.zero_point) - act.qmin, float(act.scale)  # the grid shifted to unsigned
        act_observer.min_val = torch.tensor(-zero_point * act_scale)
        act_observer.max_val = torch.tensor((act.qmax - act.qmin - zero_point) * act_scale)
        done.add(name)
    missing = sorted(set(wrappers) - done)
    if missing:
        raise UserError(f"export: PT2E did not quantize {missing[0]} (and {len(missing) - 1} more); use --format onnx")


def _dynamic_batch() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1, max=_MAX_BATCH)},)


def to_pt2e(quantized: nn.Module, example: torch.Tensor) -> tuple[torch.fx.GraphModule, int]:
    """``quantized`` (a model whose policy is applied) converted by PT2E with the policy's
    quantizers; returns (the converted graph module, attention matmuls left float)."""
    require_torchao()
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    model, wrappers, float_matmuls = _plain_model(quantized)
    if not wrappers:  # an fp32 policy: the float model as it is
        return model, float_matmuls
    quantizer = X86InductorQuantizer()
    for name, wrapper in wrappers.items():
        quantizer.set_module_name_qconfig(name, _layer_config(wrapper))
    example = example.float()
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_batch())
        prepared = prepare_pt2e(program.module(), quantizer)
        prepared(example)  # the observers take their shapes
        _set_observers(prepared, wrappers)
        converted = convert_pt2e(prepared)
    _drop_unused_tensors(converted)
    return converted, float_matmuls


def _drop_unused_tensors(module: torch.fx.GraphModule) -> None:
    """Delete the parameters and buffers no node reads: ``convert_pt2e`` stores each quantized
    weight as a new int8 constant and leaves the float one behind, which the file would carry."""
    used = {node.target for node in module.graph.nodes if node.op == "get_attr"}
    called = tuple(f"{node.target}." for node in module.graph.nodes if node.op == "call_module")
    names = [n for n, _ in (*module.named_parameters(), *module.named_buffers())]
    for name in [n for n in names if n not in used and not n.startswith(called)]:
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._parameters.pop(attr, None)
        owner._buffers.pop(attr, None)


def save_pt2e(quantized: nn.Module, example: torch.Tensor, path: str | Path, *, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``quantized`` (a model whose policy is applied) as a PT2E int8 program to ``path``
    (``.pt2``, ``torch.export.save``), ``metadata`` JSON inside it; returns the path. A float
    model is written as it is."""
    path = check_output(path, "pt2e")
    with model_stage(model_name(quantized, metadata), "exporting it as PT2E",
                     "it does not export with torch.export: try --format onnx or another model"):
        if any(isinstance(m, (QuantWrapper, MatmulQuantizer)) for m in quantized.modules()):
            converted, float_matmuls = to_pt2e(quantized, example)
        else:  # the fp32 model, for timing next to the quantized one
            converted, float_matmuls = quantized.eval(), 0
        with torch.no_grad():
            program = torch.export.export(converted, (example.float(),), dynamic_shapes=_dynamic_batch())
    record = {**(metadata or {}), "float_matmuls": float_matmuls, "format": "pt2e"}
    try:
        with warnings.catch_warnings():  # torch's archive writer warns about weights not on a GPU; they are on the CPU
            warnings.filterwarnings("ignore", message="No complete tensor found")
            torch.export.save(program, str(path), extra_files={METADATA_FILE: json.dumps(record)})
    except OSError as e:
        raise UserError(f"--output {path}: cannot write it ({e.strerror or e})", fields=("output",)) from None
    if float_matmuls:
        logger.info(f"pt2e: {float_matmuls} quantized attention matmuls run in float (X86InductorQuantizer has no per-name matmul config)")
    return path


def _load(path: str | Path) -> tuple[Any, dict[str, Any]]:
    if not Path(path).is_file():
        raise UserError(f"pt2e: no file {path}", fields=("pt2e",))
    not_a_program = f"pt2e: {path} is not a torch.export program; write it with mpsearch export --format pt2e"
    if not zipfile.is_zipfile(path):
        raise UserError(not_a_program, fields=("pt2e",))
    missing = torchao_problem()  # None: torchao imported, the quantized operators a program calls are registered
    extra = {METADATA_FILE: ""}
    try:
        with _quiet("torch.export"):
            program = torch.export.load(str(path), extra_files=extra)
    except Exception as e:  # noqa: BLE001 - torch.export.load raises many types for a file that is not a program
        raise UserError(missing or f"{not_a_program} ({type(e).__name__})", fields=("pt2e",)) from None
    try:
        meta = json.loads(extra[METADATA_FILE]) if extra[METADATA_FILE] else {}
    except json.JSONDecodeError:
        meta = {}
    return program, meta


def read_pt2e_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata :func:`save_pt2e` wrote into ``path``."""
    return _load(path)[1]


class Pt2eClassifier:
    """A ``.pt2`` image classifier compiled by ``torch.compile`` (inductor, freezing on: int8
    weights prepacked for oneDNN). Each batch size compiles once; :meth:`predict` pads the last
    batch to the others' size so that a data set compiles one graph."""

    runtime = "torch.compile"

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        program, self.metadata = _load(path)
        self.path = Path(path)
        self.threads = threads
        self.module = program.module()
        self.input_shape = tuple(int(d) for d in self.module.graph.find_nodes(op="placeholder")[0].meta["val"].shape[1:])
        self._compiled = torch.compile(self.module, dynamic=False)  # one graph per batch size: static shapes

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        threads = torch_threads(self.threads) if self.threads else contextlib.nullcontext()
        with torch.no_grad(), threads, inductor_config.patch(freezing=True), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="To copy construct from a tensor")  # inductor's own int8 lowering
            return self._compiled(x.float().contiguous())

    def predict(self, batches: Iterable[torch.Tensor]) -> torch.Tensor:
        """Predicted classes of every image in ``batches``, in order."""
        out, size = [], None
        for x in batches:
            size = size or len(x)
            padded = torch.cat([x, x.new_zeros((size - len(x), *x.shape[1:]))]) if len(x) < size else x
            out.append(self.logits(padded)[: len(x)].argmax(dim=-1))
        return torch.cat(out)


def compiled_int8_ops(path: str | Path, example: torch.Tensor) -> dict[str, int]:
    """How many calls of each oneDNN int8 kernel (:data:`INT8_KERNELS`) the code inductor
    generates for ``path`` holds: what actually runs."""
    import re

    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    program, _ = _load(path)
    with torch.no_grad(), inductor_config.patch(freezing=True):
        _, sources = run_and_get_code(torch.compile(program.module(), dynamic=False), example.float())
    counts: dict[str, int] = {}
    for match in re.findall(r"torch\.ops\.(onednn\.\w+)", "\n".join(sources)):
        counts[match] = counts.get(match, 0) + 1
    return counts
