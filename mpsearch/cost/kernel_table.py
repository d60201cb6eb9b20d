"""Per-layer kernel tables: every counted conv and linear layer run alone, at each precision the
hardware really runs (:mod:`mpsearch.cost.kernels`), timed (and metered for energy where a meter
exists) into a lookup table.

Each layer runs at its true input shape (traced from one forward pass) with a batch of
``batch_size`` random inputs, in channels-last layout for convolutions (what oneDNN and cuDNN
run fastest); rows are per sample (the batch's time divided by the batch size), the unit every
energy profile uses. Weight values do not change kernel time, so profiling needs no trained
checkpoint. Attention matmuls are not profiled (no quantized batched matmul kernel on the CPU);
the table says so.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpsearch.cost.counting import CostTable, LayerCost
from mpsearch.cost.energy import KERNEL_BYTES, kernel_bytes
from mpsearch.cost.kernels import KERNELS, _Skip
from mpsearch.cost.meters import Measurement, Meter, MeterUnavailable, create_meter
from mpsearch.errors import UserError

__all__ = [
    "KernelRow",
    "KernelTable",
    "layer_inputs",
    "load_kernel_table",
    "profile_layers",
]

logger = logging.getLogger(__name__)

TABLE_VERSION = 1


@dataclass(frozen=True)
class KernelRow:
    """One layer at one precision, per sample: what was run and what it cost."""

    layer: str
    kind: str
    precision: str
    macs: int  # per sample, like every count below (the layer's CostTable entry)
    weight_params: int
    bias_params: int
    input_elems: int
    output_elems: int
    seconds: float  # wall-clock per sample
    energy_j: float | None  # per sample, idle included; None without an energy meter
    idle_power_w: float | None
    calls: int
    window_s: float

    @property
    def memory_bytes(self) -> float:
        """Bytes the kernel moves per sample (see :func:`mpsearch.cost.energy.kernel_bytes`)."""
        return kernel_bytes(self.layer_cost(), self.precision)

    def layer_cost(self) -> LayerCost:
        return LayerCost(self.layer, self.kind, self.macs, self.weight_params, self.bias_params, self.input_elems,
                         self.output_elems)


@dataclass(frozen=True)
class KernelTable:
    """A measured per-layer lookup table (JSON on disk, read back as data)."""

    model: str
    dataset: str
    device: str  # "cpu" or "cuda"
    device_name: str
    machine: str
    torch: str
    threads: int
    batch_size: int
    window_s: float
    time_meter: str
    energy_meter: str | None  # None: energy could not be measured (see energy_unavailable)
    energy_unavailable: str | None
    skipped: dict[str, str]  # precision or layer -> why it has no rows
    rows: tuple[KernelRow, ...]
    created: str = ""
    version: int = TABLE_VERSION

    @property
    def precisions(self) -> list[str]:
        return sorted({r.precision for r in self.rows}, key=list(KERNEL_BYTES).index)

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(r.layer for r in self.rows))

    def row(self, layer: str, precision: str) -> KernelRow | None:
        return next((r for r in self.rows if r.layer == layer and r.precision == precision), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike[str]) -> None:
        from mpsearch.host.files import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1), what="kernel table")

    def to_frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame([asdict(r) for r in self.rows])

    def microseconds(self) -> Any:
        """Microseconds per sample: one row per layer (in table order), one column per precision measured."""
        frame = self.to_frame()
        wide = frame.pivot(index="layer", columns="precision", values="seconds").reindex(self.layers) * 1e6
        return wide[[p for p in self.precisions if p in wide.columns]]


def load_kernel_table(path: str | os.PathLike[str]) -> KernelTable:
    """Read a table written by ``mpsearch profile`` (plain JSON, validated field by field)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"kernel table {p} does not exist; write one with `mpsearch profile --model NAME --device cpu`")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"kernel table {p} is not JSON ({exc}); pass the table.json that `mpsearch profile` wrote") from None
    if not isinstance(data, dict) or data.get("version") != TABLE_VERSION:
        got = data.get("version") if isinstance(data, dict) else type(data).__name__
        raise UserError(f"kernel table {p}: this mpsearch reads version {TABLE_VERSION}, got {got!r}")
    known = {f.name for f in fields(KernelTable)}
    unknown = sorted(set(data) - known)
    missing = sorted(known - set(data) - {"created", "version"})
    if unknown or missing:
        what = f"unknown field {unknown[0]!r}" if unknown else f"missing field {missing[0]!r}"
        raise UserError(f"kernel table {p}: {what}; write it again with `mpsearch profile`")
    row_fields = {f.name for f in fields(KernelRow)}
    rows = []
    for i, row in enumerate(data["rows"] if isinstance(data["rows"], list) else [None]):
        if not isinstance(row, dict) or set(row) != row_fields:
            raise UserError(f"kernel table {p}: row {i} must have exactly the fields {sorted(row_fields)}")
        if row["precision"] not in KERNEL_BYTES:
            raise UserError(f"kernel table {p}: row {i} has unknown precision {row['precision']!r}")
        for key in ("macs", "weight_params", "bias_params", "input_elems", "output_elems", "seconds"):
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
                raise UserError(f"kernel table {p}: row {i} ({row['layer']}, {row['precision']}) has {key} = {value!r}")
        rows.append(KernelRow(**row))
    return KernelTable(**{**data, "rows": tuple(rows)})


