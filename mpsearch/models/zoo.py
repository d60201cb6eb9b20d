"""Models: timm's factory, a small-image adaptation and the fp32 baselines a study quantizes.

``create_model(name, info)`` is ``timm.create_model(name, num_classes, in_chans)`` plus, for
inputs of at most 64 pixels, the adaptation that keeps small images from being downsampled to
nothing (:mod:`mpsearch.models.small_images`); a model that cannot run on the images is refused in one
line that names the smallest size it runs on.

``get_baseline`` returns the fp32 model a study quantizes: from a checkpoint file, from timm's
hub (``pretrained``), or trained by mpsearch with a :class:`TrainConfig` (:mod:`mpsearch.models.train`)
and cached under ``cache_root()/checkpoints`` keyed by (model, data set, recipe, seed).
:meth:`Baseline.from_module` wraps a model object of the user's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from mpsearch.config import TrainConfig
from mpsearch.data import DatasetInfo, DataSplits
from mpsearch.errors import UserError, model_stage, quoted, read_user_file
from mpsearch.evaluation.metrics import correct_mask
from mpsearch.host.files import atomic_write, atomic_write_text
from mpsearch.host.machine import available_cores, describe_machine, native_bf16, torch_threads
from mpsearch.host.paths import cache_root
from mpsearch.models.fp32_masks import Fp32Masks
from mpsearch.models.small_images import build_for_size, check_runs, failure, refusal
from mpsearch.models.train import train_model

__all__ = [
    "CONVNET_ADAMW_RECIPE", "MODEL_ALIASES", "VIT_RECIPE", "Baseline", "create_model", "default_recipe", "get_baseline",
    "is_vision_transformer", "model_family", "resolve_model_name", "sha256_file", "state_sha256", "training_recipe",
]

logger = logging.getLogger(__name__)

# Short names users type -> timm names.
MODEL_ALIASES = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "vit_tiny": "vit_tiny_patch16_224",
}
_ADAPTATION_VERSION = 1  # part of the checkpoint cache key: bump when the adaptation changes


def resolve_model_name(name: str) -> str:
    """The timm name for ``name``; unknown names fail with suggestions."""
    timm_name = MODEL_ALIASES.get(name, name)
    if not timm.is_model(timm_name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:6]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise UserError(f"unknown model {name!r}{hint}; any timm model name works, e.g. resnet18, deit_tiny, test_resnet")
    return timm_name


def model_family(name: str) -> str:
    """The timm module that defines model ``name``: ``"resnet"``, ``"vision_transformer"``,
    ``"mobilenetv3"``, ``"convnext"``, ``"efficientnet"``, ... (timm's families)."""
    return timm.models.model_entrypoint(resolve_model_name(name)).__module__.rsplit(".", 1)[-1]


def is_vision_transformer(name: str) -> bool:
    """Whether ``name`` is one of timm's plain vision transformers (ViT, DeiT and relatives)."""
    return model_family(name) in ("vision_transformer", "deit")


# Vision transformers trained from scratch get AdamW with strong weight decay and crop/flip
# augmentation, as in DeiT (Touvron et al. 2021) and timm's ViT recipes, all at native size: a
# ViT's position embedding is fixed to the token grid, so progressive resizing does not apply.
# Every field is written out: the CNN defaults (TrainConfig()) come from a sweep on ResNet-18 and
# must not leak into this recipe (docs/baseline.md).
VIT_RECIPE = TrainConfig(
    epochs=3, batch_size=128, lr=1e-3, momentum=0.9, weight_decay=0.05, label_smoothing=0.1, warmup_fraction=0.2,
    crop_padding=2, hflip=True, bf16=True, channels_last=True, image_scales=(1.0,), optimizer="adamw", keep_fraction=1.0,
)
# Every other family (MobileNets, EfficientNets, ConvNeXts, RegNets, NFNets, MaxViTs, ...): under
# the ResNet recipe's SGD at lr 0.3 they lag behind or diverge (timm's test NFNet outputs NaN
# after two epochs). AdamW with warm-up trains them; its learning rate comes from a brief measured
# sweep (scripts/sweep_family_recipe.py, docs/models.md). The schedule is the ResNet recipe's.
CONVNET_ADAMW_RECIPE = TrainConfig(
    epochs=11, batch_size=128, lr=3e-3, momentum=0.9, weight_decay=0.05, label_smoothing=0.1, warmup_fraction=0.2,
    crop_padding=0, hflip=False, bf16=True, channels_last=True,
    image_scales=(0.64, 0.64, 0.64, 0.64, 0.64, 0.64, 0.64, 0.86, 0.86, 1.0, 1.0), optimizer="adamw", keep_fraction=0.5,
)
_TRANSFORMER_FAMILIES = ("vision_transformer", "deit", "vision_transformer_relpos")
SMALL_TRAINING_SET = 10_000  # training images under which default_recipe trains every epoch at native size on every image


def default_recipe(name: str, train_images: int | None = None) -> TrainConfig:
    """The documented baseline recipe for model ``name``, by family: :class:`TrainConfig`'s
    defaults (SGD) for ResNets, :data:`VIT_RECIPE` for vision transformers,
    :data:`CONVNET_ADAMW_RECIPE` for every other family (at native size only where the network's
    attention is sized for one input size, as in CoAtNet and MaxViT).

    With ``train_images`` under :data:`SMALL_TRAINING_SET`, the recipe's speed-ups are off: every
    epoch at native size on every image. Progressive resizing and selective epochs save hours on
    Fashion-MNIST; on digits' 1,257 images they save seconds and leave a network about 60
    optimizer steps, too few for some families to learn (docs/models.md#recipes-on-small-data-sets)."""
    recipe = _family_recipe(name)
    if train_images is not None and train_images < SMALL_TRAINING_SET:
        return replace(recipe, image_scales=(1.0,), keep_fraction=1.0)
    return recipe


def _family_recipe(name: str) -> TrainConfig:
    family = model_family(name)
    if family == "resnet":
        return TrainConfig()
    if family in _TRANSFORMER_FAMILIES:
        return VIT_RECIPE
    if family == "maxxvit":
        return replace(CONVNET_ADAMW_RECIPE, image_scales=(1.0,))
    return CONVNET_ADAMW_RECIPE


def _build(name: str, info: DatasetInfo, *, pretrained: bool = False, explain: bool = True) -> tuple[nn.Module, list[str]]:
    """The model of :func:`create_model` and the small-image changes made to it (:mod:`mpsearch.models.small_images`).
    A model that cannot run on the images is refused (``explain``: in one line that names the
    smallest size it runs on; otherwise a bare ValueError)."""
    timm_name = resolve_model_name(name)
    kwargs: dict[str, Any] = {"num_classes": info.num_classes, "in_chans": info.in_chans}

    def create(timm_name: str, **more: Any) -> nn.Module:
        if not pretrained:
            return timm.create_model(timm_name, pretrained=False, **more)
        try:
            return timm.create_model(timm_name, pretrained=True, **more)
        except Exception as exc:  # noqa: BLE001 - hub failures come in many types
            raise UserError(
                f"cannot load timm hub weights for {timm_name} ({quoted(exc)}); "
                "pretrained weights need internet access to the Hugging Face hub: use a checkpoint file instead, "
                "or let mpsearch train a baseline"
            ) from None

    try:
        model, changes = build_for_size(timm_name, info.image_size, create, reuse_probe=not pretrained, **kwargs)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a constructor's own checks (asserts, TypeErrors) refuse the size too
        why = failure(exc)
        if not explain:
            raise ValueError(why) from None
        raise refusal(timm_name, info.image_size, why, runs_at=lambda size: _runs(name, replace(info, image_size=size))) from None
    return model, changes


def training_recipe(name: str, model: nn.Module, recipe: TrainConfig, info: DatasetInfo) -> TrainConfig:
    """The recipe ``model`` really trains with: ``recipe``, or ``recipe`` at native size only
    where the model cannot run at a smaller size its progressive resizing would feed (attention
    sized for one token grid: LeViT, Swin; stages that would shrink to nothing: DenseNet)."""
    native = info.image_size
    smaller = sorted({recipe.image_size(epoch, native) for epoch in range(recipe.epochs)} - {native})
    for size in smaller:
        try:
            check_runs(model, size, info.in_chans)
        except ValueError as exc:
            logger.info(f"{name} does not run on {size} px images ({exc}): it trains at {native} px only, "
                        "without progressive resizing")
            return replace(recipe, image_scales=(1.0,))
    return recipe


def _runs(name: str, info: DatasetInfo) -> bool:
    try:
        _build(name, info, explain=False)
        return True
    except ValueError:
        return False


def create_model(name: str, info: DatasetInfo, *, pretrained: bool = False) -> nn.Module:
    """A timm model for ``info``'s images and classes, adapted to small inputs (see module doc)."""
    return _build(name, info, pretrained=pretrained)[0]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- baselines ----------------------------------------------------------------------------------
def _ready(model: nn.Module) -> nn.Module:
    """Eval mode, parameters in channels_last: measurements feed images in that layout (oneDNN's
    convolutions are faster in it on CPU), and a baseline's outputs must not depend on whether it
    was trained, loaded from a file or from the cache."""
    with torch.no_grad():
        return model.to(memory_format=torch.channels_last).eval()


def state_sha256(model: nn.Module) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes and values): identifies its weights."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        # Flattened first: a 0-d tensor has no byte view, and a contiguous tensor with size-1 dims may keep odd strides.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class Baseline:
    """An fp32 model ready to quantize, with where it came from."""

    name: str  # the model name the user typed (policies record it)
    model: nn.Module
    checkpoint: Path | None
    sha256: str | None
    meta: dict[str, Any]

    @classmethod
    def from_module(cls, model: nn.Module, name: str | None = None) -> Baseline:
        """A baseline of a model object (the user's own network): named by ``name`` or its class,
        identified by the sha256 of its state dict. The model itself is not changed; the
        baseline holds an eval-mode copy."""
        import copy

        if not isinstance(model, nn.Module):
            raise UserError(f"model: expected a torch.nn.Module or a timm model name, got {type(model).__name__}")
        copied = copy.deepcopy(model)
        return cls(name or type(model).__name__, _ready(copied), None, state_sha256(copied), {"source": "nn.Module"})


