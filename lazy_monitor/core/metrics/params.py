"""Parameter changes: ``‖θ − θ₀‖`` overall and per layer (see :mod:`lazy_monitor.core.metrics` for the
conventions)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Optional

import torch
from torch import Tensor

from lazy_monitor.core.metrics._base import (
    _finite,
    _nan,
    _ratio,
)

__all__ = [
    "layer_name",
    "group_by_layer",
    "param_changes",
    "param_distance",
    "param_rel_change",
    "param_rel_change_by_layer",
]

# ----------------------------------------------------------------------------- parameters


def layer_name(param_name: str) -> str:
    """The layer a parameter belongs to: its module prefix (``"net.0.weight" -> "net.0"``).

    A parameter registered directly on the root module has no prefix; it is its own layer.
    """
    prefix = param_name.rpartition(".")[0]
    return prefix or param_name


def group_by_layer(names: Iterable[str]) -> dict[str, list[str]]:
    """Parameter names grouped by :func:`layer_name`, in first-appearance order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(layer_name(name), []).append(name)
    return groups


def _param_sums(
    params: Mapping[str, Tensor], params0: Mapping[str, Tensor]
) -> Optional[dict[str, tuple[Tensor, Tensor]]]:
    if set(params) != set(params0):
        missing = sorted(set(params0) - set(params))
        extra = sorted(set(params) - set(params0))
        raise ValueError(
            f"params and params0 must have the same names; missing from params: {missing}, "
            f"not in params0: {extra}"
        )
    if not params:
        raise ValueError("params is empty; pass at least one parameter")
    out = {}
    first_device = next(iter(params.values())).device
    for name, p in params.items():
        p0 = params0[name]
        if p.shape != p0.shape:
            raise ValueError(
                f"params[{name!r}] has shape {tuple(p.shape)} but params0[{name!r}] has "
                f"{tuple(p0.shape)}"
            )
        q = p.detach().to(torch.float64)
        q0 = p0.detach().to(device=q.device, dtype=torch.float64)
        out[name] = ((q - q0).square().sum(), q0.square().sum())
    # A NaN/inf anywhere propagates into these float64 sums (finite float32 squares cannot
    # overflow there), so one check on the sums replaces an isfinite pass over every tensor.
    sums = torch.stack([s.to(first_device) for pair in out.values() for s in pair])
    if not _finite(sums):
        return None
    return out


def param_changes(
    params: Mapping[str, Tensor],
    params0: Mapping[str, Tensor],
    groups: Optional[Mapping[str, Iterable[str]]] = None,
    *,
    relative_to: str = "model",
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    r"""Distance, relative change and per-group relative change of the parameters, in one pass.

    .. math::
        d = \|\theta - \theta_0\|_2,\qquad
        r = \|\theta - \theta_0\|_2 / \|\theta_0\|_2,\qquad
        r_g = \|\theta_g - \theta_{0,g}\|_2 / \|\theta_0\|_2

    over all parameters (``θ`` is the concatenation of every tensor) and over the parameters of
    each group ``g``. Under NTK parameterization ``r`` decays like ``width^{-1/2}`` (Lee et al.
    2019). Use this when you need several of them (one float64 pass over the parameters); the
    single-value functions below are thin wrappers.

    **Per-group normalisation.** ``r_g`` divides group ``g``'s movement by the *whole model's*
    ``‖θ₀‖`` (``relative_to="model"``, the default and the tracker's ``params_layer/*``): the
    groups then share one scale, ``Σ_g r_g² = r²`` when the groups partition the parameters
    (each ``r_g`` is the part of ``r`` that happens in ``g``), and ``r_g`` is finite whenever
    ``r`` is, also for a group initialised at exactly 0 (LoRA's ``lora_B``, zero biases), whose
    own ratio ``‖Δθ_g‖ / ‖θ₀,g‖`` is ``+inf`` after one step. ``relative_to="group"`` gives
    that own ratio (a zero ``θ₀,g``: 0 if unchanged, else ``+inf``).

    Args:
        params: current parameters by name (e.g. ``dict(model.named_parameters())``).
        params0: reference parameters, same names and shapes (may live on another device).
        groups: ``{group: [param names]}``; default :func:`group_by_layer` (module prefix, so a
            layer's weight and bias form one group). Pass ``{name: [name] for name in params}``
            for per-parameter values.
        relative_to: ``"model"`` (divide by ``‖θ₀‖`` of all parameters) or ``"group"`` (by the
            group's own ``‖θ₀,g‖``).

    Returns:
        ``(d, r, {group: r_g})``, 0-dim float64 tensors. A zero denominator gives 0 if the
        numerator is 0, else ``+inf`` (``relative_to="model"``: only for an all-zero ``θ₀``).
        All NaN on non-finite input.

    Raises:
        ValueError: names or shapes differ, a group names an unknown parameter, or
            ``relative_to`` is not ``"model"``/``"group"``.
    """
    if relative_to not in ("model", "group"):
        raise ValueError(f"relative_to must be 'model' or 'group', got {relative_to!r}")
    sums = _param_sums(params, params0)
    groups = group_by_layer(params) if groups is None else groups
    first = next(iter(params.values()))
    by_group = {}
    total0 = None if sums is None else torch.stack([r for _, r in sums.values()]).sum().sqrt()
    for group, names in groups.items():
        names = list(names)
        unknown = [n for n in names if n not in params]
        if unknown or not names:
            raise ValueError(f"group {group!r} names unknown parameters {unknown} (or none)")
        if sums is None:
            by_group[group] = _nan(first)
            continue
        num = torch.stack([sums[n][0] for n in names]).sum().sqrt()
        if relative_to == "group":
            den = torch.stack([sums[n][1] for n in names]).sum().sqrt()
        else:
            den = total0
        by_group[group] = _ratio(num, den)
    if sums is None:
        return _nan(first), _nan(first), by_group
    num = torch.stack([d for d, _ in sums.values()]).sum().sqrt()
    return num, _ratio(num, total0), by_group


def param_distance(params: Mapping[str, Tensor], params0: Mapping[str, Tensor]) -> Tensor:
    """``‖θ − θ₀‖₂`` over all parameters; see :func:`param_changes` (NaN on non-finite input)."""
    return param_changes(params, params0, {})[0]


def param_rel_change(params: Mapping[str, Tensor], params0: Mapping[str, Tensor]) -> Tensor:
    """``‖θ − θ₀‖₂ / ‖θ₀‖₂`` over all parameters (Lee et al. 2019); see :func:`param_changes`
    for the conventions (``θ₀ = 0``: 0 if unchanged, else ``+inf``; NaN on non-finite input)."""
    return param_changes(params, params0, {})[1]


def param_rel_change_by_layer(
    params: Mapping[str, Tensor],
    params0: Mapping[str, Tensor],
    groups: Optional[Mapping[str, Iterable[str]]] = None,
    *,
    relative_to: str = "model",
) -> dict[str, Tensor]:
    """``{group: ‖θ_g − θ_{0,g}‖ / ‖θ₀‖}`` (the whole model's ``‖θ₀‖``; ``relative_to="group"``:
    the group's own), groups by layer by default; see :func:`param_changes`."""
    return param_changes(params, params0, groups, relative_to=relative_to)[2]
