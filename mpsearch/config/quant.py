"""How quantizers are calibrated (:class:`QuantConfig`) and how a policy is fine-tuned (:class:`FinetuneConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

from mpsearch.config._base import Config, config_key, field_error

__all__ = ["QuantConfig", "FinetuneConfig"]


@dataclass(frozen=True)
class QuantConfig(Config):
    """How quantizers are calibrated (the policy says which bit widths; this says how).

    Weight ranges come from ``weight_observer`` on the weights themselves; activation ranges from
    ``act_observer`` on ``act_samples`` values per layer drawn while the calibration split runs
    through the float model once. Observer, PTQ and attention-calibration names are checked
    against their registries by the quantizer that uses them (config sits below quant in the
    import order).
    """

    SECTION = "quant"

    version: int = 1
    weight_observer: str = "minmax"
    act_observer: str = "mse"
    act_samples: int = 2**16
    calibration_batch_size: int = 256
    seed: int = 0
    # How weights are put on their grid (mpsearch.quant.ptq): rtn, gptq, adaround or brecq; the
    # learned ones use ``ptq_columns`` sampled input columns per layer of the calibration split.
    ptq: str = "rtn"
    ptq_columns: int = 2048
    block_images: int = 256  # calibration images whose block inputs block reconstruction (brecq) learns from
    # Bias correction (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
    # Correction", ICCV 2019, empirical variant): shift each quantized layer's bias by the mean
    # output error (W - Wq) E[x] over the calibration split, after any PTQ rounding.
    bias_correction: bool = False
    # SmoothQuant migration strength alpha (mpsearch.quant.smoothing) for layers whose weights and
    # inputs are both quantized; None: off.
    smoothquant_alpha: float | None = None
    # How the ranges of q and k, the operands of attention's q·kᵀ, are chosen
    # (mpsearch.quant.qk_calibration): "observer" (act_observer, like every layer input) or
    # "ranking" (ranking-aware, Liu et al. 2021) from q/k of the first ``qk_images`` calibration images.
    attention_calibration: str = "observer"
    qk_images: int = 8
    # What runs the quantized model when a policy is measured (mpsearch.quant.backends): "fake"
    # (float32 on fake-quantized values), "int8" (integer kernels for every layer whose weight and
    # input are quantized) or "auto" (int8 where the CPU has int8 dot-product instructions). A
    # study stores the backend "auto" resolved to, and never mixes two.
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("act_samples", "ptq_columns"):
            if getattr(self, name) < 16:
                raise field_error(f"quant.{name}", f"must be >= 16, got {getattr(self, name)}")
        for name in ("block_images", "qk_images", "calibration_batch_size"):
            if getattr(self, name) < 1:
                raise field_error(f"quant.{name}", f"must be >= 1, got {getattr(self, name)}")
        alpha = self.smoothquant_alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1):
            raise field_error("quant.smoothquant_alpha", f"a migration strength in [0, 1] or null (off), got {alpha!r}")

    def key(self) -> str:
        # The backend decides what runs a measurement, not what the quantized model computes
        # (the two agree within docs/backends.md#fidelity): caches keyed by this hash, such as
        # sensitivity tables, serve every backend.
        return config_key(self, ignore=("backend",))


@dataclass(frozen=True)
class FinetuneConfig(Config):
    """Quantization-aware fine-tuning of one policy: LSQ step sizes + distillation from fp32.

    ``steps`` SGD-Nesterov steps of ``batch_size`` augmented training images, cosine-annealed
    from ``lr`` (shared by weights, biases, batch-norm affines and step sizes: LSQ's gradient
    scaling makes one rate fit all). The loss is the KL divergence to the fp32 model's outputs at
    ``temperature`` (times T², Hinton et al. 2015) plus ``label_weight`` times cross-entropy with
    the labels. Batch-norm statistics stay frozen (the quantized model is evaluated with them).
    """

    SECTION = "finetune"

    version: int = 1
    steps: int = 300
    batch_size: int = 64
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 0.0
    temperature: float = 1.0
    label_weight: float = 0.0
    bf16: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise field_error(f"finetune.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise field_error(f"finetune.{name}", f"must be > 0, got {getattr(self, name)}")
        if self.label_weight < 0:
            raise field_error("finetune.label_weight", f"must be >= 0, got {self.label_weight}")
