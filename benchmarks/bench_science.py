"""Regenerate the two science tables of ``docs/science.md``: the catapult edge and the phase exponent.

1. Catapult (``lazy-monitor demo --catapult``): verdict against ``lr·λ₀/N`` for one-hidden-layer
   ReLU nets of widths 64, 1024, 4096 (N = 32 spirals, 300 GD steps, seed 0), and for depths 1-3
   at width 512, each row next to what the window ``2 < lr·λ₀/N <= 4`` predicts.
2. Phase (``lazy-monitor demo --phase``, default grid): the boundary exponent of every
   initialisation over data seeds 0-2 × 3 initialisations (9 fits), their mean and Student-t 95 %
   interval, and the lazy-cell fit ``ntk/rel_change ∝ width^p · α^-q`` (boundary exponent p/q).

One thread per process, ``--jobs`` processes (default 2); the load and, at the end, the CPU time
of the workers are printed. Measured: 33 min wall on 2 cores at load 11-22 (other jobs); the
phase grids are 9 × (42-51 s) of CPU time, so on idle cores expect several minutes.
``--phase-seeds 0`` (one grid of 3 initialisations) or ``--skip-phase`` make it shorter.

    python benchmarks/bench_science.py [--jobs 2] [--phase-seeds 0,1,2] [--skip-phase]
"""

from __future__ import annotations

import argparse
import io
import math
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

#: (width, depth, lr·λ₀/N values): three widths at depth 1, then depths 2 and 3 at width 512.
CATAPULT_CASES = [
    (64, 1, (1, 1.8, 2.2, 3, 3.6, 4, 4.4, 5, 6, 8, 12, 16)),
    (1024, 1, (1, 1.8, 2.2, 3, 3.6, 4, 4.4, 5, 6, 8, 12, 16)),
    (4096, 1, (1, 1.8, 2.2, 3, 3.6, 4, 4.4, 5, 6, 8, 12, 16)),
    (512, 1, (3, 4, 4.4, 5, 6, 8)),
    (512, 2, (3, 4, 5, 6, 7, 8, 10, 12)),
    (512, 3, (3, 4, 6, 8, 9, 10, 12, 14)),
]
CATAPULT_STEPS = 300


def _catapult(case: tuple[int, int, tuple[float, ...]]) -> tuple[str, list[tuple[float, str]]]:
    from lazy_monitor.cli.catapult import format_result, run_catapult

    width, depth, ratios = case
    result = run_catapult(
        factors=[r / 2 for r in ratios], width=width, depth=depth, n=32, steps=CATAPULT_STEPS
    )
    return format_result(result), [(r.lr_eig_max0, r.verdict) for r in result.runs]


def _phase(seed: int) -> dict:
    from lazy_monitor.cli.phase import boundary_alpha, fit_lazy_scaling, run_phase, summary

    with tempfile.TemporaryDirectory() as tmp:
        result = run_phase(tmp, seed=seed, seeds=3, plot=False)
        text = summary(result)
    per_init_pq = []
    for k in range(result.seeds):
        vals = [c.ntk_rel_change_runs[k] for c in result.cells]
        per_init_pq.append(
            fit_lazy_scaling(
                [c.width for c in result.cells], [c.alpha for c in result.cells], vals, 0.1
            )
        )
    stars = {
        k: [
            boundary_alpha(
                result.alphas,
                [result.cell(w, a).ntk_rel_change_runs[k] for a in result.alphas],
                result.threshold,
            )
            for w in result.widths
        ]
        for k in range(result.seeds)
    }
    return {
        "seed": seed,
        "per_init": result.interval.per_init,
        "median_fit": result.exponent,
        "pq": (result.lazy_width_slope, result.lazy_alpha_slope),
        "per_init_pq": per_init_pq,
        "stars": stars,
        "widths": result.widths,
        "summary": text,
        "seconds": result.seconds,
    }


