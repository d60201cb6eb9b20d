"""Models: timm's factory, a small-image adaptation, baseline training and a checkpoint cache.

``create_model(name, info)`` is ``timm.create_model(name, num_classes, in_chans)`` plus, for
inputs of at most 64 pixels, the adaptation that keeps small images from being downsampled to
nothing: ResNets get a 3x3 stride-1 stem and no max-pool (the research project kept the ImageNet
stem on 32x32 inputs, leaving layer4 at 1x1), ViTs a patch size that gives a 7x7 grid on 28x28.

``get_baseline`` returns the fp32 model a study quantizes: from ``--checkpoint PATH``, from
timm's hub (``--pretrained``), or trained by mpsearch with a :class:`TrainRecipe` and cached
under ``cache_root()/checkpoints`` keyed by (model, data set, recipe, seed).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mpsearch.config import TrainRecipe
from mpsearch.data import DatasetInfo, DataSplits, Split
from mpsearch.errors import UserError, read_user_file
from mpsearch.files import atomic_write, atomic_write_text
from mpsearch.machine import describe_machine, native_bf16
from mpsearch.metrics import correct_mask
from mpsearch.paths import cache_root

__all__ = [
    "MODEL_ALIASES", "VIT_RECIPE", "Baseline", "augment", "create_model", "default_recipe", "get_baseline",
    "is_vision_transformer", "resolve_model_name", "sha256_file", "train_model",
]

# Short names users type -> timm names.
MODEL_ALIASES = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "vit_tiny": "vit_tiny_patch16_224",
}
SMALL_IMAGE_MAX = 64  # inputs up to this size get the small-image adaptation
_ADAPTATION_VERSION = 1  # part of the checkpoint cache key: bump when the adaptation changes


def resolve_model_name(name: str) -> str:
    """The timm name for ``name``; unknown names fail with suggestions."""
    timm_name = MODEL_ALIASES.get(name, name)
    if not timm.is_model(timm_name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:6]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise UserError(f"unknown model {name!r}{hint}; any timm model name works, e.g. resnet18, deit_tiny, test_resnet")
    return timm_name


def is_vision_transformer(name: str) -> bool:
    """Whether ``name`` is one of timm's plain vision transformers (ViT, DeiT and relatives)."""
    entry = timm.models.model_entrypoint(resolve_model_name(name))
    return entry.__module__.rsplit(".", 1)[-1] in ("vision_transformer", "deit")


# Vision transformers trained from scratch get AdamW with strong weight decay, as in DeiT
# (Touvron et al. 2021) and timm's ViT recipes. All at native size: a ViT's position embedding is fixed
# to the token grid, so progressive resizing does not apply. A DeiT-Tiny step on 28x28
# Fashion-MNIST at batch 128 costs about as much as a ResNet-18 one on this kind of CPU
# (~1.25 s on 2 cores), so three epochs fill the same ~30 minutes; the README has the accuracy.
VIT_RECIPE = TrainRecipe(
    epochs=3, batch_size=128, lr=1e-3, momentum=0.9, weight_decay=0.05, label_smoothing=0.1, warmup_fraction=0.2,
    image_scales=(1.0,), optimizer="adamw", keep_fraction=1.0,  # selective epochs were tuned on ResNet-18 only
)


def default_recipe(name: str) -> TrainRecipe:
    """The documented baseline recipe for model ``name``: :data:`VIT_RECIPE` for vision
    transformers, :class:`TrainRecipe`'s defaults (tuned on ResNet-18) for everything else."""
    return VIT_RECIPE if is_vision_transformer(name) else TrainRecipe()


def _vit_patch_size(image_size: int) -> int:
    # 28 -> 4 (7x7 = 49 tokens), 32 -> 4 (8x8), 8 -> 2 (4x4), 64 -> 8 (8x8).
    for patch in (2, 4, 8):
        if image_size % patch == 0 and image_size // patch >= 4 and (image_size // patch <= 8 or patch == 8):
            return patch
    return 1


