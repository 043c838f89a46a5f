"""Resume: a run split at a checkpoint logs the same metrics as an uninterrupted run."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
from _cb_helpers import (
    MODULES,
    NAMESPACES,
    LitLightning,
    RecordingLogger,
    RecordingLoggerPL,
    trainer_kwargs,
)
from lightning.pytorch.callbacks import ModelCheckpoint

from lazy_monitor.callbacks import pytorch_lightning as pl_cb
from lazy_monitor.callbacks.lightning import KernelRegimeMonitor

# 8 batches per epoch (n=64, batch_size=8). Checkpoints sit on epoch boundaries: Lightning
# restarts a partly seen epoch from its first batch, so mid-epoch resumes differ in *training*.
N = 16


def _monitor():
    return KernelRegimeMonitor(probe_size=8, every_n_steps=4, log_spaced_until=4, max_overhead=None)


def _model():
    torch.manual_seed(7)
    return LitLightning(n=64, batch_size=8, shuffle=False, lr=0.2)


def _fit(tmp_path, max_steps, ckpt_path=None, callbacks=(), ns="lightning"):
    logger = RecordingLogger() if ns == "lightning" else RecordingLoggerPL()
    monitor = (
        _monitor()
        if ns == "lightning"
        else pl_cb.KernelRegimeMonitor(
            probe_size=8, every_n_steps=4, log_spaced_until=4, max_overhead=None
        )
    )
    trainer = NAMESPACES[ns].Trainer(
        **trainer_kwargs(
            tmp_path,
            max_steps=max_steps,
            logger=logger,
            callbacks=[monitor, *callbacks],
            enable_checkpointing=bool(callbacks),
        )
    )
    torch.manual_seed(7)
    trainer.fit(MODULES[ns](n=64, batch_size=8, shuffle=False, lr=0.2), ckpt_path=ckpt_path)
    return logger, monitor


@pytest.mark.parametrize("resume_ns", ["lightning", "pytorch_lightning"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, resume_ns):
    full, _ = _fit(tmp_path / "full", 2 * N)
    # written in on_train_batch_end, after the step-8 measurement
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=8)
    _fit(tmp_path / "first", N, callbacks=[ckpt_cb])
    ckpt, start = str(tmp_path / "ckpt" / "epoch=0-step=8.ckpt"), 8
    state = torch.load(ckpt, weights_only=True)  # tensors and plain Python only
    (key,) = [k for k in state["callbacks"] if k.startswith("KernelRegimeMonitor")]
    assert state["callbacks"][key]["probe_x"].shape == (8, 6)

    # the same state_key in both namespaces: a lightning checkpoint resumes under pytorch_lightning
    resumed, monitor = _fit(tmp_path / "resumed", 2 * N, ckpt_path=ckpt, ns=resume_ns)
    assert monitor.tracker.started
    steps = sorted(resumed.series("ntk/rel_change"))
    assert steps[0] > start and steps[-1] == 2 * N and 0 not in steps  # no second reference
    names = monitor.metric_names()
    for step, metrics in resumed.calls:
        ref = dict(full.calls)[step]
        for name in names:
            if name.startswith("health/"):  # logged only once non-zero (never here)
                assert name not in metrics and name not in ref
                continue
            if name.startswith("monitor/"):  # wall-clock seconds: not reproducible
                continue
            assert metrics[name] == pytest.approx(ref[name], rel=1e-6, abs=1e-6), (step, name)
        # the log10 companions resume too
        assert metrics["drift/log10_ntk_rel_change"] == pytest.approx(
            ref["drift/log10_ntk_rel_change"], abs=1e-6
        )


def test_new_fit_without_checkpoint_takes_a_new_reference(tmp_path):
    monitor = _monitor()
    model = _model()
    for _ in range(2):
        logger = RecordingLogger()
        L.Trainer(**trainer_kwargs(tmp_path, max_steps=3, logger=logger, callbacks=[monitor])).fit(
            model
        )
        assert logger.series("ntk/rel_change")[0] == 0.0
