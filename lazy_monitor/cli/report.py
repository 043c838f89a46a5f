"""``lazy-monitor report``: one row per logged run with the key drift metrics and the verdict.

For each run found under LOGDIR (see :mod:`lazy_monitor.cli._events`) the table shows the final
and the maximum over all logged steps of

* ``ntk/rel_change``   -- ‖K_t − K₀‖_F / ‖K₀‖_F, how far the empirical NTK moved;
* ``params/rel_change`` -- ‖θ_t − θ₀‖ / ‖θ₀‖, how far the weights moved;
* ``lin/rel_error``    -- ‖f − f_lin‖ / ‖f − f₀‖, the share of the function's change that the
  linearization f_lin = f₀ + J₀(θ − θ₀) misses (Lee et al. 2019),

and the verdict: ``lazy`` / ``non-lazy`` from the last logged ``regime/lazy`` (the tracker's
thresholds), ``non-finite`` if ``health/nonfinite`` was ever raised, ``unknown`` if the run
logged no ``regime/lazy``. ``--json`` gives every tag (final, min, max and their steps);
``--plot [FILE.png]`` draws the drift curves (default ``LOGDIR/drift.png``; log axes; one colour per configuration, the
line style is the verdict).
A ``phase.png`` in LOGDIR (the phase diagram ``lazy-monitor demo --phase --out LOGDIR`` writes)
is named in the output (``"phase_image"`` in ``--json``), also when LOGDIR holds no runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Optional, TextIO

from lazy_monitor import catalogue
from lazy_monitor._extras import require
from lazy_monitor.cli._events import Run, load_runs

__all__ = [
    "KEY_METRICS",
    "PLOT_METRICS",
    "verdict",
    "format_table",
    "plot_runs",
    "run_group",
    "add_parser",
]

#: Table columns (final and maximum per run) and plot panels: the catalogue entries marked
#: ``report=True`` / ``plot=True``.
KEY_METRICS = catalogue.report_metrics()
PLOT_METRICS = catalogue.plot_metrics()
#: The verdict reads the tracker's verdict and health flags (catalogue names).
VERDICT_METRIC, HEALTH_METRIC = "regime/lazy", "health/nonfinite"


def verdict(run: Run) -> str:
    """``"non-finite"``, ``"lazy"``, ``"non-lazy"`` or ``"unknown"`` for a logged run."""
    health = run.curve(HEALTH_METRIC)
    if health is not None and any(v != 0 for v in health.values):
        return "non-finite"
    lazy = run.curve(VERDICT_METRIC)
    if lazy is None:
        return "unknown"
    if math.isnan(lazy.final):
        return "non-finite"
    return "lazy" if lazy.final >= 0.5 else "non-lazy"


def _num(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Plain fixed-width table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        out = [str(cells[0]).ljust(widths[0])]
        out += [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule] + [line(r) for r in rows])


def _row(run: Run) -> list[str]:
    cells = [run.name, _num(run.last_step)]
    for metric in KEY_METRICS:
        curve = run.curve(metric)
        if curve is None:
            cells += ["-", "-"]
        else:
            cells += [_num(curve.final), _num(curve.extreme(largest=True)[0])]
    cells.append(verdict(run))
    return cells


def _headers() -> list[str]:
    headers = ["run", "step"]
    for metric in KEY_METRICS:
        headers += [f"{metric} final", "max"]
    return headers + ["verdict"]


def _finite_or_none(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def _run_json(run: Run) -> dict:
    metrics = {}
    for tag, curve in run.curves.items():
        vmax, smax = curve.extreme(largest=True)
        vmin, smin = curve.extreme(largest=False)
        metrics[tag] = {
            "final": _finite_or_none(curve.final),
            "final_step": curve.final_step,
            "max": _finite_or_none(vmax),
            "max_step": smax,
            "min": _finite_or_none(vmin),
            "min_step": smin,
            "points": len(curve.steps),
            "all_finite": all(math.isfinite(v) for v in curve.values),
        }
    return {
        "run": run.name,
        "path": str(run.path),
        "last_step": run.last_step,
        "verdict": verdict(run),
        "metrics": metrics,
        "matched_tags": matched_tags(run),
    }


#: The names ``report`` reads from a run (table, verdict, plot).
READ_METRICS = tuple(dict.fromkeys([*KEY_METRICS, VERDICT_METRIC, HEALTH_METRIC, *PLOT_METRICS]))


def matched_tags(run: Run) -> dict[str, str]:
    """``{metric: tag}`` for the metrics ``report`` read from a tag under a logger prefix
    (``ntk/rel_change`` from ``train/ntk/rel_change`` in a Hugging Face Trainer run)."""
    tags = {m: run.tag(m) for m in READ_METRICS}
    return {m: t for m, t in tags.items() if t is not None and t != m}


def _prefix_notes(runs: list[Run]) -> list[str]:
    """One line per run whose metrics were read under a logger prefix, naming an example."""
    notes = []
    for run in runs:
        matched = matched_tags(run)
        if matched:
            prefixes = sorted({t[: -len(m) - 1] for m, t in matched.items()})
            metric, tag = next(iter(matched.items()))
            notes.append(
                f"note: {run.name}: metrics read from tags under "
                + ", ".join(f"'{p}/'" for p in prefixes)
                + f" (e.g. {metric} = {tag})"
            )
    return notes


_REPEAT = re.compile(r"(^|[_/.-])(init|seed|version|rep|run)[_=-]?\d+(?=$|[_/.-])")
_WIDTH = re.compile(r"(?:^|[_/.-])(?:w|width)[_=-]?0*(\d+)(?=$|[_/.-])")


def run_group(name: str) -> str:
    """The group a run belongs to: its name without repeat markers (``init0``, ``seed3``,
    ``version_1``), so the initialisations of one configuration share a colour.

    >>> run_group("lazy_w00064_init2/version_0")
    'lazy_w00064'
    """
    return _REPEAT.sub("", name).strip("_/.-") or name


def _width(group: str) -> Optional[int]:
    match = _WIDTH.search(group)
    return int(match.group(1)) if match else None


#: Line style per verdict: lazy solid, non-lazy dashed, everything else dotted.
LINESTYLES = {"lazy": "-", "non-lazy": "--", "non-finite": ":", "unknown": ":"}


def line_styles(runs: list[Run]) -> tuple[dict[str, tuple], dict[str, tuple[tuple, str]]]:
    """Colours and line styles of :func:`plot_runs`: ``({group: colour}, {run name: (colour,
    linestyle)})``, groups ordered by width (then name)."""
    matplotlib = require("matplotlib", "lazy-monitor report --plot")
    groups = sorted(
        {run_group(r.name) for r in runs},
        key=lambda g: (_width(g) is None, _width(g) or 0, g),
    )
    many = len(groups) > 10  # tab10 repeats after ten: a sequential map, distinct and ordered
    cmap = matplotlib.colormaps["viridis" if many else "tab10"]
    colours = {
        g: tuple(cmap(0.9 * i / max(1, len(groups) - 1) if many else i))
        for i, g in enumerate(groups)
    }
    styles = {r.name: (colours[run_group(r.name)], LINESTYLES.get(verdict(r), ":")) for r in runs}
    return colours, styles


def plot_runs(runs: list[Run], path: str | Path, title: Optional[str] = None) -> Path:
    """Save the drift curves of ``runs`` (one panel per metric, one line per run) as an image.

    Runs are grouped by :func:`run_group` (the initialisations of one configuration): one colour
    per group, ordered by the width in the name (``w64``, ``width_256``) where there is one, from
    a sequential colour map (distinct however many groups there are); the line style is the
    verdict (lazy solid, non-lazy dashed, non-finite/unknown dotted). Both axes are
    logarithmic (step 0, where every change is 0, is not drawn; the x-axis is linear up to 1).

    Args:
        runs: runs to draw.
        path: output image (format from the extension, e.g. ``.png``, ``.pdf``, ``.svg``).
        title: figure title.

    Returns:
        The written path.

    Raises:
        ImportError: if matplotlib is not installed, with the install command.
        ValueError: if no run logged any of :data:`PLOT_METRICS`.
    """
    matplotlib = require("matplotlib", "lazy-monitor report --plot")
    matplotlib.use("Agg")  # headless: never open a window from a CLI
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    metrics = [m for m in PLOT_METRICS if any(r.curve(m) is not None for r in runs)]
    if not metrics:
        raise ValueError("nothing to plot: no run logged any of " + ", ".join(PLOT_METRICS))
    path = Path(path)
    groups, styles = line_styles(runs)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.4 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        positive = True
        for run in runs:
            curve = run.curve(metric)
            if curve is None:
                continue
            ax.plot(
                curve.steps,
                curve.values,
                color=styles[run.name][0],
                linestyle=styles[run.name][1],
                linewidth=1.4,
                alpha=0.85,
            )
            positive &= any(v > 0 for v in curve.values if math.isfinite(v))
        if positive:
            # Drift spans decades across widths; step 0 (exactly 0) is simply not drawn.
            ax.set_yscale("log", nonpositive="mask")
        ax.set_xscale("symlog", linthresh=1.0)  # early steps, where kernels move fastest
        ax.set_xlim(left=0)
        ax.set_title(metric)
        ax.set_xlabel("optimizer step")
        ax.grid(True, which="both", alpha=0.3)
    verdicts = {r.name: verdict(r) for r in runs}
    handles = [Line2D([], [], color=colour, linewidth=2) for colour in groups.values()]
    labels = list(groups)
    for name, style in (("lazy", "-"), ("non-lazy", "--")):
        if name in verdicts.values():
            handles.append(Line2D([], [], color="grey", linestyle=style))
            labels.append(f"verdict: {name}")
    if any(v not in ("lazy", "non-lazy") for v in verdicts.values()):
        handles.append(Line2D([], [], color="grey", linestyle=":"))
        labels.append("verdict: other")
    ncol = min(len(labels), 4)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize="small", frameon=False)
    if title:
        fig.suptitle(title)
    rows = math.ceil(len(labels) / ncol)
    fig.tight_layout(rect=(0, min(0.5, 0.06 * rows + 0.02), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "report",
        help="table of the key drift metrics and the verdict of every run under LOGDIR",
        description=(
            "One row per run under LOGDIR (a run is a directory holding *tfevents* files): final "
            "and max of " + ", ".join(KEY_METRICS) + ", and the lazy/non-lazy verdict."
        ),
    )
    parser.add_argument(
        "logdir", metavar="LOGDIR", nargs="?", help="directory searched recursively for runs"
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        nargs="?",
        const=DEFAULT_PLOT,
        help=f"also save drift curves to this image (.png, .pdf, .svg; without a name: "
        f"LOGDIR/{DEFAULT_PLOT})",
    )
    parser.add_argument(
        "--json", action="store_true", help="print every metric of every run as JSON on stdout"
    )
    parser.set_defaults(func=run)
    return parser


#: ``--plot`` without a file name writes this image into LOGDIR (next to the runs it draws).
DEFAULT_PLOT = "drift.png"
#: Image formats ``--plot`` writes (matplotlib's, by extension).
PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")

#: File name of the phase diagram written by ``lazy-monitor demo --phase``.
PHASE_IMAGE = "phase.png"


def _phase_image(logdir: str) -> Optional[Path]:
    path = Path(logdir) / PHASE_IMAGE
    return path if path.is_file() else None


def _plot_path(args: argparse.Namespace) -> Optional[str]:
    """Where ``--plot`` writes, or an error message: ``--plot`` alone -> LOGDIR/drift.png;
    ``report --plot LOGDIR`` (argparse reads LOGDIR as the image) is understood the same way."""
    if args.logdir is None:
        if args.plot is not None and Path(args.plot).is_dir():
            args.logdir, args.plot = args.plot, DEFAULT_PLOT
        else:
            return "the LOGDIR argument is required, e.g. lazy-monitor report runs/ --plot"
    if args.plot is None:
        return None
    if args.plot == DEFAULT_PLOT:
        args.plot = str(Path(args.logdir) / DEFAULT_PLOT)
    if Path(args.plot).suffix.lower() not in PLOT_FORMATS:
        return (
            f"--plot {args.plot!r}: give an image file name ending in "
            + ", ".join(PLOT_FORMATS)
            + f" (or --plot alone for LOGDIR/{DEFAULT_PLOT})"
        )
    return None


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Execute ``report``; 0 on success, 2 when LOGDIR is missing/empty or the plot fails. A
    reader that stops early (``report --json | head``) ends the output quietly."""
    try:
        return _report(args, out, err)
    except BrokenPipeError:
        quiet_broken_pipe(out)
        return 0


