"""``lazy-monitor check``: gate finished runs on metric thresholds (for shells and CI).

Exit status:

* ``0`` -- every run satisfies every threshold;
* ``1`` -- at least one run violates a threshold (each violation is listed with run, metric,
  worst value and the step where it occurred);
* ``2`` -- the check could not be made: usage error, no run under the log directory, or a
  threshold's metric absent from a run. A missing metric never passes.

By default every logged point is checked (the *worst* value over the run must satisfy the
bound); ``--final`` checks only the last logged value. A NaN violates every bound.

``--min`` skips the reference point at step 0: the monitor logs it at train start, where every
change metric (``ntk/rel_change``, ``params/rel_change``, ...) is exactly 0, so a minimum on a
change could otherwise never pass. Minimums are checked at every point with step ``>=
--min-from-step`` (default 1; 0 includes the step-0 point) and always at the last point (so a run
that logged only step 0 is checked there): the policy
:func:`lazy_monitor.thresholds.checks_minimum`, shared with :class:`~lazy_monitor.KernelDriftGate`.
``--max`` always checks every point. Thresholds are :class:`lazy_monitor.thresholds.Threshold`
(metric or glob, value, direction).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Optional, TextIO

from lazy_monitor._validation import check_int
from lazy_monitor.cli._events import CorruptEventFileError, Curve, Run, load_runs, suggest
from lazy_monitor.cli.report import quiet_broken_pipe
from lazy_monitor.thresholds import DIRECTIONS, Threshold, checks_minimum

__all__ = ["Threshold", "CheckResult", "parse_threshold", "evaluate", "add_parser", "run"]

EXIT_OK, EXIT_VIOLATION, EXIT_ERROR = 0, 1, 2
#: ``--min`` skips the step-0 reference point (every change metric is exactly 0 there).
DEFAULT_MIN_FROM_STEP = 1


@dataclass(frozen=True)
class CheckResult:
    """One (run, tag, threshold) comparison: ``metric`` is the tag read, ``requested`` the
    threshold's metric as given (they differ for a tag under a logger prefix or a glob)."""

    run: str
    metric: str
    bound: str
    threshold: float
    value: float
    step: int
    ok: bool
    requested: str = ""


def parse_threshold(bound: str, text: str) -> Threshold:
    """Parse ``METRIC=VALUE`` given to ``--max``/``--min``.

    Raises:
        ValueError: naming the bad text and the expected form.
    """
    metric, sep, raw = text.rpartition("=")
    metric = metric.strip()
    if not sep or not metric:
        raise ValueError(
            f"--{bound} {text!r}: expected METRIC=VALUE, e.g. --{bound} ntk/rel_change=0.1"
        )
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"--{bound} {text!r}: {raw!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"--{bound} {text!r}: the threshold must be a finite number")
    return Threshold(metric, value, bound)


def _min_curve(curve: Curve, from_step: int) -> Curve:
    """The points a minimum is checked at (:func:`checks_minimum`): steps ``>= from_step``, and
    always the last one."""
    last = len(curve.steps) - 1
    keep = [
        i
        for i, step in enumerate(curve.steps)
        if checks_minimum(step, min_from_step=from_step, final=i == last)
    ]
    return Curve(tuple(curve.steps[i] for i in keep), tuple(curve.values[i] for i in keep))


