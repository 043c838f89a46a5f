"""Wall-time overhead of KernelRegimeMonitor at default settings on small realistic CPU jobs.

    python benchmarks/bench_overhead.py                  # MLP-1024 and small CNN, 3000 steps
    python benchmarks/bench_overhead.py --steps 500 --repeats 1 --models mlp   # quick look
    python benchmarks/bench_overhead.py --budget --steps 1500   # max_overhead=0.03, CNN

``--budget`` (issue 9): the CNN job with ``every_n_steps=10`` -- a cadence that alone spends
most of the fit measuring (shown by a short unbudgeted fit of ``--probe-steps`` steps) -- fitted
with ``max_overhead=0.03`` and without the monitor, in the same process: the share of the
budgeted fit spent inside measurements, the measured steps, and the wall-time ratio.

For each model the script fits the same job with and without ``KernelRegimeMonitor()`` (default
arguments: probe of 32 training examples, ``every_n_steps`` default, measurement at train start
and end), alternating the two arms ``--repeats`` times so machine noise hits both, and prints the
median fit wall times, their ratio (the overhead), and the monitor's own measured share of the
monitored fits (time spent inside measurements / fit time; less sensitive to noise). A tiny warm-up
fit first pays one-off costs (imports, first torch.func call) that every process pays once.

Jobs (generated data, TensorBoardLogger in both arms):

* ``mlp``: 784-1024-1024-10 ReLU MLP, batch 128, SGD.
* ``cnn``: conv 3→32→64→128 (3×3, strides 1/2/2), global average pool, dense 10 on 3×32×32,
  batch 128, SGD.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any, Optional

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lazy_monitor.callbacks.lightning import KernelRegimeMonitor


def _network(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    if name == "mlp":
        net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 1024),
            nn.ReLU(),
            nn.Linear(1024, 1024),
            nn.ReLU(),
            nn.Linear(1024, 10),
        )
        return net, (1, 28, 28)
    if name == "cnn":
        net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(128, 10),
        )
        return net, (3, 32, 32)
    raise ValueError(f"unknown model {name!r}; use mlp or cnn")


class _Job(L.LightningModule):
    def __init__(self, model: str, n: int = 4096, batch_size: int = 128) -> None:
        super().__init__()
        self.net, self.shape = _network(model)
        self.n, self.batch_size = n, batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.n, *self.shape, generator=g)
        y = torch.randint(0, 10, (self.n,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size, shuffle=True)


class _StepsMonitor(KernelRegimeMonitor):
    """Records the measured steps (for the budget report)."""

    steps: list[int]

    def on_measurement(self, session: Any, step: int, metrics: Any, **kwargs: Any) -> None:
        if not kwargs.get("repeat"):
            self.steps = [*getattr(self, "steps", []), step]
        super().on_measurement(session, step, metrics, **kwargs)


def _fit(
    model: str,
    steps: int,
    monitored: bool,
    log_dir: str,
    batch_size: int = 128,
    **monitor_kwargs: Any,
) -> tuple[float, float]:
    torch.manual_seed(0)
    job = _Job(model, batch_size=batch_size)
    monitor: Optional[KernelRegimeMonitor] = _StepsMonitor(**monitor_kwargs) if monitored else None
    _fit.last_monitor = monitor  # type: ignore[attr-defined]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=50,
        logger=TensorBoardLogger(log_dir, name=model, default_hp_metric=False),
        callbacks=[monitor] if monitor else [],
    )
    start = time.perf_counter()
    trainer.fit(job)
    wall = time.perf_counter() - start
    return wall, (monitor.measure_seconds if monitor else 0.0)


def main(argv: Optional[list[str]] = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps per fit")
    parser.add_argument("--repeats", type=int, default=3, help="fits per arm (alternated)")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--budget", action="store_true", help="the max_overhead=0.03 case")
    parser.add_argument("--probe-steps", type=int, default=60, help="unbudgeted fit (--budget)")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch (--budget)")
    parser.add_argument("--probe-size", type=int, default=32, help="probe examples (--budget)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.budget:
        return _budget_case(args)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as log_dir:
        _fit("mlp", 3, True, log_dir)  # warm-up: one-off import / first-call costs
        print(
            f"default every_n_steps={KernelRegimeMonitor().every_n_steps}, "
            f"probe_size={KernelRegimeMonitor().probe_size}, steps={args.steps}, "
            f"repeats={args.repeats}, threads={torch.get_num_threads()}"
        )
        for model in args.models:
            plain, watched, share = [], [], []
            for _ in range(args.repeats):
                plain.append(_fit(model, args.steps, False, log_dir)[0])
                wall, inside = _fit(model, args.steps, True, log_dir)
                watched.append(wall)
                share.append(inside / wall)
            p, w = statistics.median(plain), statistics.median(watched)
            results[model] = {
                "plain_s": p,
                "monitored_s": w,
                "ratio": w / p,
                "measure_share": statistics.median(share),
            }
            print(
                f"{model}: without {p:.2f} s, with {w:.2f} s (medians of {args.repeats}); "
                f"ratio {w / p:.3f} (overhead {100 * (w / p - 1):+.1f} %); time inside "
                f"measurements {100 * statistics.median(share):.1f} % of the monitored fit"
            )
    return results


def _budget_case(args: Any) -> dict[str, dict[str, float]]:
    """CNN, every_n_steps=10: unbudgeted share, then max_overhead=0.03 vs no monitor."""
    with tempfile.TemporaryDirectory() as log_dir:
        _fit("mlp", 3, True, log_dir)  # warm-up
        print(
            f"threads={torch.get_num_threads()}, steps={args.steps}, batch={args.batch_size}, "
            f"probe={args.probe_size}"
        )
        common = {"batch_size": args.batch_size, "probe_size": args.probe_size, "every_n_steps": 10}
        wall, inside = _fit("cnn", args.probe_steps, True, log_dir, **common)
        free_share = inside / wall
        print(
            f"cnn every_n_steps=10 without budget ({args.probe_steps} steps): "
            f"{100 * free_share:.1f} % of {wall:.1f} s inside measurements"
        )
        plain, _ = _fit("cnn", args.steps, False, log_dir, batch_size=args.batch_size)
        wall, inside = _fit("cnn", args.steps, True, log_dir, **common, max_overhead=0.03)
        monitor = _fit.last_monitor  # type: ignore[attr-defined]
        share = inside / wall
        print(
            f"cnn every_n_steps=10 max_overhead=0.03 ({args.steps} steps): {100 * share:.2f} % "
            f"of {wall:.1f} s inside {monitor.num_measurements} measurements at steps "
            f"{monitor.steps}; without monitor {plain:.1f} s, ratio {wall / plain:.3f}"
        )
    return {
        "budget": {
            "free_share": free_share,
            "share": share,
            "measurements": float(monitor.num_measurements),
            "ratio": wall / plain,
        }
    }


if __name__ == "__main__":
    main()
