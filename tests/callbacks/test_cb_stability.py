"""The monitor reads the optimizer's learning rate (opt/lr, ntk/lr_eig_max) and tracks features."""

from __future__ import annotations

import math

import lightning.pytorch as L
import pytest
import torch
from _cb_helpers import LitLightning, RecordingLogger, trainer_kwargs

from lazy_monitor.callbacks.lightning import KernelRegimeMonitor


class _Scheduled(LitLightning):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        # halve the learning rate after every optimizer step: the logged lr must follow it
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _fit(tmp_path, monitor, steps=4):
    L.seed_everything(0)
    logger = RecordingLogger()
    trainer = L.Trainer(
        **trainer_kwargs(tmp_path, max_steps=steps, callbacks=[monitor], logger=logger)
    )
    trainer.fit(_Scheduled(n=32, batch_size=8))
    return logger


def test_monitor_logs_the_scheduled_lr_and_lr_times_eig_max_over_n(tmp_path):
    monitor = KernelRegimeMonitor(
        probe_size=8, every_n_steps=1, log_spaced_until=0, max_overhead=None
    )
    logger = _fit(tmp_path, monitor)
    lr, eig, ratio = (logger.series(k) for k in ("opt/lr", "ntk/eig_max", "ntk/lr_eig_max"))
    # x = k: the weights after k steps, measured before step k+1, which uses 0.1 * 0.5**k
    assert lr == {k: 0.1 * 0.5**k for k in range(5)}
    for k in lr:
        assert ratio[k] == pytest.approx(lr[k] * eig[k] / 8, rel=1e-12)
    assert set(logger.series("regime/catapult").values()) == {0.0}  # far below the edge
    cka = logger.series("features/net.0/cka")  # hidden (Linear, Tanh, Dropout, Linear)
    assert cka[0] == 1.0 and all(0.0 < v <= 1.0 for v in cka.values())
    assert "features/net.3/cka" not in monitor.metric_names()  # the readout: only by name


def test_feature_modules_can_be_chosen_or_switched_off(tmp_path):
    monitor = KernelRegimeMonitor(
        probe_size=8,
        every_n_steps=2,
        feature_modules=["net.1"],
        log_spaced_until=0,
        max_overhead=None,
    )
    _fit(tmp_path / "a", monitor, steps=2)  # net.1 is the Tanh: a module without parameters
    assert [n for n in monitor.metric_names() if n.startswith("features/")] == [
        "features/net.1/cka"
    ]
    off = KernelRegimeMonitor(
        probe_size=8, every_n_steps=2, feature_modules=False, log_spaced_until=0, max_overhead=None
    )
    _fit(tmp_path / "b", off, steps=2)
    assert not any(n.startswith("features/") for n in off.metric_names())
    assert math.isfinite(off.last_metrics["ntk/lr_eig_max"])


@pytest.mark.parametrize(
    "value, error, match",
    [
        ("net.0", TypeError, "feature_modules must be True, False/None or a non-empty list"),
        ([], TypeError, "feature_modules must be True"),
        ([3], TypeError, r"feature_modules\[0\]"),
    ],
)
def test_bad_feature_modules_are_rejected_at_construction(value, error, match):
    with pytest.raises(error, match=match):
        KernelRegimeMonitor(feature_modules=value, log_spaced_until=0, max_overhead=None)


def test_unknown_feature_module_fails_at_train_start_naming_it(tmp_path):
    monitor = KernelRegimeMonitor(
        probe_size=8, feature_modules=["net.9"], log_spaced_until=0, max_overhead=None
    )
    with pytest.raises(ValueError, match=r"feature modules \['net.9'\] are not submodules"):
        _fit(tmp_path, monitor, steps=1)
