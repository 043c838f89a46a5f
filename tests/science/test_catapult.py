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
    # below: monotone loss, λmax kept; inside: spike and λmax drop; above: non-finite.
    assert below.spike == 1.0 and below.eig_max_final > 0.9 * below.eig_max0
    assert inside.spike > 1.5 and inside.eig_max_final < 0.8 * inside.eig_max0
    assert math.isfinite(inside.loss_final) and inside.loss_final < inside.loss0
    assert above.nonfinite
    assert "all verdicts as expected" in stream.getvalue()


def test_cli_pair_parses_and_runs():
    parser = argparse.ArgumentParser()
    catapult.add_arguments(parser)
    args = parser.parse_args(
        ["--catapult-factors", "0.5", "--catapult-width", "8", "--catapult-steps", "5"]
    )
    stream = io.StringIO()
    assert catapult.main(args, stream, io.StringIO()) == 0
    assert "lr_crit" in stream.getvalue()


def test_run_catapult_rejects_bad_factors():
    with pytest.raises(ValueError, match="factors"):
        catapult.run_catapult(factors=[0.0])
