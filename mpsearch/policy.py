"""Per-layer precision policy: which bit widths each layer of one model runs at.

A policy is a versioned JSON document::

    {"format": "mpsearch-policy", "version": 1, "model": "resnet18", "dataset": "fashion-mnist",
     "checkpoint_sha256": "...", "architecture": "...",
     "layers": {"conv1": {"weight_bits": 8, "act_bits": 8, "granularity": "per-channel",
                          "symmetric": true, "act_symmetric": false}, ...},
     "provenance": {"study": ..., "trial": ..., "seed": ..., "metrics": {...}}}

Layers are keyed by the module's fully qualified name (``layer1.0.conv1``). A vision
transformer's attention matmuls are layers too, named ``<attention>.matmul_qk`` (q·kᵀ) and
``<attention>.matmul_av`` (softmax·v): their ``act_bits`` quantize the first operand (q, the
attention probabilities), their ``weight_bits`` the second (k, v), both per tensor. ``null`` bits mean
"off": that operand stays float32. A quantizable layer that the policy does not list stays
float32 too; a listed layer the model does not have is an error. ``architecture`` is a fingerprint
of the model's quantizable layers (names, kinds, weight shapes): a policy made for another
network is refused even when both carry the same name. Loading validates everything and names the
offending field in one line. ``provenance.quant`` (with ``calibration_size`` and ``torch_threads``)
records how the policy was measured, so that it re-measures to the same numbers
(:class:`MeasurementSettings`).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mpsearch.config import QuantConfig
from mpsearch.errors import UserError, read_user_file
from mpsearch.host.files import atomic_write_text

__all__ = [
    "POLICY_VERSION",
    "GRANULARITIES",
    "LayerPrecision",
    "MeasurementSettings",
    "Policy",
    "uniform_policy",
    "parse_shorthand",
    "is_shorthand",
    "MATMUL_QK",
    "MATMUL_AV",
    "is_matmul",
    "precision_for",
]

POLICY_VERSION = 1
_FORMAT = "mpsearch-policy"
GRANULARITIES = ("per-channel", "per-tensor")
_MIN_BITS, _MAX_BITS = 2, 8
_SHORTHAND = re.compile(r"^w(?P<w>\d+)(?:a(?P<a>\d+))?(?P<all>:all)?$|^(?P<fp32>fp32)$")
# The convention of LSQ, HAWQ-V3 and most PTQ papers: the first and last layers stay at 8 bits in
# "W4A4" results (they are the most sensitive, and cheap). `:all` opts out.
_ENDS_BITS = 8
# Attention matmuls are addressed as "<attention module>.<suffix>".
MATMUL_QK = "matmul_qk"
MATMUL_AV = "matmul_av"


def is_matmul(name: str) -> bool:
    """Whether policy layer ``name`` is an attention matmul (its operands are both activations)."""
    return name.rpartition(".")[2] in (MATMUL_QK, MATMUL_AV)


def precision_for(name: str, weight_bits: int | None, act_bits: int | None) -> LayerPrecision:
    """The default quantizer options at these widths for layer ``name`` (per tensor for a matmul)."""
    if is_matmul(name):
        return LayerPrecision(weight_bits=weight_bits, act_bits=act_bits, granularity="per-tensor")
    return LayerPrecision(weight_bits=weight_bits, act_bits=act_bits)


def _check_bits(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not _MIN_BITS <= value <= _MAX_BITS:
        raise UserError(
            f"{where}: bits must be an integer from {_MIN_BITS} to {_MAX_BITS} or null (float32), got {value!r}"
        )
    return value


@dataclass(frozen=True)
class LayerPrecision:
    """Precision of one layer: weights (``granularity``, ``symmetric``) and its input activation."""

    weight_bits: int | None = 8
    act_bits: int | None = 8
    granularity: str = "per-channel"
    symmetric: bool = True
    act_symmetric: bool = False

    def __post_init__(self) -> None:
        self.validate("layer")

    def validate(self, where: str) -> None:
        _check_bits(self.weight_bits, f"{where}.weight_bits")
        _check_bits(self.act_bits, f"{where}.act_bits")
        if self.granularity not in GRANULARITIES:
            raise UserError(f"{where}.granularity: must be one of {list(GRANULARITIES)}, got {self.granularity!r}")
        for name in ("symmetric", "act_symmetric"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{where}.{name}: must be true or false, got {getattr(self, name)!r}")

    @property
    def is_float(self) -> bool:
        return self.weight_bits is None and self.act_bits is None

    @classmethod
    def from_dict(cls, data: Any, where: str) -> LayerPrecision:
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected an object with weight_bits and act_bits, got {type(data).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{where}: unknown field {unknown[0]!r}; allowed fields are {sorted(known)}")
        for required in ("weight_bits", "act_bits"):
            if required not in data:
                raise UserError(f"{where}.{required}: required (an integer bit width, or null for float32)")
        try:
            return cls(**data)
        except UserError as exc:  # re-anchor "layer.<field>" at this layer's place in the document
            raise UserError(where + str(exc)[len("layer") :]) from None


@dataclass(frozen=True)
class MeasurementSettings:
    """How a policy was measured: re-measured with these settings it gives the same numbers."""

    quant: QuantConfig
    calibration_size: int = 512
    torch_threads: int | None = None


@dataclass(frozen=True)
class Policy:
    """A complete per-layer precision policy for one model, data set and checkpoint."""

    model: str
    dataset: str
    layers: dict[str, LayerPrecision]
    checkpoint_sha256: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    version: int = POLICY_VERSION
    architecture: str | None = None

    def precision(self, layer: str) -> LayerPrecision:
        """The layer's precision; layers the policy does not list run in float32."""
        return self.layers.get(layer, LayerPrecision(weight_bits=None, act_bits=None))

    def bits(self) -> dict[str, tuple[int | None, int | None]]:
        """``layer -> (weight_bits, act_bits)``, the form the cost model takes."""
        return {name: (p.weight_bits, p.act_bits) for name, p in self.layers.items()}

    def validate_for(self, *, model: str, layers: list[str], checkpoint_sha256: str | None = None,
                     architecture: str | None = None) -> None:
        """Check that this policy belongs to ``model`` (architecture and checkpoint) and names only its layers."""
        if self.model != model:
            raise UserError(
                f"policy.model: this policy is for model {self.model!r}, not {model!r}; "
                f"measure it on {self.model} or make a policy for {model}"
            )
        if architecture and self.architecture and self.architecture != architecture:
            raise UserError(
                f"policy.architecture: this policy was made for another network than this {model!r} (its layers or their "
                "shapes differ); make a policy for this model"
            )
        known = set(layers)
        for name in self.layers:
            if name not in known:
                close = [n for n in layers if n.split(".")[-1] == name.split(".")[-1]][:3]
                hint = f" (similar: {', '.join(close)})" if close else ""
                raise UserError(
                    f"policy.layers.{name}: model {model!r} has no quantizable layer {name!r}{hint}; "
                    f"`mpsearch layers --model {model}` lists them"
                )
        if checkpoint_sha256 and self.checkpoint_sha256 and self.checkpoint_sha256 != checkpoint_sha256:
            raise UserError(
                f"policy.checkpoint_sha256: policy was made for checkpoint {self.checkpoint_sha256[:12]}…, "
                f"the model loaded is {checkpoint_sha256[:12]}…; use the checkpoint it was made for"
            )

    def with_provenance(self, **items: Any) -> Policy:
        return replace(self, provenance={**self.provenance, **items})

    def with_settings(self, settings: MeasurementSettings) -> Policy:
        """This policy recording how it was measured (``provenance.quant`` and friends)."""
        items: dict[str, Any] = {"quant": settings.quant.to_dict(), "calibration_size": settings.calibration_size}
        if settings.torch_threads is not None:
            items["torch_threads"] = settings.torch_threads
        return self.with_provenance(**items)

    def settings(self) -> MeasurementSettings | None:
        """How this policy was measured, from its provenance; None when it does not say."""
        quant = self.provenance.get("quant")
        if quant is None:
            return None
        try:
            config = QuantConfig.from_dict(quant)
        except UserError as exc:
            raise UserError(f"policy.provenance.{exc}") from None
        size, threads = self.provenance.get("calibration_size", 512), self.provenance.get("torch_threads")
        for key, value in (("calibration_size", size), ("torch_threads", threads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UserError(f"policy.provenance.{key}: a positive integer, got {value!r}")
        return MeasurementSettings(config, size, threads)

    # -- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": self.version,
            "model": self.model,
            "dataset": self.dataset,
            "checkpoint_sha256": self.checkpoint_sha256,
            "architecture": self.architecture,
            "layers": {name: asdict(p) for name, p in self.layers.items()},
            "provenance": self.provenance,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> Policy:
        if not isinstance(data, dict):
            raise UserError("policy: expected a JSON object at the top level")
        if data.get("format", _FORMAT) != _FORMAT:
            raise UserError(f"policy.format: expected {_FORMAT!r}, got {data.get('format')!r}")
        version = data.get("version")
        if version != POLICY_VERSION:
            raise UserError(f"policy.version: this mpsearch reads version {POLICY_VERSION}, got {version!r}")
        for key in ("model", "dataset"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise UserError(f"policy.{key}: required, a non-empty string")
        sha = data.get("checkpoint_sha256")
        if sha is not None and (not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha)):
            raise UserError("policy.checkpoint_sha256: must be 64 lowercase hex digits or null")
        architecture = data.get("architecture")
        if architecture is not None and (not isinstance(architecture, str) or not re.fullmatch(r"[0-9a-f]{64}", architecture)):
            raise UserError("policy.architecture: must be 64 lowercase hex digits or null")
        layers = data.get("layers")
        if not isinstance(layers, dict):
            raise UserError("policy.layers: required, an object mapping layer names to precisions")
        provenance = data.get("provenance")
        provenance = {} if provenance is None else provenance
        if not isinstance(provenance, dict):
            raise UserError("policy.provenance: must be an object")
        unknown = sorted(set(data) - {"format", "version", "model", "dataset", "checkpoint_sha256", "architecture", "layers",
                                      "provenance"})
        if unknown:
            raise UserError(f"policy.{unknown[0]}: unknown field; remove it")
        return cls(
            model=data["model"],
            dataset=data["dataset"],
            checkpoint_sha256=sha,
            architecture=architecture,
            layers={name: LayerPrecision.from_dict(spec, f"policy.layers.{name}") for name, spec in layers.items()},
            provenance=provenance,
        )

    @classmethod
    def from_json(cls, text: str) -> Policy:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"policy: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        path = Path(path)
        text = read_user_file(path, "policy file", "JSON")
        try:
            return cls.from_json(text)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None

    def save(self, path: str | Path) -> None:
        """Write atomically: a reader never sees half a policy."""
        atomic_write_text(path, self.to_json(), what="policy")

    def summary(self) -> str:
        """The bit widths in use, e.g. ``W4-8 A4-8`` for w4a4 with 8-bit ends, ``fp32`` for none."""
        pairs = [(p.weight_bits, p.act_bits) for p in self.layers.values()]
        if not pairs:
            return "fp32"
        ws = sorted({w for w, _ in pairs}, key=lambda b: b or 32)
        as_ = sorted({a for _, a in pairs}, key=lambda b: b or 32)
        fmt = lambda bs: "-".join("32" if b is None else str(b) for b in bs)  # noqa: E731
        return f"W{fmt(ws)} A{fmt(as_)}"


def is_shorthand(text: str) -> bool:
    return bool(_SHORTHAND.match(text.strip().lower()))


def parse_shorthand(text: str) -> tuple[int | None, int | None, bool]:
    """``"w4a8"`` → ``(4, 8, keep_ends)``; ``"w8"`` weights only; ``"fp32"``; suffix ``:all`` quantizes the ends too."""
    m = _SHORTHAND.match(text.strip().lower())
    if not m:
        raise UserError(
            f"policy {text!r}: not a file or a shorthand; use e.g. w8a8, w4a8, w4a4, w8 (weights only), fp32, "
            "w4a4:all (ends quantized too) or a policy JSON path"
        )
    if m.group("fp32"):
        return None, None, True
    w = _check_bits(int(m.group("w")), f"policy {text!r} weight")
    a = _check_bits(int(m.group("a")), f"policy {text!r} activation") if m.group("a") else None
    return w, a, not m.group("all")


def uniform_policy(
    shorthand: str,
    *,
    model: str,
    dataset: str,
    layers: list[str],
    checkpoint_sha256: str | None = None,
    architecture: str | None = None,
) -> Policy:
    """A uniform policy over ``layers`` (in execution order) from a shorthand like ``w4a4``.

    Unless the shorthand ends in ``:all``, the first and last layers are held at 8 bits
    (never lowered below what was asked, and never raised above it for weights-only policies).
    Both operands of an attention matmul are activations, so a matmul runs at the activation
    width on both sides (``w4a8`` -> 8/8) and stays float32 in weights-only policies.
    """
    w, a, keep_ends = parse_shorthand(shorthand)
    specs: dict[str, LayerPrecision] = {}
    if w is None and a is None:
        return Policy(model=model, dataset=dataset, layers={}, checkpoint_sha256=checkpoint_sha256,
                      architecture=architecture, provenance={"shorthand": shorthand})
    for i, name in enumerate(layers):
        if is_matmul(name):
            if a is not None:
                specs[name] = precision_for(name, a, a)
            continue
        lw, la = w, a
        if keep_ends and i in (0, len(layers) - 1):
            lw = max(lw, _ENDS_BITS) if lw is not None else None
            la = max(la, _ENDS_BITS) if la is not None else None
        specs[name] = LayerPrecision(weight_bits=lw, act_bits=la)
    return Policy(model=model, dataset=dataset, layers=specs, checkpoint_sha256=checkpoint_sha256,
                  architecture=architecture, provenance={"shorthand": shorthand})
