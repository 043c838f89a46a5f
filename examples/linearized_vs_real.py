"""A wide network trains like its linearization (Lee et al. 2019, "Wide Neural Networks of Any
Depth Evolve as Linear Models Under Gradient Descent", fig. 2/3).

For each width, an NTK-parameterised ReLU MLP ``f(x; θ)`` and its linearization at
initialisation, ``f_lin(x; θ) = f(x; θ₀) + J(θ₀)(θ − θ₀)`` (a :class:`LinearizedModel`), are
trained side by side: same data (a teacher regression task), same full-batch gradient descent on
the mean squared error, same learning rate and steps. The script prints, over training, the RMSE
between the two models' predictions on held-out points, and that RMSE relative to how far the
real network's held-out predictions moved from initialisation. Under the NTK parameterisation
with a fixed learning rate the gap shrinks with width (like ``width^(-1/2)``): wide networks stay
in the lazy regime, narrow ones leave it.

Run::

    python examples/linearized_vs_real.py                    # widths 32 and 1024, ~20 s

Each width ends with the verdict of the monitor's default threshold on the relative gap
(``lin/rel_error <= 0.1``), e.g. ``-> lazy: relative gap 0.0189 vs threshold 0.1`` for width 1024
and ``-> NOT lazy`` for width 32.
    python examples/linearized_vs_real.py --width 64 256 1024 --steps 300
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Optional

import torch

from lazy_monitor import LinearizedModel
from lazy_monitor.demo.datasets import teacher_regression
from lazy_monitor.demo.models import mlp


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().pow(2).mean().sqrt())


def run(
    width: int,
    *,
    steps: int = 200,
    lr: float = 0.2,
    depth: int = 2,
    dim: int = 8,
    n_train: int = 64,
    n_test: int = 128,
    seed: int = 0,
    log_every: int = 50,
) -> list[dict[str, float]]:
    """Train ``mlp(dim, width, 1, depth)`` and its linearization side by side.

    Returns:
        One record per logged step (step 0, every ``log_every`` steps, and the last step) with
        ``step``, ``loss`` and ``loss_lin`` (training MSE of the net and of f_lin),
        ``rmse`` (RMSE between net and f_lin on the held-out points) and ``rel_rmse`` (``rmse``
        divided by the RMS change of the net's held-out predictions since initialisation).
    """
    x, y = teacher_regression(n_train, dim, seed=seed, task_seed=seed)
    x_test, _ = teacher_regression(n_test, dim, seed=seed + 1, task_seed=seed)
    net = mlp(dim, width, 1, depth, seed=seed)
    lin = LinearizedModel(net)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    opt_lin = torch.optim.SGD(lin.parameters(), lr=lr)
    with torch.no_grad():
        f_test0 = net(x_test)
    records = []
    for step in range(steps + 1):
        if step % log_every == 0 or step == steps:
            with torch.no_grad():
                f_test, f_lin_test = net(x_test), lin(x_test)
                loss, loss_lin = ((net(x) - y) ** 2).mean(), ((lin(x) - y) ** 2).mean()
            moved = _rmse(f_test, f_test0)
            rmse = _rmse(f_test, f_lin_test)
            records.append(
                {
                    "step": step,
                    "loss": float(loss),
                    "loss_lin": float(loss_lin),
                    "rmse": rmse,
                    "rel_rmse": rmse / moved if moved > 0 else math.nan,
                }
            )
        if step == steps:
            break
        for model, optimizer in ((net, opt), (lin, opt_lin)):
            optimizer.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            optimizer.step()
    return records


#: ``lin/rel_error`` threshold of the monitor's default verdict (``regime/lazy``).
LAZY_THRESHOLD = 0.1


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, nargs="+", default=[32, 1024], help="hidden widths")
    parser.add_argument("--steps", type=int, default=200, help="full-batch GD steps")
    parser.add_argument(
        "--lr",
        type=float,
        default=0.2,
        help="learning rate, same for both models and all widths; keep it below 2/λmax of the "
        "MSE Hessian (about 0.6 here): above it the real net can still converge through a "
        "catapult (Lewkowycz et al. 2020) but the linear model diverges",
    )
    parser.add_argument("--depth", type=int, default=2, help="hidden layers")
    parser.add_argument("--dim", type=int, default=8, help="input dimension")
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-test", type=int, default=128)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny CPU demo: more threads only spin-wait (10x slower if busy)
    if args.steps < 1 or args.log_every < 1 or min(args.width) < 1:
        parser.error("--steps, --log-every and every --width must be >= 1")
    for width in args.width:
        start = time.perf_counter()
        records = run(
            width,
            steps=args.steps,
            lr=args.lr,
            depth=args.depth,
            dim=args.dim,
            n_train=args.n_train,
            n_test=args.n_test,
            seed=args.seed,
            log_every=args.log_every,
        )
        print(f"width {width} ({time.perf_counter() - start:.1f} s)")
        print(f"  {'step':>6} {'loss':>10} {'loss_lin':>10} {'rmse(f,f_lin)':>14} {'relative':>9}")
        for r in records:
            rel = "-" if math.isnan(r["rel_rmse"]) else f"{r['rel_rmse']:.3g}"
            print(
                f"  {r['step']:>6d} {r['loss']:>10.4g} {r['loss_lin']:>10.4g} "
                f"{r['rmse']:>14.4g} {rel:>9}"
            )
        # the monitor's default lazy threshold on the same quantity (lin/rel_error <= 0.1)
        final = records[-1]["rel_rmse"]
        verdict = "lazy" if final <= LAZY_THRESHOLD else "NOT lazy"
        print(f"  -> {verdict}: relative gap {final:.3g} vs threshold {LAZY_THRESHOLD:g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