def evaluate(
    runs: list[Run],
    thresholds: list[Threshold],
    *,
    final_only: bool = False,
    min_from_step: int = DEFAULT_MIN_FROM_STEP,
) -> tuple[list[CheckResult], list[tuple[str, str]]]:
    """Compare every run with every threshold.

    Args:
        runs: runs read by :func:`lazy_monitor.cli._events.load_runs`.
        thresholds: the bounds to enforce.
        final_only: compare the last logged value instead of the worst value over all steps.
        min_from_step: minimums ignore points logged before this step (default 1: skip the
            step-0 reference point, where every change is exactly 0); the last point is always
            checked. Maximums check every point.

    Returns:
        ``(results, missing)``: one :class:`CheckResult` per (run, matching tag, threshold), and
        ``(run, metric)`` for each threshold that matches no tag of a run. A metric matches its
        tags, else the same tags under one logger prefix (``train/ntk/rel_change``, as the
        Hugging Face Trainer logs them: :meth:`~lazy_monitor.cli._events.Run.select`); the
        result's ``metric`` is the tag read.
    """
    results: list[CheckResult] = []
    missing: list[tuple[str, str]] = []
    for run in runs:
        for th in thresholds:
            tags = run.select(th.metric)
            if not tags:
                missing.append((run.name, th.metric))
                continue
            for tag in tags:
                curve = run.curves[tag]
                if final_only:
                    value, step = curve.final, curve.final_step
                elif th.direction == "max":
                    value, step = curve.extreme(largest=True)
                else:
                    value, step = _min_curve(curve, min_from_step).extreme(largest=False)
                ok = th.satisfied(value)
                results.append(
                    CheckResult(run.name, tag, th.direction, th.value, value, step, ok, th.metric)
                )
    return results, missing


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "check",
        help="exit 0/1/2 depending on whether logged runs satisfy metric thresholds",
        description=(
            "Check every run under LOGDIR against thresholds. Exit 0: all satisfied; 1: some run "
            "violates a threshold; 2: usage error, no runs, a metric missing from a run, or an "
            "unreadable event file. --max checks every logged point; --min skips the step-0 "
            "reference point (where every change metric is exactly 0) and checks every point "
            "from --min-from-step on, and always the last one."
        ),
        epilog=(
            "example: lazy-monitor check runs/ --max ntk/rel_change=0.1 "
            "--max lin/rel_error=0.05 --min lin/agreement=0.95"
        ),
    )
    parser.add_argument("logdir", metavar="LOGDIR", help="directory searched recursively for runs")
    parser.add_argument(
        "--max",
        metavar="METRIC=VALUE",
        action="append",
        default=[],
        help="the metric must stay <= VALUE (repeatable; METRIC may be a glob such as "
        "'ntk_layer/*/rel_change')",
    )
    parser.add_argument(
        "--min",
        metavar="METRIC=VALUE",
        action="append",
        default=[],
        help="the metric must stay >= VALUE (repeatable); checked from step --min-from-step on "
        "(default 1: the step-0 reference point, where every change is exactly 0, is skipped) "
        "and always at the last point",
    )
    parser.add_argument(
        "--min-from-step",
        metavar="STEP",
        type=_non_negative_int,
        default=DEFAULT_MIN_FROM_STEP,
        help=f"first step at which --min thresholds are checked (default "
        f"{DEFAULT_MIN_FROM_STEP}; 0 also checks the step-0 point)",
    )
    parser.add_argument(
        "--final",
        action="store_true",
        help="check only the last logged value of each metric (default: every logged value)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON document on stdout")
    parser.set_defaults(func=run)
    return parser


