"""The default cadence and overhead budget on runs of 200, 2,000 and 20,000 steps.

A plain PyTorch loop trains a small MLP (Gaussian mixture, SGD) with ``MonitorSession`` and its
defaults (``every_n_steps=500``, ``log_spaced_until=512``, ``max_overhead=0.05``), next to other
budgets, and without the monitor, in one process: the runs alternate (monitor off / each
setting) and each figure is the median over ``--repeats``. Columns:

* ``measured``: measurements taken (reference and final included);
* ``share``: the monitor's own seconds (``monitor/seconds`` summed: measurements and listeners)
  over the fit's wall time with the monitor;
* ``slowdown``: fit wall time with the monitor over the median without, minus 1.

    python benchmarks/bench_cadence.py                   # ~2 min on 2 busy CPU cores
    python benchmarks/bench_cadence.py --lengths 200 2000 --repeats 3
    python benchmarks/bench_cadence.py --lengths 20000 --repeats 1 --budgets "5 % (default)"
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from lazy_monitor.tracking.session import MonitorSession

BUDGETS: dict[str, Optional[float]] = {"none": None, "5 % (default)": 0.05, "10 %": 0.10}


def _data(n: int = 4096, dim: int = 32, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(classes, dim, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, dim, generator=g), y


def _model(dim: int, width: int, classes: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, classes))


def fit(steps: int, budget: Any, width: int, batch: int) -> dict[str, float]:
    """One training run of ``steps`` SGD steps; ``budget`` "off" trains without the monitor."""
    x, y = _data()
    model = _model(x.shape[1], width, int(y.max()) + 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    order = torch.Generator().manual_seed(1)
    session = None
    t0 = time.perf_counter()
    if budget != "off":
        session = MonitorSession(probe_size=32, max_overhead=budget)
        session.start(model, optimizer=opt, data=torch.utils.data.TensorDataset(x, y))
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (batch,), generator=order)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if session is not None:
            session.step(model, step, optimizer=opt)
    if session is not None:
        session.finish(model, steps, optimizer=opt)
    wall = time.perf_counter() - t0
    if session is None:
        return {"wall": wall, "measured": 0, "seconds": 0.0}
    return {"wall": wall, "measured": session.num_measurements, "seconds": session.seconds}


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[200, 2000, 20000])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    args = p.parse_args(argv)
    budgets = {k: BUDGETS[k] for k in args.budgets}
    torch.set_num_threads(1)
    rows = []
    print(f"load {os.getloadavg()[0]:.1f}; MLP 32-{args.width}-10, batch {args.batch}, probe 32")
    print("| steps | budget | measured | share of fit time | slowdown | s/step off |")
    print("|---:|---|---:|---:|---:|---:|")
    for steps in args.lengths:
        runs: dict[str, list[dict[str, float]]] = {"off": [], **{k: [] for k in budgets}}
        for _ in range(args.repeats):  # alternate: off, each budget, off, ...
            runs["off"].append(fit(steps, "off", args.width, args.batch))
            for name, budget in budgets.items():
                runs[name].append(fit(steps, budget, args.width, args.batch))
        off = statistics.median(r["wall"] for r in runs["off"])
        for name in budgets:
            wall = statistics.median(r["wall"] for r in runs[name])
            share = statistics.median(r["seconds"] / r["wall"] for r in runs[name])
            measured = statistics.median(r["measured"] for r in runs[name])
            row = {"steps": steps, "budget": name, "measured": measured, "share": share,
                   "slowdown": wall / off - 1, "step_seconds": off / steps}  # fmt: skip
            rows.append(row)
            print(
                f"| {steps:,} | {name} | {measured:g} | {share:.1%} | {row['slowdown']:+.1%} "
                f"| {off / steps * 1e3:.2f} ms |",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
