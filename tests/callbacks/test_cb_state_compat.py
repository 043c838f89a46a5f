"""A Lightning checkpoint written by lazy_monitor 0.1.0 (commit beec677) still resumes.

``tests/fixtures/monitor_v0_1.ckpt`` holds monitor and gate state at step 8 of a 16-step run;
``monitor_v0_1.json`` the metrics the uninterrupted run logged after step 8.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
from _cb_helpers import RecordingLogger, trainer_kwargs
from lightning.pytorch import Trainer

from lazy_monitor.callbacks.lightning import KernelDriftGate, KernelRegimeMonitor

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
sys.path.insert(0, FIXTURES)
from make_fixtures import GATE_THRESHOLDS, MONITOR_KW, monitor_model  # noqa: E402


def test_checkpoint_of_version_0_1_resumes_with_the_same_metrics(tmp_path):
    with open(os.path.join(FIXTURES, "monitor_v0_1.json")) as fh:
        expected = {int(step): metrics for step, metrics in json.load(fh).items()}
    logger = RecordingLogger()
    monitor = KernelRegimeMonitor(**MONITOR_KW, max_overhead=None)
    gate = KernelDriftGate(GATE_THRESHOLDS, action="warn")
    trainer = Trainer(
        **trainer_kwargs(tmp_path, max_steps=16, logger=logger, callbacks=[monitor, gate])
    )
    model = monitor_model()
    torch.manual_seed(7)
    trainer.fit(model, ckpt_path=os.path.join(FIXTURES, "monitor_v0_1.ckpt"))
    assert not gate.tripped
    got = {s: m for s, m in logger.calls if "ntk/rel_change" in m}
    assert sorted(got) == sorted(expected)
    factors: dict[str, set] = {}
    for step, metrics in expected.items():
        # health/* is logged only once non-zero since issue 12 (0.1 logged it at every step)
        metrics = {k: v for k, v in metrics.items() if not (k.startswith("health/") and v == 0)}
        assert set(got[step]) >= set(metrics)
        for name, value in metrics.items():
            if "_layer/" in name and value > 0:
                # per layer in units of the whole model's ‖K₀‖/‖θ₀‖ since issue 18 (0.1: the
                # layer's own): the same reference-norm factor <= 1 at every step
                factors.setdefault(name, set()).add(round(got[step][name] / value, 5))
                continue
            # the kernel's float32 rounding depends on the engine path (auto may now take the
            # Jacobian path where the fixture was made with the structured one): the smallest
            # eigenvalue carries an absolute error ~eps·λmax, 1.2e-5 relative to λmin here
            tol = 1e-4 if name in ("ntk/cond", "ntk/eig_min") else 1e-5
            assert math.isclose(got[step][name], value, rel_tol=tol, abs_tol=1e-8), (step, name)
    assert len(factors) == 4
    for name, values in factors.items():
        assert len(values) == 1 and 0 < next(iter(values)) <= 1, (name, values)
