"""Quantization-aware fine-tuning of one policy: LSQ step sizes and distillation from the fp32 model.

:func:`finetune` starts from the post-training-quantized model an :class:`Evaluator` builds for a
policy (whatever PTQ method it was configured with), makes every quantizer's step size learnable
(:mod:`mpsearch.quant.lsq`), trains weights and steps to match the fp32 model's outputs on
augmented training images, then freezes the learned quantizers and measures the result on the
validation and test splits, paired with the fp32 model on the same images.

The result is saved as a *fine-tuned checkpoint*: a file of tensors and plain values (it loads
with ``weights_only=True``) holding the fine-tuned float weights under the model's own names and
each layer's learned quantizer (precision, scale, zero point). The policy written next to it
names that file in ``provenance.finetune``; :func:`attach_finetuned` (used by ``mpsearch
evaluate``) loads it back so the policy re-measures to the same numbers.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mpsearch.config import FinetuneConfig, TrainConfig
from mpsearch.errors import UserError
from mpsearch.evaluation.evaluator import EvaluationResult, Evaluator
from mpsearch.host.files import atomic_write
from mpsearch.host.machine import native_bf16
from mpsearch.models.train import augment
from mpsearch.policy import LayerPrecision, MeasurementSettings, Policy
from mpsearch.quant.lsq import attach_learned_quantizers, freeze_learned_quantizers
from mpsearch.quant.primitives import QParams, fake_quantize, integer_range

__all__ = ["FinetuneResult", "finetune", "save_finetuned", "write_finetuned", "load_finetuned", "attach_finetuned", "FORMAT"]

logger = logging.getLogger(__name__)
FORMAT = "mpsearch-finetuned"
_VERSION = 1


@dataclass
class FinetuneResult:
    """Before (PTQ) and after (QAT) measurements of one policy, and how long training took."""

    policy: Policy
    before: dict[str, EvaluationResult]  # split -> result
    after: dict[str, EvaluationResult]
    train_s: float
    config: FinetuneConfig

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for split, result in self.after.items():
            out[f"{split}_accuracy"] = result.accuracy
            out[f"{split}_ci95"] = list(result.accuracy_ci95)
            if result.drop is not None:
                out[f"{split}_drop"] = result.drop
                out[f"{split}_drop_ci95"] = list(result.drop_ci95 or ())
        for split, result in self.before.items():
            out[f"ptq_{split}_accuracy"] = result.accuracy
        return out


def _distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, config: FinetuneConfig) -> torch.Tensor:
    t = config.temperature
    loss = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                    log_target=True, reduction="batchmean") * (t * t)
    if config.label_weight > 0:
        loss = loss + config.label_weight * F.cross_entropy(student, labels)
    return loss


def _train(evaluator: Evaluator, config: FinetuneConfig, progress: bool) -> None:
    """``config.steps`` steps of LSQ + distillation on ``evaluator.qmodel`` (quantizers attached)."""
    qmodel, teacher = evaluator.qmodel, evaluator.baseline.model
    info = evaluator.data.info
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    recipe = TrainConfig(crop_padding=2, hflip=True)  # crop + flip: a few hundred steps on a fixed subset would overfit
    fill = (-torch.tensor(info.mean) / torch.tensor(info.std)).view(1, -1, 1, 1)
    params = list(qmodel.module.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=True, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / config.steps)))
    # Frozen batch-norm statistics: the quantized model is evaluated with them, and a few hundred
    # small batches would only add noise to statistics estimated on the whole training split.
    qmodel.module.eval()
    teacher.eval()
    bf16 = config.bf16 and native_bf16("cpu") is None  # emulated bf16 is slower than fp32
    bar = tqdm(total=config.steps, desc="fine-tune (LSQ + distillation)", disable=not progress)
    step, epoch, loss_sum = 0, 0, 0.0
    try:
        while step < config.steps:
            for x, y in evaluator.data.train.batches(config.batch_size, shuffle=True, seed=config.seed * 1000 + epoch):
                x = augment(x, recipe, fill, gen).contiguous(memory_format=torch.channels_last)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    with torch.no_grad():
                        target = teacher(x).float()
                    loss = _distillation_loss(qmodel.module(x).float(), target, y, config)
                if not torch.isfinite(loss):
                    raise UserError(f"fine-tuning diverged at step {step} (loss {loss.item()}); lower finetune.lr",
                                    fields=("finetune.lr",))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                loss_sum += float(loss.detach())
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss_sum / step:.4f}")
                if step >= config.steps:
                    break
            epoch += 1
    finally:
        bar.close()
        for p in params:
            p.requires_grad_(False)


def finetune(
    evaluator: Evaluator,
    policy: Policy,
    config: FinetuneConfig | None = None,
    *,
    splits: tuple[str, ...] = ("val", "test"),
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``policy`` on ``evaluator``'s model; measure it before and after on ``splits``.

    Afterwards ``evaluator.qmodel`` holds the fine-tuned weights with the learned quantizers
    pinned for ``policy``'s precisions: :func:`save_finetuned` writes them.
    """
    config = config or FinetuneConfig()
    if evaluator.quant.smoothquant_alpha is not None:
        raise UserError("quant.smoothquant_alpha: fine-tuning a SmoothQuant-smoothed model is not supported; fine-tune without it",
                        fields=("quant.smoothquant_alpha",))
    evaluator.calibrate()
    before = {s: evaluator.evaluate(policy, split=s, progress=progress) for s in splits}
    for s, r in before.items():
        logger.info(f"before fine-tuning ({evaluator.quant.ptq} PTQ): {s} accuracy {r.accuracy:.2%} ({(r.drop or 0) * 100:+.2f} pp)")
    qmodel = evaluator.qmodel
    qmodel.apply(policy)
    sample, _ = next(iter(evaluator.data.train.batches(1)))
    attach_learned_quantizers(qmodel, sample.contiguous(memory_format=torch.channels_last))
    start = time.perf_counter()
    _train(evaluator, config, progress)
    train_s = time.perf_counter() - start
    for name, (weight, act) in freeze_learned_quantizers(qmodel).items():
        qmodel.pin(name, policy.precision(name), weight, act)
    qmodel.clear_weight_cache()  # other precisions re-quantize the fine-tuned float weights
    after = {s: evaluator.evaluate(policy, split=s, progress=progress) for s in splits}
    for s, r in after.items():
        logger.info(f"after fine-tuning: {s} accuracy {r.accuracy:.2%} ({(r.drop or 0) * 100:+.2f} pp)")
    return FinetuneResult(policy=policy, before=before, after=after, train_s=train_s, config=config)


