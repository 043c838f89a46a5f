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
        probe_size=8, every_n_steps=5, log_spaced_until=4, tensorboard="full", max_overhead=None
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
    tags = set(acc.Tags()["scalars"])
    # health/* only once something is wrong (never here); everything else under its name
    assert {n for n in monitor.metric_names() if not n.startswith("health/")} <= tags
    assert "health/nonfinite" not in tags and "health/nonfinite" in monitor.metric_names()
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
    assert [(c.title, c.closed) for c in layout.category] == [
        ("drift (log10)", False),
        ("kernel drift", False),
        ("linearization", False),
        ("spectrum", True),
        ("parameters", True),
        ("stability", True),
        ("features", False),
        ("monitor cost", True),
        ("health", True),
    ]
    hist = acc.Histograms("ntk/eigenvalues")
    assert [h.step for h in hist] == [0, 1, 2, 5, 10, 12]
    assert hist[0].histogram_value.num == 8 * 3  # N*O eigenvalues of the full kernel
    assert [i.step for i in acc.Images("images/ntk_kernel")] == [0, 1, 2, 5, 10, 12]


def test_hparams_columns_are_the_module_hparams_and_sessions_keep_the_monitor_settings(run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    from lazy_monitor.callbacks._tensorboard import HPARAMS_METRICS

    _, _, acc = run
    content = acc.PluginTagToContent("hparams")
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    assert [m.name.tag for m in exp.experiment.metric_infos] == list(HPARAMS_METRICS)
    differs = {h.name: h.differs for h in exp.experiment.hparam_infos}
    # the module's save_hyperparameters values are the columns that differ between runs
    assert differs["lr"] and differs["batch_size"]
    # the monitor's settings (the same in a sweep) are no columns, but each session has them
    assert not any(name.startswith("lazy_monitor/") for name in differs)
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["lr"].number_value > 0
    assert start.session_start_info.hparams["lazy_monitor/every_n_steps"].number_value == 5
    # every metric of the table is a logged scalar series (TensorBoard reads the values there)
    assert set(HPARAMS_METRICS) <= set(acc.Tags()["scalars"])


def test_log10_companions_skip_the_reference_and_match_the_metric(run):
    import math

    _, _, acc = run
    rel = scalars(acc, "ntk/rel_change")
    log = scalars(acc, "drift/log10_ntk_rel_change")
    assert sorted(log) == [1, 2, 5, 10, 12]  # no step 0, where the change is 0 by definition
    for step, value in log.items():
        assert value == pytest.approx(math.log10(max(rel[step], 1e-8)), abs=1e-6)
    assert "drift_layer/net.0/log10_rel_change" in acc.Tags()["scalars"]


def test_run_summary_text_and_layer_heatmap(run):
    _, _, acc = run
    (summary,) = acc.Tensors("lazy_monitor/1_verdict/text_summary")
    text = summary.tensor_proto.string_val[0].decode()
    assert text.startswith("### lazy_monitor: ") and "| `ntk/rel_change` |" in text
    assert "ntk/rel_change ≤ 0.1" in text
    # heatmap at measurements 2, 4 and at the end (6 measurements)
    assert [i.step for i in acc.Images("images/layer_drift")] == [1, 5, 12]


def test_thresholds_are_flat_series_in_their_metrics_charts(run):
    trainer, _, acc = run
    # the default thresholds at the first measurement (step 0) and at train end (12),
    # TensorBoard only (not in callback_metrics)
    flat = scalars(acc, "threshold/ntk/rel_change")  # float32 in the event file
    assert flat == dict.fromkeys([0, 12], pytest.approx(0.1))
    assert "threshold/ntk/rel_change" not in trainer.callback_metrics
    log = scalars(acc, "threshold/drift/log10_ntk_rel_change")
    assert list(log.values()) == [pytest.approx(-1.0)] * 2
    layout = layout_pb2.Layout.FromString(
        acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    )
    tags = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert "^threshold/drift/log10_ntk_rel_change$" in tags["log10 |K-K0|/|K0|"]
    assert "^threshold/lin/rel_error$" in tags["relative error |f-f_lin|"]


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
            callbacks=[
                KernelRegimeMonitor(
                    probe_size=8,
                    every_n_steps=4,
                    per_layer=False,
                    log_spaced_until=0,
                    max_overhead=None,
                ),
                stop,
            ],
        )
    )
    trainer.fit(LitLightning(n=32, batch_size=8))
    assert trainer.current_epoch == 1 and stop.stopped_epoch == 0


def test_run_summary_counts_are_pluralised():
    from lazy_monitor.callbacks._tensorboard import run_summary

    def text(n: int) -> str:
        summary = run_summary(
            step=3,
            lazy=True,
            reason="",
            thresholds=[],
            final={},
            maxima={},
            transitions=n,
            measurements=n,
            seconds=0.5,
        )
        return summary.splitlines()[2]

    assert text(1).endswith("1 measurement (0.5 s), 1 regime transition")
    assert text(2).endswith("2 measurements (0.5 s), 2 regime transitions")
    assert text(0).endswith("0 measurements (0.5 s), 0 regime transitions")
