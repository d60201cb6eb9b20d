"""One search study as data: what to quantize (:class:`StudyConfig`), how to search
(:class:`SearchConfig`), how to quantize (:class:`~mpsearch.config.QuantConfig`), whether to
fine-tune the front (:class:`~mpsearch.config.FinetuneConfig`), how its front is timed in
onnxruntime (:class:`LatencyConfig`) and where it runs (:class:`RunConfig`).

A study config is a YAML file (``mpsearch optimize --config studies/resnet18.yaml``) whose
sections are these classes; a study writes the config it ran with as ``config.yaml`` next to
its outputs, and running that file again resumes the study.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from mpsearch.config._base import Config, field_error
from mpsearch.config.quant import FinetuneConfig, QuantConfig
from mpsearch.errors import UserError, parse_user_yaml, read_user_file
from mpsearch.objectives import is_objective, profile_name_ok

__all__ = ["SearchConfig", "LatencyConfig", "timing_problem", "RunConfig", "StudyConfig", "RESUMABLE_FIELDS", "DEFAULT_TOLERANCES_PP"]


@dataclass(frozen=True)
class SearchConfig(Config):
    """How the search runs: which methods, how many evaluations, on what, seeded how.

    ``budget`` counts trials per method, each measured on the first ``eval_images`` validation
    images; a multi-fidelity method (``nsga2+mf``) measures each candidate on the first
    ``multi_fidelity_images`` and doubles them, rung by rung up to ``eval_images``, while the
    candidate stays near the front. Population searches start from the uniform policies and the HAWQ-V3 ILP's
    solutions at ``ilp_seeds`` evenly spaced energy budgets (sensitivity from ``sensitivity``,
    estimated on ``sensitivity_batches`` calibration batches with at most
    ``sensitivity_probes`` Hutchinson probes); NSGA-II gives up to ``ilp_gap_plans`` offspring of
    every later generation to ILP solutions in the widest gaps of its measured front.

    At the end, the answers are chosen: for each of ``tolerances`` (percentage points below
    fp32; None: 0.5, 1 and 2, those within the floor), the cheapest Pareto point that the rule of
    :mod:`mpsearch.study.answers` proves within it at ``confidence``, on the validation images the
    search did not use. Then at most ``remeasure_points`` Pareto points (0: all; never fewer
    than the rule measured) are measured on the test split: those the answers rest on, the
    knee, then points spread along the front.

    ``max_drop`` is the study's accuracy floor, in percentage points below the fp32 model on the
    same validation images (None: no floor). Candidates below it stay in the study, but the
    search treats them as infeasible (a constraint), and they are never on the front, never
    re-measured and never picked.
    """

    SECTION = "search"

    version: int = 1
    algorithm: str = "nsga2"
    budget: int = 200
    population_size: int = 20
    space: str = ""
    objectives: tuple[str, ...] = ("accuracy", "energy")
    energy_profile: str = "horowitz45nm"
    eval_images: int = 400
    multi_fidelity_images: int = 100
    sensitivity: str = "hessian"
    sensitivity_batches: int = 2
    sensitivity_probes: int = 16
    ilp_seeds: int = 12
    ilp_gap_plans: int = 4
    remeasure_points: int = 8
    max_drop: float | None = 5.0
    tolerances: tuple[float, ...] | None = None
    confidence: float = 0.95

    def __post_init__(self) -> None:
        for name, least in (("budget", 1), ("population_size", 2), ("eval_images", 1), ("multi_fidelity_images", 1),
                            ("sensitivity_batches", 1), ("sensitivity_probes", 1), ("ilp_seeds", 0), ("ilp_gap_plans", 0),
                            ("remeasure_points", 0)):
            if getattr(self, name) < least:
                raise field_error(f"search.{name}", f"must be >= {least}, got {getattr(self, name)}")
        drop = self.max_drop
        if drop is not None and (isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop < 100):
            raise field_error("search.max_drop", f"percentage points of accuracy below fp32, from 0 to 100 (null: no floor), "
                                                 f"got {drop!r}")
        confidence = self.confidence
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
            raise field_error("search.confidence", f"the probability each answer holds, strictly between 0 and 1 (e.g. 0.95), "
                                                   f"got {confidence!r}")
        self._check_tolerances()
        objectives = self.objectives
        if (not all(is_objective(o) for o in objectives) or len(objectives) < 2 or objectives[0] != "accuracy"
                or len(set(objectives)) != len(objectives)):
            raise field_error("search.objectives", "accuracy first, then one or more of energy, size, bops, latency, energy@PROFILE "
                                                   f"(no repeats); got {list(objectives)}")
        if not profile_name_ok(self.energy_profile):
            raise field_error("search.energy_profile", f"a profile name (see `mpsearch profiles`), got {self.energy_profile!r}; "
                                                       "`mpsearch calibrate-energy` installs a fitted profile under its name")

    def _check_tolerances(self) -> None:
        tolerances = self.tolerances
        if tolerances is None:
            return
        if isinstance(tolerances, (int, float)) and not isinstance(tolerances, bool):  # --set search.tolerances=1
            tolerances = (tolerances,)
        if isinstance(tolerances, list):
            tolerances = tuple(tolerances)
        object.__setattr__(self, "tolerances", tolerances)
        if not isinstance(tolerances, tuple):
            raise field_error("search.tolerances", f"a list of percentage points below fp32, e.g. [0.5, 1, 2]; got {tolerances!r}")
        if (not tolerances or not all(not isinstance(t, bool) and isinstance(t, (int, float)) and 0 < t < 100 for t in tolerances)
                or list(tolerances) != sorted(set(tolerances))):
            raise field_error("search.tolerances", "percentage points below fp32, each above 0, increasing, e.g. [0.5, 1, 2] "
                                                   f"(null: 0.5, 1 and 2); got {list(tolerances)}")
        if self.max_drop is not None and tolerances[-1] > self.max_drop:
            raise field_error("search.tolerances", f"{tolerances[-1]:g} pp lies beyond the accuracy floor ({self.max_drop:g} pp "
                                                   "below fp32): no point there is searched; ask for tolerances within the "
                                                   "floor or lower the floor (--max-drop)")

    @property
    def answer_tolerances(self) -> tuple[float, ...]:
        """The tolerances the answers are chosen for: ``tolerances``, else those of
        :data:`DEFAULT_TOLERANCES_PP` within the floor (the floor itself when none is)."""
        if self.tolerances is not None:
            return tuple(float(t) for t in self.tolerances)
        inside = tuple(t for t in DEFAULT_TOLERANCES_PP if self.max_drop is None or t <= self.max_drop)
        return inside or (float(self.max_drop),)


DEFAULT_TOLERANCES_PP = (0.5, 1.0, 2.0)  # what the answers give the cheapest point within, unless asked otherwise
MIN_TIMED_RUNS = 30  # fewer timed runs give a median too noisy to compare two models by


def timing_problem(*, batch_sizes: Any, runs: int, warmup: int, threads: int | None) -> tuple[str, str] | None:
    """(field, what is wrong) with these latency timing settings, or None: one rule for a study's
    ``latency:`` section and for ``mpsearch latency``'s flags."""
    if runs < MIN_TIMED_RUNS:
        return "runs", f"at least {MIN_TIMED_RUNS} timings per batch size give a stable median, got {runs}"
    if not batch_sizes or not all(type(b) is int and b >= 1 for b in batch_sizes):
        return "batch_sizes", f"each must be >= 1, got {list(batch_sizes)}"
    if warmup < 1:
        return "warmup", f"must be >= 1 run, got {warmup}"
    if threads is not None and (type(threads) is not int or threads < 1):
        return "threads", f"must be >= 1 (unset: every core), got {threads!r}"
    return None


