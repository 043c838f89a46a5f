"""The regime metrics as a pure function of (reference, current measurement).

:func:`regime_metrics` computes every value :class:`~lazy_monitor.KernelTracker` returns from a
:class:`~lazy_monitor.tracking._state.Reference` (``f₀``, ``K₀``, per-layer ``K₀``,
eigenvectors of ``K₀``), θ₀, the previous measurement and a :class:`Measurement`; it mutates
nothing. The formulas are in :mod:`lazy_monitor.metrics` and :mod:`lazy_monitor.catalogue`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from lazy_monitor.core import metrics as M
from lazy_monitor.core.features import gram_cka
from lazy_monitor.core.stability import lr_eig_max
from lazy_monitor.thresholds import Threshold
from lazy_monitor.tracking._state import LastMeasurement, Reference

__all__ = ["Measurement", "lazy_decision", "regime_metrics"]


@dataclass(frozen=True)
class Measurement:
    """One evaluation of the model on the probe (all on the metric device).

    Attributes:
        kernel: ``K`` in the engine's shape for the kind.
        layer_kernels: ``{layer: K_l}`` (empty without ``per_layer``).
        spectrum: ``(eigenvalues (M,) ascending, eigenvectors (M, M))`` of the kernel matrix.
        f: outputs ``(N, O)``; f_lin: ``f₀ + J(θ₀)(θ − θ₀)`` ``(N, O)``.
        params: the tracked parameters θ by name.
        feature_grams: ``{module: (N, N)}`` centred Gram matrices of the tracked modules'
            features (empty when no module is tracked).
    """

    kernel: Tensor
    layer_kernels: Mapping[str, Tensor]
    spectrum: tuple[Tensor, Tensor]
    f: Tensor
    f_lin: Tensor
    params: Mapping[str, Tensor]
    feature_grams: Mapping[str, Tensor] = field(default_factory=dict)


def lazy_decision(
    thresholds: Sequence[Threshold], metrics: Mapping[str, float]
) -> tuple[bool, str]:
    """Whether every threshold holds on ``metrics`` (globs apply to every matching name), and
    the violations as ``"ntk/rel_change = 0.231 > 0.1"`` (empty when lazy). NaN violates."""
    reasons = []
    for th in thresholds:
        for name in th.select(metrics):
            value = float(metrics[name])
            if not th.satisfied(value):
                symbol = "<" if th.direction == "min" else ">"
                reasons.append(f"{name} = {value:.4g} {symbol} {th.value:g}")
    return not reasons, "; ".join(reasons)


def regime_metrics(
    reference: Reference,
    current: Measurement,
    *,
    params0: Mapping[str, Tensor],
    last: LastMeasurement,
    step: int,
    targets: Optional[Tensor],
    classification: bool,
    topk: int,
    layers: Mapping[str, Sequence[str]],
    lazy_thresholds: Sequence[Threshold],
    names: Sequence[str],
    lr: Optional[float] = None,
    full_spectrum: bool = True,
) -> dict[str, float]:
    """Every metric of :meth:`KernelTracker.measure`, keyed and ordered by ``names``.

    ``layers`` maps a layer to its parameter names (empty: no per-layer metrics). Velocity is 0
    when ``last`` holds no kernel (the reference measurement). ``lr`` is the learning rate of
    this step (``opt/lr``; None: NaN); ``full_spectrum`` says whether the measured kernel matrix
    is the ``(N·O) × (N·O)`` NTK whose λmax ``ntk/lr_eig_max`` needs (a full kernel, or one
    output); otherwise ``ntk/lr_eig_max`` is NaN. ``regime/catapult`` (stateful) is the
    tracker's, so ``names`` must not contain it here.
    """
    kernel, f, f_lin = current.kernel, current.f, current.f_lin
    vals, vecs = current.spectrum
    values: dict[str, Any] = {
        "ntk/rel_change": M.kernel_rel_change(kernel, reference.kernel0),
        "ntk/distance": M.kernel_distance(kernel, reference.kernel0),
    }
    if last.last_kernel is None:
        values["ntk/velocity"] = 0.0
    else:
        distance = M.kernel_distance(kernel, last.last_kernel)
        values["ntk/velocity"] = distance / (step - last.last_step)
    if targets is not None:
        values["ntk/alignment"] = M.kernel_alignment(kernel, targets.to(kernel.device))
    # "zero" eigenvalues at the precision the kernel was computed in (float32 kernels are
    # decomposed in float64, which would otherwise turn float32 round-off into a huge cond)
    stats = M.spectrum_stats(vals, M.spectral_rtol(vals.numel(), kernel.dtype))
    for key in ("eig_max", "eig_min", "trace", "eff_rank", "cond", "log10_cond", "rank"):
        values[f"ntk/{key}"] = stats[key]
    values["ntk/eig_overlap"] = M.eigenspace_overlap(reference.eigvecs0, vecs[:, -topk:])
    distance, rel_change, by_layer = M.param_changes(current.params, params0, layers)
    values["params/rel_change"] = rel_change
    values["params/distance"] = distance
    f0 = reference.f0
    # Output changes at rounding level (e.g. the same θ evaluated on another device) are no
    # change: otherwise lin/rel_error would be a ratio of two noise terms.
    atol = 100 * torch.finfo(f0.dtype).eps * float(torch.linalg.vector_norm(f0))
    atol = atol if math.isfinite(atol) else 0.0  # NaN f₀ (NaN weights): NaN metrics, no raise
    values["lin/rel_error"] = M.linearization_error(f, f_lin, f0, atol=atol)
    values["lin/rmse"] = M.linearization_rmse(f, f_lin)
    if classification:
        values["lin/agreement"] = M.argmax_agreement(f, f_lin)
    # per layer: in units of the whole model's ‖K₀‖ / ‖θ₀‖ (finite for a layer whose own K₀ or
    # θ₀ block is 0, e.g. LoRA at init; see M.kernel_layer_changes / M.param_changes)
    layer_changes = M.kernel_layer_changes(
        current.layer_kernels, reference.layer_kernels0, reference.kernel0
    )
    for layer, v in layer_changes.items():
        values[f"ntk_layer/{layer}/rel_change"] = v
    for layer, v in by_layer.items():
        values[f"params_layer/{layer}/rel_change"] = v
    values["opt/lr"] = math.nan if lr is None else lr
    n = f.shape[0]
    values["ntk/lr_eig_max"] = (
        lr_eig_max(lr, float(stats["eig_max"]), n) if lr is not None and full_spectrum else math.nan
    )
    for layer, gram0 in reference.feature_grams0.items():
        values[f"features/{layer}/cka"] = gram_cka(gram0, current.feature_grams[layer])
    out = {k: float(v) for k, v in values.items()}
    out["regime/lazy"] = 1.0 if lazy_decision(lazy_thresholds, out)[0] else 0.0
    finite = M.all_finite(kernel, f, f_lin, current.params)
    out["health/nonfinite"] = 0.0 if finite else 1.0
    return {name: out[name] for name in names}
