"""Old vs new engine in one run: ``bench_kernels.py`` rows, alternating worker subprocesses.

Each row runs ``bench_kernels.py --worker`` against two source trees (``--old``, ``--new``:
checkouts whose ``lazy_monitor`` is imported through ``PYTHONPATH``) in the order A B B A
(``tut`` = the torch.func tutorial anchor, also alternated where requested), so slow drift of
the machine's load hits both sides alike; the row's number is the median over the runs of each
side, the ratio ``old / new`` is printed with it.

    git worktree add /tmp/old <commit>
    python benchmarks/bench_ab.py --old /tmp/old --new . --cases resnet18:128,cnn:128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

BENCH = Path(__file__).with_name("bench_kernels.py")

# (model, N, timed calls per worker, run order)
ROWS = [
    ("resnet18", 128, 1, ["old", "new", "new", "old"]),
    ("cnn", 32, 3, ["tut", "old", "new", "new", "old", "tut"]),
    ("cnn", 128, 3, ["tut", "old", "new", "new", "old", "tut"]),
    ("mlp", 32, 5, ["old", "new", "new", "old"]),
    ("mlp", 128, 5, ["old", "new", "new", "old"]),
    ("mlp", 512, 3, ["old", "new", "new", "old"]),
    ("lm", 16, 3, ["old", "new", "new", "old"]),
    ("gpt2", 32, 3, ["old", "new", "new", "old"]),
]


def worker(tree: str, model: str, n: int, method: str, repeats: int, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=tree)
    cmd = [sys.executable, str(BENCH), "--worker", model, str(n), method, str(repeats)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if res.returncode:
        return {"error": (res.stderr.strip().splitlines() or ["?"])[-1][:120]}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["load"] = os.getloadavg()[0]
    return out


def _median(runs: dict, side: str, key: str = "median_s") -> Optional[float]:
    vals = [r[key] for r in runs.get(side, []) if key in r]
    return statistics.median(vals) if vals else None


def _s(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.3f} s"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="source tree of the old engine")
    parser.add_argument("--new", default=".", help="source tree of the new engine")
    parser.add_argument("--cases", default=None, help="e.g. resnet18:128,cnn:32 (default: all)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker")
    args = parser.parse_args(argv)
    trees = {"old": str(Path(args.old).resolve()), "new": str(Path(args.new).resolve())}
    wanted = None if args.cases is None else set(args.cases.split(","))
    print("| case | N | tutorial | old | new | old / new | peak RSS extra old → new | load |")
    print("|---|---|---|---|---|---|---|---|")
    for model, n, repeats, order in ROWS:
        if wanted is not None and f"{model}:{n}" not in wanted:
            continue
        runs: dict[str, list[dict]] = {}
        for side in order:
            method = "tutorial" if side == "tut" else "auto"
            tree = trees["new" if side == "tut" else side]
            runs.setdefault(side, []).append(worker(tree, model, n, method, repeats, args.timeout))
            print(f"# {model}:{n} {side}: {runs[side][-1]}", file=sys.stderr, flush=True)

        old, new, tut = (_median(runs, side) for side in ("old", "new", "tut"))
        ratio = f"{old / new:.2f}x" if old and new else "–"
        rss_old = _median(runs, "old", "peak_rss_delta_gib") or float("nan")
        rss_new = _median(runs, "new", "peak_rss_delta_gib") or float("nan")
        rss = f"{rss_old:.2f} → {rss_new:.2f} GiB"
        loads = [r["load"] for rs in runs.values() for r in rs if "load" in r]
        print(
            f"| {model} | {n} | {_s(tut)} | {_s(old)} | {_s(new)} | {ratio} | {rss} | {min(loads):.1f}–{max(loads):.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
