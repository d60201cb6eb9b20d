"""Training a baseline: :func:`train_model` runs a :class:`~mpsearch.config.TrainRecipe` on a model.

SGD-Nesterov or AdamW with a one-cycle learning rate, label smoothing, optional crop/flip
augmentation, progressive resizing, bf16 autocast where the CPU runs bf16 natively, and
selective epochs (after the first, each epoch trains on the images with the highest recent loss,
then batch-norm statistics are re-estimated). Batches and augmentation are seeded.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mpsearch.config import TrainRecipe
from mpsearch.data import DatasetInfo, Split
from mpsearch.machine import native_bf16

__all__ = ["augment", "train_model"]

logger = logging.getLogger(__name__)
_ETA_STEPS = 10  # steps timed (after the first) before the expected training time is logged


def augment(x: torch.Tensor, recipe: TrainRecipe, fill: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
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


def _optimizer(model: nn.Module, recipe: TrainRecipe) -> torch.optim.Optimizer:
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


def train_model(
    model: nn.Module,
    train: Split,
    info: DatasetInfo,
    recipe: TrainRecipe,
    *,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Train ``model`` in place with ``recipe`` (SGD-Nesterov or AdamW, one-cycle LR, label smoothing).

    Batches and augmentation come from the CPU with the same seeds on every ``device``; the model
    trains on ``device`` and comes back on the CPU. ``recipe.bf16`` asks for bf16 autocast where
    the device runs bf16 natively (:func:`mpsearch.machine.native_bf16`); elsewhere it trains in
    fp32, which is faster than emulated bf16."""
    device = torch.device(device)
    bf16 = recipe.bf16 and native_bf16(device.type) is None
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    fill = (-torch.tensor(info.mean) / torch.tensor(info.std)).view(1, -1, 1, 1)
    memory_format = torch.channels_last if recipe.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format).train()
    opt = _optimizer(model, recipe)
    n_train = len(train)
    epoch_images = [recipe.epoch_images(epoch, n_train) for epoch in range(recipe.epochs)]
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr, total_steps=sum(math.ceil(n / recipe.batch_size) for n in epoch_images),
        pct_start=recipe.warmup_fraction,
    )
    selective = recipe.keep_fraction < 1
    # Each image's loss when it was last trained on (selective epochs pick by it; see TrainRecipe).
    last_loss = torch.zeros(n_train)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    per_image_loss = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing, reduction="none")
    for epoch in range(recipe.epochs):
        size = recipe.image_size(epoch, info.image_size)
        if selective:
            positions = torch.randperm(n_train, generator=gen) if epoch == 0 else _pick_by_loss(last_loss, epoch_images[epoch], gen)
            batches = train.select(positions).batches(recipe.batch_size)
        else:  # every image every epoch, in a seeded shuffle
            positions = None
            batches = train.batches(recipe.batch_size, shuffle=True, seed=seed * 1000 + epoch)
        steps = math.ceil(epoch_images[epoch] / recipe.batch_size)
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{recipe.epochs} @{size}px", disable=not progress, leave=True)
        seen = 0
        timed_from = time.perf_counter()
        # Running sums stay on the device: reading them every step would stall a GPU's queue.
        correct = torch.zeros((), dtype=torch.int64, device=device)
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        for step, (x, y) in enumerate(batches):
            x = augment(x, recipe, fill, gen)
            if size != x.shape[-1]:
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
                if positions is None:
                    loss = loss_fn(logits.float(), y)
                else:
                    losses = per_image_loss(logits.float(), y)
                    loss = losses.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if positions is not None:
                last_loss[positions[seen : seen + len(y)]] = losses.detach().float().cpu()
            seen += len(y)
            correct += (logits.argmax(1) == y).sum()
            loss_sum += loss.detach() * len(y)
            bar.update(1)
            if epoch == 0 and step == 0:
                timed_from = time.perf_counter()  # after the first step, which pays for one-time setup
            elif epoch == 0 and step == _ETA_STEPS:
                _log_expected_time(time.perf_counter() - timed_from, recipe, epoch_images, size, info.image_size)
            if step % 10 == 0 or seen == epoch_images[epoch]:
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}", acc=f"{int(correct) / seen:.3f}")
        bar.close()
    if selective:
        _recalibrate_batch_norm(model, train, recipe, device, memory_format, gen, progress)
    model.to(device="cpu", memory_format=torch.contiguous_format).eval()
    return model


def _log_expected_time(seconds: float, recipe: TrainRecipe, epoch_images: list[int], first_size: int, native: int) -> None:
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
def _recalibrate_batch_norm(model: nn.Module, train: Split, recipe: TrainRecipe, device: torch.device,
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