def quiet_broken_pipe(out: TextIO) -> None:
    """After the reader of ``out`` went away (``... | head``): point stdout at /dev/null so
    the interpreter's final flush does not print a second BrokenPipeError."""
    if out is sys.stdout:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _report(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    problem = _plot_path(args)
    if problem is not None:
        print(f"lazy-monitor report: error: {problem}", file=err)
        return 2
    try:
        runs = load_runs(args.logdir)
    except (FileNotFoundError, NotADirectoryError) as exc:
        print(f"lazy-monitor report: error: {exc}", file=err)
        return 2
    phase = _phase_image(args.logdir)
    phase_line = f"phase diagram (lazy-monitor demo --phase): {phase}"
    if not runs and phase is not None and not args.json:
        print(phase_line + " (no TensorBoard runs in this folder)", file=out)
        return 0
    if not runs:
        print(
            f"lazy-monitor report: error: no runs under {args.logdir!r} (a run is a directory "
            "holding *tfevents* files)",
            file=err,
        )
        return 2
    if args.plot:
        try:
            written = plot_runs(runs, args.plot, title=str(args.logdir))
        except (ImportError, ValueError) as exc:
            print(f"lazy-monitor report: error: {exc}", file=err)
            return 2
    if args.json:
        doc = {"logdir": str(args.logdir), "runs": [_run_json(r) for r in runs]}
        if args.plot:
            doc["plot"] = str(written)
        if phase is not None:
            doc["phase_image"] = str(phase)
        json.dump(doc, out, indent=2, allow_nan=False)
        out.write("\n")
        out.flush()  # a closed pipe raises here, inside run()'s guard
        return 0
    print(format_table(_headers(), [_row(r) for r in runs]), file=out)
    for note in _prefix_notes(runs):
        print(note, file=out)
    missing = [r.name for r in runs if not any(r.curve(m) is not None for m in KEY_METRICS)]
    if missing:
        print(
            "note: no lazy_monitor metrics in: "
            + ", ".join(missing)
            + " (logged by KernelRegimeMonitor / KernelTracker under ntk/, params/, lin/)",
            file=out,
        )
    if args.plot:
        print(f"drift curves saved to {written}", file=out)
    if phase is not None:
        print(phase_line, file=out)
    out.flush()
    return 0
