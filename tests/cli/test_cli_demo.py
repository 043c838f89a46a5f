"""`lazy-monitor demo` end to end with tiny settings, and the logs served by the real TensorBoard."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from lazy_monitor.cli.main import main

KEY_TAGS = {"ntk/rel_change", "params/rel_change", "lin/rel_error", "regime/lazy"}
RUNS = ("w0016", "w0064", "nonlazy_w0016")  # table rows
LOGGED = [f"w{w:04d}_init{i}" for w in (16, 64) for i in range(2)] + [RUNS[2]]  # run dirs


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("demo") / "runs"
    stdout = io.StringIO()
    argv = ["demo", "--out", str(out_dir), "--widths", "16,64", "--steps", "20", "--inits", "2"]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        code = main(argv)
    return code, stdout.getvalue(), out_dir


def _width(run: str) -> int:
    """The width in a run directory name (``w0016_init0``, ``nonlazy_w0064``)."""
    return int(re.search(r"(?:^|_)w(\d+)", run).group(1))


def _table(text: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in text.splitlines() if line.startswith(RUNS)}


def _report(out_dir: Path, capsys) -> dict[str, dict]:
    assert main(["report", str(out_dir), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    return {r["run"].split("/")[0]: r for r in doc["runs"]}


def _final(logged: dict, run: str, tag: str = "ntk/rel_change") -> float:
    return logged[run]["metrics"][tag]["final"]


def test_demo_exits_0_and_prints_one_row_per_width(demo):
    code, text, _ = demo
    assert code == 0, text
    rows = _table(text)
    assert set(rows) == set(RUNS)
    # run, width, inits, alpha, lr, ntk/rel_change, params/rel_change, lin/rel_error, verdict
    assert rows["w0064"][1:5] == ["64", "2", "1", "1"]
    assert rows["nonlazy_w0016"][1:5] == ["16", "1", "0.1", "100"]
    for row in rows.values():
        assert all(float(v) >= 0 for v in row[5:8])


def test_demo_non_lazy_run_is_judged_non_lazy(demo):
    rows = _table(demo[1])
    assert rows["nonlazy_w0016"][-1] == "non-lazy"
    # α = 0.1 must move the kernel far more than the lazy sweep at the same width
    assert float(rows["nonlazy_w0016"][5]) > 5 * float(rows["w0016"][5])


def test_demo_writes_event_files_that_report_reads_back(demo, capsys):
    _, text, out_dir = demo
    for run in LOGGED:
        # one folder per run, no version_N: the run name is what TensorBoard's tables show
        assert list((out_dir / run).glob("events.out.tfevents.*")), run
    logged = _report(out_dir, capsys)
    assert set(logged) == set(LOGGED)
    for run in LOGGED:
        assert KEY_TAGS <= set(logged[run]["metrics"])
        assert logged[run]["last_step"] == 20
    rows = _table(text)
    for width in (16, 64):  # the table shows the mean over the initialisations
        mean = sum(_final(logged, f"w{width:04d}_init{i}") for i in range(2)) / 2
        assert float(rows[f"w{width:04d}"][5]) == pytest.approx(mean, rel=1e-3)


def test_demo_prints_the_slope_fitted_to_every_run_and_the_tensorboard_line(demo, capsys):
    _, text, out_dir = demo
    match = re.search(r"log-log slope of ntk/rel_change vs width: ([-+]\d+\.\d+)", text)
    assert match, text
    logged = _report(out_dir, capsys)
    points = [
        (math.log(w), math.log(_final(logged, f"w{w:04d}_init{i}")))
        for w in (16, 64)
        for i in range(2)
    ]
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    expected = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    assert float(match.group(1)) == pytest.approx(expected, abs=0.006)  # printed with 2 decimals
    assert f"tensorboard --logdir {out_dir}" in text


def test_check_gates_the_demo_runs(demo, capsys):
    out_dir = demo[2]
    assert main(["check", str(out_dir), "--max", "ntk/rel_change=0.5"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  nonlazy_w0016" in out and "PASS  w0064_init0" in out
    assert main(["check", str(out_dir), "--max", "ntk/rel_change=1000"]) == 0


@pytest.mark.parametrize(
    "argv",
    [["--widths", "64"], ["--widths", "a,b"], ["--widths", "1,64"], ["--steps", "0"],
     ["--seed", "-1"], ["--lr", "0"], ["--inits", "0"]],
)  # fmt: skip
def test_demo_rejects_bad_arguments_with_exit_2(argv, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), *argv]) == 2
    assert "error" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing trained


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read().decode())


def test_tensorboard_serves_the_demo_metric_tags(demo):
    """Start the real `tensorboard --logdir` on a loopback port and query its HTTP API."""
    out_dir: Path = demo[2]
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(out_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    served: dict = {}
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(
                    f"tensorboard exited with {proc.returncode}: {proc.stderr.read()[-2000:]}"
                )
            try:
                served = _get_json(f"{base}/data/plugin/scalars/tags")
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                served = {}
            if all(
                any(r.startswith(run) and KEY_TAGS <= set(tags) for r, tags in served.items())
                for run in LOGGED
            ):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"tensorboard did not serve the metric tags in 90 s; served: {served}")
        run = next(r for r in served if r.startswith("w0064_init0"))
        points = _get_json(
            f"{base}/data/plugin/scalars/scalars?run={urllib.parse.quote(run)}&tag=ntk/rel_change"
        )
        steps = [p[1] for p in points]
        assert steps[0] == 0 and steps[-1] == 20
        assert points[0][2] == 0.0 and points[-1][2] > 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        proc.stderr.close()


def test_redirected_demo_prints_no_progress_bar(demo):
    _, text, _ = demo
    # a Lightning progress bar redirected to a file writes hundreds of KB of "\r" updates
    assert "\r" not in text and len(text.encode()) < 5_000


def test_demo_hparams_table_has_the_sweep_variables_first(demo):
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.plugins.hparams import plugin_data_pb2

    out_dir: Path = demo[2]
    for run in LOGGED:
        (events,) = (out_dir / run).rglob("events.out.tfevents.*")
        acc = ea.EventAccumulator(str(events))
        acc.Reload()
        content = acc.PluginTagToContent("hparams")
        exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
        # the sweep's variables are the columns, in this order; the monitor's settings are not
        columns = [h.name for h in exp.experiment.hparam_infos]
        assert columns == ["width", "alpha", "lr", "init"]
        assert all(h.differs for h in exp.experiment.hparam_infos)
        assert [m.name.tag for m in exp.experiment.metric_infos][:2] == [
            "regime/lazy",
            "ntk/rel_change",
        ]
        start = plugin_data_pb2.HParamsPluginData.FromString(
            content["_hparams_/session_start_info"]
        )
        assert start.session_start_info.hparams["width"].number_value == _width(run)


def test_a_second_demo_replaces_the_runs_of_the_first_and_spares_other_files(tmp_path):
    from lazy_monitor.cli import demo as demo_cli

    plan = [demo_cli.DemoRun(n, 16, 1.0, 1.0, True, Path()) for n in ("w0016_init0", "other")]
    old = tmp_path / "w0016_init0"
    old.mkdir()
    (old / "events.out.tfevents.1.host").write_bytes(b"")
    (old / "hparams.yaml").write_text("width: 16\n")
    assert demo_cli._clear_previous(tmp_path, plan) == [] and not old.exists()
    mine = tmp_path / "other"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert demo_cli._clear_previous(tmp_path, plan) == [str(mine)]
    assert (mine / "notes.txt").read_text() == "keep"
