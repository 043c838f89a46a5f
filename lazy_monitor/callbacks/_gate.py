"""Gate decision logic: thresholds with a direction, patience, and the trip message.

Pure functions and a tiny state object, no Lightning: the callback wires the decision to the
trainer (reduces it across ranks, stops or raises).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

__all__ = [
    "GATE_ACTIONS",
    "KernelDriftError",
    "Threshold",
    "check_measurement",
    "parse_thresholds",
]

GATE_ACTIONS = ("warn", "stop", "raise")

#: Names the tracker produces (docs/DESIGN.md); per-layer names carry a module path.
_GLOBAL_METRICS = frozenset(
    [
        "ntk/rel_change",
        "ntk/distance",
        "ntk/velocity",
        "ntk/alignment",
        "ntk/eig_max",
        "ntk/eig_min",
        "ntk/trace",
        "ntk/eff_rank",
        "ntk/cond",
        "ntk/eig_overlap",
        "params/rel_change",
        "params/distance",
        "lin/rel_error",
        "lin/rmse",
        "lin/agreement",
        "regime/lazy",
        "health/nonfinite",
    ]
)
_LAYER_METRIC = re.compile(r"^(ntk_layer|params_layer)/.+/rel_change$")

ThresholdSpec = Union[float, Mapping[str, float]]


class KernelDriftError(RuntimeError):
    """Raised by :class:`KernelDriftGate` with ``action="raise"`` when a threshold trips."""


@dataclass(frozen=True)
class Threshold:
    """One bound on one metric.

    ``direction="max"``: violated when ``value > bound`` (a maximum not to exceed).
    ``direction="min"``: violated when ``value < bound`` (a minimum to reach).
    """

    metric: str
    bound: float
    direction: str

    @property
    def key(self) -> str:
        return f"{self.metric}:{self.direction}"

    def violated(self, value: float, check_finite: bool) -> Optional[str]:
        """The comparison that failed, e.g. ``"0.31 > max 0.2"``, or None if satisfied."""
        if not math.isfinite(value):
            return f"{value} is not finite" if check_finite else None
        if self.direction == "max" and value > self.bound:
            return f"{value:.6g} > max {self.bound:.6g}"
        if self.direction == "min" and value < self.bound:
            return f"{value:.6g} < min {self.bound:.6g}"
        return None


def is_known_metric(name: str) -> bool:
    return name in _GLOBAL_METRICS or bool(_LAYER_METRIC.match(name))


def _bound(metric: str, direction: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"thresholds[{metric!r}] {direction} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"thresholds[{metric!r}] {direction} must be finite, got {value}")
    return float(value)


def parse_thresholds(thresholds: Mapping[str, ThresholdSpec]) -> tuple[Threshold, ...]:
    """Parse ``{"ntk/rel_change": 0.2, "ntk/alignment": {"min": 0.3}}``.

    A number is a maximum; a mapping may hold ``"max"`` and/or ``"min"``.

    Raises:
        ValueError: empty thresholds, unknown metric name or direction, ``min > max``.
        TypeError: non-numeric bound or a spec that is neither a number nor a mapping.
    """
    if not isinstance(thresholds, Mapping):
        raise TypeError(
            "thresholds must be a mapping metric -> bound, e.g. {'ntk/rel_change': 0.2}, got "
            f"{type(thresholds).__name__}"
        )
    if not thresholds:
        raise ValueError("thresholds is empty; pass e.g. {'ntk/rel_change': 0.2}")
    parsed: list[Threshold] = []
    for metric, spec in thresholds.items():
        if not isinstance(metric, str) or not is_known_metric(metric):
            known = ", ".join(sorted(_GLOBAL_METRICS))
            raise ValueError(
                f"thresholds has unknown metric {metric!r}; use one of {known} or "
                "'ntk_layer/<layer>/rel_change' / 'params_layer/<layer>/rel_change'"
            )
        if isinstance(spec, Mapping):
            unknown = [k for k in spec if k not in ("max", "min")]
            if unknown or not spec:
                raise ValueError(
                    f"thresholds[{metric!r}] = {dict(spec)!r}: use the keys 'max' (a maximum not "
                    "to exceed) and/or 'min' (a minimum to reach)"
                )
            bounds = {d: _bound(metric, d, v) for d, v in spec.items()}
            if "min" in bounds and "max" in bounds and bounds["min"] > bounds["max"]:
                raise ValueError(
                    f"thresholds[{metric!r}] has min {bounds['min']} > max {bounds['max']}; no "
                    "value can satisfy both"
                )
            parsed += [Threshold(metric, b, d) for d, b in sorted(bounds.items())]
        else:
            parsed.append(Threshold(metric, _bound(metric, "max", spec), "max"))
    return tuple(parsed)


def check_measurement(
    thresholds: tuple[Threshold, ...],
    metrics: Mapping[str, float],
    step: int,
    counts: dict[str, int],
    *,
    patience: int,
    check_minimums: bool,
    final: bool,
    check_finite: bool,
    repeat: bool = False,
) -> Optional[str]:
    """Update the consecutive-violation ``counts`` in place; return a trip reason or None.

    Maximums are checked at every measurement. Minimums are checked when ``check_minimums``
    (after the warm-up) and at the final measurement, where a miss trips immediately: the run
    ended without reaching the minimum, there is no later measurement to wait for.

    ``repeat=True`` (with ``final``) marks a measurement that was already checked: training ended
    right after a scheduled measurement, which is then also the final one. Only the end-of-training
    check of the minimums runs; maximums and ``counts`` are left alone, so one measurement never
    counts twice towards ``patience``.

    A threshold trips when it has been violated at ``patience`` consecutive checks. The reason
    names metric, value, comparison, threshold, step and patience.
    """
    if repeat:
        if not final:
            raise ValueError("repeat=True re-checks the final measurement; pass final=True")
        minimums = tuple(th for th in thresholds if th.direction == "min")
        return check_measurement(
            minimums,
            metrics,
            step,
            dict(counts),  # already counted at the first check
            patience=patience,
            check_minimums=False,
            final=True,
            check_finite=check_finite,
        )
    reasons = []
    for th in thresholds:
        if th.direction == "min" and not (check_minimums or final):
            continue
        value = metrics.get(th.metric)
        if value is None:
            continue
        failed = th.violated(float(value), check_finite)
        if failed is None:
            counts[th.key] = 0
            continue
        counts[th.key] = counts.get(th.key, 0) + 1
        final_min = final and th.direction == "min"
        if counts[th.key] >= patience or final_min:
            seen = counts[th.key]
            if final_min and not check_minimums:
                when = "at the end of training"
            else:
                when = f"for {seen} consecutive measurement{'s' if seen > 1 else ''}"
            reasons.append(f"{th.metric} = {failed} at step {step} ({when}, patience={patience})")
    return "; ".join(reasons) if reasons else None
