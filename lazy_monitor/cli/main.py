"""Entry point of the ``lazy-monitor`` command (also ``python -m lazy_monitor``).

Sub-commands:

* ``demo``   -- train NTK-parameterised MLPs of several widths (and one non-lazy run) with
  :class:`~lazy_monitor.callbacks.KernelRegimeMonitor`, then print the drift table and the fitted
  width exponent of the kernel change (theory: −½).
* ``report`` -- table / JSON / plot of the drift metrics of every run under a log directory.
* ``check``  -- exit 0/1/2 depending on whether logged runs satisfy metric thresholds.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from lazy_monitor import __version__
from lazy_monitor.cli import check, demo, report

__all__ = ["build_parser", "main"]

#: Exit status of usage errors and of any failure that prevented the command from finishing.
EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """The ``lazy-monitor`` argument parser with its three sub-commands."""
    parser = argparse.ArgumentParser(
        prog="lazy-monitor",
        description="Is your network still in the lazy (kernel / NTK) regime?",
    )
    parser.add_argument("--version", action="version", version=f"lazy-monitor {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="{demo,report,check}")
    subparsers.required = True
    demo.add_parser(subparsers)
    report.add_parser(subparsers)
    check.add_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``lazy-monitor`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status.

    Usage errors (unknown option, bad value) return 2, as argparse does; ``--help`` returns 0.
    Any other unexpected error (an unreadable or corrupt event file, a ``PermissionError``, ...)
    is reported on stderr as ``lazy-monitor <command>: error: <type>: <message>`` and returns 2
    ("could not check"), never 1, which ``check`` reserves for a threshold violation.
    ``KeyboardInterrupt`` and ``SystemExit`` propagate unchanged.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        return int(args.func(args, sys.stdout, sys.stderr))
    except Exception as exc:  # noqa: BLE001 -- any failure must map to exit 2, not 1
        print(
            f"lazy-monitor {args.command}: error: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
