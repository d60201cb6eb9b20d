"""Typed, versioned configuration objects that round-trip through JSON.

Each config is a frozen dataclass with defaults, value checks in ``__post_init__`` and a
``version``; ``to_dict``/``from_dict`` are exact inverses (a test saves every config and loads it
back). Its ``key()`` (a hash of the JSON) names caches, so a changed setting never reuses a stale
artifact.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, ClassVar, TypeVar

from mpsearch.errors import UserError

__all__ = ["TrainRecipe", "SIX_EPOCH_SCALES", "QuantConfig", "FinetuneConfig", "StudyConfig", "OBJECTIVES", "ENERGY_UNDER",
           "objective_spec", "objective_profiles", "config_key", "config_from_dict"]

C = TypeVar("C")


def config_key(config: Any) -> str:
    """A stable hash of a config's JSON form (sha256 hex).

    Fields a class lists in ``KEY_OMITS_DEFAULTS`` (those added after caches keyed by it were
    written) count only when they differ from the value listed there, what every config did
    before the field existed (usually, not always, the field's default), so an artifact cached
    before the field existed keeps its key.
    """
    data = asdict(config)
    for name, default in getattr(type(config), "KEY_OMITS_DEFAULTS", {}).items():
        if data[name] == default:
            del data[name]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def config_from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build ``cls`` from a dict, rejecting unknown fields and other versions with a clear line."""
    if not isinstance(data, dict):
        raise UserError(f"{cls.__name__}: expected an object of settings, got {type(data).__name__}")
    defaults = {
        f.name: f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        for f in fields(cls)  # type: ignore[arg-type]
    }
    # Fields a class retired are dropped, so that records written before (a study's config.yaml) stay readable.
    data = {k: v for k, v in data.items() if k not in getattr(cls, "RETIRED_FIELDS", ())}
    unknown = sorted(set(data) - set(defaults))
    if unknown:
        raise UserError(f"{cls.__name__}: unknown field {unknown[0]!r}; known fields are {sorted(defaults)}")
    version = data.get("version", 1)
    if type(version) is not int or version != 1:
        raise UserError(f"{cls.__name__}.version: this mpsearch reads version 1, got {version!r}")
    values = dict(data)
    for name, value in data.items():
        default = defaults[name]
        if default is None:  # optional fields (None by default) are checked by the class itself
            continue
        expected = type(default)
        if expected is tuple and isinstance(value, list):  # JSON/YAML have lists, configs keep tuples
            values[name] = value = tuple(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if expected is float else type(value) is expected
        if not ok:
            raise UserError(f"{cls.__name__}.{name}: expected {expected.__name__}, got {value!r}")
    return cls(**values)


# The image-size table of the six-epoch default recipe that selective epochs replaced on
# 2026-11-27; recipes written before then (the recipe sweep's base, old cache keys) use it.
SIX_EPOCH_SCALES: tuple[float, ...] = (0.64, 0.64, 0.64, 0.64, 0.86, 1.0)


@dataclass(frozen=True)
class TrainRecipe:
    """How a baseline is trained: SGD + Nesterov (or AdamW), one-cycle LR, label smoothing,
    optional crop/flip augmentation, progressive resizing, selective epochs.

    ``image_scales`` is a per-epoch table of training image sizes as fractions of the native size,
    stretched over ``epochs`` (the first entry trains the first epoch, the last entry the last
    one). Epochs at 0.64x (18 px for Fashion-MNIST) cost half a full-size epoch on a CPU; the
    last epochs train at native size so that filters match what evaluation sees. bf16 autocast
    and channels_last roughly halve the CPU time per step on CPUs with native bf16 (AVX512-BF16
    or AMX); elsewhere ``bf16`` is ignored and training runs in fp32, since emulated bf16 is 15x
    slower. Evaluation always runs in float32 at native size.

    Within 30 CPU minutes ResNet-18 underfits Fashion-MNIST: the defaults were chosen by
    ``scripts/sweep_recipe.py`` (35 candidate recipes, two seeds each, ranked on validation
    accuracy: a high peak learning rate and no crop/flip augmentation) and then by CPU runs of
    selective epochs (``keep_fraction``), which spend the time on the images the model still
    gets wrong: after one full epoch, each epoch trains on the harder half, so the budget buys
    more epochs at the same cost (docs/recipe_sweep.md, docs/recipe_selective.md). Measured
    numbers are in the README.
    """

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
    # rank of the loss each had when last trained on. An epoch then costs ``keep_fraction`` of a
    # full one. Afterwards batch-norm statistics are re-estimated on ``batch_norm_images`` training
    # images at native size. 1.0: every epoch trains on every image.
    keep_fraction: float = 0.5
    batch_norm_images: int = 10_000

    KEY_OMITS_DEFAULTS: ClassVar[dict[str, Any]] = {"optimizer": "sgd", "keep_fraction": 1.0, "batch_norm_images": 10_000}

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise UserError(f"recipe.optimizer: must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.epochs < 1:
            raise UserError(f"recipe.epochs: must be >= 1, got {self.epochs}")
        if not self.image_scales or not all(isinstance(s, (int, float)) and 0 < s <= 1 for s in self.image_scales):
            raise UserError(f"recipe.image_scales: need one or more fractions in (0, 1], got {list(self.image_scales)}")
        if self.image_scales[-1] != 1:
            raise UserError(f"recipe.image_scales: the last epoch must train at native size (1.0), got {self.image_scales[-1]}")
        if self.batch_size < 1:
            raise UserError(f"recipe.batch_size: must be >= 1, got {self.batch_size}")
        if not 0 < self.keep_fraction <= 1:
            raise UserError(f"recipe.keep_fraction: must be in (0, 1], got {self.keep_fraction}")
        if self.batch_norm_images < 1:
            raise UserError(f"recipe.batch_norm_images: must be >= 1, got {self.batch_norm_images}")
        if not self.lr > 0:
            raise UserError(f"recipe.lr: must be > 0, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"recipe.label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.warmup_fraction < 1:
            raise UserError(f"recipe.warmup_fraction: must be in (0, 1), got {self.warmup_fraction}")

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainRecipe:
        return config_from_dict(cls, data)

    def key(self) -> str:
        return config_key(self)


@dataclass(frozen=True)
class QuantConfig:
    """How quantizers are calibrated (the policy says which bit widths; this says how).

    Weight ranges come from ``weight_observer`` on the weights themselves; activation ranges from
    ``act_observer`` on ``act_samples`` values per layer drawn while the calibration split runs
    through the float model once.
    """

    version: int = 1
    weight_observer: str = "minmax"
    act_observer: str = "mse"
    act_samples: int = 2**16
    calibration_batch_size: int = 256
    seed: int = 0
    # How weights are put on their grid (mpsearch.quant.ptq): rtn, gptq or adaround; the last two
    # learn from ``ptq_columns`` sampled input columns per layer of the calibration split.
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

    KEY_OMITS_DEFAULTS: ClassVar[dict[str, Any]] = {"attention_calibration": "observer", "qk_images": 8}

    def __post_init__(self) -> None:
        # Observer names are checked against the registry by the quantizer that uses them
        # (config sits below quant in the import order).
        if self.act_samples < 16:
            raise UserError(f"quant.act_samples: must be >= 16, got {self.act_samples}")
        if self.ptq_columns < 16:
            raise UserError(f"quant.ptq_columns: must be >= 16, got {self.ptq_columns}")
        if self.block_images < 1:
            raise UserError(f"quant.block_images: must be >= 1, got {self.block_images}")
        if self.qk_images < 1:
            raise UserError(f"quant.qk_images: must be >= 1, got {self.qk_images}")
        alpha = self.smoothquant_alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1):
            raise UserError(f"quant.smoothquant_alpha: a migration strength in [0, 1] or null (off), got {alpha!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        return config_from_dict(cls, data)

    def key(self) -> str:
        return config_key(self)


@dataclass(frozen=True)
class FinetuneConfig:
    """Quantization-aware fine-tuning of one policy: LSQ step sizes + distillation from fp32.

    ``steps`` SGD-Nesterov steps of ``batch_size`` augmented training images, cosine-annealed
    from ``lr`` (shared by weights, biases, batch-norm affines and step sizes: LSQ's gradient
    scaling makes one rate fit all). The loss is the KL divergence to the fp32 model's outputs at
    ``temperature`` (times T², Hinton et al. 2015) plus ``label_weight`` times cross-entropy with
    the labels. Batch-norm statistics stay frozen (the quantized model is evaluated with them).
    """

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
        if self.steps < 1:
            raise UserError(f"finetune.steps: must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise UserError(f"finetune.batch_size: must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise UserError(f"finetune.lr: must be > 0, got {self.lr}")
        if not self.temperature > 0:
            raise UserError(f"finetune.temperature: must be > 0, got {self.temperature}")
        if self.label_weight < 0:
            raise UserError(f"finetune.label_weight: must be >= 0, got {self.label_weight}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        return config_from_dict(cls, data)

    def key(self) -> str:
        return config_key(self)


# Objective name -> (direction, trial metric it reads). Accuracy is measured on the validation
# subset; the others are modeled costs relative to the fp32 model (1.0 = fp32).
OBJECTIVES = {
    "accuracy": ("maximize", "accuracy"),
    "energy": ("minimize", "rel_energy"),
    "size": ("minimize", "rel_size"),
    "bops": ("minimize", "rel_bops"),
}
# "energy@PROFILE": relative energy under another profile than ``energy_profile``, e.g. a profile
# fitted to measured kernels (``mpsearch calibrate-energy``) searched beside the analytical one.
ENERGY_UNDER = "energy@"


def objective_spec(name: str) -> tuple[str, str]:
    """(direction, metric key) of an objective name (see :data:`OBJECTIVES`, :data:`ENERGY_UNDER`)."""
    if name.startswith(ENERGY_UNDER) and len(name) > len(ENERGY_UNDER):
        return "minimize", "rel_energy:" + name[len(ENERGY_UNDER):]
    return OBJECTIVES[name]


def objective_profiles(objectives: tuple[str, ...]) -> tuple[str, ...]:
    """The energy profiles that ``energy@PROFILE`` objectives name."""
    return tuple(o[len(ENERGY_UNDER):] for o in objectives if o.startswith(ENERGY_UNDER))


def _profile_name_ok(name: str) -> bool:
    """A profile *name* (studies record profiles by name so that every worker finds them)."""
    return bool(name) and not name.endswith(".toml") and all(c.isalnum() or c in "-_." for c in name)


@dataclass(frozen=True)
class StudyConfig:
    """One search study: what to quantize, how to search, where to record it.

    ``budget`` counts real evaluations (trials). ``eval_images`` is the validation subset each
    trial is measured on. The Pareto set is re-measured on the full validation and test splits:
    every point, or at most ``remeasure_points`` spread evenly along the front (each costs a pass
    over both splits, 15,000 images on Fashion-MNIST).
    ``workers`` 0 runs in-process, -1 uses every core (one torch thread per worker).
    """

    version: int = 1
    name: str = ""
    model: str = "resnet18"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    checkpoint: str | None = None
    seed: int = 0
    budget: int = 200
    algorithm: str = "nsga2"
    population_size: int = 20
    space: str = ""
    objectives: tuple[str, ...] = ("accuracy", "energy")
    energy_profile: str = "horowitz45nm"
    eval_images: int = 400
    # Multi-fidelity methods (algorithm "nsga2+mf"): the first rung's image count, doubled per rung up to eval_images.
    multi_fidelity_images: int = 100
    workers: int = -1
    torch_threads: int = 1
    ray_address: str | None = None
    storage: str | None = None
    calibration_size: int = 512
    weight_observer: str = "minmax"
    act_observer: str = "mse"
    ptq: str = "rtn"
    bias_correction: bool = False
    smoothquant_alpha: float | None = None
    attention_calibration: str = "observer"  # QuantConfig.attention_calibration
    sensitivity: str = "hessian"
    # Population searches (not random search, not planners) start from the HAWQ-V3 ILP's
    # solutions at this many evenly spaced energy budgets, after the uniform policies: the first
    # batches carry them (NSGA-II takes more than one batch; Optuna samplers keep the first
    # population_size); 0: no sensitivity seeds. 12 (+ 5 uniform + 3 random in a generation of
    # 20) beat 35 on seed 0 of scripts/bench_search.py: hypervolume 0.8689 vs 0.8666 at reference (1, 1), fewer
    # seeds leaving more of the budget to the search.
    ilp_seeds: int = 12
    # NSGA-II gives up to this many offspring of every later batch to ILP solutions in the widest
    # gaps of its measured front (mpsearch.search.nsga2); 0: plain NSGA-II after the seeds.
    ilp_gap_plans: int = 4
    # hawq_budgets (size-based seed allocations) gave way to ilp_seeds; old study records still load.
    RETIRED_FIELDS: ClassVar[tuple[str, ...]] = ("hawq_budgets",)
    remeasure_points: int = 6
    out_root: str = "studies"
    # Fine-tune every re-measured Pareto point with LSQ + distillation (mpsearch.finetune), after
    # the search; ``finetune_steps`` steps each. The trials themselves stay post-training measured.
    finetune_front: bool = False
    finetune_steps: int = 300

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise UserError(f"study.budget: must be >= 1 evaluation, got {self.budget}")
        if self.population_size < 2:
            raise UserError(f"study.population_size: must be >= 2, got {self.population_size}")
        if self.eval_images < 1:
            raise UserError(f"study.eval_images: must be >= 1, got {self.eval_images}")
        if self.ilp_gap_plans < 0:
            raise UserError(f"study.ilp_gap_plans: must be >= 0 (0: no gap filling), got {self.ilp_gap_plans}")
        if self.ilp_seeds < 0:
            raise UserError(f"study.ilp_seeds: must be >= 0 (0: no sensitivity seeds), got {self.ilp_seeds}")
        if self.multi_fidelity_images < 1:
            raise UserError(f"study.multi_fidelity_images: must be >= 1, got {self.multi_fidelity_images}")
        if self.finetune_steps < 1:
            raise UserError(f"study.finetune_steps: must be >= 1, got {self.finetune_steps}")
        if self.finetune_front and self.smoothquant_alpha is not None:
            raise UserError("study: --finetune-front cannot fine-tune SmoothQuant-smoothed models; drop one of the two")
        if self.remeasure_points < 0:
            raise UserError(f"study.remeasure_points: 0 (every Pareto point) or a count, got {self.remeasure_points}")
        if self.torch_threads < 1:
            raise UserError(f"study.torch_threads: must be >= 1, got {self.torch_threads}")
        if self.workers < -1:
            raise UserError(f"study.workers: -1 (all cores), 0 (in-process) or a count, got {self.workers}")
        unknown = [o for o in self.objectives
                   if o not in OBJECTIVES and not (o.startswith(ENERGY_UNDER) and _profile_name_ok(o[len(ENERGY_UNDER):]))]
        if unknown or len(self.objectives) < 2 or self.objectives[0] != "accuracy" or len(set(self.objectives)) != len(self.objectives):
            raise UserError(
                "study.objectives: accuracy first, then one or more of energy, size, bops, energy@PROFILE "
                f"(no repeats); got {list(self.objectives)}"
            )
        if not _profile_name_ok(self.energy_profile):
            raise UserError(f"study.energy_profile: a profile name (see `mpsearch profiles`), got {self.energy_profile!r}; "
                            "`mpsearch calibrate-energy` installs a fitted profile under its name")
        if self.name and not all(c.isalnum() or c in "-_." for c in self.name):
            raise UserError(f"study.name: letters, digits, '-', '_' and '.' only, got {self.name!r}")

    @property
    def study_name(self) -> str:
        methods = self.algorithm.replace("+", "-").replace(",", "_")  # "nsga2+mf,random" -> "nsga2-mf_random"
        return self.name or f"{self.model}-{self.dataset.replace(':', '_').replace('/', '_')}-{methods}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudyConfig:
        return config_from_dict(cls, data)

    def key(self) -> str:
        return config_key(self)