def layer_inputs(model: nn.Module, input_shape: tuple[int, int, int], names: Iterable[str]) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Each named conv/linear module and the shape of its input for ONE sample (first call)."""
    wanted = set(names)
    found: dict[str, tuple[nn.Module, tuple[int, ...]]] = {}
    handles = []
    for name, module in model.named_modules():
        if name in wanted and isinstance(module, (nn.Conv2d, nn.Linear)):
            def hook(mod: nn.Module, inputs: Any, output: Any, name: str = name) -> None:
                found.setdefault(name, (mod, tuple(inputs[0].shape[1:])))

            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return found


def profile_layers(
    model: nn.Module,
    table: CostTable,
    *,
    model_name: str,
    dataset: str,
    device: str = "cpu",
    precisions: Iterable[str] | None = None,
    batch_size: int = 32,
    window_s: float = 1.0,
    energy_meter: str | None = "auto",
    seed: int = 0,
    progress: bool = True,
) -> KernelTable:
    """Time (and meter) every conv/linear layer of ``table`` alone at each precision.

    ``energy_meter``: "auto" (RAPL on the CPU, NVML on CUDA, none where it cannot measure: the
    table then records why), a meter name (an error if it cannot measure), or None.
    """
    from mpsearch.host.machine import describe_machine

    dev = torch.device(device)
    time_meter = create_meter("wallclock", device=device)
    time_meter.check()
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    meter, unavailable = _energy_meter(energy_meter, dev)
    if unavailable:
        logger.info(f"energy: {unavailable}; measuring latency only")
    names = list(precisions) if precisions is not None else KERNELS.names()
    runnable, skipped = _runnable_precisions(names, dev, device)
    modules = layer_inputs(model, table.input_shape, table.names)
    for layer in table.layers:
        if layer.name not in modules:
            skipped[layer.name] = ("attention matmuls are not profiled (no quantized batched matmul kernel)"
                                   if layer.kind == "matmul" else f"{layer.kind} layers other than Conv2d/Linear are not profiled")
    with _exact_fp32(dev):
        # An energy meter times its own window: one window gives both numbers.
        rows = _measure_rows(table, modules, runnable, skipped, dev, meter or time_meter, sync, batch_size, window_s,
                             seed, progress, model_name)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else describe_machine().split(",")[0]
    return KernelTable(
        model=model_name, dataset=dataset, device=dev.type, device_name=device_name, machine=describe_machine(),
        torch=torch.__version__, threads=torch.get_num_threads(), batch_size=batch_size, window_s=window_s,
        time_meter=time_meter.name, energy_meter=meter.name if meter is not None else None,
        energy_unavailable=unavailable, skipped=skipped, rows=tuple(rows),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def _runnable_precisions(names: list[str], dev: torch.device, device: str) -> tuple[list[str], dict[str, str]]:
    """The kernel precisions among ``names`` that run on ``dev``, and why each other one does not
    (logged); none running is an error."""
    skipped: dict[str, str] = {}
    runnable = []
    for name in names:
        reason = KERNELS.get(name)().skip_reason(dev)
        if reason:
            skipped[name] = reason
            logger.info(f"{name}: skipped ({reason})")
        else:
            runnable.append(name)
    if not runnable:
        raise UserError(f"no kernel precision runs on {device}: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return runnable, skipped


@contextmanager
def _exact_fp32(dev: torch.device) -> Iterator[None]:
    """On CUDA, TF32 off while the block runs: fp32 rows must time fp32, not the TF32 PyTorch allows cuDNN by default."""
    if dev.type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _measure_rows(table: CostTable, modules, runnable: list[str], skipped: dict[str, str], dev: torch.device, meter: Meter,
                  sync, batch_size: int, window_s: float, seed: int, progress: bool, model_name: str) -> list[KernelRow]:
    """One row per (layer, precision): the layer built at that precision and measured by ``meter``."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    rows: list[KernelRow] = []
    jobs = [(layer, p) for layer in table.layers if layer.name in modules for p in runnable]
    bar = tqdm(jobs, desc=f"profile {model_name} on {dev}", unit="kernel", disable=not progress)
    for layer, precision in bar:
        module, shape = modules[layer.name]
        x = torch.randn((batch_size, *shape), generator=gen).to(dev)
        try:
            run = KERNELS.get(precision)().build(module, x)
        except _Skip as exc:
            skipped[f"{layer.name}:{precision}"] = str(exc)
            continue
        timed = meter.measure(run, window_s=window_s, sync=sync)
        metered: Measurement | None = timed if timed.energy_j_per_call is not None else None
        rows.append(KernelRow(
            layer=layer.name, kind=layer.kind, precision=precision, macs=layer.macs, weight_params=layer.weight_params,
            bias_params=layer.bias_params, input_elems=layer.input_elems, output_elems=layer.output_elems,
            seconds=timed.seconds_per_call / batch_size,
            energy_j=metered.energy_j_per_call / batch_size if metered and metered.energy_j_per_call is not None else None,
            idle_power_w=metered.idle_power_w if metered else None, calls=timed.calls, window_s=timed.window_s,
        ))
    return rows


def _energy_meter(choice: str | None, device: torch.device) -> tuple[Meter | None, str | None]:
    """The energy meter to use and, when there is none, why (recorded in the table)."""
    if choice is None:
        return None, "no energy meter requested"
    name = ("nvml" if device.type == "cuda" else "rapl") if choice == "auto" else choice
    meter = create_meter(name, **({"index": device.index or 0} if name == "nvml" else {}))
    try:
        meter.check()
    except MeterUnavailable as exc:
        if choice != "auto":
            raise UserError(f"energy_meter {name}: {exc}", fields=("energy_meter",)) from None
        return None, str(exc)
    return meter, None