def _non_negative_int(text: str) -> int:
    try:
        return check_int("--min-from-step", int(text), minimum=0)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            str(err) if text.strip().lstrip("-").isdigit() else f"{text!r} is not an integer"
        ) from None


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Execute ``check``; writes human or JSON output on ``out``, errors on ``err``. A reader
    that stops early (``check --json | head``) keeps the exit status, without a traceback."""
    try:
        code = _check(args, out, err)
        out.flush()
        return code
    except BrokenPipeError:
        quiet_broken_pipe(out)
        return EXIT_ERROR


def _check(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        thresholds = [parse_threshold("max", t) for t in args.max]
        thresholds += [parse_threshold("min", t) for t in args.min]
    except ValueError as exc:
        print(f"lazy-monitor check: error: {exc}", file=err)
        return EXIT_ERROR
    if not thresholds:
        print(
            "lazy-monitor check: error: nothing to check; give at least one --max METRIC=VALUE or "
            "--min METRIC=VALUE",
            file=err,
        )
        return EXIT_ERROR
    try:
        runs = load_runs(args.logdir)
    except (FileNotFoundError, NotADirectoryError) as exc:
        print(f"lazy-monitor check: error: {exc}", file=err)
        return EXIT_ERROR
    except CorruptEventFileError as exc:
        # A damaged log is "could not check" (2), never a pass: its lost tail may hold the
        # violation. Through _finish so that --json reports it too.
        return _finish(args, out, err, thresholds, [], [], EXIT_ERROR, str(exc))
    if not runs:
        message = (
            f"no runs under {args.logdir!r} (a run is a directory holding *tfevents* files); "
            "nothing was checked"
        )
        return _finish(args, out, err, thresholds, [], [], EXIT_ERROR, message)

    results, missing = evaluate(
        runs, thresholds, final_only=args.final, min_from_step=args.min_from_step
    )
    if missing:
        code = EXIT_ERROR
    elif any(not r.ok for r in results):
        code = EXIT_VIOLATION
    else:
        code = EXIT_OK
    names = [r.name for r in runs]
    hints = {metric: suggest(metric, runs) for _, metric in missing}
    return _finish(
        args, out, err, thresholds, results, missing, code, None, names, _prefixed(results), hints
    )


def _prefixed(results: list[CheckResult]) -> list[tuple[str, str]]:
    """``(requested metric, tag)`` for each metric read from a tag under a logger prefix."""
    pairs = {
        (r.requested, r.metric)
        for r in results
        if r.metric != r.requested and not fnmatch.fnmatchcase(r.metric, r.requested)
    }
    return sorted(pairs)


def _missing_text(metric: str, run: str, hints: dict[str, Optional[str]]) -> str:
    hint = hints.get(metric)
    return f"{metric!r} in {run!r}" + (f" (did you mean {hint!r}?)" if hint else "")


def _finish(
    args: argparse.Namespace,
    out: TextIO,
    err: TextIO,
    thresholds: list[Threshold],
    results: list[CheckResult],
    missing: list[tuple[str, str]],
    code: int,
    message: Optional[str],
    run_names: Optional[list[str]] = None,
    prefixed: Sequence[tuple[str, str]] = (),
    hints: Optional[dict[str, Optional[str]]] = None,
) -> int:
    status = {EXIT_OK: "pass", EXIT_VIOLATION: "fail", EXIT_ERROR: "error"}[code]
    run_names = run_names or []
    hints = hints or {}
    if args.json:
        doc = {
            "status": status,
            "exit_code": code,
            "logdir": str(args.logdir),
            "final_only": bool(args.final),
            "min_from_step": int(args.min_from_step),
            "thresholds": [
                {"bound": t.direction, "metric": t.metric, "value": t.value} for t in thresholds
            ],
            "runs": [
                {
                    "run": name,
                    "passed": all(r.ok for r in results if r.run == name)
                    and not any(m[0] == name for m in missing),
                    "checks": [_result_json(r) for r in results if r.run == name],
                    "missing": [m for run_name, m in missing if run_name == name],
                }
                for name in run_names
            ],
            "violations": [_result_json(r) for r in results if not r.ok],
            "matched_tags": [{"metric": m, "tag": t} for m, t in prefixed],
            "suggestions": {m: h for m, h in hints.items() if h},
            "error": message,
        }
        json.dump(doc, out, indent=2, allow_nan=False)
        out.write("\n")
        if message:
            print(f"lazy-monitor check: error: {message}", file=err)
        return code

    if message:
        print(f"lazy-monitor check: error: {message}", file=err)
        return code
    which = "final value" if args.final else "worst value"
    print(
        f"checked {len(run_names)} run(s) against: " + "; ".join(t.describe() for t in thresholds),
        file=out,
    )
    for metric, tag in prefixed:
        print(f"  note: {metric} read from the tag {tag}", file=out)
    for name in run_names:
        bad = [r for r in results if r.run == name and not r.ok]
        absent = [m for run_name, m in missing if run_name == name]
        if not bad and not absent:
            print(f"  PASS  {name}", file=out)
            continue
        print(f"  FAIL  {name}", file=out)
        for r in bad:
            op = DIRECTIONS[r.bound][2]
            print(
                f"        {r.metric}: {which} {_fmt(r.value)} at step {r.step} {op} {r.bound} "
                f"{_fmt(r.threshold)}",
                file=out,
            )
        for metric in absent:
            print(
                f"        {metric}: not logged in this run (missing metrics never pass)"
                + (f"; did you mean {hints[metric]!r}?" if hints.get(metric) else ""),
                file=out,
            )
    if missing:
        listing = ", ".join(_missing_text(metric, run, hints) for run, metric in missing)
        print(f"lazy-monitor check: error: metric not found: {listing}", file=err)
        if any(not r.ok for r in results):
            print(
                "lazy-monitor check: there are also threshold violations (listed above)", file=err
            )
    verdict = {
        EXIT_OK: "all runs pass",
        EXIT_VIOLATION: "threshold violated",
        EXIT_ERROR: "could not check every run",
    }[code]
    print(f"result: {status.upper()} ({verdict}), exit {code}", file=out)
    return code


def _result_json(r: CheckResult) -> dict:
    d = asdict(r)
    # Strict JSON has no NaN/inf: report them as null plus their spelling (they never pass).
    if not math.isfinite(d["value"]):
        d["value_text"] = str(d["value"])
        d["value"] = None
    return d
