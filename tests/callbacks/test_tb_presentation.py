"""The presentation helpers of lazy_monitor.callbacks._tensorboard on a plain SummaryWriter."""

from __future__ import annotations

import sys
import warnings

import pytest
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter

from lazy_monitor.callbacks import _tensorboard as tb


def _read(path) -> ea.EventAccumulator:
    acc = ea.EventAccumulator(str(path), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
    acc.Reload()
    return acc


def test_monitor_settings_are_columns_only_without_module_hparams(tmp_path):
    settings = {"lazy_monitor/every_n_steps": 10, "lazy_monitor/kind": "auto"}
    for name, model in (("bare", {}), ("module", {"width": 64, "opt": {"lr": 0.1}})):
        writer = SummaryWriter(str(tmp_path / name))
        assert tb.log_hparams(writer, settings, model_hparams=model)
        writer.close()
        content = _read(tmp_path / name).PluginTagToContent("hparams")
        exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
        start = plugin_data_pb2.HParamsPluginData.FromString(
            content["_hparams_/session_start_info"]
        )
        columns = {h.name: h.differs for h in exp.experiment.hparam_infos}
        if model:  # the module's values (nested ones flattened) are the columns
            assert columns == {"width": True, "opt/lr": True}
        else:
            assert columns == dict.fromkeys(settings, False)
        # every session keeps the monitor's settings either way
        assert start.session_start_info.hparams["lazy_monitor/kind"].string_value == "auto"
        assert [m.name.tag for m in exp.experiment.metric_infos][0] == "regime/lazy"


def test_thresholds_are_due_at_powers_of_eight():
    assert [c for c in range(0, 600) if tb.thresholds_due(c)] == [1, 8, 64, 512]


def test_heatmap_without_matplotlib_warns_once_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(tb, "_heatmap_warned", False)
    writer = SummaryWriter(str(tmp_path))
    with pytest.warns(UserWarning, match=r'pip install "lazy-monitor\[viz\]"'):
        assert not tb.write_layer_heatmap(writer, [0, 1], ["fc"], [[0.0], [0.1]], 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: silent
        assert not tb.write_layer_heatmap(writer, [0, 1], ["fc"], [[0.0], [0.1]], 2)
    writer.close()
    assert tb.LAYER_IMAGE_TAG not in _read(tmp_path).Tags()["images"]


def test_heatmap_is_one_image_under_the_images_prefix(tmp_path):
    pytest.importorskip("matplotlib")
    writer = SummaryWriter(str(tmp_path))
    assert tb.write_layer_heatmap(writer, [0, 1, 2], ["fc1", "readout"], [[0, 0], [0.1, 0.01], [0.2, 0.02]], 2)  # fmt: skip
    writer.close()
    assert tb.LAYER_IMAGE_TAG.startswith("images/") and tb.IMAGE_TAG.startswith("images/")
    (image,) = _read(tmp_path).Images(tb.LAYER_IMAGE_TAG)
    assert image.step == 2 and image.width <= 500  # small canvas, large type: readable in a card
