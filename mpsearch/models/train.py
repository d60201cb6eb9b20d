"""Training a baseline: :func:`train_model` runs a :class:`~mpsearch.config.TrainConfig` on a model.

SGD-Nesterov or AdamW with a one-cycle learning rate, label smoothing, optional crop/flip
augmentation, progressive resizing, bf16 autocast where the CPU runs bf16 natively, and
selective epochs (after the first, each epoch trains on the images with the highest recent loss,
then batch-norm statistics are re-estimated). Batches and augmentation are seeded.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mpsearch.config import TrainConfig
from mpsearch.data import DatasetInfo, Split
from mpsearch.host.machine import native_bf16

__all__ = ["augment", "train_model"]

logger = logging.getLogger(__name__)
_ETA_STEPS = 10  # steps timed (after the first) before the expected training time is logged


def augment(x: torch.Tensor, recipe: TrainConfig, fill: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-image random crop (zero-pixel padding) and horizontal flip, vectorized over the batch."""
    n, c, h, w = x.shape
    p = recipe.crop_padding
    if p > 0:
        padded = F.pad(x - fill, (p, p, p, p)) + fill  # pad with the normalized value of a black pixel
        oy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        ox = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
        x = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if recipe.hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def _optimizer(model: nn.Module, recipe: TrainConfig) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=recipe.lr, momentum=recipe.momentum, nesterov=True, weight_decay=recipe.weight_decay
        )
    # Decaying norm gains, biases, position embeddings and the class token toward zero only
    # hurts a transformer (DeiT and timm exclude them the same way).
    keep = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()  # timm: pos_embed, cls_token
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.dim() >= 2 and n not in keep]
    rest = [p for n, p in params if not (p.dim() >= 2 and n not in keep)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(recipe.momentum, 0.999),
    )


@dataclass
class _Run:
    """What every step of one training run shares: the model, where and how it trains, and its optimizer."""

    model: nn.Module
    recipe: TrainConfig
    info: DatasetInfo
    device: torch.device
    bf16: bool
    memory_format: torch.memory_format
    fill: torch.Tensor  # the normalized value of a black pixel, what crops pad with
    gen: torch.Generator  # batch order of selective epochs and augmentation
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.OneCycleLR
    epoch_images: list[int]
    loss_fn: nn.Module
    per_image_loss: nn.Module
    progress: bool