# -- the fine-tuned checkpoint -------------------------------------------------------------------
def _qparams_record(qp: QParams | None) -> dict[str, Any] | None:
    if qp is None:
        return None
    return {"scale": qp.scale.detach().clone().float(), "zero_point": qp.zero_point.detach().clone().to(torch.int32),
            "qmin": int(qp.qmin), "qmax": int(qp.qmax), "axis": -1 if qp.axis is None else int(qp.axis)}


def _qparams_from_record(record: Any, where: str) -> QParams | None:
    if record is None:
        return None
    if not isinstance(record, dict) or set(record) != {"scale", "zero_point", "qmin", "qmax", "axis"}:
        raise UserError(f"{where}: expected scale, zero_point, qmin, qmax and axis")
    scale, zero = record["scale"], record["zero_point"]
    if not (isinstance(scale, torch.Tensor) and isinstance(zero, torch.Tensor) and scale.shape == zero.shape):
        raise UserError(f"{where}: scale and zero_point must be tensors of one shape")
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise UserError(f"{where}: scales must be finite and positive")
    qmin, qmax, axis = record["qmin"], record["qmax"], record["axis"]
    grids = {integer_range(b, s) for b in range(2, 9) for s in (True, False)}
    if (qmin, qmax) not in grids or axis not in (-1, 0):
        raise UserError(f"{where}: ({qmin}, {qmax}) on axis {axis} is not a 2-8 bit grid")
    return QParams(scale=scale.float(), zero_point=zero.to(torch.int32), qmin=int(qmin), qmax=int(qmax),
                   axis=None if axis == -1 else 0)


def save_finetuned(path: str | Path, evaluator: Evaluator, policy: Policy) -> str:
    """Write the fine-tuned weights and learned quantizers; returns the file's sha256."""
    qmodel = evaluator.qmodel
    quantizers = {}
    for name, (spec, weight, act) in qmodel.pinned().items():
        quantizers[name] = {
            "precision": {"weight_bits": spec.weight_bits, "act_bits": spec.act_bits, "granularity": spec.granularity,
                          "symmetric": spec.symmetric, "act_symmetric": spec.act_symmetric},
            "weight": _qparams_record(weight[0] if weight is not None else None),
            "act": _qparams_record(act),
        }
    payload = {"format": FORMAT, "version": _VERSION, "model": policy.model, "dataset": policy.dataset,
               "base_checkpoint_sha256": evaluator.baseline.sha256 or "",
               "state_dict": qmodel.float_state_dict(), "quantizers": quantizers}
    atomic_write(path, lambda f: torch.save(payload, f), binary=True, what="fine-tuned checkpoint")
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_finetuned(path: str | Path, evaluator: Evaluator, result: FinetuneResult) -> Policy:
    """Write the fine-tuned policy to ``path`` (JSON) and its checkpoint beside it (``.pt``).

    The policy's provenance names the checkpoint and its sha256, the fine-tuning settings, the
    measured metrics and the quantizer settings, so ``mpsearch evaluate`` re-measures it as is.
    """
    path = Path(path)
    checkpoint = path.with_suffix(".pt")
    digest = save_finetuned(checkpoint, evaluator, result.policy)
    tuned = result.policy.with_provenance(
        finetune={"checkpoint": checkpoint.name, "sha256": digest, "config": result.config.to_dict(),
                  "train_s": result.train_s},
        metrics=result.metrics(),
    ).with_settings(MeasurementSettings(evaluator.quant, len(evaluator.data.calibration)))
    tuned.save(path)
    return tuned