def _adapt_resnet_stem(model: nn.Module, in_chans: int) -> None:
    stem = model.conv1
    if isinstance(stem, nn.Conv2d):
        model.conv1 = nn.Conv2d(in_chans, stem.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    else:  # timm's deep stems are a Sequential whose first conv carries the stride
        first = next(m for m in stem.modules() if isinstance(m, nn.Conv2d))
        first.stride = (1, 1)
    model.maxpool = nn.Identity()


def create_model(name: str, info: DatasetInfo, *, pretrained: bool = False) -> nn.Module:
    """A timm model for ``info``'s images and classes, adapted to small inputs (see module doc)."""
    timm_name = resolve_model_name(name)
    kwargs: dict[str, Any] = {"num_classes": info.num_classes, "in_chans": info.in_chans}
    small = info.image_size <= SMALL_IMAGE_MAX
    probe = timm.create_model(timm_name, pretrained=False, **kwargs)
    is_vit = isinstance(probe, timm.models.vision_transformer.VisionTransformer)
    if is_vit:
        kwargs.update(img_size=info.image_size, patch_size=_vit_patch_size(info.image_size) if small else None)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if pretrained:
        try:
            model = timm.create_model(timm_name, pretrained=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - hub failures come in many types
            raise UserError(
                f"cannot load timm hub weights for {timm_name} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                "--pretrained needs internet access to the Hugging Face hub: use --checkpoint PATH, "
                "or drop --pretrained and let mpsearch train a baseline"
            ) from None
    else:
        model = probe if not is_vit else timm.create_model(timm_name, pretrained=False, **kwargs)
    if small and isinstance(model, timm.models.resnet.ResNet):
        _adapt_resnet_stem(model, info.in_chans)
    return model


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- training -----------------------------------------------------------------------------------
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
        else:  # the original path, kept bit for bit: cached baselines of earlier recipes stay reproducible
            positions = None
            batches = train.batches(recipe.batch_size, shuffle=True, seed=seed * 1000 + epoch)
        steps = math.ceil(epoch_images[epoch] / recipe.batch_size)
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{recipe.epochs} @{size}px", disable=not progress, leave=True)
        seen = 0
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
            if step % 10 == 0 or seen == epoch_images[epoch]:
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}", acc=f"{int(correct) / seen:.3f}")
        bar.close()
    if selective:
        _recalibrate_batch_norm(model, train, recipe, device, memory_format, gen, progress)
    model.to(device="cpu", memory_format=torch.contiguous_format).eval()
    return model


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


# -- baselines ----------------------------------------------------------------------------------
def _ready(model: nn.Module) -> nn.Module:
    """Eval mode, parameters in channels_last: measurements feed images in that layout (oneDNN's
    convolutions are faster in it on CPU), and a baseline's outputs must not depend on whether it
    was trained, loaded from a file or from the cache."""
    with torch.no_grad():
        return model.to(memory_format=torch.channels_last).eval()


@dataclass
class Baseline:
    """An fp32 model ready to quantize, with where it came from."""

    name: str  # the model name the user typed (policies record it)
    model: nn.Module
    checkpoint: Path | None
    sha256: str | None
    meta: dict[str, Any]


def _versions() -> dict[str, str]:
    import numpy

    return {"python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__, "numpy": numpy.__version__}


def _cache_dir(name: str, data: DataSplits, recipe: TrainRecipe, seed: int) -> Path:
    key = recipe.key()
    ident = json.dumps({
        "model": name, "dataset": data.info.name, "train_images": len(data.train),
        "recipe": key, "seed": seed, "adapt": _ADAPTATION_VERSION,
    })
    digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
    safe_ds = data.info.name.replace("/", "_").replace(":", "_")[-40:]
    return cache_root() / "checkpoints" / f"{name}__{safe_ds}__seed{seed}__{digest}"


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint as data only (``weights_only=True``); accepts a bare or wrapped state dict."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path}: file not found; check --checkpoint") from None
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors of corrupt files come in many types
        raise UserError(
            f"checkpoint {path}: not a readable PyTorch state dict ({type(exc).__name__}); "
            "re-export it with torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {path}: expected a state dict of tensors; save it with torch.save(model.state_dict(), path)")
    return obj


def _read_sidecar(meta_path: Path) -> dict[str, Any]:
    """Optional metadata next to a user checkpoint; unreadable metadata is an error, not ignored."""
    if not meta_path.exists():
        return {}
    try:
        meta = json.loads(read_user_file(meta_path, "checkpoint metadata", "JSON"))
    except json.JSONDecodeError:
        raise UserError(f"checkpoint metadata {meta_path} is not valid JSON; fix or remove it") from None
    if not isinstance(meta, dict):
        raise UserError(f"checkpoint metadata {meta_path} must be a JSON object; fix or remove it")
    return meta


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise UserError(
            f"checkpoint {path} does not fit model {name!r} on this data set ({first[:160]}); "
            "pass the matching --model/--dataset"
        ) from None


def get_baseline(
    name: str,
    data: DataSplits,
    *,
    recipe: TrainRecipe | None = None,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Baseline:
    """The fp32 baseline: ``checkpoint``, else hub weights, else the cached or newly trained model."""
    resolve_model_name(name)  # an unknown name fails before anything is announced or trained
    recipe = recipe or default_recipe(name)
    if checkpoint is not None:
        path = Path(checkpoint)
        model = create_model(name, data.info)
        _load_into(model, load_state_dict_file(path), path, name)
        meta = _read_sidecar(path.with_suffix(".json"))
        return Baseline(name, _ready(model), path, sha256_file(path), meta)
    if pretrained:
        model = create_model(name, data.info, pretrained=True)
        return Baseline(name, _ready(model), None, None, {"source": "timm hub"})
    folder = _cache_dir(name, data, recipe, seed)
    path, meta_path = folder / "model.pt", folder / "meta.json"
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        sha = sha256_file(path)
        if meta.get("sha256") != sha:
            raise UserError(f"cached checkpoint {path} is corrupt (sha256 mismatch); delete {folder} to retrain")
        model = create_model(name, data.info)
        _load_into(model, load_state_dict_file(path), path, name)
        return Baseline(name, _ready(model), path, sha, meta)
    log(f"No cached baseline for {name} on {data.info.name} (seed {seed}); training one now "
        f"({recipe.epochs} epochs, cached in {folder}).")
    no_bf16 = native_bf16("cpu") if recipe.bf16 else None  # train_model's reason to train in fp32 instead
    if no_bf16 is not None:
        log(f"Training in fp32 instead of bf16 autocast: {no_bf16}.")
    torch.manual_seed(seed)
    model = create_model(name, data.info)
    start = time.perf_counter()
    train_model(model, data.train, data.info, recipe, seed=seed, progress=progress)
    wall = time.perf_counter() - start
    _ready(model)
    val_mask, test_mask = correct_mask(model, data.val), correct_mask(model, data.test)
    val_acc, test_acc = int(val_mask.sum()) / len(val_mask), int(test_mask.sum()) / len(test_mask)
    atomic_write(path, lambda f: torch.save(model.state_dict(), f), binary=True, what="checkpoint")
    sha = sha256_file(path)
    meta = {
        "model": name,
        "timm_name": resolve_model_name(name),
        "dataset": data.info.name,
        "recipe": recipe.to_dict(),
        "autocast": "bf16" if recipe.bf16 and no_bf16 is None else "fp32",
        "seed": seed,
        "val_accuracy": val_acc,
        "test_accuracy": test_acc,
        "train_wall_s": wall,
        "train_images": len(data.train),
        "sha256": sha,
        "versions": _versions(),
        "machine": describe_machine(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_text(meta_path, json.dumps(meta, indent=2), what="checkpoint metadata")
    log(f"Trained {name}: val {val_acc:.2%}, test {test_acc:.2%} in {wall / 60:.1f} min -> {path}")
    return Baseline(name, _ready(model), path, sha, meta)
