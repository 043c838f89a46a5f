"""Is my network training in the lazy (kernel) regime? A plain PyTorch loop with MonitorSession.

Trains an NTK-parameterised MLP with minibatch SGD on a Gaussian-mixture classification task
and, every ``--measure-every`` steps, prints how far the empirical NTK, the weights and the
function have moved from their linearization around θ₀. A wide network with a small learning
rate stays lazy; a narrow one with a large learning rate does not::

    python examples/plain_pytorch_loop.py                          # width 512, lr 0.5: lazy
    python examples/plain_pytorch_loop.py --width 16 --lr 5        # feature learning

Runs in well under a minute on a CPU with the defaults.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from lazy_monitor import MonitorSession
from lazy_monitor.demo.datasets import gaussian_mixture
from lazy_monitor.demo.models import mlp
from lazy_monitor.tracking import LOWER_BOUND_METRICS

# metric -> column header
SHOWN = {"ntk/rel_change": "dK/K0", "ntk/velocity": "K velocity", "ntk/alignment": "alignment",
         "params/rel_change": "dθ/θ0", "lin/rel_error": "lin error", "lin/agreement": "agreement",
         "regime/lazy": "lazy"}  # fmt: skip


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=512, help="hidden units per layer")
    p.add_argument("--depth", type=int, default=2, help="hidden layers")
    p.add_argument("--lr", type=float, default=0.5, help="SGD learning rate")
    p.add_argument("--steps", type=int, default=200, help="SGD steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--measure-every", type=int, default=20, help="steps between measurements")
    p.add_argument("--n-train", type=int, default=512, help="training examples")
    p.add_argument("--n-probe", type=int, default=32, help="probe examples for the kernel")
    p.add_argument("--dim", type=int, default=16, help="input dimension")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--kind", choices=["full", "trace", "diagonal"], default="full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="print only the final verdict")
    args = p.parse_args(argv)
    for name in ("width", "depth", "steps", "batch_size", "measure_every", "n_train", "n_probe"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.n_probe > args.n_train:
        p.error(f"--n-probe ({args.n_probe}) cannot exceed --n-train ({args.n_train})")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    """Train, track, print; return the metrics of the last measurement."""
    args = _parse(argv)
    torch.set_num_threads(1)  # tiny CPU demo: more threads only spin-wait (10x slower if busy)
    x, y = gaussian_mixture(args.n_train, args.dim, args.classes, seed=args.seed)
    model = mlp(args.dim, args.width, args.classes, depth=args.depth, seed=args.seed)
    # The probe is a fixed slice of the training set; its labels give ntk/alignment. An exact
    # cadence for this demo: the defaults add the log-spaced early steps 1, 2, 4, ... and keep
    # the monitor within 5 % of the wall time.
    session = MonitorSession(
        (x[: args.n_probe], y[: args.n_probe]),
        every_n_steps=args.measure_every,
        log_spaced_until=0,
        max_overhead=None,
        kernel={"kind": args.kind},
    )
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    shuffle = torch.Generator().manual_seed(args.seed)

    def report(step: int, metrics: dict[str, float], loss: float) -> None:
        if not args.quiet:
            values = " ".join(f"{metrics[k]:>10.4g}" for k in SHOWN if k in metrics)
            print(f"{step:>6} {loss:>8.4f} {values}")

    if not args.quiet:
        print(f"{'step':>6} {'loss':>8} " + " ".join(f"{h:>10}" for h in SHOWN.values()))
    # the reference K0 at step 0; the optimizer gives opt/lr, ntk/lr_eig_max, regime/catapult
    metrics = session.start(model, optimizer=opt)
    report(0, metrics, float("nan"))
    step = 0
    while step < args.steps:
        for idx in torch.randperm(args.n_train, generator=shuffle).split(args.batch_size):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            step += 1
            if step == args.steps:
                metrics = session.finish(model, step, optimizer=opt)  # always measured
                report(step, metrics, float(loss.detach()))
                break
            measured = session.step(model, step, optimizer=opt)  # None when not due
            if measured is not None:
                report(step, measured, float(loss.detach()))

    tracker = session.tracker
    lazy, reason = tracker.regime_decision(metrics)
    thresholds = ", ".join(
        f"{k} {'>=' if k in LOWER_BOUND_METRICS else '<='} {v:g}"
        for k, v in tracker.lazy_thresholds.items()
    )
    verdict = "LAZY (kernel regime)" if lazy else f"NOT lazy: {reason}"
    print(
        f"width={args.width} lr={args.lr} steps={args.steps}: {verdict} (lazy means {thresholds})"
    )
    return metrics


if __name__ == "__main__":
    main()
