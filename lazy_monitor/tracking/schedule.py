"""When to measure: a fixed cadence on optimizer steps plus optional log-spaced early steps.

Kernels move fastest in the first steps of training (Fort et al. 2020, "Deep learning versus
kernel learning"), so a uniform cadence can miss the early drift; ``log_spaced_until`` adds the
steps 1, 2, 4, 8, ... below it.
"""

from __future__ import annotations

from typing import Optional

from lazy_monitor._validation import check_int

__all__ = ["MeasurementSchedule"]


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
