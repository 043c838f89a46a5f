"""`report`/`check`/`report --plot` on a Hugging Face Trainer run, whose tags carry the
Trainer's `train/` prefix, plus the small CLI fixes: a closed pipe, a misspelled metric, `--plot`
without a file name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _cli_events import lazy_curves, write_run

from lazy_monitor.cli._events import load_run
from lazy_monitor.cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def _hf_curves(scale: float, lazy: bool) -> dict:
    """The monitor's curves as the HF Trainer logs them (`train/` prefix) next to its own."""
    curves = {f"train/{tag}": points for tag, points in lazy_curves(scale, lazy=lazy).items()}
    curves["train/loss"] = [(s, 1.0 / (s + 1)) for s in range(5)]
    curves["train/learning_rate"] = [(s, 1e-3) for s in range(5)]
    return curves


@pytest.fixture
def hf_logdir(tmp_path):
    write_run(tmp_path / "hf_lazy", _hf_curves(0.01, lazy=True))  # ntk max 0.04
    write_run(tmp_path / "hf_nonlazy", _hf_curves(0.2, lazy=False))  # ntk max 0.8
    return tmp_path


def test_a_plain_name_reads_the_prefixed_tag_and_an_exact_tag_wins(tmp_path):
    run = load_run(write_run(tmp_path / "r", _hf_curves(0.01, lazy=True)))
    assert run.tag("ntk/rel_change") == "train/ntk/rel_change"
    assert run.curve("ntk/rel_change") is run.curves["train/ntk/rel_change"]
    assert run.select("ntk/*") == sorted(t for t in run.curves if t.startswith("train/ntk/"))
    assert run.tag("ntk/missing") is None
    both = load_run(
        write_run(
            tmp_path / "both",
            {
                "eval/ntk/rel_change": [(0, 1.0)],
                "train/ntk/rel_change": [(0, 2.0)],
                "ntk/rel_change": [(0, 3.0)],
            },
        )
    )
    assert both.tag("ntk/rel_change") == "ntk/rel_change"  # exact first
    del both.curves["ntk/rel_change"]
    assert both.select("ntk/rel_change") == ["train/ntk/rel_change", "eval/ntk/rel_change"]


def test_check_accepts_plain_names_on_hf_tags_and_names_the_tag(hf_logdir, capsys):
    assert main(["check", str(hf_logdir / "hf_lazy"), "--max", "ntk/rel_change=0.5"]) == 0
    out = capsys.readouterr().out
    assert "note: ntk/rel_change read from the tag train/ntk/rel_change" in out
    assert main(["check", str(hf_logdir), "--max", "ntk/rel_change=0.5"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  hf_nonlazy" in out and "train/ntk/rel_change: worst value 0.8" in out
    assert main(["check", str(hf_logdir), "--max", "ntk/rel_change=0.5", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["matched_tags"] == [{"metric": "ntk/rel_change", "tag": "train/ntk/rel_change"}]
    assert doc["violations"][0]["metric"] == "train/ntk/rel_change"
    assert doc["violations"][0]["requested"] == "ntk/rel_change"


def test_report_gives_the_verdict_of_hf_runs_and_says_which_tags(hf_logdir, capsys):
    assert main(["report", str(hf_logdir)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:4]}
    assert rows["hf_lazy"][-1] == "lazy" and rows["hf_nonlazy"][-1] == "non-lazy"
    assert rows["hf_nonlazy"][2:4] == ["0.8", "0.8"]  # ntk/rel_change final, max
    assert "note: hf_lazy: metrics read from tags under 'train/'" in out
    assert "(e.g. ntk/rel_change = train/ntk/rel_change)" in out
    assert main(["report", str(hf_logdir), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    first = doc["runs"][0]
    assert first["verdict"] == "lazy"
    assert first["matched_tags"]["ntk/rel_change"] == "train/ntk/rel_change"


def test_report_plot_draws_hf_runs_into_the_default_file(hf_logdir, capsys):
    pytest.importorskip("matplotlib")
    assert main(["report", str(hf_logdir), "--plot"]) == 0
    out = capsys.readouterr().out
    default = hf_logdir / "drift.png"
    assert default.stat().st_size > 10_000
    assert f"drift curves saved to {default}" in out
    # `report --plot LOGDIR`: argparse hands LOGDIR to --plot; read as LOGDIR + default file
    default.unlink()
    assert main(["report", "--plot", str(hf_logdir)]) == 0
    assert default.is_file()


def test_report_plot_with_a_name_that_is_no_image_says_so(hf_logdir, capsys):
    assert main(["report", str(hf_logdir), "--plot", str(hf_logdir / "curves")]) == 2
    err = capsys.readouterr().err
    assert "give an image file name ending in .png" in err and "--plot alone" in err
    assert not (hf_logdir / "curves").exists()
    assert main(["report"]) == 2
    assert "LOGDIR argument is required" in capsys.readouterr().err


def test_a_misspelled_metric_gets_a_suggestion(hf_logdir, capsys):
    assert main(["check", str(hf_logdir), "--max", "ntk/rel_chnage=0.5"]) == 2
    captured = capsys.readouterr()
    assert "did you mean 'ntk/rel_change'?" in captured.err
    assert "did you mean 'ntk/rel_change'?" in captured.out
    assert main(["check", str(hf_logdir), "--max", "ntk/rel_chnage=0.5", "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["suggestions"] == {
        "ntk/rel_chnage": "ntk/rel_change"
    }
    # nothing close: no made-up suggestion
    assert main(["check", str(hf_logdir), "--max", "zzz=1"]) == 2
    assert "did you mean" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["report", "check"])
def test_json_into_a_closed_pipe_ends_quietly(tmp_path, command):
    # output far larger than a pipe buffer, so writing continues after `head` has exited
    write_run(tmp_path / "big", {f"ntk_layer/l{i:04d}/rel_change": [(0, 0.0)] for i in range(900)})
    extra = ["--max", "ntk_layer/*/rel_change=1"] if command == "check" else []
    cmd = [sys.executable, "-m", "lazy_monitor", command, str(tmp_path), "--json", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()  # what `| head -n 1` does after its line
        err = proc.stderr.read().decode()
        proc.wait(timeout=120)
    assert first.strip() == b"{"
    assert "BrokenPipeError" not in err and "Traceback" not in err, err
