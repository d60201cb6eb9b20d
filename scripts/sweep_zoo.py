"""Compatibility sweep over the timm zoo: one model per family, every mpsearch stage, on 8 and 28 px.

    python scripts/sweep_zoo.py                                   # every family, both sizes -> docs/compatibility.md
    python scripts/sweep_zoo.py --families resnet,levit --sizes 28 --out /tmp/compat.md
    python scripts/sweep_zoo.py --jobs 2 --resume                 # continue a killed run, two cells at a time

A *family* is the timm module that defines a model (:func:`mpsearch.models.zoo.model_family`).
Each family is represented by its smallest variant in ``timm.list_models()`` (parameters counted
on the meta device, so no weights are allocated; names that do not build there are skipped). That
choice is cached per timm version in ``cache_root()/sweep_zoo_models-<timm version>.json``.

Each cell (family x image size) runs, in its own ``spawn`` subprocess with one torch thread and a
time limit per stage (``--timeout`` 120 s; ``--pt2e-timeout`` 600 s), with random weights, until
the first stage that does not pass:

    build        mpsearch.models.zoo.create_model (with the small-image adaptation)
    train        one optimizer step of the family recipe (zoo.training_recipe) on
                 8 images at every size the recipe trains at (progressive resizing)
    eval         one forward pass at native size
    learn        8 px only: the family recipe shortened to LEARN_EPOCHS epochs on all of
                 digits, then its test accuracy (does the family learn with its recipe?)
    sensitivity  Hessian sensitivity, 1 batch of 8 images, 1 probe
    fake, int8   a mixed w8a8/w4a8 policy measured by mpsearch.Evaluator on 32 images per backend
    onnx         mpsearch.quantize + export_onnx, the file run in onnxruntime
    pt2e         mpsearch.quantize + export_pt2e (needs torchao), the exported program run
                 by torch (--pt2e-runtime eager, the default) or compiled by inductor into
                 the int8 kernels mpsearch times (--pt2e-runtime compile: ~90 s a cell)

A stage ends ``ok``, ``refused: <message>`` (mpsearch's own UserError) or ``CRASH: <type>:
<message>`` (anything else; ``CRASH: timeout`` / ``CRASH: died`` when the subprocess hangs or
dies). Data: 8 px is scikit-learn's digits, 28 px Fashion-MNIST where it is installed, else random
1x28x28 images (the report says which).

How long it takes: the written report states the wall time of the run that wrote it, the mean
seconds per stage, and an extrapolation to every family from its mean cell. The stages after
eval cost the most (sensitivity, onnx and learn: tens of seconds a cell for the larger
families; pt2e with --pt2e-runtime compile about 90 s more); ``--stages``, ``--sizes`` and
``--jobs`` shorten a run, and ``--resume`` keeps the cells of an earlier one. It is not a CI job:
CI keeps a fast sample (tests/test_zoo.py runs this script on one family, builds and runs
CrossViT, Twins and EfficientFormer at 28 px, and trains LeViT at every size of its recipe).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import shlex
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from mpsearch.config import TrainConfig
    from mpsearch.data import DataSplits
    from mpsearch.models.zoo import Baseline
    from mpsearch.policy import Policy

STAGES = ("build", "train", "eval", "learn", "sensitivity", "fake", "int8", "onnx", "pt2e")
SIZES = {8: "digits", 28: "fashion-mnist"}
TRAIN_IMAGES = 8  # one training batch per training size
EVAL_IMAGES = 32  # calibration and measurement images of the quantized stages
LEARN_EPOCHS = 4  # the learn stage's short recipe
PT2E_RUNTIMES = {"eager": "as torch runs it (eager)", "compile": "compiled by inductor (torch.compile), on int8 kernels"}
SKIPPED = "skipped"
PICK_VERSION = 2  # of the rule choosing a family's model (2: test_* models only where nothing else exists)


# -- choosing one model per family -----------------------------------------------------------------
def family_members() -> dict[str, list[str]]:
    """Every timm model name (without pretrained tags: list_models() gives each architecture once), by family."""
    import timm

    from mpsearch.models.zoo import model_family

    out: dict[str, list[str]] = {}
    for name in timm.list_models():
        out.setdefault(model_family(name), []).append(name)
    return out


def _takes_img_size(cls: type) -> bool:
    """Whether ``cls``'s constructor takes ``img_size``, following ``**kwargs`` up to the base
    classes (as mpsearch.models.small_images does on an instance)."""
    for klass in cls.__mro__:
        parameters = inspect.signature(klass.__init__).parameters
        if "img_size" in parameters:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return False
    return False


def _meta_size(name: str) -> tuple[int, bool]:
    """Parameter count of ``name`` and whether its class takes ``img_size``, built on the meta
    device: shapes without storage, so that even billion-parameter variants cost milliseconds."""
    import timm
    import torch

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False)
    return sum(p.numel() for p in model.parameters()), _takes_img_size(type(model))


def pick_smallest(names: list[str]) -> dict[str, Any]:
    """The variant with the fewest parameters among ``names`` (ties: the first name in timm's order).
    timm's ``test_*`` models are taken only where a family has nothing else: the suite runs them
    end to end already (tests/test_families.py), and the sweep is for the models it does not."""
    best: dict[str, Any] | None = None
    errors: list[str] = []
    real = [name for name in names if not name.startswith("test_")]
    for name in real or names:
        try:
            params, img_size = _meta_size(name)
        except Exception as exc:  # noqa: BLE001 - a constructor may do anything meta tensors cannot (.item(), ...)
            errors.append(f"{name}: {type(exc).__name__}")
            continue
        if best is None or params < best["params"]:
            best = {"model": name, "params": params, "img_size": img_size}
    if best is None:
        return {"model": None, "error": f"no variant builds on the meta device ({'; '.join(errors[:3])})"}
    return {**best, "meta_failures": len(errors)}


def chosen_models(families: list[str], members: dict[str, list[str]], progress: bool) -> dict[str, dict[str, Any]]:
    """The model of each family in ``families``, from the per-timm-version cache or picked now
    (picking builds every variant on the meta device: minutes for the whole zoo, hence the cache)."""
    import timm
    from tqdm import tqdm

    from mpsearch.host.files import atomic_write_text
    from mpsearch.host.paths import cache_root

    path = cache_root() / f"sweep_zoo_models-v{PICK_VERSION}-{timm.__version__}.json"
    cached: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}
    missing = [f for f in families if f not in cached]
    for family in tqdm(missing, desc="picking models (meta device)", disable=not progress or not missing):
        cached[family] = pick_smallest(members[family])
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(cached, indent=1, sort_keys=True), what="model choice cache")
    return {f: cached[f] for f in families}


# -- the data of each size -----------------------------------------------------------------------
def small_data(size: int) -> tuple[DataSplits, str, int]:
    """A few images of the data set of ``size`` px (the subprocesses get them pickled, so that no
    cell reads a data set from disk), a line saying what they are, and how many training images
    the whole data set has (the family recipe depends on it: zoo.default_recipe)."""
    import torch

    import mpsearch
    from mpsearch.errors import UserError

    if size not in SIZES:
        raise SystemExit(f"--sizes: each must be one of {sorted(SIZES)}, got {size}")
    try:
        data = mpsearch.load_dataset(SIZES[size], download=False)
        source = f"{data.info.name} ({data.source})"
    except UserError:  # Fashion-MNIST not installed: random images of its shape, stated in the report
        gen = torch.Generator().manual_seed(size)
        split = lambda n: (torch.randn(n, 1, size, size, generator=gen), torch.randint(0, 10, (n,), generator=gen))  # noqa: E731
        data = mpsearch.make_data(train=split(64), val=split(EVAL_IMAGES), test=split(EVAL_IMAGES), num_classes=10,
                                  name=f"random-{size}px")
        source = f"random 1x{size}x{size} tensors, 10 classes ({SIZES[size]} not installed)"
    small = replace(data, train=data.train.subset(TRAIN_IMAGES), calibration=data.calibration.subset(EVAL_IMAGES),
                    val=data.val.subset(EVAL_IMAGES), test=data.test.subset(EVAL_IMAGES))
    return small, source, len(data.train)


# -- one cell, in its subprocess -----------------------------------------------------------------
@dataclass
class _Cell:
    """What the stages of one cell share. Later stages start from the untrained ``model`` so that
    their results do not depend on whether --stages ran ``train``."""

    name: str
    data: DataSplits
    train_images: int = 0  # of the whole data set, which the family recipe depends on
    model: nn.Module | None = None
    baseline: Baseline | None = None
    policy: Policy | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # facts the report shows beside the results (sent to the parent)
    tmp: Path = field(default_factory=Path)  # the cell's folder for exported files, in the parent's temporary folder
    pt2e_runtime: str = "eager"  # how the pt2e stage runs the exported program: "eager" or "compile" (inductor)

    def ready(self) -> Baseline:
        """The model as a baseline: an eval-mode, channels_last copy, what every measurement uses."""
        from mpsearch.models.zoo import Baseline

        if self.baseline is None:
            self.baseline = Baseline.from_module(self.model, self.name)
        return self.baseline

    def images(self, n: int = TRAIN_IMAGES) -> Any:
        return next(iter(self.data.val.batches(n)))


def _stage_build(cell: _Cell) -> str | None:
    from mpsearch.models.zoo import create_model

    cell.model = create_model(cell.name, cell.data.info)
    return None


def training_recipe(cell: _Cell) -> TrainConfig:
    """The recipe the baseline really trains with (progressive resizing off for models that
    cannot run at the smaller sizes), as get_baseline decides it."""
    from mpsearch.models.zoo import default_recipe, training_recipe

    return training_recipe(cell.name, cell.model, default_recipe(cell.name, cell.train_images), cell.data.info)


def _optimizer(model: nn.Module, recipe: Any) -> Any:
    """The recipe's optimizer (SGD-Nesterov or AdamW) with its hyper-parameters, as training uses it."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, nesterov=True, weight_decay=recipe.weight_decay)
    return torch.optim.AdamW(params, lr=recipe.lr, betas=(recipe.momentum, 0.999), weight_decay=recipe.weight_decay)


def _stage_train(cell: _Cell) -> str | None:
    """One step at each size the recipe trains at, in the layout and autocast training uses."""
    import torch
    import torch.nn.functional as F

    from mpsearch.host.machine import native_bf16
    from mpsearch.models.zoo import default_recipe

    recipe = training_recipe(cell)
    native = cell.data.info.image_size
    sizes = sorted({recipe.image_size(e, native) for e in range(recipe.epochs)})
    # Whether zoo.training_recipe switched progressive resizing off: the report says so per cell.
    cell.notes.update(train_px=sizes, native_only=recipe.image_scales != default_recipe(cell.name, cell.train_images).image_scales)
    model = copy.deepcopy(cell.model)  # later stages quantize the untrained model (see _Cell)
    layout = torch.channels_last if recipe.channels_last else torch.contiguous_format
    model.to(memory_format=layout).train()
    optimizer = _optimizer(model, recipe)
    bf16 = recipe.bf16 and native_bf16("cpu") is None
    x, y = next(iter(cell.data.train.batches(TRAIN_IMAGES)))
    for size in sizes:
        xs = x if size == native else F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(xs.contiguous(memory_format=layout))
        loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return None


def _check_logits(logits: Any, n: int, classes: int, where: str) -> None:
    import torch

    if tuple(logits.shape) != (n, classes):
        raise ValueError(f"{where}: logits of shape {tuple(logits.shape)}, expected {(n, classes)}")
    if not torch.isfinite(logits).all():
        raise FloatingPointError(f"{where}: non-finite logits")


def _stage_eval(cell: _Cell) -> str | None:
    import torch

    x, _ = cell.images()
    with torch.inference_mode():
        logits = cell.ready().model(x.contiguous(memory_format=torch.channels_last))
    _check_logits(logits, len(x), cell.data.info.num_classes, "eval")
    return None


def _stage_sensitivity(cell: _Cell) -> str | None:
    """As `mpsearch sensitivity` calls it (mpsearch/cli/tasks.py), with 1 batch of 8 images and 1
    probe; no checkpoint hash, so random weights leave nothing in the sensitivity cache."""
    from mpsearch.config import QuantConfig
    from mpsearch.evaluation.evaluator import Evaluator
    from mpsearch.sensitivity import SensitivityConfig, compute_sensitivity

    evaluator = Evaluator(cell.ready(), cell.data, quant=QuantConfig())
    evaluator.calibrate()
    config = SensitivityConfig(estimator="hessian", batches=1, batch_size=TRAIN_IMAGES, min_probes=1, max_probes=1)
    compute_sensitivity(cell.ready().model, evaluator.layer_names, cell.data.calibration, config, quant=evaluator.quant,
                        checkpoint_sha256=None, qmodel=evaluator.qmodel)
    return None


def mixed_policy(cell: _Cell, evaluator: Any = None) -> Policy:
    """w4a8 with every other weight layer raised to w8a8 (first and last stay at 8 bits, matmuls at
    a8): mixed widths exercise what a search's answer holds, not just one uniform grid. Made once
    per cell, by ``evaluator`` (which knows the model's policy layers) or a fake-backend one."""
    from mpsearch.config import QuantConfig
    from mpsearch.evaluation.evaluator import Evaluator
    from mpsearch.policy import LayerPrecision, is_matmul

    if cell.policy is None:
        evaluator = evaluator or Evaluator(cell.ready(), cell.data, quant=QuantConfig(backend="fake"))
        uniform = evaluator.resolve_policy("w4a8")
        weight_layers = [name for name in uniform.layers if not is_matmul(name)]
        raised = {name: LayerPrecision(weight_bits=8, act_bits=8) for name in weight_layers[1::2]}
        cell.policy = replace(uniform, layers={**uniform.layers, **raised}, provenance={"shorthand": "mixed w8a8/w4a8"})
    return cell.policy


def _measure(cell: _Cell, backend: str) -> str | None:
    from mpsearch.config import QuantConfig
    from mpsearch.evaluation.evaluator import Evaluator

    evaluator = Evaluator(cell.ready(), cell.data, quant=QuantConfig(backend=backend))
    result = evaluator.evaluate(mixed_policy(cell, evaluator), split="val", limit=EVAL_IMAGES)
    if result.images != EVAL_IMAGES:
        raise ValueError(f"{backend}: measured {result.images} images, expected {EVAL_IMAGES}")
    return None


def _quantized(cell: _Cell) -> nn.Module:
    """A fresh mpsearch.quantize of the model per export stage, so that each export stands alone."""
    import mpsearch

    return mpsearch.quantize(cell.model, mixed_policy(cell), cell.data)


def _stage_onnx(cell: _Cell) -> str | None:
    import mpsearch
    from mpsearch.export import OnnxClassifier

    path = mpsearch.export_onnx(_quantized(cell), cell.tmp / "model.onnx", cell.data)
    x, _ = cell.images()
    _check_logits(OnnxClassifier(path, threads=1).logits(x), len(x), cell.data.info.num_classes, "onnxruntime")
    return None


def _stage_pt2e(cell: _Cell) -> str | None:
    import torch

    if importlib.util.find_spec("torchao") is None:
        return f"{SKIPPED}: torchao not installed"
    import mpsearch
    from mpsearch.export.pt2e import Pt2eClassifier

    path = mpsearch.export_pt2e(_quantized(cell), cell.tmp / "model.pt2", cell.data)
    x, _ = cell.images()
    program = Pt2eClassifier(path, threads=1)
    if cell.pt2e_runtime == "eager":  # the exported program as torch runs it, without inductor's compile
        with torch.no_grad():
            logits = program.module(x.float().contiguous())
    else:
        logits = program.logits(x)
    _check_logits(logits, len(x), cell.data.info.num_classes, cell.pt2e_runtime)
    return None


def _stage_learn(cell: _Cell) -> str | None:
    """A short version of the family recipe on all of digits' training images (same optimizer,
    learning rate, warm-up and smoothing; LEARN_EPOCHS epochs at native size, every image each
    epoch), then the test accuracy. Whether a family learns at all here, not how well it can."""
    import torch

    import mpsearch
    from mpsearch.evaluation.metrics import correct_mask
    from mpsearch.models.train import train_model

    if cell.data.info.image_size != 8:
        return f"{SKIPPED}: digits (8 px) only"
    data = mpsearch.load_dataset("digits")
    recipe = replace(training_recipe(cell), epochs=LEARN_EPOCHS, image_scales=(1.0,), keep_fraction=1.0)
    model = copy.deepcopy(cell.model)
    torch.manual_seed(0)
    train_model(model, data.train, data.info, recipe, seed=0, progress=False)
    with torch.no_grad():
        accuracy = float(correct_mask(model.eval(), data.test).float().mean())
    cell.notes["learn_accuracy"] = round(100 * accuracy, 1)
    return None


STAGE_FUNCTIONS = {
    "build": _stage_build, "train": _stage_train, "eval": _stage_eval, "sensitivity": _stage_sensitivity,
    "fake": lambda cell: _measure(cell, "fake"), "int8": lambda cell: _measure(cell, "int8"),
    "onnx": _stage_onnx, "pt2e": _stage_pt2e, "learn": _stage_learn,
}


def run_stage(stage: str, cell: _Cell) -> str:
    """``ok``, ``skipped: ...``, ``refused: <UserError>`` or ``CRASH: <type>: <message>``."""
    from mpsearch.errors import UserError, first_line, quoted

    try:
        return STAGE_FUNCTIONS[stage](cell) or "ok"
    except UserError as exc:
        return f"refused: {first_line(exc, limit=300)}"  # one table cell, not a traceback
    except Exception as exc:  # noqa: BLE001 - every other failure is what this sweep is looking for
        return f"CRASH: {quoted(exc)}"


def passed(result: str) -> bool:
    return result == "ok" or result.startswith(SKIPPED)


def cell_main(conn: Any, name: str, data: tuple[DataSplits, int], stages: list[str], tmp: Path, pt2e_runtime: str) -> None:
    """The subprocess: run ``stages`` in order, sending ``(stage, result, seconds)`` after each so
    that the parent keeps what passed even when a later stage hangs or kills the process."""
    os.setpgrp()  # a group of its own, so that a timeout kills its compile workers too (see _kill)
    import torch

    import mpsearch

    torch.set_num_threads(1)  # one core per cell: --jobs cells share the machine predictably
    mpsearch.set_verbosity(logging.ERROR)
    logging.getLogger("torch").setLevel(logging.ERROR)  # inductor's notices would break the parent's progress bar
    warnings.simplefilter("ignore")
    tmp.mkdir(parents=True, exist_ok=True)
    cell = _Cell(name, data[0], train_images=data[1], tmp=tmp, pt2e_runtime=pt2e_runtime)
    for stage in ("build", *[s for s in stages if s != "build"]):  # every stage needs the model
        start = time.perf_counter()
        result = run_stage(stage, cell)
        if cell.notes:
            conn.send(dict(cell.notes))
        conn.send((stage, result, round(time.perf_counter() - start, 2)))
        if not passed(result):
            break
    conn.close()


# -- running the cells ---------------------------------------------------------------------------
@dataclass
class _Running:
    key: str
    stages: list[str]  # in the order the cell runs them, build first
    process: Any
    conn: Any
    started: float
    last: float  # when the cell last reported a stage: the running stage started then
    record: dict[str, Any]

    def current(self) -> str | None:
        """The stage running now: the first one not reported (None once all are)."""
        reported = {s for s, _, _ in self.record["stages"]}
        return next((s for s in self.stages if s not in reported), None)


def start_cell(ctx: Any, key: str, model: str, data: tuple[DataSplits, int], stages: list[str], tmp: Path,
               pt2e_runtime: str) -> _Running:
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=cell_main, args=(send, model, data, stages, tmp / key.replace("@", "_"), pt2e_runtime),
                          daemon=True)
    process.start()
    send.close()  # the child holds the only send end: its exit shows as EOF here
    now = time.perf_counter()
    order = ["build", *[s for s in stages if s != "build"]]
    return _Running(key, order, process, receive, now, now, {"model": model, "stages": [], "wall_s": 0.0})