def train_model(
    model: nn.Module,
    train: Split,
    info: DatasetInfo,
    recipe: TrainConfig,
    *,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Train ``model`` in place with ``recipe`` (SGD-Nesterov or AdamW, one-cycle LR, label smoothing).

    Batches and augmentation come from the CPU with the same seeds on every ``device``; the model
    trains on ``device`` and comes back on the CPU. ``recipe.bf16`` asks for bf16 autocast where
    the device runs bf16 natively (:func:`mpsearch.host.machine.native_bf16`); elsewhere it trains in
    fp32, which is faster than emulated bf16."""
    n_train = len(train)
    run = _start(model, n_train, info, recipe, seed, progress, torch.device(device))
    selective = recipe.keep_fraction < 1
    # Each image's loss when it was last trained on (selective epochs pick by it; see TrainConfig).
    last_loss = torch.zeros(n_train)
    for epoch in range(recipe.epochs):
        size = recipe.image_size(epoch, info.image_size)
        positions, batches = _epoch_batches(run, train, epoch, seed, last_loss if selective else None)
        _train_epoch(run, epoch, size, batches, positions, last_loss)
    if selective:
        _recalibrate_batch_norm(model, train, recipe, run.device, run.memory_format, run.gen, progress)
    model.to(device="cpu", memory_format=torch.contiguous_format).eval()
    return model


def _start(model: nn.Module, n_train: int, info: DatasetInfo, recipe: TrainConfig, seed: int, progress: bool,
           device: torch.device) -> _Run:
    """Seed the run, move ``model`` to ``device`` in training mode, and set up its optimizer and schedule."""
    bf16 = recipe.bf16 and native_bf16(device.type) is None
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    fill = (-torch.tensor(info.mean) / torch.tensor(info.std)).view(1, -1, 1, 1)
    memory_format = torch.channels_last if recipe.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format).train()
    opt = _optimizer(model, recipe)
    epoch_images = [recipe.epoch_images(epoch, n_train) for epoch in range(recipe.epochs)]
    total_steps = sum(math.ceil(n / recipe.batch_size) for n in epoch_images)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=total_steps,
                                                pct_start=_warmup_fraction(recipe.warmup_fraction, total_steps))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    per_image_loss = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing, reduction="none")
    return _Run(model, recipe, info, device, bf16, memory_format, fill, gen, opt, sched, epoch_images, loss_fn,
                per_image_loss, progress)


def _warmup_fraction(fraction: float, total_steps: int) -> float:
    """The recipe's warm-up fraction, or in a run of a few steps (one epoch on a few hundred
    images), one that warms up over two steps: OneCycleLR divides by its warm-up's length in
    steps less one, so one step (4 steps at 0.25) fails and fewer leave no warm-up."""
    if fraction * total_steps > 1:
        return fraction
    return min(2 / max(total_steps, 1), 0.9)


def _epoch_batches(run: _Run, train: Split, epoch: int, seed: int,
                   last_loss: torch.Tensor | None) -> tuple[torch.Tensor | None, Iterable[tuple[torch.Tensor, torch.Tensor]]]:
    """The batches ``epoch`` trains on and, for a selective recipe (``last_loss`` given), the
    positions of their images in ``train``: all of them shuffled first, then those picked by loss."""
    if last_loss is None:  # every image every epoch, in a seeded shuffle
        return None, train.batches(run.recipe.batch_size, shuffle=True, seed=seed * 1000 + epoch)
    if epoch == 0:
        positions = torch.randperm(len(train), generator=run.gen)
    else:
        positions = _pick_by_loss(last_loss, run.epoch_images[epoch], run.gen)
    return positions, train.select(positions).batches(run.recipe.batch_size)


def _train_epoch(run: _Run, epoch: int, size: int, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 positions: torch.Tensor | None, last_loss: torch.Tensor) -> None:
    """One epoch over ``batches`` at ``size`` pixels, with a progress bar of its running loss and accuracy.
    ``positions``: the training images the batches hold, in order, whose ``last_loss`` is updated (None: no update)."""
    recipe, images = run.recipe, run.epoch_images[epoch]
    steps = math.ceil(images / recipe.batch_size)
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{recipe.epochs} @{size}px", disable=not run.progress, leave=True)
    seen = 0
    timed_from = time.perf_counter()
    # Running sums stay on the device: reading them every step would stall a GPU's queue.
    correct = torch.zeros((), dtype=torch.int64, device=run.device)
    loss_sum = torch.zeros((), dtype=torch.float32, device=run.device)
    for step, (x, y) in enumerate(batches):
        y, logits, loss, losses = _train_step(run, x, y, size, per_image=positions is not None)
        if positions is not None:
            last_loss[positions[seen : seen + len(y)]] = losses.detach().float().cpu()
        seen += len(y)
        correct += (logits.argmax(1) == y).sum()
        loss_sum += loss.detach() * len(y)
        bar.update(1)
        if epoch == 0 and step == 0:
            timed_from = time.perf_counter()  # after the first step, which pays for one-time setup
        elif epoch == 0 and step == _ETA_STEPS:
            _log_expected_time(time.perf_counter() - timed_from, recipe, run.epoch_images, size, run.info.image_size)
        if step % 10 == 0 or seen == images:
            bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}", acc=f"{int(correct) / seen:.3f}")
    bar.close()


def _train_step(run: _Run, x: torch.Tensor, y: torch.Tensor, size: int, *,
                per_image: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One optimizer step on the batch ``(x, y)``, augmented and resized to ``size`` pixels: the labels
    on the device, the logits, the mean loss and (``per_image``) each image's loss."""
    x = augment(x, run.recipe, run.fill, run.gen)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = x.to(run.device, non_blocking=True).contiguous(memory_format=run.memory_format)
    y = y.to(run.device, non_blocking=True)
    losses = None
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16):
        logits = run.model(x)
        if not per_image:
            loss = run.loss_fn(logits.float(), y)
        else:
            losses = run.per_image_loss(logits.float(), y)
            loss = losses.mean()
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    run.sched.step()
    return y, logits, loss, losses


def _log_expected_time(seconds: float, recipe: TrainConfig, epoch_images: list[int], first_size: int, native: int) -> None:
    """Log the expected training time from the first steps: a step's time scales with the
    pixels it trains on (the image sizes of later epochs) and the steps with the images per epoch."""
    per_pixel_step = seconds / _ETA_STEPS / first_size**2
    total = sum(math.ceil(n / recipe.batch_size) * recipe.image_size(e, native) ** 2 * per_pixel_step
                for e, n in enumerate(epoch_images))
    logger.info(f"training: expected about {total / 60:.1f} min ({torch.get_num_threads()} threads; "
                f"from the first {_ETA_STEPS} steps)")


def _pick_by_loss(last_loss: torch.Tensor, n_keep: int, gen: torch.Generator) -> torch.Tensor:
    """``n_keep`` positions drawn without replacement with probability proportional to the rank
    of their last loss (the hardest image is the likeliest, the easiest still has a chance, so
    a stale low loss gets re-measured now and then), in random order. Gumbel top-k sampling."""
    n = len(last_loss)
    rank = torch.empty(n)
    rank[last_loss.argsort()] = torch.arange(1, n + 1, dtype=torch.float32)
    uniform = torch.rand(n, generator=gen).clamp_min(1e-12)
    keys = torch.log(rank / n) - torch.log(-torch.log(uniform))
    picked = keys.topk(n_keep).indices
    return picked[torch.randperm(n_keep, generator=gen)]


@torch.no_grad()
def _recalibrate_batch_norm(model: nn.Module, train: Split, recipe: TrainConfig, device: torch.device,
                            memory_format: torch.memory_format, gen: torch.Generator, progress: bool) -> None:
    """Re-estimate batch-norm running statistics on ``recipe.batch_norm_images`` random training
    images at native size, in float32 like evaluation: selective epochs see the hard images
    most, so the statistics they leave describe another mix of images than evaluation sees."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over every batch
    images = min(len(train), recipe.batch_norm_images)
    sample = train.select(torch.randperm(len(train), generator=gen)[:images])
    for x, _ in tqdm(sample.batches(256), total=math.ceil(images / 256), desc="batch-norm statistics",
                     disable=not progress, leave=False):
        model(x.to(device).contiguous(memory_format=memory_format))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


