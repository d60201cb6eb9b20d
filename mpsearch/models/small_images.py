"""Small images for every timm family: keep a 28 px (or 8 px) image from being downsampled to nothing.

timm's models are built for 160-224 px inputs and reduce them 32-fold (ResNet, EfficientNet,
ConvNeXt, MaxViT, ...) or cut them into 16 px patches (ViT). On Fashion-MNIST's 28 px that leaves
less than one pixel. Inputs of at most :data:`SMALL_IMAGE_MAX` px are adapted:

* **Patch-embedding transformers** (ViT, DeiT, ViT with relative positions): built for the
  image size with a patch size that gives a 4x4 to 8x8 token grid (28 px: 4 px patches, 7x7).
* **ResNets**: a 3x3 stride-1 stem and no max-pool (the CIFAR stem), 8-fold reduction.
* **Every other network**: a probe forward pass finds every strided convolution and pooling in
  the order they run, grouped into downsampling steps (the layers that read the same feature map
  size: a block's main path and its shortcut are one step). Steps are made stride-1 from the
  first until the network reduces at most :data:`MAX_REDUCTION`-fold: a strided conv keeps its
  weights and is padded to keep the size (a patchify conv, kernel = stride, becomes a kernel+1
  conv), a strided pooling becomes the identity. Networks whose attention tables are sized from
  the image size at construction (CoAtNet, MaxViT) are built for the size the remaining steps see.
* **Networks built for an image size whose first model does not run**: timm's own size with
  fewer downsampling steps, then smaller patches (:func:`_size_fallbacks`).

A network that still cannot run on the images is refused with one line that names the smallest
input size it runs on (:func:`check_runs`). The changes made are returned, and are part of the
baseline cache key.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import timm
import torch
from timm.layers import PatchEmbed
from torch import nn

from mpsearch.errors import UserError, first_line, quoted

__all__ = ["MAX_REDUCTION", "SMALL_IMAGE_MAX", "build_for_size", "check_runs", "failure", "patch_size_for", "refusal"]

SMALL_IMAGE_MAX = 64  # inputs up to this size are adapted
MAX_REDUCTION = 8  # adapted networks reduce the input at most this many times (28 px -> 4x4, like ResNet)
_PROBE = 256  # probe forward size: a power of two, so each step's reduction is exact

Rule = Callable[[], tuple[nn.Module, list[str]]]  # builds a model and says what it changed


def patch_size_for(image_size: int) -> int:
    """Patch size that gives a transformer a 4x4 to 8x8 token grid: 28 -> 4 (7x7), 32 -> 4 (8x8), 8 -> 2 (4x4), 64 -> 8."""
    for patch in (2, 4, 8):
        if image_size % patch == 0 and image_size // patch >= 4 and (image_size // patch <= 8 or patch == 8):
            return patch
    return 1


def _dividing_patch(image_size: int) -> int:
    """:func:`patch_size_for`, or where that does not divide ``image_size`` (a CrossViT branch's
    26 px), the largest patch of 2, 4, 8 that does and leaves at least 4 tokens a side."""
    patch = patch_size_for(image_size)
    if image_size % patch == 0 and patch > 1:
        return patch
    return max([p for p in (2, 4, 8) if image_size % p == 0 and image_size // p >= 4], default=1)


def _accepts(model: nn.Module, argument: str) -> bool:
    """Whether ``model``'s constructor takes ``argument`` (following ``**kwargs`` up to the base classes)."""
    for cls in type(model).__mro__:
        parameters = inspect.signature(cls.__init__).parameters
        if argument in parameters:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return False
    return False


def _downsampling_steps(model: nn.Module, size: int, in_chans: int) -> list[tuple[int, list[str]]]:
    """(stride, layer names) per downsampling step, in the order the steps run on a ``size`` px input."""
    seen: dict[str, int] = {}  # layer -> width of the feature map it reads, in the order the layers run

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            seen.setdefault(name, args[0].shape[-1])

        return hook

    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and _stride(module) > 1:
            hooks.append(module.register_forward_hook(record(name)))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, in_chans, size, size))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    steps: dict[int, list[str]] = {}
    for name, width in seen.items():
        steps.setdefault(width, []).append(name)
    modules = dict(model.named_modules())
    return [(max(_stride(modules[n]) for n in names), names) for _, names in sorted(steps.items(), key=lambda kv: -kv[0])]


