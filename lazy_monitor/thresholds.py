"""One threshold type for the tracker's lazy verdict, :class:`KernelDriftGate` and
``lazy-monitor check``.

A :class:`Threshold` is a metric name or :mod:`fnmatch` glob (``ntk_layer/*/rel_change``), a
value and a direction: ``"max"`` (the metric must stay ``<= value``) or ``"min"`` (``>=
value``). The direction comes from the catalogue's lazy side unless given. The comparisons are
spelled once, in :data:`DIRECTIONS` (the ``mode_dict`` of Lightning's ``EarlyStopping``).

Minimums and the step-0 reference point: every change metric is exactly 0 at the reference, so
a minimum on a change could never hold there. :func:`checks_minimum` is the one policy: a
minimum is checked at the final point and, if ``min_from_step`` is given, at every point from
that step on.

Torch-free (the CLI imports it).

>>> th = Threshold.on("lin/agreement", 0.95)
>>> th.direction, th.satisfied(0.97), th.violated(0.9)
('min', True, '0.9 < min 0.95')
>>> Threshold("ntk_layer/*/rel_change", 0.3, "max").matches("ntk_layer/fc1/rel_change")
True
"""

from __future__ import annotations

import fnmatch
import math
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from lazy_monitor import catalogue
from lazy_monitor._validation import check_float, message

__all__ = ["DIRECTIONS", "Threshold", "ThresholdSpec", "checks_minimum", "parse_thresholds"]

#: direction -> (holds(value, bound), symbol when it holds, symbol when violated)
DIRECTIONS: dict[str, tuple[Callable[[float, float], bool], str, str]] = {
    "max": (operator.le, "<=", ">"),
    "min": (operator.ge, ">=", "<"),
}

#: A gate threshold as written by users: a number (direction from the catalogue, a maximum for
#: metrics without a lazy side) or ``{"max": b}`` / ``{"min": b}`` / both.
ThresholdSpec = Union[float, Mapping[str, float]]


@dataclass(frozen=True)
class Threshold:
    """``metric <= value`` (``direction="max"``) or ``metric >= value`` (``"min"``).

    ``metric`` is a logged name or an :mod:`fnmatch` glob applying to every matching name.
    NaN never satisfies a threshold.
    """

    metric: str
    value: float
    direction: str

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(
                message("direction", "'max' or 'min'", self.direction, "'max' bounds from above")
            )

    @classmethod
    def on(cls, metric: str, value: float, direction: Optional[str] = None) -> Threshold:
        """A threshold with the catalogue's lazy direction of ``metric`` unless ``direction``
        is given (``"max"`` for metrics without a lazy side)."""
        return cls(metric, value, direction or catalogue.direction_of(metric) or "max")

    @property
    def key(self) -> str:
        return f"{self.metric}:{self.direction}"

    def matches(self, name: str) -> bool:
        return name == self.metric or fnmatch.fnmatchcase(name, self.metric)

    def select(self, names: Iterable[str]) -> list[str]:
        """The names this threshold applies to."""
        return [n for n in names if self.matches(n)]

    def satisfied(self, value: float) -> bool:
        """Whether ``value`` is within the bound (False for NaN)."""
        return bool(DIRECTIONS[self.direction][0](value, self.value))

    def violated(self, value: float, check_finite: bool = True) -> Optional[str]:
        """The failed comparison, e.g. ``"0.31 > max 0.2"``, or None if satisfied.

        With ``check_finite=False`` a non-finite value passes (is not judged)."""
        if not math.isfinite(value):
            return f"{value} is not finite" if check_finite else None
        if self.satisfied(value):
            return None
        return f"{value:.6g} {DIRECTIONS[self.direction][2]} {self.direction} {self.value:.6g}"

    def describe(self) -> str:
        """``"ntk/rel_change <= 0.1"``."""
        return f"{self.metric} {DIRECTIONS[self.direction][1]} {self.value:g}"


def checks_minimum(step: int, *, min_from_step: Optional[int], final: bool) -> bool:
    """Whether a minimum is checked at this point: at the final point always (a run that ended
    below a minimum cannot reach it later), before that from ``min_from_step`` on (None: only
    at the end). Maximums are checked at every point."""
    return final or (min_from_step is not None and step >= min_from_step)


def _bound(metric: str, direction: str, value: Any) -> float:
    # Every metric with a lazy side is >= 0 (changes, distances, errors) and those lazy when
    # large lie in [0, 1] (overlaps, agreement): a bound outside would trip at every
    # measurement (or never hold), which the constructor says now rather than step 0.
    lazy = catalogue.direction_of(metric)
    return check_float(
        f"thresholds[{metric!r}] {direction}",
        value,
        minimum=0.0 if lazy else None,
        maximum=1.0 if lazy == "min" else None,
        fix=(
            f"{metric} is never negative" + (" and at most 1" if lazy == "min" else "")
            if lazy
            else ""
        ),
    )


def parse_thresholds(
    thresholds: Any, *, name: str = "thresholds", known_only: bool = True
) -> tuple[Threshold, ...]:
    """Parse ``{"ntk/rel_change": 0.2, "ntk/alignment": {"min": 0.3}}``.

    A number takes the catalogue's lazy direction of the metric (``"min"`` for
    ``lin/agreement`` and ``ntk/eig_overlap``, ``"max"`` otherwise); a mapping holds ``"max"``
    and/or ``"min"``. Keys are metric names or globs.

    Raises:
        TypeError: not a mapping, or a bound that is not a number.
        ValueError: empty, an unknown metric name (``known_only``), an unknown direction, a
            non-finite bound, ``min > max``.
    """
    if not isinstance(thresholds, Mapping):
        raise TypeError(
            message(name, "a mapping metric -> bound", thresholds, "e.g. {'ntk/rel_change': 0.2}")
        )
    if not thresholds:
        raise ValueError(message(name, "non-empty", {}, "pass e.g. {'ntk/rel_change': 0.2}"))
    parsed: list[Threshold] = []
    for metric, spec in thresholds.items():
        if not isinstance(metric, str) or (known_only and not catalogue.is_known(metric)):
            raise ValueError(
                f"{name} has unknown metric {metric!r}; use one of {catalogue.known_names_hint()}"
            )
        if isinstance(spec, Mapping):
            unknown = [k for k in spec if k not in DIRECTIONS]
            if unknown or not spec:
                raise ValueError(
                    f"{name}[{metric!r}] = {dict(spec)!r}: use the keys 'max' (a maximum not "
                    "to exceed) and/or 'min' (a minimum to reach)"
                )
            bounds = {d: _bound(metric, d, v) for d, v in spec.items()}
            if "min" in bounds and "max" in bounds and bounds["min"] > bounds["max"]:
                raise ValueError(
                    f"{name}[{metric!r}] has min {bounds['min']} > max {bounds['max']}; no "
                    "value can satisfy both"
                )
            parsed += [Threshold(metric, b, d) for d, b in sorted(bounds.items())]
        else:
            direction = catalogue.direction_of(metric) or "max"
            parsed.append(Threshold(metric, _bound(metric, direction, spec), direction))
    return tuple(parsed)