def _versions() -> dict[str, str]:
    import numpy

    return {"python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__, "numpy": numpy.__version__}


def _cache_dir(name: str, data: DataSplits, recipe: TrainConfig, seed: int, adapted: list[str]) -> Path:
    key = {
        "model": name, "dataset": data.info.name, "train_images": len(data.train),
        "recipe": recipe.key(), "seed": seed, "adapt": _ADAPTATION_VERSION,
    }
    if adapted:  # the generic small-image rule: its exact changes (ResNets and ViTs keep their version-1 keys)
        key["adapted"] = adapted
    ident = json.dumps(key)
    digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
    safe_ds = data.info.name.replace("/", "_").replace(":", "_")[-40:]
    return cache_root() / "checkpoints" / f"{name}__{safe_ds}__seed{seed}__{digest}"


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint as data only (``weights_only=True``); accepts a bare or wrapped state dict."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path}: file not found; check the path", fields=("checkpoint",)) from None
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
            "use the model and data set it was trained for"
        ) from None


def _from_checkpoint(name: str, data: DataSplits, path: Path) -> Baseline:
    """The baseline in the user's checkpoint file, with the metadata of an optional ``.json`` next to it."""
    model = create_model(name, data.info)
    _load_into(model, load_state_dict_file(path), path, name)
    meta = _read_sidecar(path.with_suffix(".json"))
    return Baseline(name, _ready(model), path, sha256_file(path), meta)


