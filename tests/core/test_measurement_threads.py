"""Thread choice of :func:`measurement_threads` (issue 18, item 7): every sample is taken on a
quiet machine, sampling stops (no sleep) once one sample already leaves a single thread, and a
sample reads this process's threads only where the runnable bound could bind."""

from __future__ import annotations

import io

import pytest
import torch

from lazy_monitor.core import _functional as F


@pytest.fixture
def two_threads(monkeypatch: pytest.MonkeyPatch):
    """Two intra-op threads on a 2-core affinity; sleeps recorded instead of slept."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(F.os, "sched_getaffinity", lambda pid: {0, 1})
    sleeps: list[float] = []
    monkeypatch.setattr(F.time, "sleep", sleeps.append)
    yield sleeps
    torch.set_num_threads(before)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """``time.perf_counter`` as seen by the sampler: advanced by hand (setup time)."""
    now = [100.0]
    monkeypatch.setattr(F.time, "perf_counter", lambda: now[0])
    return now


def _sampler(monkeypatch: pytest.MonkeyPatch, samples: list[int]) -> list[int]:
    taken: list[int] = []

    def sample(enough: int = -1) -> int:
        taken.append(samples[len(taken)])
        return taken[-1]

    monkeypatch.setattr(F, "_other_running_threads", sample)
    return taken


@pytest.mark.parametrize(
    ("samples", "taken", "inside"),
    [
        ([0, 0, 0], 3, 2),  # quiet: all three samples, all threads
        ([0, 0, 1], 3, 1),  # a neighbour seen only in the last sample still counts
        ([1, 0, 0], 1, 1),  # busy at once: one thread is the floor, no more samples or sleeps
        ([5, 0, 0], 1, 1),
    ],
)
def test_thread_choice(
    two_threads: list[float],
    monkeypatch: pytest.MonkeyPatch,
    samples: list[int],
    taken: int,
    inside: int,
) -> None:
    seen = _sampler(monkeypatch, samples)
    with F.measurement_threads():
        assert torch.get_num_threads() == inside
    assert torch.get_num_threads() == 2
    assert len(seen) == taken
    assert len(two_threads) == taken - 1  # 1 ms between consecutive samples only


def test_one_thread_samples_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _sampler(monkeypatch, [1, 1, 1])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with F.measurement_threads():
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert seen == []


@pytest.mark.parametrize(
    ("runnable", "enough", "expected", "reads_tasks"),
    [
        (1, 0, 0, False),  # only the calling thread runs: no other process, exactly
        (2, 1, 1, False),  # bound 1 <= enough: returned as is
        (2, 0, 1, True),  # bound 1 > enough: exact count, own threads subtracted (one R: us)
        (3, -1, 2, True),  # the default asks for the exact count
    ],
)
def test_other_running_threads_bound(
    monkeypatch: pytest.MonkeyPatch, runnable: int, enough: int, expected: int, reads_tasks: bool
) -> None:
    listed: list[str] = []

    def fake_open(path: str) -> io.StringIO:
        if path == "/proc/loadavg":
            return io.StringIO(f"0.50 0.40 0.30 {runnable}/300 4242\n")
        state = "R" if path == "/proc/self/task/1/stat" else "S"
        return io.StringIO(f"1 (python (x)) {state} 1 1 1")

    def fake_listdir(path: str) -> list[str]:
        listed.append(path)
        return ["1", "2", "3"]

    monkeypatch.setattr(F, "open", fake_open, raising=False)
    monkeypatch.setattr(F.os, "listdir", fake_listdir)
    assert F._other_running_threads(enough) == expected
    assert bool(listed) == reads_tasks


def test_deferred_samples_after_setup(
    two_threads: list[float], monkeypatch: pytest.MonkeyPatch, clock: list[float]
) -> None:
    """``defer``: the first sample applies at once; the others are taken by
    :func:`settle_threads`, sleeping only for what the setup did not already wait."""
    seen = _sampler(monkeypatch, [0, 0, 1])
    with F.measurement_threads(defer=True):
        assert (len(seen), torch.get_num_threads()) == (1, 2)
        clock[0] += 0.005  # 5 ms of setup: covers both 1 ms spacings of the first one
        F.settle_threads()
        assert (len(seen), torch.get_num_threads()) == (3, 1)
        F.settle_threads()  # nothing left to sample
        assert len(seen) == 3
    assert torch.get_num_threads() == 2
    assert two_threads == [pytest.approx(0.001)]  # the third sample is 1 ms after the second
    F.settle_threads()  # outside: a no-op
    assert len(seen) == 3


def test_deferred_busy_first_sample(
    two_threads: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _sampler(monkeypatch, [1, 0, 0])
    with F.measurement_threads(defer=True):
        assert torch.get_num_threads() == 1
        F.settle_threads()
        assert torch.get_num_threads() == 1
    assert (len(seen), two_threads, torch.get_num_threads()) == (1, [], 2)


def test_sample_threads_mid_setup_never_sleeps(
    two_threads: list[float], monkeypatch: pytest.MonkeyPatch, clock: list[float]
) -> None:
    seen = _sampler(monkeypatch, [0, 1, 0])
    with F.measurement_threads(defer=True):
        clock[0] += 0.0005
        F.sample_threads()  # 0.5 ms after the first sample: not due yet
        assert len(seen) == 1
        clock[0] += 0.0015
        F.sample_threads()  # due: taken, and its choice applies
        assert (len(seen), torch.get_num_threads()) == (2, 1)
        # one thread already: nothing left to sample
        F.settle_threads()
    assert (len(seen), two_threads, torch.get_num_threads()) == (2, [], 2)


def test_deferred_quiet_setup_hides_both_sleeps(
    two_threads: list[float], monkeypatch: pytest.MonkeyPatch, clock: list[float]
) -> None:
    seen = _sampler(monkeypatch, [0, 0, 0])
    with F.measurement_threads(defer=True):
        clock[0] += 0.0015
        F.sample_threads()
        clock[0] += 0.0015
        F.settle_threads()
        assert torch.get_num_threads() == 2
    assert (len(seen), two_threads) == (3, [])
