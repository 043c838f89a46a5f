"""A width × learning-rate sweep in which every run is gated by kernel-drift thresholds.

Each configuration trains an NTK-parameterised MLP on a generated Gaussian mixture with
:class:`KernelRegimeMonitor` and :class:`KernelDriftGate`. The gate stops a run as soon as its
empirical NTK has moved more than ``--max-ntk`` (relative Frobenius change ‖K_t − K₀‖/‖K₀‖) or
the linearization error ``lin/rel_error`` exceeds ``--max-lin``, so a sweep spends no compute on
configurations that have left the lazy regime. Narrow nets with a large learning rate trip the
gate; wide nets with a small one train to the end::

    python examples/gated_sweep.py                                  # 4 runs, < 30 s on CPU
    python examples/gated_sweep.py --widths 64 1024 --lrs 0.5 4 --max-ntk 0.05
    lazy-monitor report gated_sweep_runs                            # the same runs, afterwards
    lazy-monitor check gated_sweep_runs --max ntk/rel_change=0.1    # exit 1: some run drifted

Uses the ``pytorch_lightning`` adapters (``lazy_monitor.callbacks.pytorch_lightning``); with
``lightning.pytorch`` import the same classes from ``lazy_monitor.callbacks.lightning``.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from lazy_monitor.callbacks.pytorch_lightning import KernelDriftGate, KernelRegimeMonitor
from lazy_monitor.demo.datasets import gaussian_mixture, make_loader
from lazy_monitor.demo.models import mlp


class Classifier(pl.LightningModule):
    """An NTK-parameterised MLP trained with SGD and cross-entropy."""

    def __init__(self, dim: int, width: int, classes: int, lr: float, seed: int) -> None:
        super().__init__()
        self.lr = lr
        self.net = mlp(dim, width, classes, depth=2, seed=seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[32, 1024], help="hidden widths")
    p.add_argument("--lrs", type=float, nargs="+", default=[0.2, 3.0], help="SGD learning rates")
    p.add_argument("--steps", type=int, default=150, help="maximum optimizer steps per run")
    p.add_argument("--every-n-steps", type=int, default=10, help="measurement (and gate) cadence")
    p.add_argument("--max-ntk", type=float, default=0.1, help="gate: max ntk/rel_change")
    p.add_argument("--max-lin", type=float, default=0.2, help="gate: max lin/rel_error")
    p.add_argument("--patience", type=int, default=1, help="violating measurements that trip")
    p.add_argument("--out", default="gated_sweep_runs", help="TensorBoard log directory")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.widths) < 1 or args.steps < 1 or args.every_n_steps < 1 or args.patience < 1:
        p.error("--widths, --steps, --every-n-steps and --patience must be >= 1")
    if min(args.lrs) <= 0 or args.max_ntk <= 0 or args.max_lin <= 0:
        p.error("--lrs, --max-ntk and --max-lin must be > 0")
    return args


def run_one(width: int, lr: float, args: argparse.Namespace) -> dict[str, Any]:
    """Train one configuration under the gate; return what happened."""
    x, y = gaussian_mixture(1024, 16, 4, seed=args.seed)
    loader = make_loader(x, y, batch_size=64, seed=args.seed)
    monitor = KernelRegimeMonitor(
        probe=(x[:32], y[:32]),
        every_n_steps=args.every_n_steps,  # the gate checks exactly at these steps:
        log_spaced_until=0,  # no extra early measurements
        max_overhead=None,  # and none skipped to save time
        submodule="net",
    )
    gate = KernelDriftGate(
        {"ntk/rel_change": args.max_ntk, "lin/rel_error": args.max_lin},
        patience=args.patience,
        action="stop",
    )
    name = f"w{width:05d}_lr{lr:g}"
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(args.out, name=name, default_hp_metric=False),
        callbacks=[monitor, gate],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=args.every_n_steps,
    )
    trainer.fit(Classifier(16, width, 4, lr, args.seed), train_dataloaders=loader)
    # The monitor mirrors its last measurement into callback_metrics (as EarlyStopping reads).
    final = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return {
        "run": name,
        "width": width,
        "lr": lr,
        "steps": int(trainer.global_step),
        "ntk/rel_change": final.get("ntk/rel_change", float("nan")),
        "lin/rel_error": final.get("lin/rel_error", float("nan")),
        "stopped": bool(gate.tripped),
        # a trip at the final measurement (train end) flags the run but does not shorten it
        "completed": int(trainer.global_step) >= args.steps,
        "reason": gate.reason or "",
    }


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    """Run the sweep, print one line per configuration; return the per-run results."""
    args = _parse(argv)
    torch.set_num_threads(1)  # tiny CPU demo: more threads only spin-wait (10x slower if busy)
    results = []
    quiet = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.WARNING)  # hide the per-fit device banners
    try:
        with warnings.catch_warnings():
            # The gate's own KernelDriftWarning says why a run stopped; we print it below.
            warnings.simplefilter("ignore")
            for width in args.widths:
                for lr in args.lrs:
                    results.append(run_one(width, lr, args))
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)

    print(
        f"gate: ntk/rel_change <= {args.max_ntk:g} and lin/rel_error <= {args.max_lin:g} "
        f"(patience {args.patience}, checked every {args.every_n_steps} steps)"
    )
    print(f"{'run':<16} {'steps':>6} {'ntk/rel_change':>15} {'lin/rel_error':>14}  outcome")
    for r in results:
        if not r["stopped"]:
            outcome = "completed (lazy throughout)"
        elif r["completed"]:
            outcome = f"FLAGGED at end (completed): {r['reason']}"
        else:
            outcome = f"STOPPED: {r['reason']}"
        print(
            f"{r['run']:<16} {r['steps']:>6} {r['ntk/rel_change']:>15.4g} "
            f"{r['lin/rel_error']:>14.4g}  {outcome}"
        )
    kept = [r["run"] for r in results if not r["stopped"]]
    print(f"configurations that stayed lazy: {', '.join(kept) if kept else 'none'}")
    print(f"logs: tensorboard --logdir {args.out}")
    return results


if __name__ == "__main__":
    main()
