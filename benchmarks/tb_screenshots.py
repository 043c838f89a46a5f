"""Headless-Chromium screenshots of TensorBoard on a log directory: check the dashboards as a person.

Starts ``tensorboard --logdir LOGDIR --host 127.0.0.1 --port <free port>`` (the ``tensorboard``
next to the running Python, i.e. the active venv's), waits until it serves and has loaded the
runs, takes one PNG per view with ``chromium --headless --screenshot``, then stops the server.
Every shot uses a fresh, throw-away browser profile, so TensorBoard's localStorage settings
(smoothing, "ignore outliers", expanded groups, saved pins) are the defaults a new user sees.

Views (file name -> URL path on the server):

* ``timeseries.png``          ``/#timeseries``: the default tab a user lands on.
* ``timeseries_query.png``    ``/?smoothing=0&tagFilter=<--tag-filter>#timeseries``: the Time
  Series tab with URL state. TensorBoard 2.21 reads these query parameters at load:
  ``smoothing`` (float), ``tagFilter`` (regex), ``runFilter`` (regex), ``runColorGroup``
  (``run`` | ``experiment`` | ``regex:<re>``), ``pinnedCards`` (JSON list of
  ``{"plugin": "scalars", "tag": "..."}``). Pass ``--query`` to replace the query string.
* ``timeseries_pinned.png``   ``/?pinnedCards=[...]#timeseries``: the ``--pin`` tags pinned on top
  (what a "open this URL" hint printed by a tool would show).
* ``custom_scalars.png``      ``/#custom_scalars``: the layout written with ``add_custom_scalars``.
* ``hparams.png``             ``/#hparams``: the HParams tab (opens on its table view).
* ``text.png``                ``/#text``: summaries written with ``add_text`` (markdown).
* ``images.png``              ``/#images``: summaries written with ``add_image``.
* ``--extra NAME=PATH``       any other view, e.g. ``--extra hist=/#histograms``.

What is and is not settable from a URL (checked in the 2.21 ``webfiles.zip`` bundle): the
y-axis log scale is a per-card UI toggle ("More line chart options" -> "Toggle Y-axis log
scale"), "Ignore outliers in chart scaling" and the card width are settings kept in the
browser's localStorage (``_tb_global_settings``); neither comes from the URL or the logs.

Reading the Time Series shot: groups are the tag prefix before the first ``/``, ordered by a
natural sort of the full tag in which digits and ``/`` come before every other character and
other characters compare by code point (so ``0_x`` < ``Zx`` < ``drift`` < ``epoch``); on a fresh
profile only the first two groups are expanded, all others are collapsed.

Rendering notes: every URL gets ``forceSVG=true`` (a TensorBoard feature flag read from the
query string) unless ``--webgl``: the default Time Series renderer draws lines with WebGL in a
web worker (OffscreenCanvas), and headless shots of it are racy (axes and legends drawn, lines
missing in some or all cards); the SVG renderer is synchronous and the shots are repeatable
(two runs gave pixel-identical PNGs). ``--run-all-compositor-stages-before-draw`` is needed
for cards shown through ``tagFilter`` (otherwise empty card frames). ``--virtual-time-budget`` lets the Angular app and its XHRs finish before the
shot (15 s of virtual time takes about 10 s of wall time here); ``--hide-scrollbars`` keeps the
PNG clean; ``--disable-gpu`` falls back to SwiftShader WebGL, which the line charts render with.
The Time Series tab scrolls inside its own pane, so only what fits in ``--window-size`` is in
the shot; raise the height to see more groups.

Run::

    lazy-monitor demo --out /tmp/demo --widths 64,256,1024 --inits 1 --steps 100
    python benchmarks/tb_screenshots.py /tmp/demo /tmp/shots
    python benchmarks/tb_screenshots.py /tmp/demo /tmp/shots --views timeseries,hparams \\
        --window-size 1600,2400 --extra pinned='/?pinnedCards=[{"plugin":"scalars","tag":"ntk/rel_change"}]'

    python benchmarks/tb_screenshots.py /tmp/demo /tmp/shots --readme docs/tensorboard.png

Then look at the PNGs. Exit status 1 if the server does not come up or a screenshot is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

#: view name -> path (query + fragment) on the TensorBoard server; ``{query}`` is filled in.
VIEWS: dict[str, str] = {
    "timeseries": "/#timeseries",
    "timeseries_query": "/?{query}#timeseries",
    "timeseries_pinned": "/?{pinned}#timeseries",
    "custom_scalars": "/#custom_scalars",
    "hparams": "/#hparams",
    "text": "/#text",
    "images": "/#images",
}


def with_force_svg(path: str) -> str:
    """``path`` with ``forceSVG=true`` added to its query string (before any ``#fragment``)."""
    head, sep, fragment = path.partition("#")
    base, qsep, query = head.partition("?")
    query = "forceSVG=true" + ("&" + query if query else "")
    return f"{base}?{query}{sep}{fragment}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tensorboard_command(logdir: Path, port: int) -> list[str]:
    """``tensorboard`` from the running interpreter's environment (falls back to ``-m``)."""
    exe = Path(sys.executable).with_name("tensorboard")
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "tensorboard.main"]
    return head + ["--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)]


def _get_json(url: str) -> Optional[object]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read().decode())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def wait_until_served(base: str, proc: subprocess.Popen, timeout: float) -> list[str]:
    """Block until the server answers and its run list is non-empty and stable for 2 polls.

    The data loader reads the event files in the background after the port opens; a shot taken
    before it finishes shows "No dashboards are active". Returns the run names.
    """
    deadline = time.monotonic() + timeout
    previous: Optional[list[str]] = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tensorboard exited with status {proc.returncode}")
        runs = _get_json(base + "/data/runs")
        if isinstance(runs, list) and runs:
            if runs == previous:
                return [str(r) for r in runs]
            previous = runs
        time.sleep(1.0)
    raise TimeoutError(f"tensorboard at {base} had no runs after {timeout:.0f} s")


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError("no chromium / google-chrome on PATH (apt-get install chromium)")


