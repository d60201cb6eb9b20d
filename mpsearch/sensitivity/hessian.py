"""Hessian-trace sensitivity: Hutchinson's estimator and the HAWQ-V2 score.

Hutchinson (1989), "A stochastic estimator of the trace of the influence matrix for Laplacian
smoothing splines": for Rademacher ``v`` (entries +-1), ``E[v^T H v] = tr(H)``. One
Hessian-vector product over all layer weights at once (double backprop) gives ``v_l^T (H v)_l``
for every layer ``l`` simultaneously; the cross-layer terms ``v_l^T H_lm v_m`` vanish in
expectation, so each is an unbiased estimate of that layer's own block trace.

HAWQ-V2 (Dong et al., "HAWQ-V2: Hessian Aware trace-Weighted Quantization of Neural Networks",
NeurIPS 2020) scores quantizing layer ``l`` to ``b`` bits by
``tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2``: the mean curvature times the weight perturbation.

Some operations have no double backward in PyTorch (the hard-sigmoid of MobileNetV3's
squeeze-excite gates, custom ``once_differentiable`` functions). There the Hessian-vector product is
taken by central differences of gradients instead, ``H v ~ (g(w + e v) - g(w - e v)) / 2e``, in
float64 on a copy of the model (``e`` is 1e-4 of the weights' RMS), exact up to ``O(e^2)`` where
the loss is smooth; :class:`HessianEstimator` switches to it by itself and says so.

This is our own implementation; PyHessian (the HAWQ authors' library) is GPL-3 and is not used.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from mpsearch.config import QuantConfig
from mpsearch.data import Split
from mpsearch.quant import QuantizedModel
from mpsearch.sensitivity.base import (
    ESTIMATORS,
    SensitivityConfig,
    SensitivityEstimator,
    calibration_batches,
    layer_weights,
    weight_errors,
)

__all__ = ["HVP_METHODS", "TraceEstimate", "hutchinson_trace", "HessianEstimator", "no_double_backward"]

logger = logging.getLogger(__name__)
HVP_METHODS = ("autograd", "finite-difference")
_RELATIVE_STEP = 1e-4  # finite-difference step as a fraction of the weights' RMS


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson estimates, one per parameter tensor, in the order the tensors were given."""

    traces: tuple[float, ...]  # mean of v^T H v over the probes
    stderr: tuple[float, ...]  # standard error of that mean (0 with one probe)
    probes: int
    converged: bool  # stopped by the tolerance rather than by max_probes