@dataclass(frozen=True)
class LatencyConfig(Config):
    """How each re-measured Pareto point is timed end to end: exported to ONNX (its quantized
    layers on integer kernels, :mod:`mpsearch.export`) and run in onnxruntime on this CPU.

    At each of ``batch_sizes``: ``warmup`` untimed runs, then the median of ``runs`` timed ones,
    on ``threads`` threads (None: every core; the search's workers are
    done by then). Points whose files have the same graph (the same layers on integer kernels,
    widths <= 8 sharing one int8 kernel) share one timing. The ``latency`` objective
    (``search.objectives``) times candidates the same way at the first of ``batch_sizes``.
    """

    SECTION = "latency"

    version: int = 1
    batch_sizes: tuple[int, ...] = (1, 64)
    runs: int = 30
    warmup: int = 10
    threads: int | None = None

    def __post_init__(self) -> None:
        problem = timing_problem(batch_sizes=self.batch_sizes, runs=self.runs, warmup=self.warmup, threads=self.threads)
        if problem:
            raise field_error(f"latency.{problem[0]}", problem[1])


@dataclass(frozen=True)
class RunConfig(Config):
    """Where and how a study runs; a resumed study may change any of it.

    ``workers`` 0 measures in this process, -1 starts one Ray worker per core (at
    ``torch_threads`` each, fixed so that numbers do not depend on the worker count) or, on a
    cluster, as many as its CPUs hold. ``ray_address`` (else the ``RAY_ADDRESS`` environment
    variable; ``auto`` finds a cluster started on this machine) joins an existing Ray cluster;
    without either, a private Ray instance starts on the loopback address. Each worker reserves
    ``cpus_per_worker`` CPUs (default ``torch_threads``) and ``gpus_per_worker`` GPUs (default
    0: candidates are measured on CPUs); ``ray_dashboard`` starts the private instance's
    dashboard on 127.0.0.1. ``storage`` is an Optuna storage URL (or ``journal:PATH`` for a
    journal file) and ``out_dir`` the folder for the study's files; with neither, nothing is
    written.
    """

    SECTION = "run"

    version: int = 1
    workers: int = -1
    torch_threads: int = 1
    ray_address: str | None = None
    cpus_per_worker: float | None = None
    gpus_per_worker: float = 0.0
    ray_dashboard: bool = False
    storage: str | None = None
    out_dir: str | None = None

    def __post_init__(self) -> None:
        if self.torch_threads < 1:
            raise field_error("run.torch_threads", f"must be >= 1, got {self.torch_threads}")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise field_error("run.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        if not self.gpus_per_worker >= 0:
            raise field_error("run.gpus_per_worker", f"must be >= 0, got {self.gpus_per_worker}")
        if self.workers < -1:
            raise field_error("run.workers", f"-1 (one per core), 0 (in-process) or a count, got {self.workers}")


# Settings a resumed study may change: they decide how much to run and where, not what a trial
# measures. Every other field must match the study's stored config.
RESUMABLE_FIELDS = ("run", "search.budget", "search.remeasure_points", "search.tolerances", "search.confidence", "data_dir",
                    "checkpoint", "finetune", "latency", "allow_weak_baseline")


@dataclass(frozen=True)
class StudyConfig(Config):
    """One search study: which model on which data, quantized how, searched how, run where.

    ``model`` is a timm name (or the name of a model object handed to :func:`mpsearch.search`),
    ``dataset`` a data set name (``mpsearch.data.DATASETS``, ``imagefolder:PATH``) or a custom
    data set's name (``image_size``: an image folder's images resized to it instead of 224 px);
    ``checkpoint`` an fp32 state dict to quantize instead of the cached
    baseline; ``allow_weak_baseline`` searches a baseline within 10 points of chance accuracy,
    which is otherwise refused. ``seed`` seeds everything: the calibration draw, the quantizers, the search and
    fine-tuning (``quant.seed`` and ``finetune.seed`` always follow it). ``finetune`` (off when null) fine-tunes
    every re-measured Pareto point with LSQ + distillation. ``latency`` (off when null) exports every
    re-measured Pareto point to ONNX and times it in onnxruntime, next to the fp32 model.
    """

    SECTIONS: ClassVar[dict[str, type]] = {"quant": QuantConfig, "search": SearchConfig, "finetune": FinetuneConfig,
                                           "latency": LatencyConfig, "run": RunConfig}

    version: int = 1
    name: str = ""
    model: str = "resnet18"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    image_size: int | None = None
    checkpoint: str | None = None
    allow_weak_baseline: bool = False
    seed: int = 0
    calibration_size: int = 512
    quant: QuantConfig = field(default_factory=QuantConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    finetune: FinetuneConfig | None = None
    latency: LatencyConfig | None = field(default_factory=LatencyConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        # The study's seed seeds its sections: they never disagree.
        if self.quant.seed != self.seed:
            object.__setattr__(self, "quant", replace(self.quant, seed=self.seed))
        if self.finetune is not None and self.finetune.seed != self.seed:
            object.__setattr__(self, "finetune", replace(self.finetune, seed=self.seed))
        if self.calibration_size < 1:
            raise field_error("calibration_size", f"must be >= 1, got {self.calibration_size}")
        if self.finetune is not None and self.quant.smoothquant_alpha is not None:
            raise UserError("finetune: fine-tuning cannot start from SmoothQuant-smoothed models; "
                            "turn off finetune or quant.smoothquant_alpha", fields=("finetune", "quant.smoothquant_alpha"))
        if "latency" in self.search.objectives and self.latency is None:
            raise UserError("search.objectives: latency is timed with the latency section's settings; "
                            "keep the latency section (do not set latency=null)", fields=("search.objectives", "latency"))
        if self.name and not all(c.isalnum() or c in "-_." for c in self.name):
            raise field_error("name", f"letters, digits, '-', '_' and '.' only, got {self.name!r}")

    @classmethod
    def load(cls, path: str | Path) -> StudyConfig:
        """A study config from a YAML (or JSON) file; errors name the file and the field."""
        data = parse_user_yaml(read_user_file(path, "study config", "YAML"), f"study config {path}")
        try:
            return cls.from_dict({} if data is None else data)
        except UserError as exc:
            raise UserError(f"study config {path}: {exc}", fields=exc.fields) from None

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)

    @property
    def study_name(self) -> str:
        methods = self.search.algorithm.replace("+", "-").replace(",", "_")  # "nsga2+mf,random" -> "nsga2-mf_random"
        dataset = self.dataset.replace(":", "_").replace("/", "_")
        return self.name or f"{self.model}-{dataset}-{methods}-s{self.seed}"

    def conflict_with(self, stored: StudyConfig) -> tuple[str, str] | None:
        """The first setting a resume may not change that differs from ``stored``: (field,
        ``field is OLD in the study, NEW now``); None when the study may resume with this config."""
        old, new = _flatten(stored.to_dict()), _flatten(self.to_dict())
        for key in dict.fromkeys([*new, *old]):
            if key in ("name", "version") or key.endswith(".version") or old.get(key) == new.get(key):
                continue
            if any(key == f or key.startswith(f + ".") for f in RESUMABLE_FIELDS):
                continue
            return key, f"{key} is {old.get(key)!r} in the study, {new.get(key)!r} now"
        return None


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = list(value) if isinstance(value, tuple) else value
    return out


def _plain(value: Any) -> Any:
    """Tuples as lists, so that YAML writes plain sequences."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
