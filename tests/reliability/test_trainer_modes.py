"""Trainer modes and faults: the monitor never ends a run (unless ``action="raise"``) and never
reports something false (issue 13). Every test here failed on ``beec677``.
"""

from __future__ import annotations

import glob
import math
import os
import warnings

import pytest
import torch
from _rel_fit import NAMESPACES, classification_data, lit, mlp, trainer
from torch import nn

from lazy_monitor.callbacks import lightning as cb_l
from lazy_monitor.callbacks import pytorch_lightning as cb_pl
from lazy_monitor.callbacks.lightning import (
    KernelDriftError,
    KernelDriftGate,
    KernelDriftWarning,
    KernelRegimeMonitor,
)

CALLBACKS = {"lightning": cb_l, "pytorch_lightning": cb_pl}


# ---------------------------------------------------------------- fast_dev_run
@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
@pytest.mark.parametrize("logger", ["default", "tensorboard", "csv"])
def test_fast_dev_run_with_any_logger(tmp_path, namespace, logger):
    # Row "fast_dev_run=True with any logger": AttributeError ... 'add_summary' at train end.
    pl = NAMESPACES[namespace]
    loggers = {
        "default": True,
        "tensorboard": pl.loggers.TensorBoardLogger(str(tmp_path)),
        "csv": pl.loggers.CSVLogger(str(tmp_path)),
    }
    monitor = CALLBACKS[namespace].KernelRegimeMonitor(probe_size=4)
    t = trainer(tmp_path, [monitor], pl=pl, fast_dev_run=True, max_steps=-1, logger=loggers[logger])
    t.fit(lit(mlp(), classification_data(), pl=pl))
    assert monitor.last_metrics["health/nonfinite"] == 0.0


# ---------------------------------------------------------------- gate at step 0
@pytest.mark.parametrize("order", ["monitor_first", "gate_first"])
def test_gate_violated_at_step_0_warns_once_and_truly(tmp_path, order):
    # Row "gate threshold already violated at step 0": two warnings, the second claimed
    # "restored tripped state" in a fresh run.
    monitor = KernelRegimeMonitor(probe_size=4, every_n_steps=2)
    gate = KernelDriftGate({"ntk/trace": 1e-9}, action="warn")
    callbacks = [monitor, gate] if order == "monitor_first" else [gate, monitor]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, callbacks).fit(lit(mlp(), classification_data()))
    drift = [str(w.message) for w in caught if issubclass(w.category, KernelDriftWarning)]
    assert len(drift) == 1, drift
    assert "at step 0" in drift[0] and "restored" not in drift[0]


# ---------------------------------------------------------------- continued fit
def _events(log_dir: str, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    values: dict[int, float] = {}
    for path in sorted(
        glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True)
    ):
        acc = EventAccumulator(path, size_guidance={SCALARS: 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                values.setdefault(event.step, event.value)  # the first write of a step wins
                if values[event.step] != event.value:
                    values[event.step] = math.nan  # overwritten with another value
    return values


def test_continued_fit_keeps_the_original_reference(tmp_path):
    # Row "trainer.fit called again to continue (max_steps 10 -> 20)": a new K0 was taken at
    # step 10, its point overwritten by 0 and later values relative to the new reference.
    import lightning.pytorch as L

    logger = L.loggers.TensorBoardLogger(str(tmp_path), name="run")
    monitor = KernelRegimeMonitor(
        probe_size=4, every_n_steps=5, log_spaced_until=0, max_overhead=None, tensorboard="basic"
    )
    model = lit(mlp(), classification_data(n=32), lr=0.3)
    t = trainer(tmp_path, [monitor], max_steps=10, logger=logger)
    t.fit(model)
    kernel0 = monitor.tracker.kernel0.clone()
    at_10 = float(t.callback_metrics["ntk/rel_change"])
    assert at_10 > 0
    t.fit_loop.epoch_loop.max_steps = 20
    t.fit(model)
    assert t.global_step == 20
    torch.testing.assert_close(monitor.tracker.kernel0, kernel0, rtol=0, atol=0)
    logged = _events(logger.log_dir, "ntk/rel_change")
    assert logged[0] == 0.0
    assert logged[10] == pytest.approx(at_10, rel=1e-6), logged  # not overwritten by 0
    assert logged[20] > 0 and math.isfinite(logged[20])


# ---------------------------------------------------------------- faults mid-training
class _FailsLater(nn.Module):
    """An MLP whose eval-mode forward raises once ``broken`` is set: a measurement failure that
    could not be foreseen at train start (e.g. an op without an autograd rule on a device)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.broken = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.broken and not self.training:
            raise NotImplementedError("Trying to use forward AD with some_fused_op")
        return self.net(x)


def _breaking_module(net: _FailsLater):
    module = lit(net, classification_data())

    def on_train_batch_end(outputs, batch, batch_idx):
        net.broken = (
            net.broken or batch_idx >= 1
        )  # sticky; after the step-0 reference, before step 2's measurement

    module.on_train_batch_end = on_train_batch_end
    return module


def test_a_later_measurement_failure_degrades_with_one_warning(tmp_path):
    monitor = KernelRegimeMonitor(probe_size=4, every_n_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer(tmp_path, [monitor], max_steps=6)
        t.fit(_breaking_module(_FailsLater()))
    assert t.global_step == 6  # training finished
    failures = [w for w in caught if "measurement at step" in str(w.message)]
    assert len(failures) == 1, [str(w.message) for w in caught]
    assert "some_fused_op" in str(failures[0].message)
    assert monitor.last_metrics["health/nonfinite"] == 1.0
    assert math.isnan(monitor.last_metrics["ntk/rel_change"])


def test_a_failed_measurement_trips_only_a_gate_that_checks_finiteness(tmp_path):
    monitor = KernelRegimeMonitor(probe_size=4, every_n_steps=2)
    gate = KernelDriftGate({"ntk/rel_change": 10.0}, action="raise")
    with pytest.raises(KernelDriftError, match="not finite"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer(tmp_path, [monitor, gate], max_steps=6).fit(_breaking_module(_FailsLater()))
    warn_gate = KernelDriftGate({"ntk/rel_change": 10.0}, action="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitor = KernelRegimeMonitor(probe_size=4, every_n_steps=2)
        t = trainer(tmp_path, [monitor, warn_gate], max_steps=6)
        t.fit(_breaking_module(_FailsLater()))
    assert t.global_step == 6 and warn_gate.tripped