def _rademacher(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Drawn on the CPU from one CPU generator, so a seed gives the same probes on every device.
    v = torch.randint(0, 2, like.shape, generator=generator, dtype=torch.int8).to(like.dtype)
    return (v * 2 - 1).to(like.device)


def _vhv(
    losses: Sequence[Callable[[], torch.Tensor]], params: Sequence[torch.Tensor], probes: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``v_l^T (H v)_l`` per parameter tensor for the Hessian of ``sum(loss() for loss in losses)``."""
    out = torch.zeros(len(params), dtype=torch.float64)
    for loss in losses:
        value = loss()
        grads = torch.autograd.grad(value, params, create_graph=True, allow_unused=True)
        gv = sum(((g * v).sum() for g, v in zip(grads, probes) if g is not None), torch.zeros(()))
        if not gv.requires_grad:  # the loss is linear (or constant) in every parameter: H = 0
            continue
        hvs = torch.autograd.grad(gv, params, allow_unused=True)
        for i, (hv, v) in enumerate(zip(hvs, probes)):
            if hv is not None:
                out[i] += (hv.double() * v.double()).sum().item()
    return out


def _vhv_finite_difference(
    losses: Sequence[Callable[[], torch.Tensor]], params: Sequence[torch.Tensor], probes: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``v_l^T (H v)_l`` by central differences of first-order gradients (no double backward);
    ``params`` are moved by ``+-step * v`` in place and restored exactly."""
    with torch.no_grad():
        rms = torch.sqrt(sum((p.double() ** 2).sum() for p in params) / sum(p.numel() for p in params))
        step = float(_RELATIVE_STEP * rms) or _RELATIVE_STEP
        saved = [p.detach().clone() for p in params]

    def gradients(sign: float) -> list[torch.Tensor]:
        with torch.no_grad():
            for p, w, v in zip(params, saved, probes):
                p.copy_(w + sign * step * v)
        total = [torch.zeros_like(p) for p in params]
        for loss in losses:
            grads = torch.autograd.grad(loss(), params, allow_unused=True)
            for t, g in zip(total, grads):
                if g is not None:
                    t += g
        return total

    try:
        plus, minus = gradients(1.0), gradients(-1.0)
    finally:
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
    return torch.stack([((gp - gm).double() * v.double()).sum() / (2 * step) for gp, gm, v in zip(plus, minus, probes)])


def no_double_backward(exc: BaseException) -> bool:
    """Whether ``exc`` is autograd saying some operation has no second derivative."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        ("derivative for" in text and "not implemented" in text) or "once_differentiable" in text or "double backward" in text
    )


def hutchinson_trace(
    losses: Callable[[], torch.Tensor] | Sequence[Callable[[], torch.Tensor]],
    params: Sequence[torch.Tensor],
    *,
    max_probes: int = 64,
    min_probes: int = 8,
    tolerance: float = 0.02,
    seed: int = 0,
    progress: str | None = None,
    hvp: str = "autograd",
) -> TraceEstimate:
    """Hutchinson's estimate of the Hessian trace block of each tensor in ``params``.

    ``losses`` is a closure returning a scalar loss, or several whose sum is the loss (e.g. one
    per batch, each scaled by its share of the images): each is re-evaluated for every probe, so
    only one batch's double-backprop graph is alive at a time. ``params`` must require grad.
    Probes stop when, after ``min_probes``, every tensor's running mean moved by at most
    ``tolerance`` (relative) over the last ``max(1, min_probes // 2)`` probes (a window, because
    a one-probe change shrinks like 1/k and would stop too early), or at ``max_probes``.
    ``progress`` labels a progress bar (none when ``None``). ``hvp``: how Hessian-vector
    products are taken, ``"autograd"`` (double backprop) or ``"finite-difference"`` (central
    differences of gradients, for functions without a double backward; see the module doc).
    """
    closures = [losses] if callable(losses) else list(losses)
    params = list(params)
    if not params:
        raise ValueError("hutchinson_trace needs at least one parameter tensor")
    if hvp not in HVP_METHODS:
        raise ValueError(f"hvp must be one of {HVP_METHODS}, got {hvp!r}")
    vhv = _vhv if hvp == "autograd" else _vhv_finite_difference
    if not 1 <= min_probes <= max_probes:
        raise ValueError(f"need 1 <= min_probes <= max_probes, got {min_probes}, {max_probes}")
    total, total_sq, probes_used, converged = _probe(
        closures, params, vhv, max_probes=max_probes, min_probes=min_probes, tolerance=tolerance, seed=seed, progress=progress
    )
    return _trace_estimate(total, total_sq, probes_used, converged)


def _probe(
    closures: Sequence[Callable[[], torch.Tensor]],
    params: Sequence[torch.Tensor],
    vhv: Callable[[Sequence[Callable[[], torch.Tensor]], Sequence[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor],
    *,
    max_probes: int,
    min_probes: int,
    tolerance: float,
    seed: int,
    progress: str | None,
) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """The probe loop of :func:`hutchinson_trace`: sum and sum of squares of ``v^T H v`` per tensor,
    the number of probes taken and whether the running means settled before ``max_probes``."""
    generator = torch.Generator().manual_seed(seed)
    window = max(1, min_probes // 2)
    total = torch.zeros(len(params), dtype=torch.float64)
    total_sq = torch.zeros(len(params), dtype=torch.float64)
    history: list[torch.Tensor] = []  # running mean after each probe
    converged = False
    bar = tqdm(total=max_probes, desc=progress, unit="probe", disable=progress is None, leave=False)
    try:
        with torch.enable_grad():
            for k in range(1, max_probes + 1):
                probes = [_rademacher(p, generator) for p in params]
                sample = vhv(closures, params, probes)
                total += sample
                total_sq += sample * sample
                history.append(total / k)
                bar.update(1)
                if k >= min_probes and k > window and _settled(history[-1], history[-1 - window], tolerance):
                    converged = True
                    break
    finally:
        bar.close()
    return total, total_sq, len(history), converged


def _settled(now: torch.Tensor, before: torch.Tensor, tolerance: float) -> bool:
    """Whether every running mean moved by at most ``tolerance`` (relative) from ``before`` to ``now``."""
    # The absolute floor keeps an exactly-zero trace from never converging.
    return bool(((now - before).abs() <= tolerance * now.abs() + 1e-12).all())


def _trace_estimate(total: torch.Tensor, total_sq: torch.Tensor, probes_used: int, converged: bool) -> TraceEstimate:
    """The mean of the probes and its standard error, from their sum and sum of squares."""
    mean = total / probes_used
    if probes_used > 1:
        var = (total_sq - probes_used * mean * mean).clamp(min=0) / (probes_used - 1)
        stderr = (var / probes_used).sqrt()
    else:
        stderr = torch.zeros_like(mean)
    return TraceEstimate(
        traces=tuple(float(t) for t in mean),
        stderr=tuple(float(s) for s in stderr),
        probes=probes_used,
        converged=converged,
    )


@ESTIMATORS.register("hessian")
class HessianEstimator(SensitivityEstimator):
    """HAWQ-V2 scores from Hutchinson traces of the cross-entropy on the calibration batches.

    Columns: ``layer, bits, score, trace, trace_per_param, trace_stderr, weight_error, params,
    probes`` (``trace_stderr``: standard error of the trace over the probes).
    ``score = |trace| / params * weight_error``; the magnitude is used because a trained
    network's per-layer trace can come out slightly negative (noise, or a non-convex direction)
    and a score must stay a non-negative ranking. Runs on a deep copy of ``model`` in eval mode
    (BatchNorm uses its running statistics), so the caller's model is left untouched.
    """

    def estimate(
        self,
        model: nn.Module,
        layers: list[str],
        calibration: Split,
        config: SensitivityConfig,
        *,
        quant: QuantConfig,
        qmodel: QuantizedModel | None = None,
        progress: bool = False,
    ) -> pd.DataFrame:
        errors = weight_errors(model, layers, config.bits, observer=quant.weight_observer)
        batches = calibration_batches(calibration, config)
        try:
            est, weights = self._traces(model, layers, batches, config, hvp="autograd", progress=progress)
        except RuntimeError as exc:
            if not no_double_backward(exc):
                raise
            what = str(exc).strip().splitlines()[0]
            logger.info(f"hessian: the model has an operation without a double backward ({what}); "
                        "taking Hessian-vector products by finite differences of gradients in float64 instead")
            est, weights = self._traces(model, layers, batches, config, hvp="finite-difference", progress=progress)
        rows = []
        for name, w, trace, stderr in zip(layers, weights, est.traces, est.stderr):
            n = w.numel()
            for b in config.bits:
                err = errors[(name, b)]
                rows.append({
                    "layer": name,
                    "bits": b,
                    "score": abs(trace) / n * err,
                    "trace": trace,
                    "trace_per_param": trace / n,
                    "trace_stderr": stderr,
                    "weight_error": err,
                    "params": n,
                    "probes": est.probes,
                })
        return pd.DataFrame(rows)

    @staticmethod
    def _traces(model: nn.Module, layers: list[str], batches: list[tuple[torch.Tensor, torch.Tensor]],
                config: SensitivityConfig, *, hvp: str, progress: bool) -> tuple[TraceEstimate, list[torch.Tensor]]:
        """Hutchinson traces of ``layers``' weights on a copy of ``model`` in eval mode (BatchNorm
        uses its running statistics); finite differences run in float64, where the step is exact."""
        dtype = torch.float64 if hvp == "finite-difference" else None
        work = copy.deepcopy(model).eval()
        if dtype is not None:
            work = work.to(dtype)
        # Only the layer weights need gradients; freezing the rest saves their Hessian products.
        for p in work.parameters():
            p.requires_grad_(False)
        weights = list(layer_weights(work, layers).values())
        for w in weights:
            w.requires_grad_(True)
        device = weights[0].device
        images = sum(len(y) for _, y in batches)

        def batch_loss(x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
            # Sum over the batch / all images: the closures add up to the mean loss over all batches.
            # Attention through the math kernel: the fused CPU kernels have no double backward,
            # which Hessian-vector products need (vision transformers).
            def loss() -> torch.Tensor:
                with sdpa_kernel(SDPBackend.MATH):
                    return F.cross_entropy(work(x), y, reduction="sum") / images

            return loss

        closures = [batch_loss(x.to(device=device, dtype=dtype or x.dtype), y.to(device)) for x, y in batches]
        est = hutchinson_trace(
            closures,
            weights,
            max_probes=config.max_probes,
            min_probes=config.min_probes,
            tolerance=config.tolerance,
            seed=config.seed,
            progress=f"hessian trace ({hvp})" if progress else None,
            hvp=hvp,
        )
        return est, weights
