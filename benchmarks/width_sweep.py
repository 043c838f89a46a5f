"""Width sweep: how far from the lazy regime does an NTK-parameterised MLP move, per width?

Trains the same MLP architecture at several widths on the same data, with the same learning
rate, number of steps and seeds (NTK parameterization, full-batch gradient descent), and reports
the final ``ntk/rel_change``, ``params/rel_change``, ``lin/rel_error`` and the first layer's
``params_layer/fc1/rel_change`` from :class:`lazy_monitor.KernelTracker`, averaged over seeds,
plus the least-squares slope of ``log(metric)`` against ``log(width)``.

What to expect (width ``n``, fixed depth, learning rate and steps):

* Lee et al. 2019 ("Wide Neural Networks of Any Depth Evolve as Linear Models Under Gradient
  Descent", Thm 2.1) bound the relative change of the NTK and of the weights by
  ``O(n^{-1/2})``: slopes must be **at most** about ``-1/2``.
* The leading-order change of the NTK under gradient descent is ``O(1/n)`` (Dyer & Gur-Ari
  2020, "Asymptotics of Wide Networks from Feynman Diagrams"; Huang & Yau 2020, "Dynamics of
  Deep Neural Networks and Neural Tangent Hierarchy"): first-order contributions of the hidden
  units have random signs and cancel. Expect ``ntk/rel_change`` and ``lin/rel_error`` slopes
  near ``-1`` when the learning rate is below the catapult threshold ``2/λmax``
  (Lewkowycz et al. 2020); above it the kernel moves by O(1) at every width (slope ≈ 0).
* ``‖Δθ‖ = O(1)`` in NTK parameterization, while ``‖θ₀‖ ∝ n`` once there is an ``n × n`` hidden
  layer: ``params/rel_change`` has slope ≈ ``-1`` for depth ≥ 2 and ≈ ``-1/2`` for depth 1.
  ``params_layer/fc1/rel_change`` is the first layer's movement over the *whole* ``‖θ₀‖``
  (its share of ``params/rel_change``), so it has the same slopes; the first layer's own ratio
  ``‖ΔW₁‖ / ‖W₁,₀‖`` (``n × d``, ``‖W₁,₀‖ ∝ √n``) has slope ≈ ``-1/2`` at any depth.

Run::

    python benchmarks/width_sweep.py                      # defaults: widths 64..2048, ~1 min
    python benchmarks/width_sweep.py --widths 64 128 256 --steps 20 --seeds 1
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from lazy_monitor import KernelTracker
from lazy_monitor.demo.datasets import gaussian_mixture, teacher_regression
from lazy_monitor.demo.models import mlp

METRICS = ("ntk/rel_change", "params/rel_change", "lin/rel_error", "params_layer/fc1/rel_change")


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    p.add_argument("--depth", type=int, default=2, help="hidden layers")
    p.add_argument(
        "--task",
        choices=["regression", "classification"],
        default="regression",
        help="teacher regression with MSE, or a Gaussian mixture with cross-entropy",
    )
    p.add_argument("--n-train", type=int, default=64, help="training examples (full batch)")
    p.add_argument("--n-probe", type=int, default=16, help="probe examples for the kernel")
    p.add_argument("--dim", type=int, default=8, help="input dimension")
    p.add_argument("--outputs", type=int, default=2, help="outputs (classes for classification)")
    p.add_argument("--steps", type=int, default=50, help="gradient-descent steps")
    p.add_argument("--lr", type=float, default=0.5, help="learning rate (same for all widths)")
    p.add_argument("--seeds", type=int, default=3, help="initialisations averaged per width")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (None: keep)")
    return p.parse_args(argv)


def _data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    if args.task == "classification":
        return gaussian_mixture(args.n_train, args.dim, args.outputs, seed=0)
    return teacher_regression(args.n_train, args.dim, args.outputs, seed=0)


def run_width(width: int, seed: int, x: torch.Tensor, y: torch.Tensor, args) -> dict[str, float]:
    """Train one MLP and return the tracker's metrics after ``args.steps`` steps."""
    model = mlp(x.shape[1], width, args.outputs, depth=args.depth, seed=seed)
    probe = slice(0, args.n_probe)
    tracker = KernelTracker(model, x[probe], targets=y[probe])
    tracker.start()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    for _ in range(args.steps):
        opt.zero_grad()
        out = model(x)
        if args.task == "classification":
            loss = nn.functional.cross_entropy(out, y)
        else:
            loss = 0.5 * (out - y).square().sum(1).mean()
        loss.backward()
        opt.step()
    result = tracker.measure(args.steps)
    result["loss"] = float(loss.detach())
    return result


def loglog_slope(widths: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of ``log(values)`` against ``log(widths)`` (NaN if undefined)."""
    pts = [(math.log(w), math.log(v)) for w, v in zip(widths, values) if v > 0 and math.isfinite(v)]
    if len(pts) < 2:
        return math.nan
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    """Run the sweep, print a table and the fitted slopes; return ``{metric: slope}``."""
    args = _parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    x, y = _data(args)
    print(
        f"task={args.task} n_train={args.n_train} n_probe={args.n_probe} dim={args.dim} "
        f"outputs={args.outputs} depth={args.depth} steps={args.steps} lr={args.lr} "
        f"seeds={args.seeds} (NTK parameterization, full-batch GD)"
    )
    print(
        f"{'width':>6} "
        + " ".join(f"{m.replace('_layer', ''):>18}" for m in METRICS)
        + f" {'loss':>8} {'s':>6}"
    )
    rows = {}
    for width in args.widths:
        t0 = time.perf_counter()
        runs = [run_width(width, seed, x, y, args) for seed in range(args.seeds)]
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in (*METRICS, "loss")}
        rows[width] = mean
        print(
            f"{width:>6} " + " ".join(f"{mean[m]:>18.5g}" for m in METRICS)
            + f" {mean['loss']:>8.4f} {time.perf_counter() - t0:>6.1f}"
        )  # fmt: skip
    widths = list(rows)
    slopes = {m: loglog_slope(widths, [rows[w][m] for w in widths]) for m in METRICS}
    print("log-log slope vs width: " + ", ".join(f"{m} {s:+.3f}" for m, s in slopes.items()))
    print(
        "expected (see module docstring): <= -0.5 (Lee et al. 2019 bound); about -1 for "
        "ntk/rel_change, lin/rel_error and (depth >= 2) params/rel_change and its fc1 share"
    )
    return slopes


if __name__ == "__main__":
    main()
