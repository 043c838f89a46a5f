r"""``lazy-monitor demo --catapult``: one narrow net below, inside and above the catapult window.

What it runs (plain PyTorch, one CPU thread, a few seconds):

* the task: ``n`` points of two spirals (:func:`lazy_monitor.demo.datasets.two_spirals`), labels ±1,
  squared error ``L = ½·mean_n (f(x_n) − y_n)²`` and full-batch gradient descent, the setting of
  Lewkowycz et al. 2020 ("The large learning rate phase of deep learning: the catapult
  mechanism");
* the model: a narrow ReLU MLP in the NTK parameterisation, one hidden layer by default
  (``depth``; same seed for every learning rate, so every run starts from the same θ₀ and the
  same λ₀);
* the probe of :class:`~lazy_monitor.KernelTracker` is the whole training set, so
  ``λ₀ = λmax(K(θ₀))`` is exactly the top eigenvalue of the kernel that drives GD and the critical
  learning rate is ``η_crit = 2N/λ₀`` (:mod:`lazy_monitor.core.stability`). ``η λ₀/N`` is the
  paper's ``η λ₀`` (their λ is the top eigenvalue of the NTK divided by the number of samples,
  their loss ``1/(2n) Σ``), so the numbers below are in the paper's units;
* one run per factor in ``factors``: ``η = factor · η_crit``, i.e. ``η λ₀/N = 2·factor``. The
  defaults 0.5, 1.75, 8 put ``η λ₀/N`` at 1, 3.5 and 16;
* each row carries the verdict the stated window predicts (:func:`predicted`): stable up to 2,
  catapult up to ``edge`` (default 4: the edge Lewkowycz et al. derive for their two-layer
  linear model), diverged above, and whether the run matched;
* the tracker is measured at every step of the first ``dense_steps`` and every ``every`` steps
  after; :class:`~lazy_monitor.core.stability.CatapultDetector` reads ``ntk/lr_eig_max``.

Verdict per run, from the numbers printed:

* ``diverged``: the loss or the kernel became non-finite (``health/nonfinite = 1``);
* ``catapult``: the loss rose more than a factor ``1 + spike_tol`` above its running minimum
  (a spike: ``max_t L_t / min_{s<t} L_s``; gradient descent below the edge decreases the loss
  monotonically, up to higher-order terms) *and* λmax fell more than
  ``rel_drop`` below its peak after ``η λmax/N`` exceeded 2 (``regime/catapult = 1``), and the
  run stayed finite;
* ``stable``: neither a spike nor a flagged drop;
* ``unclear``: one of the two signatures without the other.

The summary line names every learning rate whose verdict differs from the prediction.

Measured here (defaults: width 64, N = 32, 100 steps; seed 0): λ₀ = 11.18, η_crit = 5.726.
η λ₀/N = 1: loss never rises (spike 1×), λmax 11.18 → 11.67 (stable). η λ₀/N = 3.5: the loss
rises to 2.60 (3.5× its running minimum) and λmax falls 11.18 → 7.03, final loss 0.283 < 0.742
(catapult). η λ₀/N = 16: the loss overflows, non-finite (diverged). Seeds 1 and 2 give the same
three verdicts (spikes 2.9× and 7.1×, λmax 12.4 → 7.09 and 19.3 → 10.3). About 9 s of CPU time.

The measured upper edge (``benchmarks/bench_science.py``: 300 steps, seed 0, η λ₀/N from 1 to
16): one hidden layer catapults up to 4 and diverges from 4.4 at widths 64 and 4096 (width 1024:
up to 3.6, diverged at 4), i.e. Lewkowycz et al.'s linear-model edge 4, not the ~12 they report
for their wide ReLU nets; at width 512 the edge is 3–4 with one hidden layer, 7–8 with two and
8–9 with three (``--catapult-depth``). Below 2 a narrow net can still catapult late (width 64 at
1.8: λmax grows to 13.6 during training and crosses 2N/η). Details: docs/science.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, TextIO

from lazy_monitor.core.stability import CATAPULT_THRESHOLD, CatapultDetector

__all__ = [
    "CatapultResult",
    "CatapultRun",
    "add_arguments",
    "main",
    "predicted",
    "run_catapult",
    "verdict",
]

DEFAULT_FACTORS = (0.5, 1.75, 8.0)
DEFAULT_WIDTH = 64
DEFAULT_DEPTH = 1
DEFAULT_N = 32
DEFAULT_STEPS = 100
#: Upper edge of the stated catapult window in units of ``η λ₀/N``: Lewkowycz et al.'s 4 (exact
#: for their two-layer linear "uv" model), also the edge this tool measures for one hidden layer.
DEFAULT_EDGE = 4.0


@dataclass
class CatapultRun:
    """One learning rate of the scenario and what it did."""

    factor: float  # η / η_crit
    lr: float
    lr_eig_max0: float  # η λ₀ / N = 2·factor
    loss0: float
    loss_max: float = math.nan  # largest loss after step 0 (inf if it overflowed)
    loss_final: float = math.nan
    eig_max0: float = math.nan  # λmax at step 0
    eig_max_peak: float = math.nan  # largest finite λmax seen
    eig_max_final: float = math.nan  # λmax at the last measurement
    nonfinite: bool = False
    catapult_flag: bool = False  # regime/catapult of the detector
    verdict: str = "unknown"
    expected: str = ""  # what the stated window 2 < η λ₀/N <= edge predicts (predicted())
    losses: list[float] = field(default_factory=list)
    eig_max: list[tuple[int, float]] = field(default_factory=list)

    spike: float = math.nan  # max_t L_t / min_{s<t} L_s: the largest rise above the running min


@dataclass
class CatapultResult:
    """The scenario: ``λ₀``, ``η_crit`` and one :class:`CatapultRun` per learning rate."""

    eig_max0: float
    lr_crit: float
    n: int
    width: int
    seed: int
    runs: list[CatapultRun]
    seconds: float = 0.0
    depth: int = DEFAULT_DEPTH
    edge: float = DEFAULT_EDGE  # upper edge of the stated window (η λ₀/N)

    @property
    def as_expected(self) -> bool:
        """Every run got the verdict the stated window predicts for its learning rate."""
        return all(r.verdict == r.expected for r in self.runs)


def verdict(*, nonfinite: bool, spike: float, catapult_flag: bool, spike_tol: float = 0.1) -> str:
    """``"diverged"``, ``"catapult"``, ``"stable"`` or ``"unclear"`` (see the module docstring).

    Args:
        nonfinite: the run produced NaN/inf (loss or kernel).
        spike: ``max_{t>0} L_t / L₀``.
        catapult_flag: :class:`CatapultDetector` fired (``lr_eig_max > 2``, then λmax fell).
        spike_tol: relative rise of the loss that counts as a spike.
    """
    if nonfinite:
        return "diverged"
    spiked = spike > 1.0 + spike_tol
    if spiked and catapult_flag:
        return "catapult"
    if not spiked and not catapult_flag:
        return "stable"
    return "unclear"


def _spike(losses: Sequence[float]) -> float:
    """``max_t L_t / min_{s<t} L_s``: the largest factor by which the loss rose above its running
    minimum (1 for a monotonically decreasing loss; inf once it overflowed)."""
    best, spike = math.inf, 1.0
    for v in losses:
        if not math.isfinite(v):
            return math.inf
        if v > best:
            spike = max(spike, v / best if best > 0 else math.inf)
        best = min(best, v)
    return spike


def predicted(lr_eig_max: float, edge: float = DEFAULT_EDGE) -> str:
    """What the window ``2 < η λ₀/N ≤ edge`` predicts for a run at ``η λ₀/N = lr_eig_max``:
    ``"stable"`` up to 2 (linearised GD contracts), ``"catapult"`` up to ``edge``, ``"diverged"``
    above. Every learning rate gets a prediction, so a wrong window shows as a mismatch."""
    if lr_eig_max <= CATAPULT_THRESHOLD:
        return "stable"
    return "catapult" if lr_eig_max <= edge else "diverged"


def run_catapult(
    *,
    factors: Sequence[float] = DEFAULT_FACTORS,
    width: int = DEFAULT_WIDTH,
    depth: int = DEFAULT_DEPTH,
    n: int = DEFAULT_N,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    edge: float = DEFAULT_EDGE,
    dense_steps: int = 20,
    every: int = 5,
    rel_drop: float = 0.1,
    spike_tol: float = 0.1,
    out: Optional[TextIO] = None,
) -> CatapultResult:
    r"""Train the same narrow net at ``η = factor · 2N/λ₀`` for each factor; print the verdicts.

    Args:
        factors: learning rates in units of ``η_crit = 2N/λ₀`` (> 0).
        width: hidden width of the ReLU MLP (NTK parameterisation).
        depth: number of hidden layers.
        n: training points (= the probe).
        steps: full-batch GD steps per run.
        seed: seed of the data and of the (shared) initialisation.
        edge: upper edge of the stated window in units of ``η λ₀/N`` (> 2): each run's
            ``expected`` verdict is :func:`predicted` for its learning rate.
        dense_steps: measure the kernel at every step up to this one (the catapult is early).
        every: then every ``every`` steps.
        rel_drop: :class:`CatapultDetector`'s relative fall of λmax.
        spike_tol: relative rise of the loss that counts as a spike.
        out: stream for the table (default: no printing).

    Returns:
        :class:`CatapultResult`.

    Raises:
        ValueError: an empty or non-positive ``factors``, bad sizes, or ``edge <= 2``.
    """
    import torch

    from lazy_monitor.demo.datasets import two_spirals
    from lazy_monitor.demo.models import mlp
    from lazy_monitor.tracking import KernelTracker

    factors = [float(f) for f in factors]
    if not factors or any(not (math.isfinite(f) and f > 0) for f in factors):
        raise ValueError(f"factors must be positive finite numbers (units of 2N/λ₀), got {factors}")
    for name, value, minimum in (("width", width, 1), ("depth", depth, 1), ("n", n, 2),
                                 ("steps", steps, 1), ("dense_steps", dense_steps, 0),
                                 ("every", every, 1)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if not (math.isfinite(edge) and edge > CATAPULT_THRESHOLD):
        raise ValueError(
            f"edge must be a finite number > {CATAPULT_THRESHOLD:g} (the upper edge of the "
            f"catapult window in units of lr*eig_max/N), got {edge!r}"
        )

    x, labels = two_spirals(n, seed=seed)
    y = (2.0 * labels.float() - 1.0).unsqueeze(1)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        probe_net = mlp(2, width, 1, depth=depth, parameterization="ntk", seed=seed)
        eig0 = KernelTracker(probe_net, x, per_layer=False).start()["ntk/eig_max"]
        lr_crit = 2.0 * n / eig0
        runs = []
        for factor in sorted(factors):
            net = mlp(2, width, 1, depth=depth, parameterization="ntk", seed=seed)
            run = _one_run(net, x, y, factor, factor * lr_crit, steps, dense_steps, every, rel_drop)
            run.verdict = verdict(
                nonfinite=run.nonfinite,
                spike=run.spike,
                catapult_flag=run.catapult_flag,
                spike_tol=spike_tol,
            )
            run.expected = predicted(2.0 * factor, edge)
            runs.append(run)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    result = CatapultResult(eig0, lr_crit, n, width, seed, runs, seconds, depth, edge)
    if out is not None:
        print(format_result(result), file=out, flush=True)
    return result


def _one_run(
    net: Any,
    x: Any,
    y: Any,
    factor: float,
    lr: float,
    steps: int,
    dense_steps: int,
    every: int,
    rel_drop: float,
) -> CatapultRun:
    import torch

    from lazy_monitor.tracking import KernelTracker

    tracker = KernelTracker(net, x, per_layer=False)
    detector = CatapultDetector(rel_drop=rel_drop)
    m0 = tracker.start(lr=lr)  # the tracker's ntk/lr_eig_max = lr·λmax/N
    eig0 = m0["ntk/eig_max"]
    detector.update(m0["ntk/lr_eig_max"], eig0)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    run = CatapultRun(factor, lr, m0["ntk/lr_eig_max"], math.nan, eig_max0=eig0)
    run.eig_max.append((0, eig0))
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = 0.5 * ((net(x) - y) ** 2).mean()
        run.losses.append(float(loss.detach()))
        if not torch.isfinite(loss):
            run.nonfinite = True
            break
        loss.backward()
        opt.step()
        if step <= dense_steps or step % every == 0 or step == steps:
            m = tracker.measure(step, lr=lr)
            eig = m["ntk/eig_max"]
            run.eig_max.append((step, eig))
            # own detector (not the tracker's regime/catapult) for a non-default rel_drop
            detector.update(m["ntk/lr_eig_max"], eig)
            if m["health/nonfinite"]:
                run.nonfinite = True
                break
    with torch.no_grad():
        final = float(0.5 * ((net(x) - y) ** 2).mean())
    run.losses.append(final)
    run.nonfinite = run.nonfinite or not math.isfinite(final)
    run.loss0 = run.losses[0]
    after = [v if math.isfinite(v) else math.inf for v in run.losses[1:]]
    run.loss_max = max(after) if after else math.nan
    run.spike = _spike(run.losses)
    run.loss_final = final
    finite_eigs = [e for _, e in run.eig_max if math.isfinite(e)]
    run.eig_max_peak = max(finite_eigs)
    run.eig_max_final = run.eig_max[-1][1]
    run.catapult_flag = detector.fired
    return run


def _num(value: float, spec: str, suffix: str = "") -> str:
    """``value`` formatted; ``overflow`` for ±inf (the run diverged), ``n/a`` for NaN."""
    if math.isinf(value):
        return "overflow"
    if math.isnan(value):
        return "n/a"
    return f"{value:{spec}}{suffix}"


def format_result(result: CatapultResult) -> str:
    """The table of runs (each with the verdict the stated window predicts) and a summary."""
    from lazy_monitor.cli.report import format_table

    headers = ["lr/lr_crit", "lr*eig0/N", "predicted", "verdict", "match", "lr", "loss0",
               "max loss", "spike", "final loss", "eig_max0", "eig_max peak", "eig_max end",
               "catapult"]  # fmt: skip
    rows = []
    for r in result.runs:
        rows.append([f"{r.factor:g}", f"{r.lr_eig_max0:.3g}", r.expected, r.verdict,
                     "yes" if r.verdict == r.expected else "NO", f"{r.lr:.4g}",
                     _num(r.loss0, ".4g"), _num(r.loss_max, ".4g"), _num(r.spike, ".3g", "x"),
                     _num(r.loss_final, ".4g"), _num(r.eig_max0, ".4g"),
                     _num(r.eig_max_peak, ".4g"), _num(r.eig_max_final, ".4g"),
                     str(int(r.catapult_flag))])  # fmt: skip
    layers = "1-hidden-layer" if result.depth == 1 else f"{result.depth}-hidden-layer"
    head = (
        f"catapult scenario: two spirals, N={result.n} (probe = training set), {layers} ReLU MLP "
        f"width {result.width} (NTK param.), ½·MSE, full-batch GD, seed {result.seed}\n"
        f"eig_max(K0) = {result.eig_max0:.4g}  ->  lr_crit = 2N/eig_max = {result.lr_crit:.4g}; "
        f"predicted: stable for lr*eig_max/N <= 2, catapult up to {result.edge:g}, diverged above\n"
        f"(edge {result.edge:g}{'' if result.edge != DEFAULT_EDGE else ', the default'}; "
        "Lewkowycz et al. 2020 derive 4 for their two-layer linear model and report about 12 for "
        "their wide ReLU nets; this tool's measured edges per depth and width: docs/science.md)"
    )
    mismatches = [f"{r.lr_eig_max0:.3g}" for r in result.runs if r.verdict != r.expected]
    tail = (
        "every verdict as the window predicts"
        if not mismatches
        else f"NOT as the window predicts at lr*eig_max/N = {', '.join(mismatches)} (match = NO)"
    )
    return f"{head}\n{format_table(headers, rows)}\n{tail} ({result.seconds:.1f} s)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the catapult options (``--catapult-*``) to ``parser``."""
    g = parser.add_argument_group("catapult scenario (--catapult)")

    def factors(text: str) -> list[float]:
        try:
            values = [float(p) for p in text.split(",") if p.strip()]
        except ValueError:
            values = []
        if not values or any(not (math.isfinite(v) and v > 0) for v in values):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated positive numbers (units of 2N/eig_max), got {text!r}"
            )
        return values

    def edge(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > CATAPULT_THRESHOLD):
            raise argparse.ArgumentTypeError(
                f"expected a number > {CATAPULT_THRESHOLD:g} (units of lr*eig_max/N), got {text!r}"
            )
        return value

    def positive_int(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
        return value

    g.add_argument("--catapult-factors", type=factors, default=list(DEFAULT_FACTORS),
                   metavar="F1,F2,...",
                   help="learning rates in units of lr_crit = 2N/eig_max(K0) (default: 0.5,1.75,8)")  # fmt: skip
    g.add_argument("--catapult-width", type=positive_int, default=DEFAULT_WIDTH, metavar="W",
                   help="hidden width (default: %(default)s)")  # fmt: skip
    g.add_argument("--catapult-depth", type=positive_int, default=DEFAULT_DEPTH, metavar="D",
                   help="hidden layers (default: %(default)s)")  # fmt: skip
    g.add_argument("--catapult-steps", type=positive_int, default=DEFAULT_STEPS, metavar="N",
                   help="GD steps per run (default: %(default)s)")  # fmt: skip
    g.add_argument("--catapult-edge", type=edge, default=DEFAULT_EDGE, metavar="E",
                   help="upper edge of the stated window in units of lr*eig_max/N, used for "
                        "each row's predicted verdict (default: %(default)s, Lewkowycz et al.'s "
                        "linear-model edge)")  # fmt: skip
    if not any("--seed" in a.option_strings for a in parser._actions):
        g.add_argument("--seed", type=int, default=0, help="data and init seed (default: 0)")


def main(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run :func:`run_catapult` from parsed ``args`` (see :func:`add_arguments`); exit status 0."""
    run_catapult(
        factors=args.catapult_factors,
        width=args.catapult_width,
        depth=args.catapult_depth,
        steps=args.catapult_steps,
        seed=args.seed,
        edge=args.catapult_edge,
        out=out,
    )
    return 0


if __name__ == "__main__":  # python -m lazy_monitor.cli.catapult
    _parser = argparse.ArgumentParser(prog="python -m lazy_monitor.cli.catapult")
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