def _from_hub(name: str, data: DataSplits) -> Baseline:
    """The baseline with timm's pretrained hub weights."""
    model = create_model(name, data.info, pretrained=True)
    return Baseline(name, _ready(model), None, None, {"source": "timm hub"})


def _from_cache(name: str, model: nn.Module, folder: Path) -> Baseline:
    """The baseline mpsearch trained and cached in ``folder`` earlier, loaded into ``model``."""
    path, meta_path = folder / "model.pt", folder / "meta.json"
    meta = json.loads(meta_path.read_text())
    sha = sha256_file(path)
    if meta.get("sha256") != sha:
        raise UserError(f"cached checkpoint {path} is corrupt (sha256 mismatch); delete {folder} to retrain")
    _load_into(model, load_state_dict_file(path), path, name)
    return Baseline(name, _ready(model), path, sha, meta)


def _from_training(name: str, model: nn.Module, data: DataSplits, recipe: TrainConfig, seed: int, folder: Path,
             progress: bool) -> Baseline:
    """``model`` trained with ``recipe``, scored, and cached in ``folder`` with its metadata."""
    path, meta_path = folder / "model.pt", folder / "meta.json"
    cores = available_cores()
    logger.info(f"No cached baseline for {name} on {data.info.name} (seed {seed}); training one now on all {cores} cores "
                f"({recipe.epochs} epochs, {recipe.optimizer} lr {recipe.lr:g}, cached in {folder}).")
    no_bf16 = native_bf16("cpu") if recipe.bf16 else None  # train_model's reason to train in fp32 instead
    if no_bf16 is not None:
        logger.info(f"Training in fp32 instead of bf16 autocast: {no_bf16}.")
    wall, val_mask, test_mask = _train_and_score(name, model, data, recipe, seed, cores, progress)
    val_acc, test_acc = int(val_mask.sum()) / len(val_mask), int(test_mask.sum()) / len(test_mask)
    atomic_write(path, lambda f: torch.save(model.state_dict(), f), binary=True, what="checkpoint")
    sha = sha256_file(path)
    Fp32Masks(sha, data).store("test", test_mask)  # the fp32 side of every re-measured front of this baseline
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
    logger.info(f"Trained {name}: val {val_acc:.2%}, test {test_acc:.2%} in {wall / 60:.1f} min -> {path}")
    return Baseline(name, _ready(model), path, sha, meta)


