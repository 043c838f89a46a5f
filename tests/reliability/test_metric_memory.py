"""Metrics inside the memory budget (issue 21): no O×O matrix from class targets, and the
feature Grams counted before they are allocated.

The O = 50257 cases run in a subprocess under an address-space limit (4 GiB), so a regression
fails with an allocation error instead of taking the machine's memory.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from lazy_monitor import KernelTracker

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 4 << 30


def _run_limited(code: str) -> str:
    prelude = f"import resource\nresource.setrlimit(resource.RLIMIT_AS, ({LIMIT}, {LIMIT}))\n"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_trace_alignment_with_vocabulary_size_class_targets_allocates_no_o_by_o():
    # Row "defaults OOM on a language-model head with class targets": the trace alignment built
    # yc.T @ yc, (O, O) = 19.3 GB for O = 50257.
    out = _run_limited(
        """
        import torch
        from lazy_monitor.metrics import kernel_alignment
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 50257, (16,), generator=g)
        y[8:] = y[:8]  # repeated classes: a non-trivial target kernel
        j = torch.randn(16, 5, generator=g, dtype=torch.float64)
        print(float(kernel_alignment(j @ j.T, y, num_classes=50257)))
        """
    )
    value = float(out.strip())
    assert -1.0 <= value <= 1.0


def test_tracker_defaults_on_a_50257_way_head_with_class_targets_fit():
    # The same row through the tracker's defaults: kind="auto" resolves to a projected trace
    # kernel, and ntk/alignment is finite within the 4 GiB address space.
    out = _run_limited(
        """
        import math, warnings, torch
        from torch import nn
        from lazy_monitor import KernelTracker
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 50257))
        x, y = torch.randn(8, 8), torch.randint(0, 50257, (8,))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tracker = KernelTracker(model, x, targets=y)
            tracker.start()
            with torch.no_grad():
                model[0].weight.mul_(1.1)
            out = tracker.measure(1)
        print(tracker.kernel_config["kind"], out["ntk/alignment"])
        """
    )
    kind, value = out.split()
    assert kind == "trace" and math.isfinite(float(value))


def test_feature_grams_over_the_budget_are_refused_before_any_is_computed():
    # Row "feature Grams are not in the budget": N = 16384 allocated 3 × 2 GiB of Grams at
    # construction (peak 6.3 GiB) before any max_memory check. Now the default set is dropped
    # with the budget message and an explicit list raises, within a 4 GiB address space. (N = 8192
    # under max_memory = 2.4 GiB: the trace kernel fits (4.5 N x N float64 = 2.25 GiB), the
    # default Grams (7 x 0.5 GiB) and two explicit modules' (5 x 0.5 GiB) do not.)
    out = _run_limited(
        """
        import warnings, torch
        from torch import nn
        from lazy_monitor import KernelTracker
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                              nn.Linear(8, 2))
        x = torch.randn(8192, 4)
        kernel = {"max_memory": int(2.4 * 2**30)}
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            tracker = KernelTracker(model, x, kernel=kernel)
        msgs = [str(w.message) for w in seen if "does not track features" in str(w.message)]
        print(tracker.feature_modules, len(msgs))
        print(msgs[0])
        try:
            KernelTracker(model, x, feature_modules=["0", "2"], kernel=kernel)
        except ValueError as err:
            print("refused:", err)
        """
    )
    lines = out.splitlines()
    assert lines[0] == "[] 1"
    assert "3 module(s) needs 3.5 GiB of (N, N) float64 Grams at N=8192" in lines[1]
    assert "max_memory=2.4 GiB" in lines[1]
    assert lines[2].startswith("refused: the feature CKA of 2 module(s) needs 2.5 GiB")
    assert "track fewer modules" in lines[2]


def test_feature_grams_are_counted_in_the_kernel_budget(monkeypatch):
    from lazy_monitor.tracking import features as tf

    calls = []
    monkeypatch.setattr(tf, "centered_gram", lambda t: calls.append(1) or torch.zeros(1))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(64, 4)
    need = tf.feature_gram_bytes(2, 64)
    assert need == 5 * 64 * 64 * 8
    with pytest.raises(ValueError, match=r"needs 0.000153 GiB .* more than max_memory"):
        KernelTracker(model, x, feature_modules=["0", "2"], kernel={"max_memory": need - 1})
    assert calls == []  # refused before any Gram was computed
    monkeypatch.undo()
    tracker = KernelTracker(model, x, kernel={"max_memory": 2**20})
    assert tracker.feature_modules == ["0", "2"]
    tracker.start()
    # the kernel is resolved within what the Grams leave of max_memory
    assert tracker.kernel_config["requested"]["max_memory"] == 2**20 - need
    assert tf.kernel_budget(None, 2, 64) is None
