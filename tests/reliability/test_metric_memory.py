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
