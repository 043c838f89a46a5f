"""KernelRegimeMonitor with default arguments on a tiny GPT-2 LightningModule (issue 8)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from _cb_helpers import trainer_kwargs
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")

from lazy_monitor.callbacks.lightning import KernelRegimeMonitor  # noqa: E402


class _LitGpt2(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        cfg = transformers.GPT2Config(vocab_size=31, n_positions=8, n_embd=8, n_layer=1, n_head=2)
        torch.manual_seed(0)
        self.net = transformers.GPT2LMHeadModel(cfg)

    def forward(self, ids: torch.Tensor):  # noqa: ANN201 - a ModelOutput
        return self.net(ids)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        (ids,) = batch
        return self.net(ids, labels=ids).loss

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self) -> DataLoader:
        ids = torch.randint(0, 31, (16, 4), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(ids), batch_size=4)


def test_default_monitor_fits_a_tiny_gpt2_and_logs_the_resolved_kernel(tmp_path, caplog):
    monitor = KernelRegimeMonitor(
        probe_size=3, every_n_steps=2, log_spaced_until=0, max_overhead=None
    )
    assert monitor.kernel.kind == "auto"
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=4, callbacks=[monitor]))
    with caplog.at_level(logging.INFO, logger="lazy_monitor"):
        trainer.fit(_LitGpt2())
    assert monitor.num_measurements == 3  # steps 0, 2, 4
    cfg = monitor.tracker.kernel_config
    assert cfg["kind"] in ("full", "trace") and monitor.tracker.num_outputs == 4 * 31
    assert any("KernelRegimeMonitor measures kind=" in r.getMessage() for r in caplog.records)
    hp = monitor.session.hparams()
    assert hp["lazy_monitor/kernel_kind"] == cfg["kind"] and hp["lazy_monitor/kind"] == "auto"
    metrics = trainer.callback_metrics
    assert float(metrics["health/nonfinite"]) == 0.0
    assert math.isfinite(float(metrics["ntk/rel_change"])) and float(metrics["ntk/rel_change"]) > 0
