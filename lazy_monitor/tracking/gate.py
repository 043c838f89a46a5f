"""The drift gate's decision and state, framework-free.

:class:`DriftGate` holds the thresholds, the patience, the consecutive-violation counts and the
tripped flag; :meth:`DriftGate.check` turns one measurement into a trip reason (or None). A
framework adapter (the Lightning :class:`~lazy_monitor.KernelDriftGate`, a Hugging Face
``TrainerCallback``) only reduces the decision across ranks and acts on it (warn, stop, raise).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

from lazy_monitor import catalogue
from lazy_monitor._validation import check_bool, check_choice, check_int
from lazy_monitor.thresholds import Threshold, ThresholdSpec, checks_minimum, parse_thresholds

__all__ = ["GATE_ACTIONS", "DriftGate", "check_measurement"]

#: What a tripped gate does: warn, stop training (after a warning), raise.
GATE_ACTIONS = ("warn", "stop", "raise")


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

    Maximums are checked at every measurement. Minimums are checked where
    :func:`~lazy_monitor.thresholds.checks_minimum` says (``check_minimums`` -- after the
    warm-up -- or the final measurement); at the final measurement a missed minimum trips
    immediately: the run ended without reaching it, there is no later measurement to wait for.
    A glob threshold is checked on every matching metric.

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
        if th.direction == "min" and not checks_minimum(
            step, min_from_step=step if check_minimums else None, final=final
        ):
            continue
        for name in th.select(metrics):
            key = f"{name}:{th.direction}"
            failed = th.violated(float(metrics[name]), check_finite)
            if failed is None:
                counts[key] = 0
                continue
            counts[key] = counts.get(key, 0) + 1
            final_min = final and th.direction == "min"
            if counts[key] >= patience or final_min:
                seen = counts[key]
                if final_min and not check_minimums:
                    when = "at the end of training"
                else:
                    when = f"for {seen} consecutive measurement{'s' if seen > 1 else ''}"
                reasons.append(f"{name} = {failed} at step {step} ({when}, patience={patience})")
    return "; ".join(reasons) if reasons else None


class DriftGate:
    """Thresholds with patience on a stream of measurements; the state of a drift gate.

    Args:
        thresholds: ``{metric or glob: bound}``; a number takes the catalogue's lazy direction
            (a maximum for most metrics, a minimum for ``lin/agreement`` and
            ``ntk/eig_overlap``), ``{"max": b}`` / ``{"min": b}`` give it explicitly.
        patience: consecutive violating measurements that trip a threshold (``>= 1``).
        action: ``"warn"``, ``"stop"`` or ``"raise"`` (carried out by the adapter).
        min_check_from_step: also check minimums at measurements with ``step >=`` this value;
            None: only at the final measurement.
        check_finite: treat NaN/inf as violations.

    >>> gate = DriftGate({"ntk/rel_change": 0.2}, patience=2)
    >>> gate.check({"ntk/rel_change": 0.3}, step=10, final=False) is None
    True
    >>> gate.check({"ntk/rel_change": 0.4}, step=20, final=False)
    'ntk/rel_change = 0.4 > max 0.2 at step 20 (for 2 consecutive measurements, patience=2)'
    """

    def __init__(
        self,
        thresholds: Mapping[str, ThresholdSpec],
        patience: int = 1,
        action: str = "stop",
        min_check_from_step: Optional[int] = None,
        check_finite: bool = True,
    ) -> None:
        self.thresholds: tuple[Threshold, ...] = parse_thresholds(thresholds)
        self.patience = check_int(
            "patience", patience, minimum=1, fix="patience counts measurements"
        )
        self.action = check_choice("action", action, GATE_ACTIONS)
        self.min_check_from_step = check_int(
            "min_check_from_step",
            min_check_from_step,
            minimum=1,
            optional=True,
            fix="(every change is 0 at step 0) or None to check at train end",
        )
        self.check_finite = check_bool("check_finite", check_finite)
        self.reset()

    def reset(self) -> None:
        """Untripped, zero counts (a new run)."""
        self.tripped = False
        self.reason: Optional[str] = None
        self.trip_step: Optional[int] = None
        self.counts: dict[str, int] = {}

    def missing(self, available: Iterable[str]) -> list[str]:
        """Threshold names (or globs) that match none of the ``available`` metric names."""
        names = list(available)
        return sorted({th.metric for th in self.thresholds if not th.select(names)})

    def require(self, available: Iterable[str], owner: str) -> None:
        """Raise at train start if a threshold names a metric the monitor does not log in this
        run (``owner``: the adapter's class name, for the message)."""
        names = sorted(available)
        missing = self.missing(names)
        if missing:
            raise ValueError(
                f"{owner} thresholds on {missing}, which the monitor does not log in this run"
                f"{catalogue.requirement_hint(missing)}; it logs: {names}"
            )

    def check(
        self, metrics: Mapping[str, float], step: int, *, final: bool, repeat: bool = False
    ) -> Optional[str]:
        """Count violations of this measurement; the trip reason, or None. Does not trip: the
        adapter reduces the decision across ranks first, then calls :meth:`trip`."""
        if self.tripped:
            return None
        return check_measurement(
            self.thresholds,
            metrics,
            step,
            self.counts,
            patience=self.patience,
            check_minimums=checks_minimum(
                step, min_from_step=self.min_check_from_step, final=False
            ),
            final=final,
            check_finite=self.check_finite,
            repeat=repeat,
        )

    def trip(self, reason: str, step: int) -> None:
        self.tripped, self.reason, self.trip_step = True, reason, step

    def state_dict(self) -> dict[str, Any]:
        return {
            "tripped": self.tripped,
            "reason": self.reason,
            "trip_step": self.trip_step,
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.tripped = bool(state.get("tripped", False))
        self.reason = state.get("reason")
        self.trip_step = state.get("trip_step")
        self.counts = {str(k): int(v) for k, v in state.get("counts", {}).items()}