def screenshot(
    browser: str, url: str, out: Path, window_size: str, budget_ms: int, timeout: float
) -> bool:
    """One headless shot of ``url`` into ``out`` with a fresh profile; True if the PNG exists."""
    with tempfile.TemporaryDirectory(prefix="tb_shot_profile_") as profile:
        cmd = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--run-all-compositor-stages-before-draw",
            "--no-first-run",
            "--disable-extensions",
            f"--user-data-dir={profile}",
            f"--window-size={window_size}",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={out}",
            url,
        ]
        if out.exists():
            out.unlink()
        try:
            subprocess.run(
                cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return False
    return out.exists() and out.stat().st_size > 0


def shrink(png: Path, width: int, colours: int) -> None:
    """Scale ``png`` down to ``width`` pixels and to a ``colours``-colour palette, in place."""
    from PIL import Image

    with Image.open(png) as image:
        rgb = image.convert("RGB")
    if rgb.width > width:
        rgb = rgb.resize((width, round(rgb.height * width / rgb.width)), Image.LANCZOS)
    rgb.quantize(colours, method=Image.Quantize.MEDIANCUT).save(png, optimize=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logdir", type=Path, help="TensorBoard log directory")
    p.add_argument("outdir", type=Path, help="folder for the PNGs (created)")
    p.add_argument(
        "--views",
        default=",".join(VIEWS),
        help=f"comma-separated subset of {','.join(VIEWS)} (default: all)",
    )
    p.add_argument(
        "--tag-filter",
        default="ntk/rel_change|lin/rel_error|regime",
        help="tagFilter regex for the timeseries_query view",
    )
    p.add_argument(
        "--query",
        default=None,
        help="full query string for timeseries_query (default: smoothing=0&tagFilter=<--tag-filter>)",
    )
    p.add_argument(
        "--pin",
        default="ntk/rel_change,lin/rel_error,regime/lazy",
        help="comma-separated scalar tags pinned in the timeseries_pinned view",
    )
    p.add_argument(
        "--webgl",
        action="store_true",
        help="keep TensorBoard's WebGL line renderer (default: forceSVG=true, see docstring)",
    )
    p.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="extra view: PNG name and URL path, e.g. hist=/#histograms (repeatable)",
    )
    p.add_argument("--window-size", default="1600,1800", help="W,H in CSS pixels")
    p.add_argument(
        "--readme",
        type=Path,
        default=None,
        metavar="PNG",
        help="also write the README's picture here: the custom-scalars view at 1400x820, "
        "scaled to 1000 px wide and reduced to 64 colours (needs Pillow, a dependency of "
        "matplotlib) so that it stays well under 300 KB",
    )
    p.add_argument("--budget-ms", type=int, default=15000, help="chromium virtual-time budget")
    p.add_argument("--start-timeout", type=float, default=120.0, help="seconds to wait for TB")
    args = p.parse_args(argv)

    if not args.logdir.is_dir():
        p.error(f"logdir {args.logdir} is not a directory")
    names = [v.strip() for v in args.views.split(",") if v.strip()]
    unknown = [v for v in names if v not in VIEWS]
    if unknown:
        p.error(f"unknown view(s) {unknown}; choose from {list(VIEWS)} or use --extra")
    query = args.query
    if query is None:
        query = urllib.parse.urlencode({"smoothing": "0", "tagFilter": args.tag_filter})
    pins = [{"plugin": "scalars", "tag": t.strip()} for t in args.pin.split(",") if t.strip()]
    pinned = urllib.parse.urlencode({"pinnedCards": json.dumps(pins, separators=(",", ":"))})
    targets = {name: VIEWS[name].format(query=query, pinned=pinned) for name in names}
    for item in args.extra:
        name, sep, path = item.partition("=")
        if not sep or not name or not path.startswith("/"):
            p.error(f"--extra {item!r}: expected NAME=/path")
        targets[name] = path
    if not args.webgl:
        targets = {name: with_force_svg(path) for name, path in targets.items()}

    browser = chromium_binary()
    args.outdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    tb_log = args.outdir / "tensorboard.log"
    with open(tb_log, "w") as log:
        proc = subprocess.Popen(
            tensorboard_command(args.logdir, port),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
    failed = []
    try:
        runs = wait_until_served(base, proc, args.start_timeout)
        print(f"tensorboard {base} serves {len(runs)} runs (log: {tb_log})")
        for name, path in targets.items():
            out = args.outdir / f"{name}.png"
            t0 = time.monotonic()
            ok = screenshot(
                browser, base + path, out, args.window_size, args.budget_ms, args.start_timeout
            )
            status = "ok" if ok else "FAILED"
            print(f"{status:6s} {out}  <- {path}  ({time.monotonic() - t0:.1f} s)")
            if not ok:
                failed.append(name)
        if args.readme is not None:
            ok = screenshot(
                browser,
                base + with_force_svg(VIEWS["custom_scalars"]),
                args.readme,
                "1400,820",
                args.budget_ms,
                args.start_timeout,
            )
            if ok:
                shrink(args.readme, width=1000, colours=64)
                print(f"ok     {args.readme} ({args.readme.stat().st_size // 1024} KB)")
            else:
                failed.append("readme")
    except (RuntimeError, TimeoutError) as err:
        print(f"error: {err}; see {tb_log}", file=sys.stderr)
        return 1
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
