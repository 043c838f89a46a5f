"""End to end: the plain-PyTorch example tells a lazy run from a feature-learning one."""

import importlib.util
import math
import os

import pytest


def _load(relpath, name):
    path = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, *relpath.split("/"))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_SMALL = ["--steps", "40", "--n-train", "128", "--n-probe", "16", "--measure-every", "20"]


@pytest.fixture(scope="module")
def example():
    return _load("examples/plain_pytorch_loop.py", "plain_pytorch_loop")


def test_wide_small_lr_is_lazy_and_narrow_large_lr_moves_the_kernel_much_more(example, capsys):
    wide = example.main(["--width", "256", "--lr", "0.5", "--quiet", *_SMALL])
    narrow = example.main(["--width", "16", "--lr", "5", "--quiet", *_SMALL])
    out = capsys.readouterr().out
    assert wide["regime/lazy"] == 1.0 and "width=256 lr=0.5 steps=40: LAZY" in out
    assert narrow["regime/lazy"] == 0.0 and "NOT lazy: ntk/rel_change" in out
    assert narrow["ntk/rel_change"] > 10 * wide["ntk/rel_change"] > 0
    assert narrow["lin/rel_error"] > 5 * wide["lin/rel_error"] > 0
    assert narrow["params/rel_change"] > 10 * wide["params/rel_change"] > 0
    assert all(math.isfinite(v) for v in wide.values())
    assert wide["health/nonfinite"] == narrow["health/nonfinite"] == 0.0


def test_example_prints_a_table_row_per_measurement(example, capsys):
    metrics = example.main(["--width", "8", "--steps", "3", "--measure-every", "1", "--kind",
                            "trace", "--n-train", "32", "--n-probe", "8"])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["step", "loss", "dK/K0"]
    assert [line.split()[0] for line in lines[1:5]] == ["0", "1", "2", "3"]
    assert "width=8" in lines[-1]
    assert metrics["ntk/rel_change"] > 0


def test_example_rejects_bad_arguments(example):
    with pytest.raises(SystemExit):
        example.main(["--n-probe", "64", "--n-train", "32"])


def test_width_sweep_fits_the_loglog_slope_and_runs_tiny(capsys):
    sweep = _load("benchmarks/width_sweep.py", "width_sweep")
    widths = [16, 64, 256]
    assert sweep.loglog_slope(widths, [3 * w**-0.5 for w in widths]) == pytest.approx(-0.5)
    assert math.isnan(sweep.loglog_slope([16], [1.0]))
    slopes = sweep.main(["--widths", "8", "32", "--steps", "3", "--seeds", "1", "--n-probe", "4"])
    assert set(slopes) == set(sweep.METRICS)
    assert slopes["params/rel_change"] < 0  # wider nets move less, even after 3 steps
    assert "log-log slope vs width" in capsys.readouterr().out
