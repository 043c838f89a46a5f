"""`lazy-monitor report`: one row per run, final/max of the key metrics, verdict, JSON, plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from _cli_events import lazy_curves, write_run

from lazy_monitor.cli.main import main


@pytest.fixture
def logdir(tmp_path):
    write_run(tmp_path / "w1024" / "version_0", lazy_curves(scale=0.01))
    write_run(tmp_path / "w64" / "version_0", lazy_curves(scale=0.05, lazy=False))
    write_run(tmp_path / "other", {"loss": [(0, 1.0), (1, 0.5)]})  # not a lazy_monitor run
    return tmp_path


def _rows(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.strip()}


def test_one_row_per_run_with_final_max_and_verdict(logdir, capsys):
    assert main(["report", str(logdir)]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert {"w1024/version_0", "w64/version_0", "other"} <= set(rows)
    # run, step, ntk final, max, params final, max, lin final, max, verdict
    assert rows["w64/version_0"] == [
        "w64/version_0",
        "4",
        "0.2",
        "0.2",
        "0.1",
        "0.1",
        "0.02",
        "0.02",
        "non-lazy",
    ]
    assert rows["w1024/version_0"][2] == "0.04" and rows["w1024/version_0"][-1] == "lazy"
    assert rows["other"][-1] == "unknown"
    assert "no lazy_monitor metrics in: other" in out


def test_max_differs_from_final_when_the_curve_comes_back(tmp_path, capsys):
    write_run(tmp_path, {"ntk/rel_change": [(0, 0.0), (7, 0.5), (9, 0.25)]})  # run named "."
    main(["report", str(tmp_path)])
    row = _rows(capsys.readouterr().out)["."]
    assert row[1:4] == ["9", "0.25", "0.5"]


def test_nonfinite_health_flag_wins_the_verdict(tmp_path, capsys):
    curves = lazy_curves()
    curves["health/nonfinite"] = [(0, 0.0), (4, 1.0)]
    write_run(tmp_path / "r", curves)
    main(["report", str(tmp_path)])
    assert _rows(capsys.readouterr().out)["r"][-1] == "non-finite"


def test_json_has_every_tag_with_final_and_extremes(logdir, capsys):
    assert main(["report", str(logdir), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    runs = {r["run"]: r for r in doc["runs"]}
    assert set(runs) == {"w1024/version_0", "w64/version_0", "other"}
    ntk = runs["w64/version_0"]["metrics"]["ntk/rel_change"]
    assert ntk["final"] == pytest.approx(0.2) and ntk["max_step"] == 4 and ntk["min_step"] == 0
    assert ntk["points"] == 5
    assert runs["w64/version_0"]["verdict"] == "non-lazy"
    assert runs["other"]["metrics"]["loss"]["final"] == pytest.approx(0.5)


def test_reads_every_point_not_tensorboards_default_sample(tmp_path, capsys):
    # EventAccumulator keeps a 10 000-point reservoir per scalar tag by default.
    n = 10_500
    write_run(tmp_path / "long", {"ntk/rel_change": [(s, s / n) for s in range(n)]})
    main(["report", str(tmp_path), "--json"])
    ntk = json.loads(capsys.readouterr().out)["runs"][0]["metrics"]["ntk/rel_change"]
    assert ntk["points"] == n


def test_plot_writes_a_png(logdir, tmp_path, capsys):
    target = tmp_path / "plots" / "drift.png"
    assert main(["report", str(logdir), "--plot", str(target)]) == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert target.stat().st_size > 10_000  # four panels with curves, not an empty canvas
    assert f"drift curves saved to {target}" in capsys.readouterr().out


def test_plot_without_matplotlib_is_a_clear_error(logdir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["report", str(logdir), "--plot", str(tmp_path / "x.png")]) == 2
    assert 'pip install "lazy-monitor[viz]"' in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_empty_or_missing_logdir_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no runs" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_plot_styles_one_colour_per_configuration_and_the_verdict_as_line_style():
    from lazy_monitor.cli._events import Curve, Run
    from lazy_monitor.cli.report import line_styles, run_group

    def run(name, lazy):
        return Run(name, Path(name), {"regime/lazy": Curve((0, 5), (1.0, float(lazy)))})

    runs = [run(f"lazy_w{w:05d}_init{i}/version_0", True) for w in range(1, 13) for i in (0, 1)]
    runs.append(run("nonlazy_w00001_alpha0.1/version_0", False))
    groups, styles = line_styles(runs)
    assert list(groups)[:3] == ["lazy_w00001", "nonlazy_w00001_alpha0.1", "lazy_w00002"]
    assert len(set(groups.values())) == 13  # 13 configurations, 13 colours (no reuse after 10)
    assert styles["lazy_w00003_init0/version_0"] == styles["lazy_w00003_init1/version_0"]
    assert styles["lazy_w00001_init0/version_0"][1] == "-"
    assert styles["nonlazy_w00001_alpha0.1/version_0"][1] == "--"
    assert run_group("sweep/width_256/seed3") == "sweep/width_256"
