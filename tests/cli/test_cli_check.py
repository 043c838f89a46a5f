"""`lazy-monitor check`: exit 0 (all pass), 1 (violation), 2 (usage error / no runs / missing)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _cli_events import lazy_curves, write_run

from lazy_monitor.cli.main import main


@pytest.fixture
def two_runs(tmp_path):
    write_run(tmp_path / "sweep" / "w1024", lazy_curves(scale=0.01))  # max ntk 0.04 at step 4
    write_run(tmp_path / "sweep" / "w64", lazy_curves(scale=0.05, lazy=False))  # max 0.2 at 4
    return tmp_path


def test_all_runs_within_thresholds_exit_0(two_runs, capsys):
    code = main(["check", str(two_runs), "--max", "ntk/rel_change=0.5", "--max", "lin/rel_error=1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "PASS  sweep/w1024" in out and "PASS  sweep/w64" in out


def test_violation_exit_1_lists_run_metric_worst_value_and_step(two_runs, capsys):
    code = main(["check", str(two_runs), "--max", "ntk/rel_change=0.1"])
    out = capsys.readouterr().out
    assert code == 1
    assert "PASS  sweep/w1024" in out
    assert "FAIL  sweep/w64" in out
    assert "ntk/rel_change: worst value 0.2 at step 4 > max 0.1" in out


def test_min_bound_violation_exit_1(two_runs, capsys):
    code = main(["check", str(two_runs), "--min", "regime/lazy=1"])
    out = capsys.readouterr().out
    assert code == 1
    assert "PASS  sweep/w1024" in out and "FAIL  sweep/w64" in out
    # The step-0 reference point is skipped by --min: the first violation reported is step 1.
    assert "regime/lazy: worst value 0 at step 1 < min 1" in out


def test_min_on_a_change_metric_skips_the_step0_reference(two_runs, capsys):
    # Every change is exactly 0 at step 0; later points of w1024 are 0.01..0.04.
    assert main(["check", str(two_runs), "--min", "ntk/rel_change=0.005"]) == 0
    assert "result: PASS" in capsys.readouterr().out
    assert main(["check", str(two_runs), "--min", "ntk/rel_change=0.02"]) == 1
    assert "ntk/rel_change: worst value 0.01 at step 1 < min 0.02" in capsys.readouterr().out


def test_min_from_step_0_includes_the_reference_point(two_runs, capsys):
    code = main(["check", str(two_runs), "--min", "ntk/rel_change=0.005", "--min-from-step", "0"])
    assert code == 1
    assert "ntk/rel_change: worst value 0 at step 0 < min 0.005" in capsys.readouterr().out


def test_min_from_step_skips_earlier_points_max_checks_all(two_runs):
    # w1024 from step 3 on: 0.03, 0.04; w64: 0.15, 0.2.
    args = ["check", str(two_runs), "--min", "ntk/rel_change=0.025"]
    assert main(args) == 1
    assert main([*args, "--min-from-step", "3"]) == 0
    # --max is not affected by --min-from-step: the 0.2 at step 4 of w64 still counts.
    assert main([*args, "--min-from-step", "3", "--max", "ntk/rel_change=0.1"]) == 1


def test_min_always_checks_the_last_point(tmp_path, capsys):
    # A run that only logged the step-0 reference is checked there (it never moved).
    write_run(tmp_path / "only0", {"ntk/rel_change": [(0, 0.0)], "lin/agreement": [(0, 1.0)]})
    assert main(["check", str(tmp_path), "--min", "lin/agreement=0.9"]) == 0
    assert main(["check", str(tmp_path), "--min", "ntk/rel_change=0.01"]) == 1
    assert "worst value 0 at step 0 < min 0.01" in capsys.readouterr().out
    # Points before --min-from-step are skipped, the last one is not.
    write_run(tmp_path / "short", {"lin/agreement": [(0, 1.0), (5, 0.5), (10, 0.8)]})
    assert main(["check", str(tmp_path / "short"), "--min", "lin/agreement=0.7"]) == 1
    assert (
        main(
            [
                "check",
                str(tmp_path / "short"),
                "--min",
                "lin/agreement=0.7",
                "--min-from-step",
                "50",
            ]
        )
        == 0
    )


@pytest.mark.parametrize("bad", ["-1", "x", "1.5"])
def test_bad_min_from_step_is_a_usage_error(two_runs, bad):
    assert main(["check", str(two_runs), "--min", "a=1", "--min-from-step", bad]) == 2


def test_help_documents_that_min_skips_step0(capsys):
    assert main(["check", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--min-from-step" in out and "step-0 reference point" in out


def test_missing_metric_exit_2_never_passes(two_runs, capsys):
    code = main(["check", str(two_runs), "--max", "ntk/alignment=0.5"])
    captured = capsys.readouterr()
    assert code == 2
    assert "ntk/alignment" in captured.err and "not found" in captured.err


def test_metric_missing_in_one_run_only_exit_2(tmp_path, capsys):
    write_run(tmp_path / "a", lazy_curves())
    write_run(tmp_path / "b", {"ntk/rel_change": [(0, 0.0), (1, 0.01)]})
    code = main(["check", str(tmp_path), "--max", "lin/rel_error=10"])
    captured = capsys.readouterr()
    assert code == 2
    assert "'lin/rel_error' in 'b'" in captured.err
    assert "PASS  a" in captured.out


def test_missing_metric_outranks_violation(two_runs):
    code = main(["check", str(two_runs), "--max", "ntk/rel_change=0.1", "--max", "nope=1"])
    assert code == 2


def test_empty_logdir_exit_2(tmp_path, capsys):
    (tmp_path / "empty_subdir").mkdir()
    code = main(["check", str(tmp_path), "--max", "ntk/rel_change=0.1"])
    assert code == 2
    assert "no runs" in capsys.readouterr().err


def test_nonexistent_logdir_exit_2(tmp_path, capsys):
    code = main(["check", str(tmp_path / "nope"), "--max", "ntk/rel_change=0.1"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bad, message",
    [
        ("ntk/rel_change", "expected METRIC=VALUE"),
        ("ntk/rel_change=abc", "not a number"),
        ("=0.1", "expected METRIC=VALUE"),
        ("ntk/rel_change=nan", "finite"),
    ],
)
def test_malformed_threshold_exit_2_names_the_value(two_runs, capsys, bad, message):
    code = main(["check", str(two_runs), "--max", bad])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and repr(bad) in err


def test_no_threshold_is_a_usage_error(two_runs, capsys):
    assert main(["check", str(two_runs)]) == 2
    assert "nothing to check" in capsys.readouterr().err


def test_unknown_option_exit_2(two_runs):
    assert main(["check", str(two_runs), "--maximum", "x=1"]) == 2


def test_nan_violates_every_bound(tmp_path, capsys):
    write_run(tmp_path / "r", {"ntk/rel_change": [(0, 0.0), (1, float("nan")), (2, 0.01)]})
    assert main(["check", str(tmp_path), "--max", "ntk/rel_change=1"]) == 1
    assert "nan at step 1" in capsys.readouterr().out
    assert main(["check", str(tmp_path), "--min", "ntk/rel_change=-1"]) == 1


def test_worst_value_by_default_final_value_with_flag(tmp_path):
    write_run(tmp_path / "spike", {"ntk/rel_change": [(0, 0.0), (5, 0.9), (10, 0.05)]})
    assert main(["check", str(tmp_path), "--max", "ntk/rel_change=0.1"]) == 1
    assert main(["check", str(tmp_path), "--max", "ntk/rel_change=0.1", "--final"]) == 0


def test_glob_pattern_applies_to_every_matching_tag(tmp_path, capsys):
    write_run(
        tmp_path / "r",
        {
            "ntk_layer/net.0/rel_change": [(0, 0.0), (3, 0.02)],
            "ntk_layer/net.2/rel_change": [(0, 0.0), (3, 0.3)],
        },
    )
    assert main(["check", str(tmp_path), "--max", "ntk_layer/*/rel_change=0.5"]) == 0
    assert main(["check", str(tmp_path), "--max", "ntk_layer/*/rel_change=0.1"]) == 1
    assert "ntk_layer/net.2/rel_change: worst value 0.3 at step 3" in capsys.readouterr().out


def test_json_output(two_runs, capsys):
    code = main(["check", str(two_runs), "--max", "ntk/rel_change=0.1", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 and doc["exit_code"] == 1 and doc["status"] == "fail"
    assert [v["run"] for v in doc["violations"]] == ["sweep/w64"]
    violation = doc["violations"][0]
    assert violation["metric"] == "ntk/rel_change" and violation["step"] == 4
    assert violation["value"] == pytest.approx(0.2)
    assert {r["run"]: r["passed"] for r in doc["runs"]} == {"sweep/w1024": True, "sweep/w64": False}


def test_json_output_for_missing_metric_and_empty_dir(two_runs, tmp_path, capsys):
    assert main(["check", str(two_runs), "--min", "lin/agreement=0.9", "--json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "error" and doc["min_from_step"] == 1
    assert doc["runs"][0]["missing"] == ["lin/agreement"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["check", str(empty), "--max", "a=1", "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"].startswith("no runs")


def test_resumed_run_merges_event_files_by_step(tmp_path):
    # First process logged steps 0..9 with a spike at 8; the resumed one restarts at step 5:
    # points >= 5 of the first file are superseded (orphaned), so the spike must not count.
    run = tmp_path / "resumed"
    write_run(run, {"ntk/rel_change": [(s, 0.9 if s == 8 else 0.01 * s) for s in range(10)]})
    write_run(run, {"ntk/rel_change": [(s, 0.01 * s) for s in range(5, 15)]})
    assert len(list(run.iterdir())) == 2
    assert main(["check", str(tmp_path), "--max", "ntk/rel_change=0.5"]) == 0
    assert main(["check", str(tmp_path), "--max", "ntk/rel_change=0.1"]) == 1  # 0.14 at step 14


def test_console_entry_point_returns_exit_code(two_runs):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lazy_monitor",
            "check",
            str(two_runs),
            "--max",
            "ntk/rel_change=0.1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "FAIL  sweep/w64" in proc.stdout
