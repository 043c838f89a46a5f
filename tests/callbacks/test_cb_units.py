"""Unit specifications of the callback building blocks: schedule, gate logic, probe, TB helpers."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch
from _cb_helpers import make_data
from torch.utils.data import DataLoader

from lazy_monitor.callbacks._tensorboard import custom_layout, kernel_image
from lazy_monitor.callbacks.lightning import KernelDriftGate, KernelRegimeMonitor
from lazy_monitor.tracking.gate import check_measurement, parse_thresholds
from lazy_monitor.tracking.probe import default_batch_to_probe, draw_probe
from lazy_monitor.tracking.schedule import MeasurementSchedule


def test_schedule_multiples_and_log_spaced_early_steps():
    assert MeasurementSchedule(10).steps_until(35) == [0, 10, 20, 30]
    assert MeasurementSchedule(10, log_spaced_until=10).steps_until(25) == [0, 1, 2, 4, 8, 10, 20]


def test_schedule_never_skips_a_point_when_the_step_jumps():
    sched = MeasurementSchedule(5)
    assert sched.is_due(6, last_step=0)  # 5 lies in (0, 6]
    assert not sched.is_due(9, last_step=6)
    assert not sched.is_due(6, last_step=6)  # same step twice (gradient accumulation)
    assert sched.is_due(0, last_step=None)


def test_thresholds_parse_direction_and_reject_bad_values():
    parsed = parse_thresholds({"ntk/rel_change": 0.2, "ntk/alignment": {"min": 0.3, "max": 0.9}})
    assert [(t.metric, t.direction, t.value) for t in parsed] == [
        ("ntk/rel_change", "max", 0.2),
        ("ntk/alignment", "max", 0.9),
        ("ntk/alignment", "min", 0.3),
    ]
    with pytest.raises(ValueError, match="unknown metric 'ntk/relchange'"):
        parse_thresholds({"ntk/relchange": 0.2})
    with pytest.raises(ValueError, match="'max'.*'min'"):
        parse_thresholds({"ntk/rel_change": {"upper": 0.2}})
    with pytest.raises(ValueError, match="min 0.5 > max 0.1"):
        parse_thresholds({"lin/rel_error": {"min": 0.5, "max": 0.1}})
    with pytest.raises(TypeError, match="must be a finite number"):
        parse_thresholds({"lin/rel_error": "0.1"})
    with pytest.raises(ValueError, match="empty"):
        parse_thresholds({})
    assert parse_thresholds({"ntk_layer/net.0/rel_change": 1.0})[0].metric.startswith("ntk_layer")


def test_gate_patience_counts_consecutive_violations_only():
    th = parse_thresholds({"ntk/rel_change": 0.2})
    counts: dict = {}
    kw = dict(patience=2, check_minimums=False, final=False, check_finite=True)
    assert check_measurement(th, {"ntk/rel_change": 0.3}, 10, counts, **kw) is None
    assert check_measurement(th, {"ntk/rel_change": 0.1}, 20, counts, **kw) is None  # resets
    assert check_measurement(th, {"ntk/rel_change": 0.3}, 30, counts, **kw) is None
    reason = check_measurement(th, {"ntk/rel_change": 0.25}, 40, counts, **kw)
    assert reason is not None
    assert "ntk/rel_change = 0.25 > max 0.2 at step 40" in reason and "patience=2" in reason


def test_gate_minimum_waits_for_train_end_or_warmup_and_nan_violates():
    th = parse_thresholds({"ntk/rel_change": {"min": 0.05}})
    kw = dict(patience=3, check_finite=True)
    assert (
        check_measurement(
            th, {"ntk/rel_change": 0.0}, 0, {}, check_minimums=False, final=False, **kw
        )
        is None
    )
    reason = check_measurement(
        th, {"ntk/rel_change": 0.01}, 50, {}, check_minimums=False, final=True, **kw
    )
    assert reason is not None and "< min 0.05" in reason and "end of training" in reason
    nan = check_measurement(
        parse_thresholds({"lin/rel_error": 1.0}),
        {"lin/rel_error": float("nan")},
        5,
        {},
        check_minimums=False,
        final=False,
        patience=1,
        check_finite=True,
    )
    assert nan is not None and "not finite" in nan


def test_monitor_constructor_rejects_bad_values_with_the_fix():
    with pytest.raises(ValueError, match="every_n_steps must be an int >= 1, got 0"):
        KernelRegimeMonitor(every_n_steps=0, log_spaced_until=0, max_overhead=None)
    with pytest.raises(ValueError, match="probe_size must be an int >= 1, got -3"):
        KernelRegimeMonitor(probe_size=-3, log_spaced_until=0, max_overhead=None)
    with pytest.raises(ValueError, match="either probe=... or probe_size"):
        KernelRegimeMonitor(
            probe=torch.randn(4, 3), probe_size=4, log_spaced_until=0, max_overhead=None
        )
    with pytest.raises(ValueError, match="kind'?\\]? must be"):
        KernelRegimeMonitor(kernel={"kind": "diag"}, log_spaced_until=0, max_overhead=None)
    with pytest.raises(ValueError, match="implementation.*'fast'"):
        KernelRegimeMonitor(
            kernel={"implementation": "fast"}, log_spaced_until=0, max_overhead=None
        )
    with pytest.raises(ValueError, match="unknown settings \\['kinds'\\]"):
        KernelRegimeMonitor(kernel={"kinds": "full"}, log_spaced_until=0, max_overhead=None)
    with pytest.raises(ValueError, match="tensorboard must be one of"):
        KernelRegimeMonitor(tensorboard="all", log_spaced_until=0, max_overhead=None)
    with pytest.raises(TypeError):
        KernelRegimeMonitor(
            torch.randn(4, 3), 4, log_spaced_until=0, max_overhead=None
        )  # everything after the probe: keywords
    with pytest.raises(ValueError, match="mismatched batch sizes|targets y have shape"):
        KernelRegimeMonitor(
            probe=(torch.randn(4, 3), torch.zeros(5)), log_spaced_until=0, max_overhead=None
        )
    with pytest.raises(TypeError, match="batch_to_probe must be callable"):
        KernelRegimeMonitor(batch_to_probe="x", log_spaced_until=0, max_overhead=None)
    with pytest.raises(ValueError, match="NaN or inf"):
        KernelRegimeMonitor(
            probe=torch.full((2, 3), float("nan")), log_spaced_until=0, max_overhead=None
        )


def test_gate_constructor_rejects_bad_values():
    with pytest.raises(ValueError, match="action must be one of"):
        KernelDriftGate({"ntk/rel_change": 0.2}, action="halt")
    with pytest.raises(ValueError, match="patience must be an int >= 1, got 0"):
        KernelDriftGate({"ntk/rel_change": 0.2}, patience=0)


def test_state_keys_distinguish_configs_and_match_across_namespaces():
    from lazy_monitor.callbacks import pytorch_lightning as pl_cb

    a = KernelRegimeMonitor(probe_size=8, log_spaced_until=0, max_overhead=None)
    assert (
        a.state_key
        != KernelRegimeMonitor(probe_size=16, log_spaced_until=0, max_overhead=None).state_key
    )
    assert (
        a.state_key
        == pl_cb.KernelRegimeMonitor(probe_size=8, log_spaced_until=0, max_overhead=None).state_key
    )
    g = KernelDriftGate({"ntk/rel_change": 0.2})
    assert g.state_key != KernelDriftGate({"ntk/rel_change": 0.3}).state_key
    assert g.state_key == pl_cb.KernelDriftGate({"ntk/rel_change": 0.2}).state_key


def test_probe_draw_is_deterministic_and_leaves_every_rng_and_the_loader_alone():
    ds = make_data(n=40)
    loader = DataLoader(ds, batch_size=8, shuffle=True)
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    x1, y1 = draw_probe(loader, 6, seed=3, batch_to_probe=default_batch_to_probe)
    x2, y2 = draw_probe(loader, 6, seed=3, batch_to_probe=default_batch_to_probe)
    after = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1])
    assert torch.equal(before[0], after[0]) and before[1] == after[1]
    assert np.array_equal(before[2], after[2])
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (6, 6)
    x3, _ = draw_probe(loader, 6, seed=4, batch_to_probe=default_batch_to_probe)
    assert not torch.equal(x1, x3)
    rows = {tuple(r.tolist()) for r in ds.tensors[0]}
    assert all(tuple(r.tolist()) in rows for r in x1)  # examples of the dataset, unchanged
    with pytest.raises(ValueError, match="only 40 examples; lower probe_size to at most 40"):
        draw_probe(loader, 41, seed=0, batch_to_probe=default_batch_to_probe)


def test_dict_batches_need_batch_to_probe():
    with pytest.raises(TypeError, match="batch_to_probe=lambda b"):
        default_batch_to_probe({"x": torch.zeros(2, 3), "y": torch.zeros(2)})


def test_custom_layout_has_the_four_categories_and_only_logged_tags():
    names = [
        "ntk/rel_change",
        "ntk_layer/net.0/rel_change",
        "lin/rel_error",
        "ntk/eig_max",
        "params/rel_change",
    ]
    layout = custom_layout(names)
    assert list(layout) == ["kernel drift", "linearization", "spectrum", "parameters"]
    with_log10 = custom_layout([*names, "drift/log10_ntk_rel_change"])
    assert list(with_log10)[0] == "drift (log10)"
    assert "kernel-target alignment" not in layout["kernel drift"]
    # the metric's pattern, then its lazy threshold's (a flat line in the same chart)
    per_layer, threshold = layout["kernel drift"]["relative change per layer"][1]
    assert re.search(per_layer, "ntk_layer/net.0/rel_change")
    assert not re.search(per_layer, "params_layer/net.0/rel_change")
    assert re.search(threshold, "threshold/ntk_layer/net.0/rel_change")


def test_kernel_image_maps_zero_to_grey_and_extremes_to_black_white():
    k = torch.zeros(2, 2, 2, 2)
    k[0, 0, 0, 0], k[1, 1, 1, 1] = 2.0, -2.0
    img = kernel_image(k, min_pixels=4)
    assert img.shape == (4, 4) and img.dtype == torch.float32
    assert img[0, 0] == 1.0 and img[3, 3] == 0.0 and img[0, 1] == 0.5


class _Writer:
    def __init__(self):
        self.texts = []

    def add_custom_scalars(self, layout):
        pass

    def add_histogram(self, *args, **kwargs):
        pass

    def add_text(self, tag, text, global_step=None):
        self.texts.append((tag, text, global_step))


def test_verdict_texts_at_transitions_health_alarm_and_cap():
    from types import SimpleNamespace

    from lazy_monitor.callbacks._extras import TensorBoardExtras
    from lazy_monitor.callbacks._tensorboard import MAX_TEXTS, VERDICT_TAG

    writer = _Writer()
    extras = TensorBoardExtras("basic")
    tracker = SimpleNamespace(
        regime_decision=lambda m: (False, f"ntk/rel_change = {m['ntk/rel_change']:.4g} > 0.1")
    )

    class _Monitor:  # the verdict part of one measurement, as the adapters call it
        def _write_texts(self, _trainer, step, log_step, metrics, previous):
            extras._verdicts([writer], tracker, step, log_step, metrics, previous)

    monitor, trainer = _Monitor(), None

    def metrics(lazy, rel=0.05, nonfinite=0.0):
        return {"regime/lazy": lazy, "ntk/rel_change": rel, "health/nonfinite": nonfinite}

    monitor._write_texts(trainer, 0, 0, metrics(1.0), {})  # reference: nothing to say
    monitor._write_texts(trainer, 120, 120, metrics(0.0, 0.13), metrics(1.0))
    monitor._write_texts(trainer, 130, 130, metrics(0.0, 0.2), metrics(0.0, 0.13))  # no change
    monitor._write_texts(trainer, 140, 140, metrics(1.0), metrics(0.0, 0.2))
    monitor._write_texts(trainer, 150, 150, metrics(1.0, nonfinite=1.0), metrics(1.0))
    assert [(t[0], t[1]) for t in writer.texts] == [
        (VERDICT_TAG, "step 120: left the lazy regime: ntk/rel_change = 0.13 > 0.1"),
        (VERDICT_TAG, "step 140: back in the lazy regime"),
        (
            VERDICT_TAG,
            "step 150: `health/nonfinite` = 1 (1 if kernel, outputs or parameters hold NaN/inf)",
        ),
    ]
    for step in range(200, 240, 2):  # oscillating: capped, the last entry says so
        monitor._write_texts(trainer, step, step, metrics(0.0, 0.2), metrics(1.0))
        monitor._write_texts(trainer, step + 1, step + 1, metrics(1.0), metrics(0.0, 0.2))
    assert len(writer.texts) == MAX_TEXTS
    assert "further events omitted" in writer.texts[-1][1]
    assert extras.transitions == 42
