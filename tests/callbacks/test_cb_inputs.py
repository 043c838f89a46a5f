"""What the monitor evaluates: dict batches, submodules, compiled and wrapped networks, examples."""

from __future__ import annotations

import os
import sys

import lightning.pytorch as L
import pytest
import torch
from _cb_helpers import LitLightning, RecordingLogger, make_data, trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lazy_monitor.callbacks.lightning import KernelRegimeMonitor
from lazy_monitor.tracking.network import resolve_submodule as _resolve_submodule

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _DictData(Dataset):
    def __init__(self) -> None:
        self.x, self.y = make_data(32).tensors

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"features": self.x[i], "label": self.y[i], "id": i}


class _DictLit(LitLightning):
    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["features"]), batch["label"])

    def train_dataloader(self):
        return DataLoader(_DictData(), batch_size=8)


def test_dict_batches_use_batch_to_probe_and_fail_clearly_without_it(tmp_path):
    monitor = KernelRegimeMonitor(
        probe_size=8,
        every_n_steps=2,
        batch_to_probe=lambda b: (b["features"], b["label"]),
        log_spaced_until=0,
        max_overhead=None,
    )
    logger = RecordingLogger()
    L.Trainer(**trainer_kwargs(tmp_path, max_steps=2, logger=logger, callbacks=[monitor])).fit(
        _DictLit()
    )
    assert "ntk/alignment" in logger.calls[0][1] and monitor.tracker.probe_size == 8
    trainer = L.Trainer(
        **trainer_kwargs(
            tmp_path,
            max_steps=2,
            callbacks=[KernelRegimeMonitor(probe_size=8, log_spaced_until=0, max_overhead=None)],
        )
    )
    with pytest.raises(TypeError, match="batch_to_probe=lambda b"):
        trainer.fit(_DictLit())
    assert trainer.global_step == 0


def test_submodule_is_monitored_under_its_own_names_and_a_wrong_path_fails_at_setup(tmp_path):
    monitor = KernelRegimeMonitor(
        probe_size=8, every_n_steps=2, submodule="net", log_spaced_until=0, max_overhead=None
    )
    L.Trainer(**trainer_kwargs(tmp_path, max_steps=2, callbacks=[monitor])).fit(LitLightning())
    assert "ntk_layer/0/rel_change" in monitor.metric_names()
    trainer = L.Trainer(
        **trainer_kwargs(
            tmp_path,
            callbacks=[
                KernelRegimeMonitor(submodule="nett", log_spaced_until=0, max_overhead=None)
            ],
        )
    )
    with pytest.raises(ValueError, match=r"has no submodule 'nett' \(its children: \['net'\]\)"):
        trainer.fit(LitLightning())


def test_compiled_and_ddp_wrapped_networks_are_unwrapped():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    holder = nn.Module()
    holder.net = torch.compile(net, backend="eager")
    assert _resolve_submodule(holder, "net") is net
    assert _resolve_submodule(torch.compile(holder, backend="eager"), "net") is net
    dp = nn.DataParallel(net)  # the .module wrapper pattern DDP shares, without a process group
    assert _resolve_submodule(dp, None) is net


def test_probe_with_all_one_class_drops_targets_with_a_warning(tmp_path):
    class OneClass(LitLightning):
        def train_dataloader(self):
            x, _ = make_data(16).tensors
            return DataLoader(
                torch.utils.data.TensorDataset(x, torch.zeros(16, dtype=torch.long)), batch_size=8
            )

    monitor = KernelRegimeMonitor(
        probe_size=8, every_n_steps=2, log_spaced_until=0, max_overhead=None
    )
    with pytest.warns(
        UserWarning, match="all have class 0: ntk/alignment and lin/agreement are undefined"
    ):
        L.Trainer(**trainer_kwargs(tmp_path, max_steps=2, callbacks=[monitor])).fit(OneClass())
    assert "ntk/alignment" not in monitor.metric_names()


def test_quickstart_example_runs_and_reports_the_regime(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import lightning_quickstart

    final = lightning_quickstart.main(
        [
            "--steps",
            "4",
            "--width",
            "16",
            "--n-train",
            "64",
            "--probe-size",
            "8",
            "--every-n-steps",
            "2",
            "--log-dir",
            str(tmp_path),
        ]
    )
    assert final["ntk/rel_change"] > 0 and final["regime/lazy"] in (0.0, 1.0)
    assert any(f.startswith("events.out") for _, _, fs in os.walk(tmp_path) for f in fs)


class _OddTargetsLit(LitLightning):
    """Batches ``(x, y)`` whose ``y`` the alignment cannot use: (N, T) labels or wide floats."""

    def __init__(self, targets: str) -> None:
        super().__init__()
        self.targets = targets

    def training_step(self, batch, batch_idx):
        x, _ = batch
        return self(x).pow(2).mean()

    def train_dataloader(self):
        x, y = make_data(32).tensors
        if self.targets == "sequence":
            y = torch.stack([y, y.flip(0)], dim=1)  # integer (N, 2)
        else:
            y = torch.randn(32, 5, generator=torch.Generator().manual_seed(0))  # 5 != 3 outputs
        return DataLoader(TensorDataset(x, y), batch_size=8)


@pytest.mark.parametrize("targets", ["sequence", "wide_float"])
def test_drawn_targets_the_alignment_cannot_use_are_dropped_with_a_warning(tmp_path, targets):
    monitor = KernelRegimeMonitor(
        probe_size=8, every_n_steps=2, log_spaced_until=0, max_overhead=None
    )
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=2, callbacks=[monitor]))
    with pytest.warns(
        UserWarning, match="targets of the drawn probe cannot be used.*returning x alone"
    ):
        trainer.fit(_OddTargetsLit(targets))
    assert trainer.global_step == 2 and "ntk/alignment" not in monitor.metric_names()
    assert monitor.state_dict()["probe_y"] is None


def test_explicit_probe_targets_that_do_not_fit_still_fail_at_train_start(tmp_path):
    x, y = make_data(8).tensors
    monitor = KernelRegimeMonitor(
        probe=(x, torch.stack([y, y], dim=1)), log_spaced_until=0, max_overhead=None
    )
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=2, callbacks=[monitor]))
    with pytest.raises(ValueError, match=r"integer targets are class indices"):
        trainer.fit(LitLightning())
    assert trainer.global_step == 0
