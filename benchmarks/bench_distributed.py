"""Kernel work split across DDP ranks vs every rank computing the whole kernel (issue 9).

    python benchmarks/bench_distributed.py            # 2 CPU ranks, 1 thread each, probe 64

Fits the CNN job of ``bench_overhead.py`` (conv 3→32→64→128, 3×32×32 inputs, 10 outputs) under
``strategy="ddp_spawn"`` with 2 CPU processes (gloo), one torch thread each, with
``KernelRegimeMonitor(probe_size=64, every_n_steps=2)`` for ``--steps`` steps, once with
``split_across_ranks=True`` and once with ``False``, in the same run. Each rank times each of
its measurements; per measurement the slowest rank's time is what training waits for. Prints
those times and the ratio of the medians (split / unsplit).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import lightning.pytorch as L
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_overhead import _Job  # noqa: E402

from lazy_monitor.callbacks.lightning import KernelRegimeMonitor  # noqa: E402


class _TimedMonitor(KernelRegimeMonitor):
    """Each rank records the wall time of each measurement (written at train end)."""

    def __init__(self, out_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir
        self.times: list[float] = []

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        torch.set_num_threads(1)  # one thread per rank: 2 ranks on 2 cores
        super().setup(trainer, pl_module, stage)

    def _timed(self, fn: Callable[..., dict[str, float]], *args: Any) -> dict[str, float]:
        start = time.perf_counter()
        out = super()._timed(fn, *args)
        self.times.append(time.perf_counter() - start)
        return out

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_end(trainer, pl_module)
        path = os.path.join(self.out_dir, f"rank{trainer.global_rank}.json")
        with open(path, "w") as f:
            json.dump({"times": self.times, "metrics": self._last_metrics}, f)


def _run(split: bool, steps: int, probe_size: int, out_dir: str) -> list[list[float]]:
    torch.manual_seed(0)
    monitor = _TimedMonitor(
        out_dir,
        probe_size=probe_size,
        every_n_steps=2,
        split_across_ranks=split,
        log_hparams=False,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    trainer.fit(_Job("cnn", n=512, batch_size=64))
    ranks = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in (0, 1)]
    assert ranks[0]["metrics"] == ranks[1]["metrics"] or not split
    return [r["times"] for r in ranks]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="steps per fit (measured every 2)")
    parser.add_argument("--probe-size", type=int, default=64)
    args = parser.parse_args(argv)
    out: dict[str, float] = {}
    for split in (False, True):
        with tempfile.TemporaryDirectory() as d:
            times = _run(split, args.steps, args.probe_size, d)
        slowest = [max(pair) for pair in zip(*times)]
        name = "split" if split else "unsplit"
        out[name] = statistics.median(slowest)
        print(
            f"{name}: per-measurement times rank0 {[round(t, 2) for t in times[0]]}, rank1 "
            f"{[round(t, 2) for t in times[1]]}; slowest-rank median {out[name]:.2f} s"
        )
    out["ratio"] = out["split"] / out["unsplit"]
    print(f"split / unsplit (slowest rank, median per measurement): {out['ratio']:.3f}")
    return out


if __name__ == "__main__":
    main()