def _edge(rows: list[tuple[float, str]]) -> str:
    """``last catapult – first diverged`` among the ratios (the measured upper edge)."""
    cat = [r for r, v in rows if v == "catapult"]
    div = [r for r, v in rows if v == "diverged"]
    return f"{max(cat) if cat else math.nan:g} – {min(div) if div else math.nan:g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--phase-seeds", default="0,1,2", help="data seeds (3 inits each)")
    parser.add_argument("--skip-phase", action="store_true")
    parser.add_argument("--skip-catapult", action="store_true")
    args = parser.parse_args(argv)
    out = sys.stdout
    print(f"load: {os.getloadavg()[0]:.1f} (1-min average), {os.cpu_count()} CPUs", file=out)
    start = time.perf_counter()
    seeds = [int(s) for s in args.phase_seeds.split(",") if s.strip()]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        # the long phase grids first so that the catapult cases fill the gaps
        phase_futs = [] if args.skip_phase else [pool.submit(_phase, s) for s in seeds]
        cat_futs = [] if args.skip_catapult else [pool.submit(_catapult, c) for c in CATAPULT_CASES]
        edges = []
        for case, fut in zip(CATAPULT_CASES, cat_futs):
            text, rows = fut.result()
            print(f"\n## catapult: width {case[0]}, depth {case[1]}\n{text}", file=out, flush=True)
            edges.append((case[0], case[1], _edge(rows)))
        if edges:
            print("\n## measured upper edge (last catapult – first diverged lr·λ₀/N)", file=out)
            for width, depth, edge in edges:
                print(f"width {width:5d}  depth {depth}:  {edge}", file=out)
        phases = [f.result() for f in phase_futs]
    for ph in phases:
        print(
            f"\n## phase: data seed {ph['seed']} ({ph['seconds']:.0f} s)\n{ph['summary']}", file=out
        )
        for k, star in ph["stars"].items():
            print(f"  init {k}: alpha* = {[round(a, 3) for a in star]}", file=out)
    if phases:
        _pooled(phases, out)
    import resource

    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        f"\ntotal {time.perf_counter() - start:.0f} s wall, workers "
        f"{cpu.ru_utime + cpu.ru_stime:.0f} s CPU, load {os.getloadavg()[0]:.1f}",
        file=out,
    )
    return 0


def _pooled(phases: list[dict], out: io.TextIOBase) -> None:
    from lazy_monitor.cli.phase import GEIGER_EXPONENT, exponent_interval

    per_init = [s for ph in phases for s in ph["per_init"]]
    iv = exponent_interval(per_init)
    ps = [p for ph in phases for p, _ in ph["per_init_pq"] if math.isfinite(p)]
    qs = [q for ph in phases for _, q in ph["per_init_pq"] if math.isfinite(q)]
    ratio = [p / q for ph in phases for p, q in ph["per_init_pq"] if math.isfinite(p / q)]
    print(f"\n## phase exponent pooled over {iv.n} initialisations", file=out)
    print("per init: " + ", ".join(f"{s:+.2f}" for s in per_init), file=out)
    verdict = "contains" if iv.contains(GEIGER_EXPONENT) else "excludes"
    print(
        f"s = {iv.mean:+.3f}, 95% interval [{iv.low:+.3f}, {iv.high:+.3f}] (Student t, "
        f"sd {statistics.stdev([v for v in per_init if math.isfinite(v)]):.3f}); {verdict} -1/2",
        file=out,
    )
    for name, vals in (("p (width slope)", ps), ("q (alpha slope)", qs), ("p/q", ratio)):
        v = exponent_interval(vals)
        print(
            f"lazy cells {name}: {v.mean:+.3f} [{v.low:+.3f}, {v.high:+.3f}] over {v.n}", file=out
        )
    narrow = [_fit_wide(ph["widths"], star) for ph in phases for star in ph["stars"].values()]
    v = exponent_interval(narrow)
    print(
        f"fit on widths >= 64 only: {v.mean:+.3f} [{v.low:+.3f}, {v.high:+.3f}] over {v.n}",
        file=out,
    )


def _fit_wide(widths: list[int], stars: list[float]) -> float:
    from lazy_monitor.cli.phase import fit_exponent

    pairs = [(w, a) for w, a in zip(widths, stars) if w >= 64]
    return fit_exponent([w for w, _ in pairs], [a for _, a in pairs])[0]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