def _stride(module: nn.Module) -> int:
    stride = module.stride if module.stride is not None else module.kernel_size
    return max(stride) if isinstance(stride, tuple) else int(stride)


def _as_pair(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, int):
        return (value, value)
    return tuple(value) if isinstance(value, (tuple, list)) else None


def _unstride(model: nn.Module, name: str) -> str:
    """Make layer ``name`` stride-1 without shrinking its output; returns what was done."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    module = getattr(parent, child)
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        setattr(parent, child, nn.Identity())
        return f"{name}: pooling -> identity"
    kernel, dilation = module.kernel_size, module.dilation
    if all(k == s for k, s in zip(kernel, module.stride)) and all(k % 2 == 0 for k in kernel) and module.padding == (0, 0):
        # A patchify conv (ConvNeXt stems and downsamplers): an odd kernel one larger, padded to keep the size.
        if type(module) is not nn.Conv2d:
            raise ValueError(f"its layer {name} ({type(module).__name__}) downsamples with a patchify convolution")
        setattr(parent, child, nn.Conv2d(module.in_channels, module.out_channels, tuple(k + 1 for k in kernel),
                                         padding=tuple(k // 2 for k in kernel), groups=module.groups,
                                         bias=module.bias is not None))
        if _as_pair(getattr(parent, "patch_size", None)) == tuple(kernel):  # an embedding that counts its tokens by it (Twins)
            parent.patch_size = (1, 1)
            if getattr(parent, "strict_img_size", False):  # timm's PatchEmbed checks the size it was built for (Visformer)
                parent.strict_img_size = False
        return f"{name}: stride-{kernel[0]} {kernel[0]}x{kernel[1]} conv -> {kernel[0] + 1}x{kernel[1] + 1} stride-1"
    module.stride = (1, 1)
    if isinstance(module.padding, tuple):  # timm's Conv2dSame pads in forward from its stride
        module.padding = tuple(max(p, d * (k - 1) // 2) for p, d, k in zip(module.padding, dilation, kernel))
    return f"{name}: stride 1"


def _adapt_strides(model: nn.Module, in_chans: int, *, keep: int) -> list[str]:
    """Remove strides from the first steps until at most ``keep``-fold reduction remains."""
    try:
        steps = _downsampling_steps(model, _PROBE, in_chans)
    except Exception:  # noqa: BLE001 - a network that runs at its own size only (EfficientFormer: 224 px)
        native = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (0, _PROBE))[-1]
        if native == _PROBE:
            raise
        steps = _downsampling_steps(model, native, in_chans)
    total = math.prod(stride for stride, _ in steps)
    changes: list[str] = []
    for stride, names in steps:
        if total <= keep:
            break
        for name in names:
            changes.append(_unstride(model, name))
        total //= stride
    return changes


def _adapt_resnet_stem(model: nn.Module, in_chans: int) -> tuple[nn.Module, list[str]]:
    stem = model.conv1
    if isinstance(stem, nn.Conv2d):
        model.conv1 = nn.Conv2d(in_chans, stem.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    else:  # timm's deep stems are a Sequential whose first conv carries the stride
        first = next(m for m in stem.modules() if isinstance(m, nn.Conv2d))
        first.stride = (1, 1)
    model.maxpool = nn.Identity()
    return model, []  # the CIFAR stem is version 1 of the adaptation: no changes listed, cache keys unchanged


def build_for_size(timm_name: str, image_size: int, create: Callable[..., nn.Module], *, reuse_probe: bool,
                   **kwargs: Any) -> tuple[nn.Module, list[str]]:
    """``create(timm_name, **kwargs)`` for ``image_size`` px inputs: adapted when they are small
    (see the module doc), with the changes made beyond the ResNet and ViT rules (empty for those);
    above :data:`SMALL_IMAGE_MAX` px as timm builds it, a patch-embedding transformer for the size.
    Every model returned has run a forward pass on the images; ValueError (why, in one line) when
    no rule gives a model that does.

    A probe model built with timm's defaults decides the rule; ``reuse_probe`` lets it be the
    model itself where the rule keeps its constructor arguments (no hub weights wanted), so that a
    seed initializes the same weights as a plain ``timm.create_model``."""
    in_chans = kwargs.get("in_chans", 3)
    probe = timm.create_model(timm_name, pretrained=False, **kwargs)
    same_arguments = probe if reuse_probe else None
    # timm's patch embedding is ``patch_embed``, or ``stem`` in the MLP-Mixers (gMLP, ResMLP)
    embed = "patch_embed" if hasattr(probe, "patch_embed") else "stem" if isinstance(getattr(probe, "stem", None), PatchEmbed) else None
    sized = _accepts(probe, "img_size")
    patch_embedding = embed is not None and _accepts(probe, "patch_size") and sized
    if image_size > SMALL_IMAGE_MAX:
        return _running(image_size, in_chans, [lambda: (create(timm_name, img_size=image_size, **kwargs) if patch_embedding
                                                        else same_arguments or create(timm_name, **kwargs), [])])
    if isinstance(probe, timm.models.resnet.ResNet):
        return _running(image_size, in_chans, [lambda: _adapt_resnet_stem(same_arguments or create(timm_name, **kwargs), in_chans)])
    if patch_embedding:
        first_rules = _patch_embedding_rules(timm_name, image_size, create, probe, embed, **kwargs)
    elif sized:
        first_rules = [lambda: _built_for_remaining_steps(timm_name, image_size, create, probe, **kwargs)]
    else:
        first_rules = [lambda: (model := same_arguments or create(timm_name, **kwargs), _adapt_strides(model, in_chans, keep=MAX_REDUCTION))]
    tried = patch_size_for(image_size) if patch_embedding else None  # the first rule's patch: not built twice
    return _running(image_size, in_chans, first_rules + (_size_fallbacks(timm_name, image_size, create, probe, tried, **kwargs) if sized
                                                         else [lambda: _strides_removed(timm_name, create, MAX_REDUCTION // 2, **kwargs)]))


def _patch_embedding_rules(timm_name: str, image_size: int, create: Callable[..., nn.Module], probe: nn.Module, embed: str,
                           **kwargs: Any) -> list[Rule]:
    """A patch-embedding transformer built for the images with a patch that gives a 4x4 to 8x8 token
    grid; where the factory fixes the patch size itself (gMLP, MLP-Mixer), its embedding re-cut."""
    patch: int | tuple[int, ...] = patch_size_for(image_size)
    if isinstance(getattr(probe, embed), nn.ModuleList):  # one embedding per branch (CrossViT), each at its own scale
        patch = tuple(_dividing_patch(int(image_size * size[0] / probe.img_size[0])) for size in probe.img_size_scaled)

    def repatched() -> tuple[nn.Module, list[str]]:
        """Built for the size whose token grid the factory's patch gives, then the patch embedding re-cut for the images."""
        fixed = _as_pair(getattr(probe, embed).patch_size)[0]
        built = image_size // patch * fixed
        model = create(timm_name, img_size=built, **kwargs)
        getattr(model, embed).set_input_size(img_size=image_size, patch_size=patch)
        return model, [f"built for {built} px, its {fixed} px patches re-cut to {patch} px"]

    direct: list[Rule] = [lambda: (create(timm_name, img_size=image_size, patch_size=patch, **kwargs), [])]
    return direct if isinstance(patch, tuple) or not hasattr(getattr(probe, embed), "set_input_size") else [*direct, repatched]


