"""The checks a :class:`~lazy_monitor.tracking.tracker.KernelTracker` runs on its inputs and
on a saved state, as plain functions: the probe (finite, runs on the model, examples
independent), the lazy thresholds, and a saved configuration against the tracker's. Each raises
with the bad value and the fix; none changes the tracker.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lazy_monitor import catalogue
from lazy_monitor._validation import check_float, check_int, check_mapping
from lazy_monitor.core import _functional as F
from lazy_monitor.core.kernels import errors as kernel_errors
from lazy_monitor.thresholds import Threshold
from lazy_monitor.tracking._state import same_fingerprint
from lazy_monitor.tracking.distributed import KernelSharding

__all__ = [
    "check_batch_independent",
    "check_lr",
    "check_probe_finite",
    "check_saved_config",
    "check_sharding",
    "check_step",
    "check_thresholds",
    "probe_error",
]


def check_step(step: Any, last: Optional[int]) -> int:
    """A training step ``>= 0`` and, after a measurement at ``last``, larger than it (the
    velocity divides by the difference)."""
    step = check_int("step", step, minimum=0, fix="pass the global training step")
    if last is not None and step <= last:
        raise ValueError(
            f"step must increase between measurements: got step={step} after "
            f"step={last}; pass the global training step"
        )
    return step


def check_lr(lr: Any) -> Optional[float]:
    """The learning rate of the next optimizer step (``>= 0``), or None."""
    return check_float(
        "lr", lr, minimum=0.0, optional=True, fix="pass the optimizer's learning rate or None"
    )


def check_sharding(sharding: Any) -> None:
    """``sharding``: a :class:`KernelSharding` or None."""
    if sharding is not None and not isinstance(sharding, KernelSharding):
        raise TypeError(
            f"sharding must be a KernelSharding or None, got {type(sharding).__name__}; "
            "e.g. KernelSharding.from_process_group()"
        )


def check_probe_finite(probe: F.InputBatch) -> None:
    """A non-finite probe makes every metric NaN for the whole run: refuse it at construction
    (non-finite *weights* are a training outcome and give NaN metrics instead)."""
    bad = [
        where for where, t in F._leaves(probe) if t.is_floating_point() and not t.isfinite().all()
    ]
    if bad:
        raise ValueError(
            f"the probe contains NaN or inf (in {', '.join(bad)}); pass finite probe inputs (e.g. "
            "torch.nan_to_num(x) or other examples)"
        )


def check_thresholds(
    thresholds: Mapping[str, float], names: Sequence[str]
) -> tuple[dict[str, float], tuple[Threshold, ...]]:
    """``lazy_thresholds`` checked against the metric ``names`` of the configuration: the
    ``{name or glob: bound}`` as floats and the parsed :class:`Threshold` s (the catalogue's
    direction: a lower bound in ``[0, 1]`` for ``ntk/eig_overlap``/``lin/agreement``)."""
    check_mapping("lazy_thresholds", thresholds, fix="e.g. {'ntk/rel_change': 0.1}")
    if not thresholds:
        raise ValueError(
            "lazy_thresholds is empty, so regime/lazy would always be 1; pass at least one "
            "threshold, or None for the defaults"
        )
    allowed = catalogue.lazy_threshold_names(list(names))
    out, parsed = {}, []
    for name, value in thresholds.items():
        th = Threshold.on(name, 0.0) if isinstance(name, str) else None
        if th is None or not th.select(allowed):
            raise ValueError(
                f"lazy_thresholds has unknown or unsupported metric {name!r}; thresholds can "
                f"be set on {', '.join(allowed)} (or a glob such as 'ntk_layer/*/rel_change')"
            )
        lower = th.direction == "min"
        value = check_float(
            f"lazy_thresholds[{name!r}]",
            value,
            minimum=0.0,
            maximum=1.0 if lower else None,
            fix="a lower bound on a value in [0, 1]" if lower else "",
        )
        out[name] = value
        parsed.append(Threshold(name, value, th.direction))
    return out, tuple(parsed)


def check_batch_independent(forward: Callable[[F.InputBatch], Tensor], x: F.InputBatch) -> None:
    """Raise if the model's output on an example depends on the other examples of the batch
    (``forward``: eval mode, side-effect free): the per-example kernel would be wrong."""
    if F.batch_size(x) < 2:
        return
    both = forward(F.slice_batch(x, slice(0, 2)))
    alone = torch.cat([forward(F.slice_batch(x, slice(i, i + 1))) for i in range(2)])
    tol = 1e-10 if both.dtype == torch.float64 else 1e-4
    diff = float(torch.linalg.vector_norm((both - alone).double()))
    scale = float(torch.linalg.vector_norm(both.double()))
    if not diff <= tol * max(scale, torch.finfo(both.dtype).tiny) and math.isfinite(scale):
        raise ValueError(
            "the model's output on a probe example depends on the other examples of the "
            f"batch in eval mode (relative difference {diff / max(scale, 1e-300):.3g} between "
            "the first two examples evaluated together and alone): a layer couples examples "
            "(e.g. subtracting a batch mean, attention across the batch, BatchNorm without "
            "running statistics). The kernel of a batch-coupled model is not a per-example "
            "NTK; remove or replace the batch-coupling layer (e.g. BatchNorm with "
            "track_running_stats=True, LayerNorm)"
        )


def check_saved_config(
    saved: Mapping[str, Any], mine: Mapping[str, Any], *, started: bool, model: nn.Module
) -> None:
    """A saved ``config`` against the tracker's (``mine``: what it will measure): the same
    kind, per_layer, topk, probe size and outputs, probe and targets, feature modules, and
    tracked parameters that are all parameters of ``model``."""
    for key in ("kind", "per_layer", "topk", "num_examples", "num_outputs"):
        if saved.get(key) != mine[key]:
            raise ValueError(
                f"the state was saved with {key}={saved.get(key)!r} but this tracker has "
                f"{key}={mine[key]!r}; build the tracker with the same settings and model"
            )
    for key in ("probe", "targets"):
        a, b = saved.get(key), mine[key]
        if (a is None) != (b is None) or (a is not None and not same_fingerprint(a, b)):
            raise ValueError(
                f"the state was saved with a different {key} batch; build the tracker with "
                f"the same {key} it was saved with (metrics relative to K₀ would be wrong)"
            )
    saved_features = saved.get("feature_modules")
    if saved_features is not None and list(saved_features) != mine["feature_modules"]:
        raise ValueError(
            f"the state was saved with feature_modules={saved_features!r} but this "
            f"tracker tracks {mine['feature_modules']!r}; build it with the same "
            "feature_modules"
        )
    names = list(saved.get("param_names", []))
    live = dict(model.named_parameters())
    if started and (not names or any(n not in live for n in names)):
        raise ValueError(
            f"the state tracks parameters {names[:4]}... that are not all parameters of "
            f"{type(model).__name__}; build the tracker with the same model"
        )


def probe_error(err: Exception, model: nn.Module, probe: F.InputBatch) -> Exception:
    """The model's own error on the probe, reworded (the engine's one wording:
    :func:`lazy_monitor.core.kernels.errors.probe_error`)."""
    return kernel_errors.probe_error(err, model, probe)
