"""OverheadBudget (issue 9): postpone scheduled measurements to keep measuring within budget."""

from __future__ import annotations

import pytest

from lazy_monitor.tracking.schedule import MeasurementSchedule, OverheadBudget


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _simulate(
    budget: OverheadBudget, clock: _Clock, schedule, steps: int, step_s: float, cost: float
):
    """A fit: each step costs ``step_s``, each measurement ``cost`` (step 0 and the end always)."""
    budget.start_clock()
    clock.now += cost
    budget.record(cost)
    measured, last = [0], 0
    for step in range(1, steps + 1):
        clock.now += step_s
        if budget.decide(schedule, step, last):
            clock.now += cost
            budget.record(cost)
            measured.append(step)
            last = step
    if last != steps:
        clock.now += cost
        budget.record(cost)
        measured.append(steps)
    return measured


def test_budget_keeps_the_share_of_wall_time_and_the_schedule_grid():
    clock = _Clock()
    budget = OverheadBudget(0.03, clock=clock)
    schedule = MeasurementSchedule(every_n_steps=10, log_spaced_until=1024)
    # alone, this cadence would spend 1 s measuring per 0.1 s of training per step (> 50 %)
    measured = _simulate(budget, clock, schedule, 5000, 0.1, 1.0)
    assert measured[0] == 0 and measured[-1] == 5000  # step 0 and the final measurement
    assert budget.overhead() <= 0.03 + 1e-12
    assert all(s in schedule.steps_until(5000) for s in measured[:-1])  # on the grid
    assert len(measured) > 5


def test_the_log_spaced_steps_that_fit_are_kept():
    clock = _Clock()
    budget = OverheadBudget(0.03, clock=clock)
    schedule = MeasurementSchedule(every_n_steps=10, log_spaced_until=1024)
    measured = _simulate(budget, clock, schedule, 2000, 1.0, 0.1)
    # after step 0 (0.1 s) the next one fits once 0.1 + 0.2 <= 0.03 (E + 0.2), i.e. E >= 9.8 s:
    # steps 1..8 come too early, step 10 fits, then 16 (E >= 13.1 s), 20, 30, 32, ...
    assert measured[:7] == [0, 10, 16, 20, 30, 32, 40]
    powers = [s for s in measured if 0 < s < 1024 and s & (s - 1) == 0]
    assert powers == [16, 32, 64, 128, 256, 512]
    assert budget.overhead() <= 0.03 + 1e-12


def test_without_pressure_the_budget_changes_nothing():
    clock = _Clock()
    budget = OverheadBudget(0.5, clock=clock)
    schedule = MeasurementSchedule(every_n_steps=100)
    measured = _simulate(budget, clock, schedule, 1000, 1.0, 0.01)
    assert measured == schedule.steps_until(1000)


def test_a_skipped_step_is_not_made_up_between_grid_points():
    clock = _Clock()
    budget = OverheadBudget(0.1, clock=clock)
    schedule = MeasurementSchedule(every_n_steps=10)
    budget.start_clock()
    budget.record(5.0)
    clock.now = 10.0
    assert not budget.decide(schedule, 10, 0)  # (5 + 10) > 0.1 * (10 + 10)
    clock.now = 1000.0
    assert [budget.decide(schedule, s, 0) for s in (11, 15, 19)] == [False] * 3
    assert budget.decide(schedule, 20, 0)


def test_state_round_trip_continues_the_accounting():
    clock = _Clock()
    budget = OverheadBudget(0.05, clock=clock)
    budget.start_clock()
    budget.record(2.0)
    clock.now = 40.0
    budget.skip(30)
    state = budget.state_dict()
    assert state == {
        "measured_seconds": 2.0,
        "elapsed_seconds": 40.0,
        "last_seconds": 2.0,
        "skipped_until": 30,
    }
    later = _Clock()
    later.now = 1e6  # wall time while the job was down does not count
    resumed = OverheadBudget(0.05, clock=later)
    resumed.load_state_dict(state)
    resumed.start_clock()
    later.now += 10.0
    assert resumed.elapsed() == 50.0 and resumed.overhead() == 2.0 / 50.0
    assert resumed.skipped_until == 30


@pytest.mark.parametrize("bad,err", [(0.0, ValueError), (1.5, ValueError), ("2%", TypeError)])
def test_max_overhead_is_validated(bad, err):
    with pytest.raises(err, match="max_overhead"):
        OverheadBudget(bad)
