"""What lands in TensorBoard event files and in trainer.callback_metrics."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
from _cb_helpers import LitLightning, read_events, scalars, trainer_kwargs
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.plugins.custom_scalar import layout_pb2

from lazy_monitor.callbacks.lightning import KernelRegimeMonitor


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tb")
    torch.manual_seed(0)
    monitor = KernelRegimeMonitor(
        probe_size=8, every_n_steps=5, log_spaced_until=4, log_kernel_image=True
    )
    logger = TensorBoardLogger(str(tmp), name="", version="run", default_hp_metric=False)
    # 8 batches/epoch, accumulate 2 -> 4 optimizer steps per epoch, 12 steps = 3 epochs
    trainer = L.Trainer(
        **trainer_kwargs(
            tmp,
            max_steps=12,
            accumulate_grad_batches=2,
            logger=logger,
            log_every_n_steps=1,
            callbacks=[monitor],
        )
    )
    trainer.fit(LitLightning(n=64, batch_size=8))
    return trainer, monitor, read_events(str(tmp / "run"))


def test_scalars_are_logged_under_the_tracker_names(run):
    trainer, monitor, acc = run
    assert set(monitor.metric_names()) <= set(acc.Tags()["scalars"])
    assert {
        "ntk/rel_change",
        "lin/rel_error",
        "params/rel_change",
        "regime/lazy",
        "ntk_layer/net.0/rel_change",
        "ntk/alignment",
        "lin/agreement",
    } <= set(monitor.metric_names())


def test_steps_are_optimizer_steps_with_accumulation_and_rel_change_is_zero_at_step_0(run):
    trainer, monitor, acc = run
    rel = scalars(acc, "ntk/rel_change")
    # train start, log-spaced 1 2, cadence 5 10, train end 12 -- in optimizer steps, not batches
    assert sorted(rel) == [0, 1, 2, 5, 10, 12]
    assert len(acc.Scalars("ntk/rel_change")) == 6  # each step once
    assert rel[0] == 0.0 and all(rel[s] > 0 for s in (1, 2, 5, 10, 12))
    assert scalars(acc, "params/rel_change")[0] == 0.0
    # same x-axis as self.log: train_loss is logged at _batches_that_stepped too
    assert max(scalars(acc, "train_loss")) == 11


def test_custom_layout_histogram_and_image_per_measurement(run):
    _, _, acc = run
    config = acc.Tensors("custom_scalars__config__")
    assert len(config) == 1
    layout = layout_pb2.Layout.FromString(config[0].tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == [
        "kernel drift",
        "linearization",
        "spectrum",
        "parameters",
        "stability",
        "features",
    ]
    hist = acc.Histograms("ntk/eigenvalues")
    assert [h.step for h in hist] == [0, 1, 2, 5, 10, 12]
    assert hist[0].histogram_value.num == 8 * 3  # N*O eigenvalues of the full kernel
    assert [i.step for i in acc.Images("ntk/kernel")] == [0, 1, 2, 5, 10, 12]


def test_hparams_session_lists_the_monitor_settings_and_metrics(run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, _, acc = run
    content = acc.PluginTagToContent("hparams")
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    metric_tags = {m.name.tag for m in exp.experiment.metric_infos}
    hparam_names = {h.name for h in exp.experiment.hparam_infos}
    assert {"ntk/rel_change", "lin/rel_error"} <= metric_tags
    assert {"lazy_monitor/every_n_steps", "lazy_monitor/probe_size", "lr"} <= hparam_names


def test_callback_metrics_hold_the_last_measurement_as_tensors(run):
    trainer, monitor, acc = run
    value = trainer.callback_metrics["ntk/rel_change"]
    assert isinstance(value, torch.Tensor)
    assert value.item() == pytest.approx(scalars(acc, "ntk/rel_change")[12], rel=1e-6)


def test_early_stopping_can_monitor_kernel_drift(tmp_path):
    torch.manual_seed(0)
    stop = EarlyStopping(
        monitor="ntk/rel_change", mode="max", stopping_threshold=0.0, check_on_train_epoch_end=True
    )
    trainer = L.Trainer(
        **trainer_kwargs(
            tmp_path,
            max_steps=-1,
            max_epochs=5,
            callbacks=[KernelRegimeMonitor(probe_size=8, every_n_steps=4, per_layer=False), stop],
        )
    )
    trainer.fit(LitLightning(n=32, batch_size=8))
    assert trainer.current_epoch == 1 and stop.stopped_epoch == 0
