"""Specification of lazy_monitor.cli.phase: boundary analysis and a smoke run of the grid."""

from __future__ import annotations

import argparse
import csv
import io
import math
from pathlib import Path

import pytest

from lazy_monitor.cli import phase


def test_boundary_alpha_interpolates_a_power_law_exactly():
    alphas = [0.1, 0.3, 1.0, 3.0, 10.0]
    values = [0.4 / a for a in alphas]  # rel_change = 0.4/α crosses 0.1 at α* = 4
    assert phase.boundary_alpha(alphas, values, 0.1) == pytest.approx(4.0, rel=1e-12)


def test_boundary_alpha_uses_last_rich_to_lazy_crossing_and_counts_nan_as_rich():
    alphas = [1.0, 2.0, 4.0, 8.0]
    assert phase.boundary_alpha(alphas, [0.05, 0.5, 0.2, 0.05], 0.1) == pytest.approx(
        4.0 * 2.0 ** (math.log(2.0) / math.log(4.0))
    )
    # A diverged (NaN) cell is rich, but gives nothing to interpolate from.
    assert math.isnan(phase.boundary_alpha(alphas, [math.nan, math.nan, 0.05, 0.01], 0.1))
    assert phase.boundary_alpha(alphas, [1.0, 0.0, 0.0, 0.0], 0.1) == 2.0


def test_boundary_alpha_is_nan_without_crossing():
    assert math.isnan(phase.boundary_alpha([1.0, 2.0], [0.01, 0.02], 0.1))  # all lazy
    assert math.isnan(phase.boundary_alpha([1.0, 2.0], [1.0, 0.5], 0.1))  # all rich
    with pytest.raises(ValueError, match="increasing"):
        phase.boundary_alpha([2.0, 1.0], [1.0, 0.01], 0.1)


def test_fit_exponent_recovers_a_power_law():
    widths = [16, 64, 256, 1024]
    s, b = phase.fit_exponent(widths, [3.0 * w**-0.5 for w in widths])
    assert s == pytest.approx(-0.5, abs=1e-12)
    assert math.exp(b) == pytest.approx(3.0, rel=1e-12)
    assert all(math.isnan(v) for v in phase.fit_exponent([16, 64], [1.0, math.nan]))


def test_exponent_interval_is_the_student_t_interval_across_initialisations():
    iv = phase.exponent_interval([-0.4, -0.6, -0.8, math.nan])
    assert iv.n == 3 and iv.mean == pytest.approx(-0.6)
    # sd = 0.2, t_0.975(2) = 4.303: half-width 4.303 * 0.2 / sqrt(3)
    assert iv.high - iv.mean == pytest.approx(4.303 * 0.2 / math.sqrt(3), rel=1e-12)
    assert iv.contains(-0.5) and not iv.contains(-2.0)
    # 41 values (df 40, beyond the table): within 0.2 % of t_0.975(40) = 2.021
    wide = phase.exponent_interval([(-1.0) ** k for k in range(41)])
    sd = math.sqrt(sum((v - wide.mean) ** 2 for v in wide.per_init) / 40)
    assert (wide.high - wide.mean) / (sd / math.sqrt(41)) == pytest.approx(2.021, rel=2e-3)
    one = phase.exponent_interval([-0.5])
    assert one.mean == -0.5 and math.isnan(one.low) and not one.contains(-0.5)


def _result_with(per_init: list[float]) -> phase.PhaseResult:
    return phase.PhaseResult(
        [phase.PhaseCell(16, 1.0, 2.0, lr_eig_max0=0.7)], [16, 64], [1.0, 10.0], 0.1, 10, 2.0,
        0, len(per_init), {16: 3.0, 64: 1.5}, -0.5, 1.0, 12.0, Path("x.csv"), None, 1.0,
        phase.exponent_interval(per_init),
    )  # fmt: skip


