"""Kernel work split across DDP ranks vs every rank computing the whole kernel (issue 9).

    python benchmarks/bench_distributed.py            # 2 CPU ranks, 1 thread each, probe 64
    python benchmarks/bench_distributed.py --sharded  # FSDP2-sharded MLP vs one process

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
            json.dump({"times": self.times, "metrics": self.last_metrics}, f)


def _run(split: bool, steps: int, probe_size: int, out_dir: str) -> list[list[float]]:
    torch.manual_seed(0)
    monitor = _TimedMonitor(
        out_dir,
        probe_size=probe_size,
        every_n_steps=2,
        split_across_ranks=split,
        log_spaced_until=0,
        max_overhead=None,
        tensorboard="basic",
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


def _mlp(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(784, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, 10),
    )


def _sharded_worker(rank: int, port: int, width: int, probe_size: int, out_dir: str) -> None:
    """One rank: the MLP under fully_shard (every Linear and the root), a KernelTracker on it,
    start + 6 timed measurements after SGD steps, alternately with and without the row
    exchange; what the rank holds, written as JSON."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lazy_monitor import KernelTracker

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # one thread per rank: 2 ranks on 2 cores
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = _mlp(width)
    mesh = init_device_mesh("cpu", (2,))
    for i in (0, 2, 4):
        fully_shard(model[i], mesh=mesh)
    fully_shard(model, mesh=mesh)
    x = torch.randn(probe_size, 784, generator=torch.Generator().manual_seed(1))
    tracker = KernelTracker(model, x, kernel={"kind": "trace"}, per_layer=True)
    start = time.perf_counter()
    tracker.start()
    start_s = time.perf_counter() - start
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    times: dict[str, list[float]] = {"exchange": [], "each": []}
    for step in range(1, 7):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        # alternate: row exchange (W rows per backward) / every rank every row
        arm = "exchange" if step % 2 else "each"
        tracker.measurement.exchange_rows = arm == "exchange"
        t = time.perf_counter()
        metrics = tracker.measure(step)
        times[arm].append(time.perf_counter() - t)
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    snap = tracker._lin
    theta0 = sum(t.numel() * t.element_size() for t in snap.params0.values())
    j0 = sum(t.numel() * t.element_size() for t in (snap.j0 or {}).values())
    record = {
        "start_s": start_s,
        "times": times,
        "local_param_bytes": local,
        "theta0_bytes": theta0,
        "j0_bytes": j0,
        "estimated_bytes": tracker.kernel_config["estimated_bytes"],
        "metrics": metrics,
    }
    with open(os.path.join(out_dir, f"sharded{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()


def sharded(width: int, probe_size: int) -> dict[str, float]:
    """FSDP2 sharded MLP (2 ranks) vs the same MLP unsharded in this process: parameter bytes
    per rank and seconds per measurement (slowest rank), trace kernel, per-layer."""
    import socket

    import torch.multiprocessing as mp

    from lazy_monitor import KernelTracker

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_sharded_worker, args=(port, width, probe_size, d), nprocs=2)
        ranks = [json.load(open(os.path.join(d, f"sharded{r}.json"))) for r in (0, 1)]
    torch.set_num_threads(1)
    model = _mlp(width)
    x = torch.randn(probe_size, 784, generator=torch.Generator().manual_seed(1))
    tracker = KernelTracker(model, x, kernel={"kind": "trace"}, per_layer=True)
    tracker.start()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    single = []
    for step in range(1, 4):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        t = time.perf_counter()
        tracker.measure(step)
        single.append(time.perf_counter() - t)
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    slowest, each = (
        statistics.median(max(pair) for pair in zip(ranks[0]["times"][a], ranks[1]["times"][a]))
        for a in ("exchange", "each")
    )
    out = {
        "full_param_mib": full / 2**20,
        "rank_param_mib": max(r["local_param_bytes"] for r in ranks) / 2**20,
        "rank_theta0_mib": max(r["theta0_bytes"] for r in ranks) / 2**20,
        "rank_j0_mib": max(r["j0_bytes"] for r in ranks) / 2**20,
        "sharded_s": slowest,
        "sharded_each_s": each,
        "single_s": statistics.median(single),
    }
    print(
        f"sharded MLP 784-{width}-{width}-10 (P={full // 4}), N={probe_size}, kind='trace': "
        f"parameters per rank {out['rank_param_mib']:.2f} MiB (unsharded "
        f"{out['full_param_mib']:.2f} MiB), θ₀ snapshot per rank {out['rank_theta0_mib']:.2f} "
        f"MiB, J(θ₀) local rows {out['rank_j0_mib']:.2f} MiB; seconds per measurement "
        f"(slowest rank, median of 3): sharded with the row exchange {slowest:.2f} s, "
        f"sharded every rank every row {each:.2f} s, one process unsharded (engine) "
        f"{out['single_s']:.2f} s"
    )
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="steps per fit (measured every 2)")
    parser.add_argument("--probe-size", type=int, default=64)
    parser.add_argument(
        "--sharded", action="store_true", help="only the FSDP2 row (MLP, --width, --probe-size)"
    )
    parser.add_argument("--width", type=int, default=256, help="hidden width of the FSDP2 MLP")
    args = parser.parse_args(argv)
    if args.sharded:
        return sharded(args.width, args.probe_size)
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
