"""Specification of lazy_monitor.cli.catapult: verdicts below, inside and above the window."""

from __future__ import annotations

import argparse
import io
import math

import pytest

from lazy_monitor.cli import catapult


def test_verdict_rules():
    assert catapult.verdict(nonfinite=True, spike=1.0, catapult_flag=False) == "diverged"
    assert catapult.verdict(nonfinite=False, spike=3.0, catapult_flag=True) == "catapult"
    assert catapult.verdict(nonfinite=False, spike=1.0, catapult_flag=False) == "stable"
    assert catapult.verdict(nonfinite=False, spike=3.0, catapult_flag=False) == "unclear"
    assert catapult.verdict(nonfinite=False, spike=1.05, catapult_flag=True) == "unclear"


def test_spike_is_rise_above_running_minimum():
    assert catapult._spike([1.0, 0.8, 0.5]) == 1.0
    assert catapult._spike([1.0, 0.5, 2.0, 0.1]) == 4.0
    assert catapult._spike([1.0, math.inf]) == math.inf


def test_seeded_tiny_case_gives_stable_catapult_diverged():
    stream = io.StringIO()
    result = catapult.run_catapult(width=32, n=16, steps=60, seed=0, out=stream)
    below, inside, above = result.runs
    assert result.lr_crit == pytest.approx(2 * 16 / result.eig_max0)
    assert [r.lr_eig_max0 for r in result.runs] == pytest.approx([1.0, 3.5, 16.0])
    assert (below.verdict, inside.verdict, above.verdict) == ("stable", "catapult", "diverged")
    assert result.as_expected
    assert [r.expected for r in result.runs] == ["stable", "catapult", "diverged"]
    # below: monotone loss, λmax kept; inside: spike and λmax drop; above: non-finite.
    assert below.spike == 1.0 and below.eig_max_final > 0.9 * below.eig_max0
    assert inside.spike > 1.5 and inside.eig_max_final < 0.8 * inside.eig_max0
    assert math.isfinite(inside.loss_final) and inside.loss_final < inside.loss0
    assert above.nonfinite
    text = stream.getvalue()
    assert "every verdict as the window predicts" in text
    # the diverged row prints what happened, not a float repr of inf ("infx", "inf")
    (row,) = [line for line in text.splitlines() if line.lstrip().startswith("8 ")]
    assert "overflow" in row and "inf" not in row and "nan" not in row


def test_predicted_verdict_covers_every_learning_rate():
    assert [catapult.predicted(r) for r in (0.5, 2.0, 2.01, 4.0, 4.01, 100.0)] == [
        "stable", "stable", "catapult", "catapult", "diverged", "diverged"
    ]  # fmt: skip
    assert catapult.predicted(8.0, edge=12.0) == "catapult"


def test_a_wrong_window_shows_as_a_mismatch_in_the_row_and_the_summary():
    stream = io.StringIO()
    result = catapult.run_catapult(factors=[8.0], width=32, n=16, steps=60, edge=20.0, out=stream)
    (run,) = result.runs
    assert run.verdict == "diverged" and run.expected == "catapult"  # η λ₀/N = 16 <= 20
    assert not result.as_expected
    text = stream.getvalue()
    assert "NOT as the window predicts at lr*eig_max/N = 16" in text
    assert any(
        " catapult " in ln and " diverged " in ln and " NO " in ln for ln in text.splitlines()
    )


def test_deeper_net_and_edge_option_reach_the_run():
    parser = argparse.ArgumentParser()
    catapult.add_arguments(parser)
    args = parser.parse_args(
        ["--catapult-factors", "0.5", "--catapult-width", "8", "--catapult-steps", "3",
         "--catapult-depth", "3", "--catapult-edge", "12"]
    )  # fmt: skip
    assert (args.catapult_depth, args.catapult_edge) == (3, 12.0)
    stream = io.StringIO()
    assert catapult.main(args, stream, io.StringIO()) == 0
    assert "3-hidden-layer" in stream.getvalue() and "catapult up to 12" in stream.getvalue()
    with pytest.raises(SystemExit):
        parser.parse_args(["--catapult-edge", "2"])


def test_cli_pair_parses_and_runs():
    parser = argparse.ArgumentParser()
    catapult.add_arguments(parser)
    args = parser.parse_args(
        ["--catapult-factors", "0.5", "--catapult-width", "8", "--catapult-steps", "5"]
    )
    stream = io.StringIO()
    assert catapult.main(args, stream, io.StringIO()) == 0
    assert "lr_crit" in stream.getvalue()


def test_run_catapult_rejects_bad_factors_depth_and_edge():
    with pytest.raises(ValueError, match="factors"):
        catapult.run_catapult(factors=[0.0])
    with pytest.raises(ValueError, match="depth"):
        catapult.run_catapult(depth=0)
    with pytest.raises(ValueError, match="edge must be a finite number > 2"):
        catapult.run_catapult(edge=1.5)
