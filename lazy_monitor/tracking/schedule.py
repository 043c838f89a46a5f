"""When to measure: a fixed cadence on optimizer steps plus optional log-spaced early steps.

Kernels move fastest in the first steps of training (Fort et al. 2020, "Deep learning versus
kernel learning"), so a uniform cadence can miss the early drift; ``log_spaced_until`` adds the
steps 1, 2, 4, 8, ... below it. :class:`OverheadBudget` postpones scheduled measurements so that
the time spent measuring stays within a stated share of the training wall time.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Callable, Optional

from lazy_monitor._validation import check_float, check_int

__all__ = ["MeasurementSchedule", "OverheadBudget"]


class MeasurementSchedule:
    """The set of optimizer steps at which the monitor measures.

    Scheduled steps: every multiple of ``every_n_steps`` (step 0 included) and, when
    ``log_spaced_until > 0``, the powers of two ``1, 2, 4, ...`` strictly below it.

    A measurement is *due* at ``step`` if a scheduled step lies in ``(last_step, step]``, so a
    step counter that jumps by more than one (several optimizers, resume) never skips a
    scheduled point and never measures the same step twice.

    Args:
        every_n_steps: cadence in optimizer steps (``trainer.global_step``), ``>= 1``.
        log_spaced_until: extra measurements at powers of two below this step; ``0`` = none.

    Raises:
        TypeError: a non-integer argument. ValueError: ``every_n_steps < 1`` or
            ``log_spaced_until < 0``.

    >>> MeasurementSchedule(every_n_steps=100, log_spaced_until=16).steps_until(300)
    [0, 1, 2, 4, 8, 100, 200, 300]
    """

    def __init__(self, every_n_steps: int, log_spaced_until: int = 0) -> None:
        self.every_n_steps = check_int(
            "every_n_steps", every_n_steps, minimum=1, fix="e.g. every_n_steps=500"
        )
        self.log_spaced_until = check_int(
            "log_spaced_until",
            log_spaced_until,
            minimum=0,
            fix="0 disables, e.g. 128 adds steps 1, 2, ..., 64",
        )

    def next_after(self, last_step: int) -> int:
        """Smallest scheduled step strictly greater than ``last_step``."""
        n = self.every_n_steps
        candidate = (last_step // n + 1) * n
        power = 1
        while power < self.log_spaced_until and power <= last_step:
            power *= 2
        if last_step < power < self.log_spaced_until:
            candidate = min(candidate, power)
        return candidate

    def is_due(self, step: int, last_step: Optional[int]) -> bool:
        """Whether a measurement is due at ``step`` given the last measured step."""
        if last_step is None:
            return True
        return step > last_step and step >= self.next_after(last_step)

    def steps_until(self, max_step: int) -> list[int]:
        """All scheduled steps in ``[0, max_step]`` (for docs, tests and planning)."""
        steps, step = [0], 0
        while True:
            step = self.next_after(step)
            if step > max_step:
                return steps
            steps.append(step)


class OverheadBudget:
    """Keep the time spent measuring within ``max_overhead`` of the wall time since the start.

    Rules (the adapter calls :meth:`start_clock` when training starts, :meth:`record` after
    every measurement with its duration, and :meth:`decide` instead of
    :meth:`MeasurementSchedule.is_due`):

    * The schedule is the densest cadence: only scheduled steps (multiples of
      ``every_n_steps``, the log-spaced early steps) are ever measured; the budget only skips
      some of them. A skipped step is not made up later: the next candidate is the next
      scheduled step, so measured steps stay on the schedule's grid.
    * A scheduled step is measured if, after it and one more measurement reserved for the end
      of training (each assumed to cost as much as the last one), the share of wall time spent
      measuring is still within the budget: ``(S + 2c) ≤ max_overhead · (E + 2c)`` with ``S``
      the seconds measured so far, ``E`` the wall seconds since the start and ``c`` the last
      measurement's seconds.
    * The start (step 0, the reference) and the final measurement are never skipped (the
      adapter does not ask); their time counts. So early on, right after the step-0
      measurement, the budget waits until training has run ``≈ 2c / max_overhead``; the
      log-spaced steps that come later than that are measured.
    * Resume: :meth:`state_dict` keeps the seconds measured, the wall seconds elapsed and the
      last skipped step, so a resumed run continues with the same accounting (the wall time
      while the job was not running is not counted).

    Args:
        max_overhead: the share of wall time, in ``(0, 1]`` (e.g. ``0.05``); ``None``: no
            budget, only the accounting (:meth:`overhead`).
        clock: seconds of a monotonic clock (tests pass a fake one).

    Raises:
        TypeError / ValueError: ``max_overhead`` not a number in ``(0, 1]``.

    >>> ticks = iter([0.0, 10.0, 400.0])
    >>> budget = OverheadBudget(0.05, clock=lambda: next(ticks))
    >>> budget.start_clock(); budget.record(5.0)            # step 0 took 5 s
    >>> schedule = MeasurementSchedule(every_n_steps=10)
    >>> budget.decide(schedule, 10, last_step=0)   # at 10 s: (5 + 10) > 0.05 * (10 + 10)
    False
    >>> budget.decide(schedule, 15, last_step=0)   # step 10 was skipped: next candidate is 20
    False
    >>> budget.decide(schedule, 20, last_step=0)   # at 400 s: 15 <= 0.05 * 410
    True
    """

    def __init__(
        self, max_overhead: Optional[float], clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.max_overhead = check_float(
            "max_overhead",
            max_overhead,
            minimum=0.0,
            maximum=1.0,
            optional=True,
            fix="a share of the wall time such as 0.05, or None for no budget",
        )
        if self.max_overhead is not None and not self.max_overhead > 0.0:
            raise ValueError(
                f"max_overhead must be > 0, got {max_overhead!r}; e.g. 0.02, or None for no budget"
            )
        self._clock = clock
        #: Seconds spent measuring (this run and, after a resume, the runs before).
        self.measured_seconds = 0.0
        #: Duration of the last measurement (None before the first).
        self.last_seconds: Optional[float] = None
        #: Scheduled steps up to this one were decided (measured or skipped).
        self.skipped_until: Optional[int] = None
        self._elapsed_before = 0.0
        self._t0: Optional[float] = None

    def start_clock(self, already: float = 0.0) -> None:
        """Start (or, after :meth:`load_state_dict`, continue) counting wall time; ``already``:
        wall seconds that passed just before (e.g. the monitor's own setup)."""
        self._elapsed_before += float(already)
        self._t0 = self._clock()

    def elapsed(self) -> float:
        """Wall seconds since :meth:`start_clock` (plus those before a resume)."""
        if self._t0 is None:
            return self._elapsed_before
        return self._elapsed_before + max(0.0, self._clock() - self._t0)

    def record(self, seconds: float) -> None:
        """Count a measurement that took ``seconds``."""
        self.measured_seconds += float(seconds)
        self.last_seconds = float(seconds)

    def charge(self, seconds: float) -> None:
        """Count ``seconds`` of the monitor's other work (publishing, drawing the probe) without
        changing the cost assumed for the next measurement."""
        self.measured_seconds += float(seconds)

    def overhead(self) -> float:
        """Share of the wall time spent measuring so far (0 before any time has passed)."""
        elapsed = self.elapsed()
        return self.measured_seconds / elapsed if elapsed > 0 else 0.0

    def allows(self) -> bool:
        """Whether one more measurement now (plus the reserved final one) fits the budget."""
        if self.max_overhead is None:
            return True  # no budget: the accounting only (monitor/overhead)
        c = self.last_seconds or 0.0
        return self.measured_seconds + 2 * c <= self.max_overhead * (self.elapsed() + 2 * c)

    def candidate(self, schedule: MeasurementSchedule, step: int, last_step: Optional[int]) -> bool:
        """Whether a scheduled step not yet decided (measured or skipped) is due at ``step``
        (clock-free: the same on every process of a distributed run)."""
        last = last_step
        if self.skipped_until is not None and (last is None or self.skipped_until > last):
            last = self.skipped_until
        return schedule.is_due(step, last)

    def skip(self, step: int) -> None:
        """Mark the scheduled steps up to ``step`` as decided without measuring."""
        self.skipped_until = step

    def decide(self, schedule: MeasurementSchedule, step: int, last_step: Optional[int]) -> bool:
        """Whether to measure at ``step``: :meth:`candidate` and :meth:`allows`; a candidate
        that does not fit is skipped for good (:meth:`skip`)."""
        if not self.candidate(schedule, step, last_step):
            return False
        if self.allows():
            return True
        self.skip(step)
        return False

    def state_dict(self) -> dict[str, Any]:
        """Plain floats/ints: measured seconds, elapsed wall seconds, last duration, skips."""
        return {
            "measured_seconds": self.measured_seconds,
            "elapsed_seconds": self.elapsed(),
            "last_seconds": self.last_seconds,
            "skipped_until": self.skipped_until,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the accounting of a saved run (call :meth:`start_clock` afterwards)."""
        self.measured_seconds = float(state["measured_seconds"])
        self._elapsed_before = float(state["elapsed_seconds"])
        last = state.get("last_seconds")
        self.last_seconds = None if last is None else float(last)
        skipped = state.get("skipped_until")
        self.skipped_until = None if skipped is None else int(skipped)
        self._t0 = None
