"""KernelDriftGate: actions, patience, minimums, validation, resume and fresh fits."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
from _cb_helpers import LitLightning, RecordingLogger, trainer_kwargs

from lazy_monitor.callbacks.lightning import (
    KernelDriftError,
    KernelDriftGate,
    KernelDriftWarning,
    KernelRegimeMonitor,
)
from lazy_monitor.tracking.gate import check_measurement, parse_thresholds

TINY = 1e-12  # every change after the first update exceeds it


def _fit(tmp_path, gate, max_steps=10, ckpt_path=None, monitor=None, model=None):
    torch.manual_seed(0)
    monitor = monitor or KernelRegimeMonitor(
        probe_size=8, every_n_steps=2, per_layer=False, log_spaced_until=0, max_overhead=None
    )
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=max_steps, callbacks=[gate, monitor]))
    trainer.fit(model or LitLightning(n=64, batch_size=8), ckpt_path=ckpt_path)
    return trainer


def test_warn_reports_metric_value_threshold_and_step_and_keeps_training(tmp_path):
    gate = KernelDriftGate({"ntk/rel_change": TINY}, action="warn")
    with pytest.warns(
        KernelDriftWarning, match=r"ntk/rel_change = \S+ > max 1e-12 at step 2 "
    ) as rec:
        trainer = _fit(tmp_path, gate)
    assert trainer.global_step == 10 and gate.tripped and gate.trip_step == 2
    assert len([w for w in rec if w.category is KernelDriftWarning]) == 1  # warned once


def test_stop_ends_training_right_after_the_tripping_step_with_patience(tmp_path):
    gate = KernelDriftGate({"ntk/rel_change": TINY}, patience=3, action="stop")
    with pytest.warns(KernelDriftWarning, match="for 3 consecutive measurements, patience=3"):
        trainer = _fit(tmp_path, gate, max_steps=20)
    assert gate.trip_step == 6 and trainer.global_step == 6  # measurements at 2, 4, 6


def test_raise_fails_the_fit_with_the_reason(tmp_path):
    gate = KernelDriftGate({"params/rel_change": TINY, "lin/rel_error": 1e9}, action="raise")
    with pytest.raises(KernelDriftError, match=r"params/rel_change = \S+ > max 1e-12 at step 2"):
        _fit(tmp_path, gate)


def test_minimum_is_checked_at_train_end_not_at_step_zero(tmp_path):
    gate = KernelDriftGate({"ntk/rel_change": {"min": 10.0}}, action="raise")
    with pytest.raises(KernelDriftError, match="< min 10 at step 10 .at the end of training"):
        _fit(tmp_path, gate)
    reached = KernelDriftGate({"ntk/rel_change": {"min": TINY}}, action="raise")
    assert _fit(tmp_path, reached).global_step == 10 and not reached.tripped


def test_minimum_after_warmup_trips_during_training(tmp_path):
    gate = KernelDriftGate({"ntk/rel_change": {"min": 10.0}}, action="stop", min_check_from_step=4)
    with pytest.warns(KernelDriftWarning, match="< min 10 at step 4"):
        trainer = _fit(tmp_path, gate)
    assert trainer.global_step == 4


def test_tripped_state_is_checkpointed_and_reasserted_on_resume(tmp_path):
    gate = KernelDriftGate({"ntk/rel_change": TINY}, action="stop")
    with pytest.warns(KernelDriftWarning):
        trainer = _fit(tmp_path / "a", gate)
    ckpt = str(tmp_path / "tripped.ckpt")
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["callbacks"][gate.state_key]
    assert state["tripped"] and "ntk/rel_change" in state["reason"]

    fresh = KernelDriftGate({"ntk/rel_change": TINY}, action="stop")
    with pytest.warns(KernelDriftWarning, match="restored tripped state: ntk/rel_change"):
        resumed = _fit(tmp_path / "b", fresh, max_steps=20, ckpt_path=ckpt)
    assert resumed.global_step == 2  # no further step


def test_gate_without_monitor_fails_at_setup(tmp_path):
    gate = KernelDriftGate({"ntk/rel_change": 0.2})
    trainer = L.Trainer(**trainer_kwargs(tmp_path, callbacks=[gate]))
    model = LitLightning()
    with pytest.raises(ValueError, match="needs exactly one KernelRegimeMonitor"):
        trainer.fit(model)
    assert trainer.global_step == 0


def test_threshold_on_a_metric_the_monitor_does_not_log_fails_before_training(tmp_path):
    gate = KernelDriftGate({"ntk/alignment": 0.5})
    monitor = KernelRegimeMonitor(
        probe=torch.randn(4, 6), log_spaced_until=0, max_overhead=None
    )  # no targets: no alignment
    with pytest.raises(ValueError, match=r"thresholds on \['ntk/alignment'\].*needs targets"):
        _fit(tmp_path, gate, monitor=monitor)


def test_final_scheduled_measurement_counts_once_towards_patience(tmp_path):
    # max_steps=10 is a multiple of every_n_steps=2: the step-10 measurement is also the final
    # one, and train end must not count it a second time.
    logger = RecordingLogger()
    torch.manual_seed(0)
    monitor = KernelRegimeMonitor(
        probe_size=8, every_n_steps=2, per_layer=False, log_spaced_until=0, max_overhead=None
    )
    trainer = L.Trainer(
        **trainer_kwargs(tmp_path, max_steps=10, logger=logger, callbacks=[monitor])
    )
    trainer.fit(LitLightning(n=64, batch_size=8))
    series = logger.series("params/distance")
    assert sorted(series) == [0, 2, 4, 6, 8, 10]
    before = max(v for s, v in series.items() if s < 10)
    assert series[10] > before
    bound = (before + series[10]) / 2  # violated at step 10 only

    once = KernelDriftGate({"params/distance": bound}, patience=2, action="raise")
    assert _fit(tmp_path, once).global_step == 10 and not once.tripped
    assert once.state_dict()["counts"] == {"params/distance:max": 1}
    flagged = KernelDriftGate({"params/distance": bound}, patience=1, action="raise")
    with pytest.raises(KernelDriftError, match="at step 10 .for 1 consecutive measurement,"):
        _fit(tmp_path, flagged)


def test_repeated_final_check_only_rechecks_minimums_without_counting():
    thresholds = parse_thresholds({"lin/rel_error": 0.1, "ntk/rel_change": {"min": 0.5}})
    counts = {"lin/rel_error:max": 1, "ntk/rel_change:min": 0}
    kw = dict(patience=2, check_minimums=False, final=True, check_finite=True, repeat=True)
    bad = {"lin/rel_error": 1.0, "ntk/rel_change": 0.3}
    reason = check_measurement(thresholds, bad, 10, counts, **kw)
    assert (
        reason == "ntk/rel_change = 0.3 < min 0.5 at step 10 (at the end of training, patience=2)"
    )
    assert counts == {"lin/rel_error:max": 1, "ntk/rel_change:min": 0}  # untouched
    assert check_measurement(thresholds, {**bad, "ntk/rel_change": 0.9}, 10, counts, **kw) is None


def test_new_fit_without_checkpoint_starts_the_gate_afresh(tmp_path):
    counting = KernelDriftGate({"ntk/rel_change": TINY}, patience=3, action="stop")
    _fit(tmp_path, counting, max_steps=4)  # violations at steps 2 and 4: counts 2, not tripped
    assert not counting.tripped and counting.state_dict()["counts"] == {"ntk/rel_change:max": 2}
    with pytest.warns(KernelDriftWarning, match="at step 6 .for 3 consecutive"):
        trainer = _fit(tmp_path, counting, max_steps=20)  # counts restart at 0
    assert trainer.global_step == 6

    tripped = KernelDriftGate({"ntk/rel_change": TINY}, action="stop")
    with pytest.warns(KernelDriftWarning, match="at step 2"):
        _fit(tmp_path, tripped)
    with pytest.warns(KernelDriftWarning) as rec:
        trainer = _fit(tmp_path, tripped, max_steps=20)
    messages = [str(w.message) for w in rec if w.category is KernelDriftWarning]
    assert not any("restored tripped state" in m for m in messages), messages
    assert trainer.global_step == 2 and tripped.tripped and tripped.trip_step == 2


def test_warning_points_at_the_users_fit_call_not_at_library_internals(tmp_path):
    gate = KernelDriftGate({"ntk/rel_change": TINY}, action="warn")
    with pytest.warns(KernelDriftWarning) as rec:
        _fit(tmp_path, gate, max_steps=4)
    (warning,) = [w for w in rec if w.category is KernelDriftWarning]
    # _fit's trainer.fit(...) line in this file: the first frame outside lazy_monitor/Lightning
    assert warning.filename == __file__
    assert "trainer.fit(" in open(__file__).read().splitlines()[warning.lineno - 1]
