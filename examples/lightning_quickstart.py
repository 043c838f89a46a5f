"""Quickstart: is my Lightning model training in the lazy (NTK) regime?

    python examples/lightning_quickstart.py                # ~20 s on a CPU
    tensorboard --logdir lightning_logs_quickstart         # "Custom Scalars": drift vs threshold

Adds one callback, :class:`KernelRegimeMonitor`, to a plain ``LightningModule`` (an MLP in the NTK
parameterisation classifying a generated Gaussian mixture) and one :class:`KernelDriftGate` that
warns when the kernel has moved by more than 50 %. Try ``--width 64`` vs ``--width 2048``: wider
networks stay lazier (``ntk/rel_change`` shrinks roughly like ``width**-0.5``, Lee et al. 2019).
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lazy_monitor import KernelDriftGate, KernelRegimeMonitor
from lazy_monitor.demo.datasets import gaussian_mixture
from lazy_monitor.demo.models import mlp


class Classifier(pl.LightningModule):
    """A LightningModule like any other: nothing in it knows about the monitor."""

    def __init__(self, width: int, lr: float, n_train: int, dim: int = 16, classes: int = 4):
        super().__init__()
        self.save_hyperparameters()
        self.net = mlp(dim, width, classes, depth=2, seed=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        x, y = gaussian_mixture(h.n_train, h.dim, h.classes, seed=0)
        return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    """Train with the monitor; return the final metrics (also printed)."""
    parser = argparse.ArgumentParser(description="KernelRegimeMonitor quickstart")
    parser.add_argument("--width", type=int, default=512, help="hidden width of the MLP")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=0.5, help="SGD learning rate")
    parser.add_argument("--n-train", type=int, default=2048, help="generated training examples")
    parser.add_argument("--probe-size", type=int, default=32, help="probe examples for the NTK")
    parser.add_argument("--every-n-steps", type=int, default=50, help="measurement cadence")
    parser.add_argument("--log-dir", default="lightning_logs_quickstart", help="TensorBoard dir")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # tiny CPU demo: more threads only spin-wait (10x slower if busy)
    pl.seed_everything(0, verbose=False)
    monitor = KernelRegimeMonitor(
        probe_size=args.probe_size,  # drawn from the training set at train start, seeded
        every_n_steps=args.every_n_steps,
        log_spaced_until=args.every_n_steps,  # also steps 1, 2, 4, ...: kernels move early
        max_overhead=None,  # a tiny model: measure on the cadence, not within 5 % of its time
    )
    gate = KernelDriftGate({"ntk/rel_change": 0.5}, patience=2, action="warn")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        logger=TensorBoardLogger(args.log_dir, name=f"width{args.width}", default_hp_metric=False),
        callbacks=[monitor, gate],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=10,
    )
    trainer.fit(Classifier(args.width, args.lr, args.n_train))

    final = {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k}
    print(f"\nwidth {args.width}, {trainer.global_step} steps, probe of {monitor.probe_size}:")
    for name in ("ntk/rel_change", "params/rel_change", "lin/rel_error", "regime/lazy"):
        print(f"  {name:20s} {final[name]:.4f}")
    verdict = "lazy (kernel regime)" if final["regime/lazy"] == 1.0 else "NOT lazy (features moved)"
    print(f"  -> {verdict}; TensorBoard: tensorboard --logdir {args.log_dir}")
    return final


if __name__ == "__main__":
    main()
