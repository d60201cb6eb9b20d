"""How a baseline is trained: :class:`TrainConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from mpsearch.config._base import Config, field_error

__all__ = ["TrainConfig", "SIX_EPOCH_SCALES"]

# The image-size table of a six-epoch recipe (the recipe sweep's base, and the tiny test baselines).
SIX_EPOCH_SCALES: tuple[float, ...] = (0.64, 0.64, 0.64, 0.64, 0.86, 1.0)


@dataclass(frozen=True)
class TrainConfig(Config):
    """SGD + Nesterov (or AdamW), one-cycle LR, label smoothing, optional crop/flip augmentation,
    progressive resizing and selective epochs.

    ``image_scales`` is a per-epoch table of training image sizes as fractions of the native size,
    stretched over ``epochs`` (the first entry trains the first epoch, the last entry the last
    one); the last epochs train at native size so that filters match what evaluation sees.
    ``bf16`` asks for bf16 autocast and applies only where the CPU runs bf16 natively; evaluation
    always runs in float32 at native size. The defaults and why they were chosen:
    docs/baseline.md.
    """

    SECTION = "recipe"

    version: int = 1
    epochs: int = 11
    batch_size: int = 128
    lr: float = 0.3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.25
    crop_padding: int = 0
    hflip: bool = False
    bf16: bool = True
    channels_last: bool = True
    image_scales: tuple[float, ...] = (0.64, 0.64, 0.64, 0.64, 0.64, 0.64, 0.64, 0.86, 0.86, 1.0, 1.0)
    # "sgd" (Nesterov, ``momentum``) or "adamw" (beta1 = ``momentum``; weight decay only on
    # weight matrices and conv kernels, not on norms, biases, position embeddings or tokens).
    optimizer: str = "sgd"
    # Selective epochs (stale-loss selective backprop, Jiang et al., "Accelerating Deep Learning by
    # Focusing on the Biggest Losers", 2019): after the first epoch, which trains on every image,
    # each epoch trains on this fraction of the images, drawn with probability proportional to the
    # rank of the loss each had when last trained on. Afterwards batch-norm statistics are
    # re-estimated on ``batch_norm_images`` training images at native size. 1.0: every epoch
    # trains on every image.
    keep_fraction: float = 0.5
    batch_norm_images: int = 10_000

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise field_error("recipe.optimizer", f"must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.epochs < 1:
            raise field_error("recipe.epochs", f"must be >= 1, got {self.epochs}")
        if not self.image_scales or not all(isinstance(s, (int, float)) and 0 < s <= 1 for s in self.image_scales):
            raise field_error("recipe.image_scales", f"need one or more fractions in (0, 1], got {list(self.image_scales)}")
        if self.image_scales[-1] != 1:
            raise field_error("recipe.image_scales", f"the last epoch must train at native size (1.0), got {self.image_scales[-1]}")
        if self.batch_size < 1:
            raise field_error("recipe.batch_size", f"must be >= 1, got {self.batch_size}")
        if not 0 < self.keep_fraction <= 1:
            raise field_error("recipe.keep_fraction", f"must be in (0, 1], got {self.keep_fraction}")
        if self.batch_norm_images < 1:
            raise field_error("recipe.batch_norm_images", f"must be >= 1, got {self.batch_norm_images}")
        if not self.lr > 0:
            raise field_error("recipe.lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise field_error("recipe.label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.warmup_fraction < 1:
            raise field_error("recipe.warmup_fraction", f"must be in (0, 1), got {self.warmup_fraction}")

    def image_size(self, epoch: int, native: int) -> int:
        """Training image size for ``epoch`` (0-based): ``image_scales`` stretched over the epochs."""
        last = len(self.image_scales) - 1
        index = last if self.epochs == 1 else round(epoch * last / (self.epochs - 1))
        return max(1, round(native * self.image_scales[index]))

    def epoch_share(self, epoch: int) -> float:
        """The share of the training images ``epoch`` (0-based) trains on: all in the first,
        ``keep_fraction`` in every later (selective) one."""
        return 1.0 if epoch == 0 else self.keep_fraction

    def epoch_images(self, epoch: int, n_train: int) -> int:
        """Images ``epoch`` (0-based) trains on, out of ``n_train``."""
        return max(1, round(n_train * self.epoch_share(epoch)))