def _train_and_score(name: str, model: nn.Module, data: DataSplits, recipe: TrainConfig, seed: int, cores: int,
                     progress: bool) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Train ``model`` in place; its training wall time and which validation and test images it gets right."""
    start = time.perf_counter()
    # Training happens once per baseline and nothing else runs meanwhile: every core, whatever
    # thread count the caller measures with.
    with torch_threads(cores):
        train_model(model, data.train, data.info, recipe, seed=seed, progress=progress)
        wall = time.perf_counter() - start
        _ready(model)
        try:
            val_mask, test_mask = correct_mask(model, data.val), correct_mask(model, data.test)
        except FloatingPointError:
            raise UserError(f"training {name} diverged: the trained model outputs NaN/inf ({recipe.optimizer} at lr "
                            f"{recipe.lr:g}); train it with a lower learning rate (mpsearch train --lr) and pass "
                            "--checkpoint") from None
    return wall, val_mask, test_mask


def get_baseline(
    name: str,
    data: DataSplits,
    *,
    recipe: TrainConfig | None = None,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    progress: bool = True,
) -> Baseline:
    """The fp32 baseline: ``checkpoint``, else hub weights, else the cached or newly trained model."""
    resolve_model_name(name)  # an unknown name fails before anything is announced or trained
    recipe = recipe or default_recipe(name, train_images=len(data.train))
    if checkpoint is not None:
        return _from_checkpoint(name, data, Path(checkpoint))
    if pretrained:
        return _from_hub(name, data)
    with torch.random.fork_rng(devices=[]):  # seeded as training needs it, the caller's generator untouched
        torch.manual_seed(seed)
        model, adapted = _build(name, data.info)
    recipe = training_recipe(name, model, recipe, data.info)
    folder = _cache_dir(name, data, recipe, seed, adapted)
    if (folder / "model.pt").exists() and (folder / "meta.json").exists():
        return _from_cache(name, model, folder)
    with model_stage(name, "training its baseline"):
        return _from_training(name, model, data, recipe, seed, folder, progress)