def _size_fallbacks(timm_name: str, image_size: int, create: Callable[..., nn.Module], probe: nn.Module,
                    tried: int | None, **kwargs: Any) -> list[Rule]:
    """What is tried, in order, where the first rule's model of a network built for an image size
    does not run:

    * timm's own size with the first steps made stride-1, to 8- or 4-fold reduction: a network
      that only checks that its size divides into patches (Twins, XCiT), whose positional tables
      are sized for the remaining steps (Visformer), or whose last stage's attention is sized for a
      7x7 grid (EfficientFormer: 28 px reduced 4-fold). Not fewer than 4-fold: at 28 px a
      network's attention would then span 196 tokens or more;
    * built for the images with smaller patches, down to 1 px, where the patch grid must divide
      further (NesT's blocks, a hybrid ViT's backbone feature map) or the embedding is not
      ``patch_embed`` (TNT). ``tried``: the patch size the first rule built with, not tried again."""
    first = patch_size_for(image_size)
    patches = [p for p in (first, 4, 2, 1) if p <= first and image_size % p == 0 and p != tried] if _accepts(probe, "patch_size") else []
    smaller: list[Rule] = [lambda p=p: (create(timm_name, img_size=image_size, patch_size=p, **kwargs),
                                        [f"built for {image_size} px with {p} px patches"]) for p in dict.fromkeys(patches)]
    return [lambda keep=keep: _strides_removed(timm_name, create, keep, **kwargs) for keep in (MAX_REDUCTION, MAX_REDUCTION // 2)] + smaller


def _strides_removed(timm_name: str, create: Callable[..., nn.Module], keep: int, **kwargs: Any) -> tuple[nn.Module, list[str]]:
    model = create(timm_name, **kwargs)
    return model, _adapt_strides(model, kwargs.get("in_chans", 3), keep=keep)


def _running(image_size: int, in_chans: int, rules: list[Rule]) -> tuple[nn.Module, list[str]]:
    """The first of ``rules`` whose model builds and runs on ``image_size`` px images; when none
    does, ValueError with the first rule's reason (the one a user would be told)."""
    reasons = []
    for rule in rules:
        try:
            model, changes = rule()
            check_runs(model, image_size, in_chans)
            return model, changes
        except UserError:  # mpsearch's own one-liners (hub weights that cannot load) are not a size problem
            raise
        except Exception as exc:  # noqa: BLE001 - a constructor's own checks (asserts, TypeErrors) or a failed forward
            reasons.append(failure(exc))
    raise ValueError(reasons[0])


def _built_for_remaining_steps(timm_name: str, image_size: int, create: Callable[..., nn.Module], probe: nn.Module,
                               **kwargs: Any) -> tuple[nn.Module, list[str]]:
    """A network whose attention is sized at construction (CoAtNet, MaxViT): built for the image
    size its later stages would see at full reduction, then its first steps made stride-1."""
    reduction = probe.feature_info[-1]["reduction"] if getattr(probe, "feature_info", None) else MAX_REDUCTION
    scale = max(1, reduction // MAX_REDUCTION)
    model = create(timm_name, img_size=image_size * scale, **kwargs)
    steps = _downsampling_steps(model, image_size * scale, kwargs.get("in_chans", 3))
    changes, removed = [f"built for {image_size * scale} px"], 1
    for stride, names in steps:
        if removed >= scale:
            break
        changes += [_unstride(model, n) for n in names]
        removed *= stride
    return model, changes


def failure(exc: Exception) -> str:
    """Why a model could not be built or run, in one line: :func:`check_runs`'s ValueError (which
    quotes the model's own error already) as it is, any other exception quoted."""
    return first_line(exc) if isinstance(exc, ValueError) else quoted(exc)


def check_runs(model: nn.Module, image_size: int, in_chans: int) -> None:
    """Raise ValueError (why, in one line) when ``model`` cannot run a forward pass on ``image_size`` px images."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, in_chans, image_size, image_size))
    except Exception as exc:  # noqa: BLE001 - shape errors of many kinds
        raise ValueError(quoted(exc)) from None
    finally:
        model.train(was_training)


def refusal(timm_name: str, image_size: int, why: str, runs_at: Callable[[int], bool]) -> UserError:
    """The one-line refusal of a model that cannot run on ``image_size`` px images, naming the
    small sizes (multiples of 8 up to :data:`SMALL_IMAGE_MAX`) it runs on by ``runs_at(size)``."""
    sizes = [str(size) for size in range(8, SMALL_IMAGE_MAX + 1, 8) if runs_at(size)]
    where = f"it runs on {', '.join(sizes)} px images" if sizes else f"it runs on no size from 8 to {SMALL_IMAGE_MAX} px"
    return UserError(f"model {timm_name} cannot run on {image_size} px images ({why}); {where}: resize the images "
                     "(imagefolder: --image-size) or choose another model")