def load_finetuned(path: str | Path) -> dict[str, Any]:
    """Read a fine-tuned checkpoint as data (``weights_only=True``) and check its structure."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"fine-tuned checkpoint {path}: file not found; keep it next to its policy JSON") from None
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors of corrupt files come in many types
        raise UserError(f"fine-tuned checkpoint {path}: not readable ({type(exc).__name__}); run mpsearch finetune again") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"fine-tuned checkpoint {path}: not an mpsearch fine-tuned checkpoint")
    if payload.get("version") != _VERSION:
        raise UserError(f"fine-tuned checkpoint {path}: version {payload.get('version')!r}, this mpsearch reads {_VERSION}")
    state, quantizers = payload.get("state_dict"), payload.get("quantizers")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"fine-tuned checkpoint {path}: state_dict must map names to tensors")
    if not isinstance(quantizers, dict):
        raise UserError(f"fine-tuned checkpoint {path}: quantizers must be an object per layer")
    pins = {}
    for name, record in quantizers.items():
        where = f"fine-tuned checkpoint {path}: quantizers.{name}"
        if not isinstance(record, dict) or set(record) != {"precision", "weight", "act"}:
            raise UserError(f"{where}: expected precision, weight and act")
        spec = LayerPrecision.from_dict(record["precision"], f"{where}.precision")
        weight_qp = _qparams_from_record(record["weight"], f"{where}.weight")
        act_qp = _qparams_from_record(record["act"], f"{where}.act")
        if (weight_qp is None) != (spec.weight_bits is None) or (act_qp is None) != (spec.act_bits is None):
            raise UserError(f"{where}: quantizers do not match the precision")
        pins[name] = (spec, weight_qp, act_qp)
    return {"state_dict": state, "pins": pins, "model": payload.get("model"), "dataset": payload.get("dataset"),
            "base_checkpoint_sha256": payload.get("base_checkpoint_sha256")}


def attach_finetuned(evaluator: Evaluator, policy: Policy, policy_dir: str | Path) -> bool:
    """If ``policy`` was fine-tuned, load its checkpoint into ``evaluator``; True when it did.

    The checkpoint path in ``provenance.finetune`` is relative to the policy file's folder; its
    sha256 must match, so a policy never silently meets other weights.
    """
    info = policy.provenance.get("finetune")
    if not info:
        return False
    if not isinstance(info, dict) or not isinstance(info.get("checkpoint"), str) or not isinstance(info.get("sha256"), str):
        raise UserError("policy.provenance.finetune: needs checkpoint (a path) and sha256")
    path = Path(policy_dir) / info["checkpoint"]
    if not path.is_file():
        raise UserError(f"policy.provenance.finetune.checkpoint: {path} not found; keep the .pt file next to the policy")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != info["sha256"]:
        raise UserError(f"fine-tuned checkpoint {path}: sha256 {digest[:12]}… is not the policy's {info['sha256'][:12]}…")
    loaded = load_finetuned(path)
    if loaded["model"] != policy.model:
        raise UserError(f"fine-tuned checkpoint {path}: made for model {loaded['model']!r}, the policy is for {policy.model!r}")
    qmodel = evaluator.qmodel
    try:
        qmodel.load_float_state_dict(loaded["state_dict"])
    except RuntimeError:
        raise UserError(f"fine-tuned checkpoint {path}: its weights do not fit model {policy.model!r}") from None
    for name, (spec, weight_qp, act_qp) in loaded["pins"].items():
        layer = qmodel.wrappers.get(name)
        if layer is None:
            raise UserError(f"fine-tuned checkpoint {path}: quantizers.{name} is not a quantizable layer")
        weight = None
        if weight_qp is not None:
            if weight_qp.axis is not None and weight_qp.scale.numel() != layer.layer.weight.shape[0]:
                raise UserError(f"fine-tuned checkpoint {path}: quantizers.{name} has {weight_qp.scale.numel()} "
                                f"channel scales for {layer.layer.weight.shape[0]} channels")
            with torch.no_grad():
                weight = (weight_qp, fake_quantize(layer.layer.weight.detach(), weight_qp))
        qmodel.pin(name, spec, weight, act_qp)
    return True