def test_summary_says_consistent_only_when_the_interval_contains_minus_one_half():
    assert "-> consistent with -1/2" in phase.summary(_result_with([-0.45, -0.6, -0.7]))
    text = phase.summary(_result_with([-0.8, -0.82, -0.85]))
    assert "excludes -1/2 (steeper)" in text and "consistent" not in text
    assert "excludes -1/2 (shallower)" in phase.summary(_result_with([-0.3, -0.32, -0.31]))
    # one initialisation: no interval, no verdict (even when it lands on -1/2 exactly)
    text = phase.summary(_result_with([-0.5]))
    assert "no verdict" in text and "consistent" not in text
    text = phase.summary(_result_with([-0.6, math.nan, -0.7]))
    assert "over 2 of 3 initialisations" in text and "inits: -0.60, none, -0.70)" in text


def test_fit_lazy_scaling_recovers_width_and_alpha_exponents_and_ignores_rich_cells():
    widths, alphas, values = [], [], []
    for w in (16, 64, 256):
        for a in (1.0, 3.0, 10.0, 30.0):
            widths.append(w)
            alphas.append(a)
            v = 2.0 * w**-0.7 / a
            values.append(v if v <= 0.1 else 5.0)  # rich cells off the power law
    p, q = phase.fit_lazy_scaling(widths, alphas, values, 0.1)
    assert p == pytest.approx(-0.7, abs=1e-9) and q == pytest.approx(1.0, abs=1e-9)
    assert all(math.isnan(v) for v in phase.fit_lazy_scaling([16, 64], [1.0, 1.0], [0.01] * 2, 0.1))


def test_cell_value_is_median_robust_to_one_blow_up_and_nan_if_any_run_diverged():
    assert phase._median([0.5, 6e30, 0.7]) == 0.7
    assert phase._median([0.2, 0.4]) == pytest.approx(0.3)
    assert math.isnan(phase._median([0.5, math.nan, 0.7]))


def test_smoke_run_writes_png_and_csv_and_fits_a_finite_exponent(tmp_path):
    stream = io.StringIO()
    result = phase.run_phase(
        tmp_path / "phase",
        widths=(8, 64),
        alphas=(0.3, 1.0, 3.0, 10.0, 30.0),
        steps=40,
        n_train=32,
        probe_size=16,
        out=stream,
    )
    assert (tmp_path / "phase" / "phase.png").stat().st_size > 1000
    with open(tmp_path / "phase" / "phase.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 10
    assert {(int(r["width"]), float(r["alpha"])) for r in rows} == {
        (w, a) for w in (8, 64) for a in (0.3, 1.0, 3.0, 10.0, 30.0)
    }
    assert all(
        float(r["lr"]) == pytest.approx(phase.DEFAULT_LR / float(r["alpha"]) ** 2) for r in rows
    )
    assert math.isfinite(result.exponent)
    assert all(math.isfinite(a) for a in result.boundary.values())
    # Laziness grows with α at fixed width and with width at fixed α (the map's two axes).
    for w in (8, 64):
        assert result.cell(w, 30.0).ntk_rel_change < result.cell(w, 0.3).ntk_rel_change
    assert result.cell(64, 1.0).ntk_rel_change < result.cell(8, 1.0).ntk_rel_change
    # the default 3 initialisations: one exponent each, the interval across them
    assert result.seeds == phase.DEFAULT_SEEDS == 3 and len(result.interval.per_init) == 3
    assert result.interval.low <= result.interval.mean <= result.interval.high
    text = stream.getvalue()
    assert "initialisations" in text and "95% interval" in text and "Geiger" in text
    # an initialisation without a crossing is named, not printed as nan
    assert "nan" not in text.split("lr*eig_max/N")[1]


def test_cli_pair_parses_and_runs(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    phase.add_arguments(parser)
    args = parser.parse_args(
        ["--out", str(tmp_path), "--phase-widths", "8,16", "--phase-alphas", "1,10",
         "--phase-steps", "5"]
    )  # fmt: skip
    assert args.phase_widths == [8, 16] and args.seed == 0
    stream = io.StringIO()
    assert phase.main(args, stream, io.StringIO()) == 0
    assert (tmp_path / "phase.csv").exists()


def test_cli_rejects_bad_grid():
    parser = argparse.ArgumentParser()
    phase.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--phase-alphas", "1"])


def test_run_phase_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="widths"):
        phase.run_phase(tmp_path, widths=(8,))
    with pytest.raises(ValueError, match="probe_size"):
        phase.run_phase(tmp_path, n_train=8, probe_size=16)
