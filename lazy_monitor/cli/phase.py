r"""``lazy-monitor demo --phase``: the lazy / rich phase diagram over width × output scale α.

What it runs (plain PyTorch loop, no Lightning, one CPU thread; 42–51 s of CPU time per
initialisation of the default grid, the default is 3, see ``run_phase``):

* the task: ``n_train`` points of two interleaved spirals (:func:`lazy_monitor.demo.datasets.two_spirals`,
  generated in code), labels ±1, squared error ``½·mean_n (F(x_n) − y_n)²``, full-batch gradient
  descent for ``steps`` steps;
* the model: a one-hidden-layer ReLU MLP in the NTK parameterisation
  (:func:`lazy_monitor.demo.models.mlp`) of each width ``h``, with output scale α, *centred* at
  initialisation as in Chizat, Oyallon & Bach 2019 ("On Lazy Training in Differentiable
  Programming"): ``F(x) = α (f(x; θ) − f(x; θ₀))``. Centring matters: without it the initial
  output ``α f(x; θ₀)`` grows with α and a large α is not lazy;
* the learning rate ``lr / α²`` (Chizat–Bach): the function-space dynamics at initialisation are
  then the same for every α (the kernel of ``F`` is ``α² K``), while the weights must move ``1/α``
  times further to fit the data. ``lr·λmax(α²K)/N`` at step 0 is printed: it stays below 2 for
  the defaults (no catapult; see :mod:`lazy_monitor.core.stability`);
* :class:`~lazy_monitor.KernelTracker` on a probe of the first ``probe_size`` training points,
  measured at step 0 and after the last step; the cell's value is the final ``ntk/rel_change``
  ``‖K_T − K₀‖_F / ‖K₀‖_F`` (median over ``seeds`` initialisations: at small α a narrow net
  occasionally blows its kernel up by orders of magnitude, which would dominate a mean).

The boundary: for each width, ``α*(h)`` is where the final ``ntk/rel_change`` falls through the
lazy ``threshold`` (default 0.1, the tracker's default heuristic) as α grows, interpolated
linearly in ``log α`` – ``log rel_change`` between the two grid points around the crossing. A
fit ``log α* = s·log h + b`` gives the exponent ``s``. Geiger, Spigler, Jacot & Wyart 2020
("Disentangling feature and lazy training in deep neural networks") find the crossover at
``α·√h ≈ const``, i.e. ``s = −½``; the figure shows both the free fit and the line
``α·√h = c`` with ``c`` fitted to the boundary points. What we measure depends on the training
time (``lr·steps``) and, strongly, on the initialisation: narrow ReLU nets have a noisy
boundary (their kernel jumps when activation patterns flip). So the exponent is fitted once per
initialisation (``seeds`` of them, default 3) and reported as their mean with a Student-t 95 %
interval; the summary says "consistent with -1/2" only when the interval contains −½, and gives
no verdict for a single initialisation.

Measured here (default grid: widths 16, 64, 256, 1024 × 9 α in [0.1, 100], 500 steps, lr 2/α²,
128 points; ``--seed`` S = 0, 1, 2, initialisations ``1000·S + k``, k = 0, 1, 2; 9 fits,
``benchmarks/bench_science.py``): s = −0.49, −0.63, −0.63, −0.82, −0.60, −0.55, −1.06, −0.70,
−0.72, mean **−0.69, 95 % interval [−0.82, −0.56]**: steeper than Geiger et al.'s −½, which lies
outside. One ``--seed`` with the default 3 initialisations gives intervals ±0.2 to ±0.5 wide
(−0.58 [−0.79, −0.38], −0.66 [−1.01, −0.30], −0.83 [−1.34, −0.32]), each containing −½: three
initialisations cannot tell −½ from −0.69. Fitted on widths 64–1024 only: −0.59 [−0.69, −0.49].
In the lazy cells ``ntk/rel_change ∝ width^p · α^-q`` with p = −0.55 [−0.63, −0.46],
q = 0.52 [0.49, 0.55] (see docs/science.md for what this says about the exponent). Wall time:
about 17 min per ``--seed`` with 3 initialisations on a 2-core machine at load ~20.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

from lazy_monitor._extras import require

__all__ = [
    "ExponentInterval",
    "PhaseCell",
    "PhaseResult",
    "add_arguments",
    "boundary_alpha",
    "exponent_interval",
    "fit_exponent",
    "fit_lazy_scaling",
    "main",
    "run_phase",
]

DEFAULT_WIDTHS = (16, 64, 256, 1024)
#: 9 log-spaced output scales from 0.1 to 100 (ratio 10^(3/8) ≈ 2.37 between neighbours): the
#: lazy threshold is crossed inside this range for widths 16..1024 (narrow ReLU nets need α of
#: several tens: their kernel jumps when activation patterns flip).
DEFAULT_ALPHAS = tuple(round(10 ** (-1 + 3 * i / 8), 4) for i in range(9))
DEFAULT_STEPS = 500
#: Learning rate at α = 1 (each run uses lr/α²). With the defaults ``lr·λmax(K)/N ≈ 0.7–1``
#: at step 0: below the MSE edge 2.
DEFAULT_LR = 2.0
DEFAULT_THRESHOLD = 0.1
DEFAULT_N_TRAIN = 128
DEFAULT_PROBE_SIZE = 64
#: Initialisations per cell: the exponent's interval is taken across them (>= 2 needed).
DEFAULT_SEEDS = 3
GEIGER_EXPONENT = -0.5
#: Two-sided 95 % quantiles t_{0.975}(df) of Student's t for df = 1..30.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


@dataclass
class PhaseCell:
    """One (width, α) cell of the grid: final metrics, averaged over the initialisations."""

    width: int
    alpha: float
    lr: float
    ntk_rel_change: float = math.nan  # median over the initialisations (robust to one blow-up)
    ntk_rel_change_runs: list[float] = field(default_factory=list)
    params_rel_change: float = math.nan
    lin_rel_error: float = math.nan
    final_loss: float = math.nan
    lr_eig_max0: float = math.nan  # lr·λmax(K₀)/N at step 0 (max over seeds)
    nonfinite_runs: int = 0


@dataclass
class ExponentInterval:
    """The boundary exponent of each initialisation and their mean with a 95 % interval.

    ``per_init[k]`` is the exponent fitted to initialisation ``k``'s own grid (NaN where fewer
    than two widths cross the threshold inside the α grid); ``mean``, ``low``, ``high`` are the
    mean of the finite ones and its Student-t 95 % interval (``low``/``high`` NaN with fewer than
    two finite values: no interval from one initialisation).
    """

    per_init: list[float]
    mean: float
    low: float
    high: float

    @property
    def n(self) -> int:
        """Number of initialisations with a finite exponent."""
        return sum(1 for v in self.per_init if math.isfinite(v))

    def contains(self, value: float) -> bool:
        """``value`` lies inside the interval (False without an interval)."""
        return bool(self.low <= value <= self.high)


@dataclass
class PhaseResult:
    """What :func:`run_phase` measured and wrote.

    ``boundary`` maps each width to ``α*`` (NaN where the grid has no crossing); ``exponent`` is
    the fitted ``s`` of ``α* ∝ width^s`` (NaN with fewer than two boundary points);
    ``sqrt_const`` the ``c`` of the ``α·√width = c`` line fitted to the boundary points (all
    three from the per-cell medians). ``interval``: the exponent per initialisation, their mean
    and 95 % interval. ``lazy_width_slope`` ``p`` and ``lazy_alpha_slope`` ``q``: the fit
    ``ntk/rel_change ∝ width^p · α^-q`` over the lazy cells of the median grid (NaN where the
    lazy cells do not span two widths and two α).
    """

    cells: list[PhaseCell]
    widths: list[int]
    alphas: list[float]
    threshold: float
    steps: int
    lr: float
    seed: int
    seeds: int
    boundary: dict[int, float]
    exponent: float
    intercept: float
    sqrt_const: float
    csv_path: Path
    png_path: Optional[Path]
    seconds: float
    interval: ExponentInterval = field(
        default_factory=lambda: ExponentInterval([], math.nan, math.nan, math.nan)
    )
    lazy_width_slope: float = math.nan
    lazy_alpha_slope: float = math.nan

    def cell(self, width: int, alpha: float) -> PhaseCell:
        """The cell at ``(width, alpha)`` (KeyError if not in the grid)."""
        for c in self.cells:
            if c.width == width and math.isclose(c.alpha, alpha, rel_tol=1e-12):
                return c
        raise KeyError((width, alpha))


# ---------------------------------------------------------------------------- pure analysis
def boundary_alpha(alphas: Sequence[float], values: Sequence[float], threshold: float) -> float:
    r"""The output scale ``α*`` at which ``values`` (final ``ntk/rel_change``) cross ``threshold``.

    ``alphas`` ascending. The crossing is the last grid interval ``[α_i, α_{i+1}]`` with
    ``values[i] > threshold ≥ values[i+1]`` (a rich cell followed by a lazy one); ``α*`` is its
    linear interpolation in ``(log α, log value)``. A NaN value (a diverged run) counts as rich.

    Returns:
        ``α*``; NaN when there is no such interval (all cells lazy: the boundary lies below the
        grid; all rich: above it) or when the rich side of the crossing is NaN (nothing to
        interpolate); ``α_{i+1}`` (an upper bound) when the lazy side is exactly 0.
    """
    if len(alphas) != len(values):
        raise ValueError(f"alphas and values differ in length: {len(alphas)} vs {len(values)}")
    if any(b <= a for a, b in zip(alphas, alphas[1:])):
        raise ValueError(f"alphas must be strictly increasing, got {list(alphas)}")
    rich = [not (v <= threshold) for v in values]  # NaN -> rich
    for i in range(len(values) - 2, -1, -1):
        if rich[i] and not rich[i + 1]:
            hi, lo = values[i], values[i + 1]
            if not (math.isfinite(hi) and hi > 0 and lo > 0):
                return math.nan if not math.isfinite(hi) else alphas[i + 1]
            la, lb = math.log(alphas[i]), math.log(alphas[i + 1])
            t = (math.log(hi) - math.log(threshold)) / (math.log(hi) - math.log(lo))
            return math.exp(la + t * (lb - la))
    return math.nan


def fit_exponent(widths: Sequence[float], alpha_star: Sequence[float]) -> tuple[float, float]:
    """Least-squares fit ``log α* = s·log width + b`` over the finite, positive ``α*``.

    Returns:
        ``(s, b)``; ``(NaN, NaN)`` with fewer than two usable points.
    """
    pts = [
        (math.log(w), math.log(a)) for w, a in zip(widths, alpha_star) if a > 0 and math.isfinite(a)
    ]
    if len(pts) < 2 or len({p[0] for p in pts}) < 2:
        return math.nan, math.nan
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    s = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    return s, my - s * mx


def exponent_interval(exponents: Sequence[float]) -> ExponentInterval:
    r"""Mean of the finite ``exponents`` (one per initialisation) and its 95 % Student-t interval
    ``mean ± t_{0.975}(k−1)·sd/√k`` (NaN bounds with fewer than two finite values)."""
    finite = [float(v) for v in exponents if math.isfinite(v)]
    k = len(finite)
    if k == 0:
        return ExponentInterval(list(exponents), math.nan, math.nan, math.nan)
    mean = sum(finite) / k
    if k < 2:
        return ExponentInterval(list(exponents), mean, math.nan, math.nan)
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (k - 1))
    # beyond the table: the Cornish-Fisher first correction to the normal quantile
    t = _T975[k - 2] if k - 1 <= len(_T975) else 1.95996 * (1 + 1.2104 / (k - 1))
    half = t * sd / math.sqrt(k)
    return ExponentInterval(list(exponents), mean, mean - half, mean + half)


def fit_lazy_scaling(
    widths: Sequence[float], alphas: Sequence[float], values: Sequence[float], threshold: float
) -> tuple[float, float]:
    r"""Least-squares fit ``log v = p·log width − q·log α + c`` over the lazy cells.

    If the kernel moved in proportion to the weights' displacement (``∝ 1/α``, first order)
    ``q`` would be 1, and if ``v`` were one power law the threshold would be crossed at
    ``α ∝ width^(p/q)``. Measured on the default grid (docs/science.md) ``q ≈ 0.5``: the kernel
    of these ReLU nets moves like the square root of the displacement in the lazy cells, and the
    boundary exponent is not ``p/q``, so the two are reported side by side.

    Args:
        widths, alphas, values: one entry per cell (same length).
        threshold: cells with ``0 < v ≤ threshold`` enter the fit.

    Returns:
        ``(p, q)``; ``(NaN, NaN)`` when the lazy cells span fewer than two widths or two α.
    """
    pts = [
        (math.log(w), math.log(a), math.log(v))
        for w, a, v in zip(widths, alphas, values)
        if math.isfinite(v) and 0 < v <= threshold
    ]
    if len({p[0] for p in pts}) < 2 or len({p[1] for p in pts}) < 2 or len(pts) < 4:
        return math.nan, math.nan
    import numpy as np

    a = np.array([[lw, la, 1.0] for lw, la, _ in pts])
    coef, _, rank, _ = np.linalg.lstsq(a, np.array([lv for *_, lv in pts]), rcond=None)
    if rank < 3:
        return math.nan, math.nan
    return float(coef[0]), float(-coef[1])


def _sqrt_const(widths: Sequence[float], alpha_star: Sequence[float]) -> float:
    """``c`` of the line ``α·√width = c`` fitted (least squares in log) to the boundary points."""
    logs = [
        math.log(a) + 0.5 * math.log(w)
        for w, a in zip(widths, alpha_star)
        if a > 0 and math.isfinite(a)
    ]
    return math.exp(sum(logs) / len(logs)) if logs else math.nan


# ---------------------------------------------------------------------------- training
def _centred(net: Any) -> Any:
    """``x ↦ net(x) − net₀(x)`` with ``net₀`` a frozen copy of ``net`` at initialisation."""
    from torch import nn

    class Centred(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net
            # Frozen (requires_grad=False): a constant for the optimiser and the kernel.
            self.init = copy.deepcopy(net).requires_grad_(False)

        def forward(self, x: Any) -> Any:
            return self.net(x) - self.init(x)

    return Centred(net)


def _train_run(
    x: Any, y: Any, probe: Any, width: int, alpha: float, lr: float, steps: int, init_seed: int
) -> dict[str, float]:
    """One centred NTK MLP trained by full-batch GD on ``½·mean (F − y)²``; final tracker metrics."""
    import torch

    from lazy_monitor.demo.models import mlp
    from lazy_monitor.tracking import KernelTracker

    model = _centred(
        mlp(2, width, 1, depth=1, parameterization="ntk", output_scale=alpha, seed=init_seed)
    )
    tracker = KernelTracker(model, probe, per_layer=False)
    start = tracker.start(lr=lr)  # ntk/lr_eig_max at θ₀
    opt = torch.optim.SGD(model.net.parameters(), lr=lr)
    loss = torch.tensor(math.nan)
    done = 0
    while done < steps:
        opt.zero_grad(set_to_none=True)
        loss = 0.5 * ((model(x) - y) ** 2).mean()
        if not torch.isfinite(loss):
            break  # diverged: the tracker reports health/nonfinite below
        loss.backward()
        opt.step()
        done += 1
    end = tracker.measure(max(done, 1))
    with torch.no_grad():
        final_loss = float(0.5 * ((model(x) - y) ** 2).mean())
    return {
        "ntk": end["ntk/rel_change"],
        "params": end["params/rel_change"],
        "lin": end["lin/rel_error"],
        "loss": final_loss,
        "lr_eig_max0": start["ntk/lr_eig_max"],
        "nonfinite": end["health/nonfinite"] or float(not math.isfinite(final_loss)),
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _median(values: list[float]) -> float:
    """Median; NaN if any value is NaN (a diverged run makes the cell diverged)."""
    if not values or any(math.isnan(v) for v in values):
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def run_phase(
    out_dir: Any,
    *,
    widths: Sequence[int] = DEFAULT_WIDTHS,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    seeds: int = DEFAULT_SEEDS,
    threshold: float = DEFAULT_THRESHOLD,
    n_train: int = DEFAULT_N_TRAIN,
    probe_size: int = DEFAULT_PROBE_SIZE,
    plot: bool = True,
    out: Optional[TextIO] = None,
) -> PhaseResult:
    r"""Train the width × α grid, write ``phase.csv`` (and ``phase.png``), print the grid and fit.

    Runtime: ``len(widths)·len(alphas)·seeds`` runs of ``steps`` full-batch steps; the defaults
    (4 × 9 × 3 runs of 500 steps on 128 points) take 3 × (42–51 s) of CPU time on one thread.

    Args:
        out_dir: folder for ``phase.csv`` / ``phase.png`` (created).
        widths: hidden widths (>= 2 distinct, each >= 1).
        alphas: output scales α (> 0, >= 2 distinct; sorted here).
        steps: gradient-descent steps per run.
        lr: learning rate at α = 1; each run uses ``lr/α²``.
        seed: seed of the data; initialisation ``k`` of a run uses seed ``1000·seed + k``.
        seeds: initialisations per cell (the cell shows their median; the exponent's interval
            is taken across them, so >= 2 for an interval).
        threshold: lazy threshold on the final ``ntk/rel_change`` (> 0).
        n_train: training points; probe_size: the first ``probe_size`` of them form the probe.
        plot: write ``phase.png`` (needs matplotlib).
        out: stream for the progress and the summary (default: no printing).

    Returns:
        :class:`PhaseResult`.

    Raises:
        ValueError: a bad grid or setting, naming it.
    """
    import torch

    from lazy_monitor.demo.datasets import two_spirals

    widths = sorted({int(w) for w in widths})
    alphas = sorted({float(a) for a in alphas})
    if len(widths) < 2 or widths[0] < 1:
        raise ValueError(f"widths needs at least two distinct values >= 1, got {widths}")
    if len(alphas) < 2 or alphas[0] <= 0 or not all(math.isfinite(a) for a in alphas):
        raise ValueError(f"alphas needs at least two distinct finite values > 0, got {alphas}")
    for name, value, minimum in (("steps", steps, 1), ("seeds", seeds, 1), ("n_train", n_train, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if not (isinstance(probe_size, int) and 2 <= probe_size <= n_train):
        raise ValueError(f"probe_size must be an int in [2, n_train={n_train}], got {probe_size!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be finite and > 0, got {lr}")
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be finite and > 0, got {threshold}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def say(text: str = "") -> None:
        if out is not None:
            print(text, file=out, flush=True)

    x, labels = two_spirals(n_train, seed=seed)
    y = (2.0 * labels.float() - 1.0).unsqueeze(1)  # ±1 targets, (N, 1)
    probe = x[:probe_size]
    say(
        f"phase diagram: two spirals ({n_train} points, seed {seed}), centred 1-hidden-layer ReLU "
        f"MLP (NTK param.), ½·MSE, full-batch GD, {steps} steps, lr={lr:g}/α², "
        f"{len(widths)}×{len(alphas)} grid × {seeds} init(s), probe {probe_size}; out {out_dir}"
    )
    total = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: one thread avoids OpenMP spin-waits on a shared CPU
    cells: list[PhaseCell] = []
    try:
        for width in widths:
            for alpha in alphas:
                cell = PhaseCell(width, alpha, lr / alpha**2)
                runs = [
                    _train_run(x, y, probe, width, alpha, cell.lr, steps, 1000 * seed + k)
                    for k in range(seeds)
                ]
                cell.ntk_rel_change_runs = [r["ntk"] for r in runs]
                cell.ntk_rel_change = _median(cell.ntk_rel_change_runs)
                cell.params_rel_change = _mean([r["params"] for r in runs])
                cell.lin_rel_error = _mean([r["lin"] for r in runs])
                cell.final_loss = _mean([r["loss"] for r in runs])
                cell.lr_eig_max0 = max(r["lr_eig_max0"] for r in runs)
                cell.nonfinite_runs = sum(int(r["nonfinite"] > 0) for r in runs)
                cells.append(cell)
            say(f"  width {width}: done ({time.perf_counter() - total:.0f} s)")
    finally:
        torch.set_num_threads(threads)

    grid = {(c.width, c.alpha): c.ntk_rel_change for c in cells}
    boundary = {
        w: boundary_alpha(alphas, [grid[(w, a)] for a in alphas], threshold) for w in widths
    }
    s, b = fit_exponent(widths, [boundary[w] for w in widths])
    c = _sqrt_const(widths, [boundary[w] for w in widths])
    per_init = []
    for k in range(seeds):
        runs = {(cl.width, cl.alpha): cl.ntk_rel_change_runs[k] for cl in cells}
        stars = [boundary_alpha(alphas, [runs[(w, a)] for a in alphas], threshold) for w in widths]
        per_init.append(fit_exponent(widths, stars)[0])
    p, q = fit_lazy_scaling(
        [cl.width for cl in cells], [cl.alpha for cl in cells], [cl.ntk_rel_change for cl in cells],
        threshold,
    )  # fmt: skip
    csv_path = out_dir / "phase.csv"
    _write_csv(csv_path, cells, threshold)
    result = PhaseResult(
        cells, widths, alphas, threshold, steps, lr, seed, seeds, boundary, s, b, c, csv_path,
        None, 0.0, exponent_interval(per_init), p, q,
    )  # fmt: skip
    if plot:
        result.png_path = out_dir / "phase.png"
        _plot(result, result.png_path)
    result.seconds = time.perf_counter() - total
    say()
    say(format_grid(result))
    say()
    say(summary(result))
    return result


def _write_csv(path: Path, cells: list[PhaseCell], threshold: float) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["width", "alpha", "lr", "seeds", "ntk_rel_change", "ntk_rel_change_min",
                    "ntk_rel_change_max", "params_rel_change", "lin_rel_error", "final_loss",
                    "lr_eig_max0", "nonfinite_runs", "lazy"])  # fmt: skip
        for c in cells:
            runs = c.ntk_rel_change_runs
            w.writerow([c.width, repr(c.alpha), repr(c.lr), len(runs), repr(c.ntk_rel_change),
                        repr(min(runs)), repr(max(runs)), repr(c.params_rel_change),
                        repr(c.lin_rel_error), repr(c.final_loss), repr(c.lr_eig_max0),
                        c.nonfinite_runs, int(c.ntk_rel_change <= threshold)])  # fmt: skip


def format_grid(result: PhaseResult) -> str:
    """The grid as text: one row per α (largest first), one column per width; ``*`` marks cells
    above the lazy threshold (rich), ``nan`` a diverged cell."""
    from lazy_monitor.cli.report import format_table

    headers = ["alpha \\ width"] + [str(w) for w in result.widths]
    rows = []
    for a in reversed(result.alphas):
        row = [f"{a:.3g}"]
        for w in result.widths:
            v = result.cell(w, a).ntk_rel_change
            row.append(f"{v:.3g}{'' if v <= result.threshold else '*'}")
        rows.append(row)
    boundary = ["alpha*"] + [f"{result.boundary[w]:.3g}" for w in result.widths]
    title = f"final ntk/rel_change (* = above the lazy threshold {result.threshold:g})"
    return title + "\n" + format_table(headers, rows + [boundary])


def summary(result: PhaseResult) -> str:
    """The fitted exponent with its interval against Geiger et al.'s −½, in words.

    "consistent with -1/2" only when the 95 % interval across initialisations contains −½; one
    initialisation gives no interval and no verdict.
    """
    lr_eig = max(
        (c.lr_eig_max0 for c in result.cells if math.isfinite(c.lr_eig_max0)), default=math.nan
    )
    lines = [f"lr*eig_max/N at step 0: at most {lr_eig:.3g} (MSE stability edge: 2)"]
    iv = result.interval
    if math.isnan(result.exponent) and iv.n == 0:
        lines.append(
            "boundary exponent: undefined (fewer than two widths have a lazy/rich crossing inside "
            "the alpha grid; widen --phase-alphas)"
        )
    else:
        per_init = ", ".join(f"{v:+.2f}" if math.isfinite(v) else "none" for v in iv.per_init)
        over = f"{iv.n} initialisations"
        if iv.n < len(iv.per_init):
            over = (
                f"{iv.n} of {len(iv.per_init)} initialisations (none: fewer than two widths "
                "cross inside the alpha grid)"
            )
        if iv.n >= 2:
            if iv.contains(GEIGER_EXPONENT):
                half = (iv.high - iv.low) / 2
                verdict = (
                    f"consistent with -1/2 at this precision (±{half:.2f}; more inits narrow it)"
                )
            else:
                side = "steeper" if iv.high < GEIGER_EXPONENT else "shallower"
                verdict = f"excludes -1/2 ({side})"
            lines.append(
                f"boundary alpha* ∝ width^s over {over}: s = {iv.mean:+.2f}, "
                f"95% interval [{iv.low:+.2f}, {iv.high:+.2f}] (Student t across inits: "
                f"{per_init}); Geiger et al. 2020: -1/2 -> {verdict}"
            )
        else:
            lines.append(
                f"boundary alpha* ∝ width^s: s = {iv.mean:+.2f} from one initialisation "
                f"({per_init}): no interval, so no verdict against Geiger et al.'s -1/2 "
                "(use --phase-seeds >= 3)"
            )
        lines.append(
            f"fit to the per-cell medians: s = {result.exponent:+.2f}; "
            f"alpha*sqrt(width) ≈ {result.sqrt_const:.3g}"
        )
    p, q = result.lazy_width_slope, result.lazy_alpha_slope
    if math.isfinite(p) and math.isfinite(q):
        lines.append(
            f"lazy cells: ntk/rel_change ∝ width^{p:+.2f} · alpha^-{q:.2f} (least squares; the "
            "width slope at fixed alpha, compare the plain demo's; alpha^-1 would be a kernel "
            "moving linearly with the weights, see docs/science.md)"
        )
    lines.append(f"seed {result.seed}, {result.seeds} init(s) per cell; {result.seconds:.0f} s")
    lines.append(
        f"wrote {result.csv_path}" + (f" and {result.png_path}" if result.png_path else "")
    )
    return "\n".join(lines)


def _plot(result: PhaseResult, path: Path) -> None:
    """Heatmap of the final ntk/rel_change (log colours), threshold contour, boundary fits."""
    import numpy as np

    matplotlib = require("matplotlib", "lazy-monitor demo --phase")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    ws = np.array(result.widths, dtype=float)
    al = np.array(result.alphas, dtype=float)
    vals = np.array(
        [[result.cell(w, a).ntk_rel_change for w in result.widths] for a in result.alphas]
    )
    masked = np.ma.masked_invalid(np.where(vals > 0, vals, np.nan))

    def edges(v: np.ndarray) -> np.ndarray:  # geometric cell edges around log-spaced centres
        lv = np.log(v)
        mid = (lv[1:] + lv[:-1]) / 2
        return np.exp(np.concatenate([[2 * lv[0] - mid[0]], mid, [2 * lv[-1] - mid[-1]]]))

    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    finite = masked.compressed()
    norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size else None
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.6")  # diverged cells in grey
    mesh = ax.pcolormesh(edges(ws), edges(al), masked, norm=norm, cmap=cmap, shading="flat")
    fig.colorbar(mesh, ax=ax, label="final ntk/rel_change  ‖K_T − K₀‖/‖K₀‖")
    if finite.size and finite.min() < result.threshold < finite.max():
        log_vals = np.ma.masked_invalid(np.log(np.where(vals > 0, vals, np.nan)))
        ax.contour(ws, al, log_vals, levels=[math.log(result.threshold)], colors="black",
                   linewidths=1.5, linestyles="solid")  # fmt: skip
        ax.plot([], [], "-", color="black", label=f"contour ΔK = {result.threshold:g}")
    pts = [(w, a) for w, a in result.boundary.items() if math.isfinite(a)]
    if pts:
        ax.plot(*zip(*pts), "o", color="white", mec="black", label="α* per width (interpolated)")
    line_w = np.geomspace(ws[0], ws[-1], 50)
    if math.isfinite(result.exponent):
        ax.plot(line_w, np.exp(result.intercept) * line_w**result.exponent, "-", color="red",
                label=f"fit α* ∝ width^{result.exponent:+.2f}")  # fmt: skip
    if math.isfinite(result.sqrt_const):
        ax.plot(line_w, result.sqrt_const / np.sqrt(line_w), "--", color="orange",
                label=f"α·√width = {result.sqrt_const:.3g} (Geiger et al.)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(edges(ws)[0], edges(ws)[-1])
    ax.set_ylim(edges(al)[0], edges(al)[-1])
    ax.set_xlabel("width")
    ax.set_ylabel("output scale α  (lr ∝ 1/α²)")
    ax.set_title(f"lazy (top right) vs rich (bottom left): two spirals, {result.steps} GD steps")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------- CLI
def _float_list(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers"
        ) from None
    if len(set(values)) < 2 or any(not (math.isfinite(v) and v > 0) for v in values):
        raise argparse.ArgumentTypeError(
            f"give at least two distinct positive numbers, got {text!r}"
        )
    return values


def _int_list(text: str) -> list[int]:
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None
    if len(set(values)) < 2 or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"give at least two distinct widths >= 1, got {text!r}")
    return values


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the phase-diagram options (``--out`` and the grid) to ``parser``.

    The option names are prefixed ``--phase-`` where they could clash with the plain demo's
    (``--phase-widths``, ``--phase-steps``, ...); ``--out`` is shared.
    """
    g = parser.add_argument_group("phase diagram (--phase)")
    if not any("--out" in a.option_strings for a in parser._actions):
        g.add_argument("--out", metavar="DIR", default="lazy_monitor_runs",
                       help="output folder for phase.png and phase.csv")  # fmt: skip
    g.add_argument("--phase-widths", type=_int_list, default=list(DEFAULT_WIDTHS), metavar="W1,W2,...",
                   help="hidden widths (default: %(default)s)")  # fmt: skip
    g.add_argument("--phase-alphas", type=_float_list, default=list(DEFAULT_ALPHAS), metavar="A1,A2,...",
                   help="output scales alpha; lr is divided by alpha^2 (default: 9 values 0.1..100)")  # fmt: skip
    g.add_argument("--phase-steps", type=_positive(int), default=DEFAULT_STEPS, metavar="N",
                   help="full-batch GD steps per run (default: %(default)s)")  # fmt: skip
    g.add_argument("--phase-lr", type=_positive(float), default=DEFAULT_LR,
                   help="learning rate at alpha=1 (default: %(default)s)")  # fmt: skip
    g.add_argument("--phase-seeds", type=_positive(int), default=DEFAULT_SEEDS, metavar="K",
                   help="initialisations per cell; the exponent's 95%% interval is taken "
                        "across them (default: %(default)s)")  # fmt: skip
    g.add_argument("--phase-threshold", type=_positive(float), default=DEFAULT_THRESHOLD,
                   help="lazy threshold on ntk/rel_change (default: %(default)s)")  # fmt: skip
    if not any("--seed" in a.option_strings for a in parser._actions):
        g.add_argument("--seed", type=int, default=0, help="data seed (default: 0)")


def main(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run :func:`run_phase` from parsed ``args`` (see :func:`add_arguments`); exit status 0, or
    2 if ``--out`` is not a usable directory."""
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        print(
            f"lazy-monitor demo --phase: error: --out {str(out_dir)!r} is not a directory", file=err
        )
        return 2
    run_phase(
        out_dir,
        widths=args.phase_widths,
        alphas=args.phase_alphas,
        steps=args.phase_steps,
        lr=args.phase_lr,
        seed=args.seed,
        seeds=args.phase_seeds,
        threshold=args.phase_threshold,
        out=out,
    )
    return 0


if __name__ == "__main__":  # python -m lazy_monitor.cli.phase --out DIR
    _parser = argparse.ArgumentParser(prog="python -m lazy_monitor.cli.phase")
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