def _drain(run: _Running) -> None:
    try:
        while run.conn.poll():
            message = run.conn.recv()
            if isinstance(message, dict):  # the cell's notes (_Cell.notes), not a stage
                run.record["notes"] = message
                continue
            stage, result, seconds = message
            run.record["stages"].append([stage, result, seconds])
            run.last = time.perf_counter()
    except (EOFError, OSError):
        pass


def _kill(process: Any) -> None:
    """Kill the cell and what it started (inductor's compile workers): the cell leads its own process group."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # not (yet) a group leader
        process.kill()


def poll_cell(run: _Running, limits: dict[str, float]) -> bool:
    """Collect what the cell reported; True when it is over (finished, died, or its running stage
    passed that stage's limit, ``limits[stage]``, else ``limits["*"]``)."""
    _drain(run)
    stage = run.current()
    limit = limits.get(stage or "", limits["*"])
    if run.process.is_alive() and time.perf_counter() - run.last <= limit:
        return False
    why = None
    if run.process.is_alive():
        _kill(run.process)
        why = f"CRASH: timeout (over {limit:.0f} s)"
    run.process.join()
    _drain(run)
    stage = run.current()
    last_failed = bool(run.record["stages"]) and not passed(run.record["stages"][-1][1])
    if stage is not None and not last_failed:
        why = why or f"CRASH: died (exit code {run.process.exitcode})"
        run.record["stages"].append([stage, why, round(time.perf_counter() - run.last, 2)])
    run.record["wall_s"] = round(time.perf_counter() - run.started, 2)
    run.conn.close()
    return True


def run_cells(todo: list[tuple[str, str, int]], data: dict[int, tuple[DataSplits, int]], stages: list[str], args: argparse.Namespace,
              results: dict[str, Any], save: Any) -> None:
    """Run every ``(key, model, size)`` cell, ``args.jobs`` at a time, saving after each one."""
    from tqdm import tqdm

    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per cell: no state, threads or crash shared
    # One core per cell, inductor's compiler included (it would start a worker pool per core);
    # set here because a spawned child imports torch while unpickling its data, before cell_main runs.
    os.environ.update(OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1")
    # torch leaves a semaphore behind in each cell; the resource tracker's notice of it is noise.
    os.environ["PYTHONWARNINGS"] = "ignore::UserWarning:multiprocessing.resource_tracker"
    limits = {"*": args.timeout, "pt2e": args.pt2e_timeout}
    pending, running = list(todo), []
    # Exported files go to one temporary folder, removed at the end even when a cell was killed.
    with tqdm(total=len(todo), desc="cells", unit="cell") as bar, tempfile.TemporaryDirectory(prefix="sweep_zoo_") as tmp:
        while pending or running:
            while pending and len(running) < args.jobs:
                key, model, size = pending.pop(0)
                running.append(start_cell(ctx, key, model, data[size], stages, Path(tmp), args.pt2e_runtime))
            multiprocessing.connection.wait([r.conn for r in running] + [r.process.sentinel for r in running], timeout=1.0)
            for run in [r for r in running if poll_cell(r, limits)]:
                running.remove(run)
                results[run.key] = run.record
                save()
                bar.set_postfix_str(f"{run.key}: {summary(run.record, stages)[:60]}")
                bar.update(1)


def load_results(path: Path, resume: bool) -> dict[str, Any]:
    if resume and path.exists():
        return json.loads(path.read_text())
    return {}


def done(record: dict[str, Any] | None, model: str, stages: list[str]) -> bool:
    """Whether a saved cell answers this run: same model, and it ran to the end or stopped at a failure."""
    if not record or record.get("model") != model or not record.get("stages"):
        return False
    reported = [s for s, _, _ in record["stages"]]
    return not passed(record["stages"][-1][1]) or all(s in reported for s in stages)


# -- the report ----------------------------------------------------------------------------------
def escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def outcome(record: dict[str, Any] | None) -> str:
    """``end to end``, ``refused``, ``crashed`` or ``not run``."""
    if not record or not record.get("stages"):
        return "not run"
    last = record["stages"][-1][1]
    return "end to end" if passed(last) else "refused" if last.startswith("refused") else "crashed"


def summary(record: dict[str, Any] | None, stages: list[str]) -> str:
    """One table cell: the last stage passed and, where a stage did not pass, its one line."""
    if not record or not record.get("stages"):
        return "not run"
    ok = [s for s, r, _ in record["stages"] if r == "ok"]
    skipped = [f"{s} {r}" for s, r, _ in record["stages"] if r.startswith(SKIPPED)]
    notes = record.get("notes", {})
    native_only = [f"trains at {notes['train_px'][-1]} px only"] if notes.get("native_only") else []
    learned = [f"digits {notes['learn_accuracy']:.0f} % after {LEARN_EPOCHS} epochs"] if "learn_accuracy" in notes else []
    skipped = [s for s in skipped if not s.startswith("learn")]  # the learn stage runs on digits only, and says so above
    if outcome(record) == "end to end":
        return "; ".join([f"✓ end to end ({ok[-1]})" if ok else "✓", *skipped, *native_only, *learned])
    stage, result, _ = record["stages"][-1]
    reached = f"{ok[-1]} ✓ · " if ok else ""
    return f"{reached}**{stage}** {result}" + "".join(f"; {n}" for n in native_only)


def counts_table(families: list[str], records: dict[str, Any], sizes: list[int]) -> list[str]:
    lines = ["| size | families | passed every stage run | refused | crashed | not run |", "|---|---:|---:|---:|---:|---:|"]
    for size in sizes:
        got = [outcome(records.get(f"{f}@{size}")) for f in families]
        lines.append(f"| {size} px | {len(families)} | {got.count('end to end')} | {got.count('refused')} | "
                     f"{got.count('crashed')} | {got.count('not run')} |")
    return lines


def main_table(families: list[str], models: dict[str, Any], records: dict[str, Any], sizes: list[int],
               stages: list[str]) -> list[str]:
    lines = ["| family | model | " + " | ".join(f"{s} px" for s in sizes) + " |", "|---|---|" + "---|" * len(sizes)]
    for family in families:
        choice = models[family]
        if choice.get("model") is None:
            lines.append(f"| {family} | — | " + " | ".join(escape(choice["error"]) for _ in sizes) + " |")
            continue
        cells = [escape(summary(records.get(f"{family}@{s}"), stages)) for s in sizes]
        lines.append(f"| {family} | `{choice['model']}` ({choice['params'] / 1e6:.2f} M) | " + " | ".join(cells) + " |")
    return lines


def img_size_table(families: list[str], models: dict[str, Any], records: dict[str, Any], stages: list[str]) -> list[str]:
    """Families whose model's constructor takes ``img_size`` (their attention or position
    embedding is sized at construction) and whether they run end to end at 28 px."""
    takers = [f for f in families if models[f].get("img_size")]
    if not takers:
        return ["No family in this run takes `img_size`."]
    running = [f for f in takers if outcome(records.get(f"{f}@28")) == "end to end"]
    lines = [f"{len(running)} of {len(takers)} ({100 * len(running) / len(takers):.0f} %) run end to end at 28 px.", "",
             "| family | model | runs at 28 px | 28 px |", "|---|---|---|---|"]
    for family in takers:
        record = records.get(f"{family}@28")
        lines.append(f"| {family} | `{models[family]['model']}` | {'yes' if family in running else 'no'} | "
                     f"{escape(summary(record, stages))} |")
    return lines


def weak_learners_table(families: list[str], models: dict[str, Any], records: dict[str, Any]) -> list[str]:
    """Families whose short recipe ends within 10 points of chance on digits (10 classes: at most 20 %)."""
    learned = {f: records[f"{f}@8"]["notes"]["learn_accuracy"] for f in families
               if "learn_accuracy" in (records.get(f"{f}@8") or {}).get("notes", {})}
    if not learned:
        return ["The learn stage did not run."]
    weak = sorted((acc, f) for f, acc in learned.items() if acc <= 20.0)
    lines = [f"{len(learned)} families trained; {len(weak)} end within 10 points of chance (at most 20 %); "
             f"median {sorted(learned.values())[len(learned) // 2]:.1f} %.", ""]
    if weak:
        lines += ["| family | model | digits test accuracy |", "|---|---|---:|"]
        lines += [f"| {f} | `{models[f]['model']}` | {acc:.1f} % |" for acc, f in weak]
    return lines


def timing_lines(records: dict[str, Any], keys: list[str], wall_s: float, ran: int, jobs: int, zoo_families: int,
                 sizes: list[int]) -> list[str]:
    """This run's wall time, the mean cell, and the full sweep extrapolated from it (said so).
    ``ran``: cells this invocation ran; the others in ``keys`` were kept from an earlier one (--resume)."""
    cells = [records[k]["wall_s"] for k in keys if records.get(k, {}).get("wall_s")]
    kept = f", {len(keys) - ran} more kept from an earlier run (--resume)" if ran < len(keys) else ""
    if not cells:
        return [f"Wall time: {wall_s / 60:.1f} min (no cell ran)."]
    mean = sum(cells) / len(cells)
    full = mean * zoo_families * len(sizes) / jobs
    return [f"Wall time of this run: {wall_s / 60:.1f} min (--jobs {jobs}) for {ran} cells{kept}; "
            f"{mean:.0f} s per cell on average over all {len(cells)} (min {min(cells):.0f} s, max {max(cells):.0f} s, "
            f"{sum(cells) / 60:.1f} min in all).",
            "Mean seconds per stage where it ran: " + ", ".join(f"{s} {t:.1f}" for s, t in stage_means(records, keys).items()) + ".",
            f"Extrapolated from the mean cell, not measured: all {zoo_families} families at {len(sizes)} size(s) would take "
            f"about {full / 60:.0f} min with --jobs {jobs}, plus picking the models once per timm version."]


def stages_run(records: dict[str, Any], keys: list[str]) -> list[str]:
    """The stages any of the cells ``keys`` ran, in the pipeline's order (runs kept with --resume
    may have run different stages at each size)."""
    ran = {stage for key in keys for stage, _, _ in (records.get(key) or {}).get("stages", [])}
    return [stage for stage in STAGES if stage in ran]


def stage_means(records: dict[str, Any], keys: list[str]) -> dict[str, float]:
    """Mean seconds of each stage over the cells that ran it (a timed-out stage counts until it was killed)."""
    times: dict[str, list[float]] = {}
    for key in keys:
        for stage, _, seconds in (records.get(key) or {}).get("stages", []):
            times.setdefault(stage, []).append(seconds)
    return {stage: sum(t) / len(t) for stage, t in times.items()}


def write_report(out: Path, args: argparse.Namespace, families: list[str], models: dict[str, Any], records: dict[str, Any],
                 sources: dict[int, str], wall_s: float, ran: int, zoo_families: int) -> None:
    import timm
    import torch

    from mpsearch.host.files import atomic_write_text
    from mpsearch.host.machine import describe_machine

    sizes, stages = args.sizes, args.stages
    keys = [f"{f}@{s}" for f in families for s in sizes]
    lines = [
        "# Compatibility of the timm zoo", "",
        "Written by `scripts/sweep_zoo.py` (its docstring says what each stage runs). One model per timm family (its "
        "smallest variant by parameter count), random weights, each cell in its own subprocess with one torch thread and "
        f"a limit of {args.timeout:.0f} s per stage ({args.pt2e_timeout:.0f} s for pt2e), stopped at the first stage that "
        f"does not pass. The pt2e stage runs the exported program {PT2E_RUNTIMES[args.pt2e_runtime]}.", "",
        f"- Command: `python scripts/sweep_zoo.py {shlex.join(sys.argv[1:])}`",
        f"- timm {timm.__version__}, torch {torch.__version__}; machine: {describe_machine()}",
        *(f"- {size} px: stages {', '.join(stages_run(records, [f'{f}@{size}' for f in families]))}; data: {sources[size]}"
          for size in sizes),
        *(f"- {line}" for line in timing_lines(records, keys, wall_s, ran, args.jobs, zoo_families, sizes)), "",
        "A cell shows the last stage passed (✓) and the first that did not: `refused` is mpsearch's own one-line "
        "check (a UserError), `CRASH` any other exception, a hang past the limit or a dead process. \"trains at N px "
        "only\": zoo.training_recipe switched the family recipe's progressive resizing off for that model.", "",
        *counts_table(families, records, sizes), "",
        *main_table(families, models, records, sizes, stages), "",
        "## Families whose constructor takes `img_size`", "",
        *(img_size_table(families, models, records, stages) if 28 in sizes else ["28 px was not run."]), "",
        f"## Families that do not learn digits in {LEARN_EPOCHS} epochs", "",
        "The learn stage: the family recipe shortened to "
        f"{LEARN_EPOCHS} epochs at native size on all 1,257 training images of digits, from random weights; test accuracy "
        "on its 360 test images.", "",
        *(weak_learners_table(families, models, records) if 8 in sizes and "learn" in stages else ["The learn stage did not run."]),
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(lines) + "\n", what="compatibility report")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="", help="comma-separated timm families (default: all)")
    ap.add_argument("--sizes", default="8,28", help="image sizes: 8 (digits), 28 (Fashion-MNIST)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"of {','.join(STAGES)} (build always runs)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N families (alphabetical)")
    ap.add_argument("--out", default="docs/compatibility.md")
    ap.add_argument("--jobs", type=int, default=1, help="cells run in parallel")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds a stage may run before it counts as hung")
    # Measured on a busy 2-core Xeon: pt2e (two torch.export passes and an inductor compile on one
    # thread) took 102 s for levit_128s and 201 s for densenet121 at 8 px, no hang: a 120 s limit
    # would report slow compiles as crashes.
    ap.add_argument("--pt2e-timeout", type=float, default=600.0, help="the same for the pt2e stage")
    ap.add_argument("--pt2e-runtime", choices=tuple(PT2E_RUNTIMES), default="eager",
                    help="run the exported program as torch runs it (eager) or compiled by inductor, the int8 kernels "
                         "mpsearch times (compile: about 90 s a cell on one thread)")
    ap.add_argument("--resume", action="store_true", help="keep the cells of the JSON next to --out and skip them")
    args = ap.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    typed = {s.strip() for s in args.stages.split(",") if s.strip()}
    unknown = typed - set(STAGES)
    args.stages = [s for s in STAGES if s in typed]  # the pipeline's order, whatever order was typed
    if unknown or args.jobs < 1:
        ap.error(f"unknown stages {sorted(unknown)}" if unknown else "--jobs must be >= 1")
    return args


def select_families(args: argparse.Namespace, members: dict[str, list[str]]) -> list[str]:
    families = sorted(members) if not args.families else [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in members]
    if unknown:
        raise SystemExit(f"--families: unknown {unknown}; timm's families are {', '.join(sorted(members))}")
    return families[: args.limit] if args.limit else families


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    members = family_members()
    families = select_families(args, members)
    models = chosen_models(families, members, progress=True)
    data_sources = {size: small_data(size) for size in args.sizes}
    out = Path(args.out)
    results_path = out.with_suffix(".json")
    records = load_results(results_path, args.resume)

    def save() -> None:
        from mpsearch.host.files import atomic_write_text

        results_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(results_path, json.dumps(records, indent=1, sort_keys=True), what="sweep results")

    todo = [(f"{f}@{s}", models[f]["model"], s) for f in families for s in args.sizes
            if models[f].get("model") and not done(records.get(f"{f}@{s}"), models[f]["model"], args.stages)]
    run_cells(todo, {s: (d, n) for s, (d, _, n) in data_sources.items()}, args.stages, args, records, save)
    write_report(out, args, families, models, records, {s: src for s, (_, src, _) in data_sources.items()},
                 time.perf_counter() - start, len(todo), len(members))
    print(f"wrote {out} (cells kept in {results_path})")


if __name__ == "__main__":
    main()
