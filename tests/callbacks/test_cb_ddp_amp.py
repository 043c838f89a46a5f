"""Distributed (ddp_spawn, 2 CPU processes) and bf16 mixed precision."""

from __future__ import annotations

import os
import re

import lightning.pytorch as L
import pytest
import torch
from _cb_helpers import LitLightning, read_events, scalars, trainer_kwargs
from lightning.pytorch.loggers import TensorBoardLogger
from torch.multiprocessing.spawn import ProcessExitedException

from lazy_monitor.callbacks.lightning import KernelDriftGate, KernelRegimeMonitor


class RankRecorder(L.Callback):
    """Writes each rank's final global step (spawned ranks are separate processes: the parent's
    callback objects are not updated, and their on_exception hooks run in the parent only)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        with open(os.path.join(self.out_dir, f"end{trainer.global_rank}.txt"), "w") as f:
            f.write(str(trainer.global_step))


class RecordingGate(KernelDriftGate):
    """The gate, recording on each rank the moment it acts and the message it acts with."""

    def __init__(self, out_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir

    def _act(self, trainer, reason, final):
        with open(os.path.join(self.out_dir, f"act{trainer.global_rank}.txt"), "w") as f:
            f.write(f"{trainer.global_step} {reason}")
        super()._act(trainer, reason, final)


def _ddp_run(tmp_path, action: str) -> None:
    tmp_path.mkdir(parents=True)
    monitor = KernelRegimeMonitor(
        probe_size=8, every_n_steps=2, per_layer=False, log_spaced_until=0, max_overhead=None
    )
    gate = RecordingGate(
        str(tmp_path), thresholds={"params/rel_change": 1e-12}, patience=2, action=action
    )
    logger = TensorBoardLogger(str(tmp_path), name="", version="ddp", default_hp_metric=False)
    trainer = L.Trainer(
        **trainer_kwargs(
            tmp_path,
            strategy="ddp_spawn",
            devices=2,
            max_steps=10,
            logger=logger,
            callbacks=[RankRecorder(str(tmp_path)), monitor, gate],
            deterministic=False,
        )
    )
    raised = None
    try:
        trainer.fit(LitLightning(n=64, batch_size=8))
    except ProcessExitedException:
        raise
    except Exception as err:  # the "raise" action surfaces here, re-raised by the spawn launcher
        raised = err
    if action == "raise":
        assert raised is not None and re.search(
            r"KernelDriftError.*params/rel_change = \S+ > max 1e-12 at step 4", str(raised)
        ), raised
    elif raised is not None:
        raise raised
    acts = [open(tmp_path / f"act{r}.txt").read() for r in (0, 1)]
    assert acts[0] == acts[1] and acts[0].startswith("4 params/rel_change = ")  # same step, message
    if action == "stop":
        assert [open(tmp_path / f"end{r}.txt").read() for r in (0, 1)] == ["4", "4"]
    acc = read_events(str(tmp_path / "ddp"))
    rel = acc.Scalars("params/rel_change")
    assert [e.step for e in rel] == [0, 2, 4]  # rank 0 only: each step once
    assert rel[0].value == 0.0
    if action == "stop":
        assert trainer.callback_metrics["params/rel_change"] > 0  # returned from rank 0


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
@pytest.mark.parametrize("action", ["stop", "raise"])
def test_ddp_spawn_logs_once_and_the_gate_acts_on_every_rank_together(tmp_path, action):
    # Rarely (seen once in ~10 full-suite runs, rank 1 of the "stop" case), a spawned rank dies
    # with SIGABRT ("terminate called without an active exception") while exiting *after*
    # training: Lightning's ddp_spawn leaves the gloo process group to be torn down at
    # interpreter exit. That crash is outside the code under test, so one such abort is
    # retried on a fresh directory; every assertion still runs on a complete run.
    try:
        _ddp_run(tmp_path / "run0", action)
    except ProcessExitedException as err:
        if "SIGABRT" not in str(err):
            raise
        _ddp_run(tmp_path / "run1", action)


def test_bf16_mixed_measures_in_float32_with_exact_zero_at_start(tmp_path):
    monitor = KernelRegimeMonitor(
        probe_size=8, every_n_steps=3, log_spaced_until=0, max_overhead=None
    )
    logger = TensorBoardLogger(str(tmp_path), name="", version="bf16", default_hp_metric=False)
    torch.manual_seed(0)
    trainer = L.Trainer(
        **trainer_kwargs(
            tmp_path, precision="bf16-mixed", max_steps=6, logger=logger, callbacks=[monitor]
        )
    )
    trainer.fit(LitLightning(n=64, batch_size=8))
    assert monitor.tracker.last_kernel.dtype == torch.float32
    rel = scalars(read_events(str(tmp_path / "bf16")), "ntk/rel_change")
    assert sorted(rel) == [0, 3, 6] and rel[0] == 0.0
    # the kernel is evaluated outside autocast: it matches a float32 kernel of the same weights
    from lazy_monitor import empirical_ntk

    net = trainer.lightning_module
    ref = empirical_ntk(net, monitor.tracker.probe, kind="full")
    assert torch.allclose(monitor.tracker.last_kernel, ref, rtol=1e-5, atol=1e-6)
