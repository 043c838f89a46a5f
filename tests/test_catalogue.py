"""The metric catalogue is the single source of every metric name (issue 11)."""

from __future__ import annotations

import importlib
import math
import os
import re
import subprocess
import sys

import pytest

from lazy_monitor import catalogue
from lazy_monitor.thresholds import Threshold, checks_minimum

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _docs_table() -> str:
    with open(os.path.join(ROOT, "docs", "metrics.md"), encoding="utf-8") as fh:
        text = fh.read()
    start = text.index("| name | formula | how to read it | source |")
    return text[start : text.index("\n\n", start)]


def test_docs_metric_table_is_the_catalogue():
    # regenerate with: python -c "from lazy_monitor import catalogue; print(catalogue.markdown_table())"
    assert _docs_table() == catalogue.markdown_table()


def test_every_metric_has_a_chart_a_formula_and_a_description():
    names = [m.name for m in catalogue.CATALOGUE]
    assert len(names) == len(set(names))
    for info in catalogue.CATALOGUE:
        assert info.formula and info.description and all(info.chart), info.name
        assert info.direction in (None, "max", "min"), info.name


def test_every_catalogue_entry_is_implemented_and_documented():
    # The metrics of the stability/feature and budget issues landed: no entry is a placeholder,
    # and every one appears in the docs/metrics.md table generated from the catalogue.
    assert [m.name for m in catalogue.CATALOGUE if m.planned] == []
    table = catalogue.markdown_table()
    for info in catalogue.CATALOGUE:
        assert f"`{info.name}`" in table, info.name


def test_tracker_names_follow_the_configuration():
    base = catalogue.tracker_metric_names(["a"], targets=False, classification=False)
    full = catalogue.tracker_metric_names(["a"], targets=True, classification=True)
    assert set(full) - set(base) == {"ntk/alignment", "lin/agreement"}
    flat = catalogue.tracker_metric_names(
        ["a"], targets=False, classification=False, per_layer=False
    )
    assert set(base) - set(flat) == {"ntk_layer/a/rel_change", "params_layer/a/rel_change"}
    assert base[-5:] == [
        "regime/lazy", "health/nonfinite", "opt/lr", "ntk/lr_eig_max", "regime/catapult"
    ]  # fmt: skip
    feats = catalogue.tracker_metric_names(
        ["a"], targets=False, classification=False, feature_layers=["enc", "head"]
    )
    assert feats == base + ["features/enc/cka", "features/head/cka"]


def test_stability_and_feature_metrics_are_computed_and_charted():
    for name in ("opt/lr", "ntk/lr_eig_max", "regime/catapult", "features/<layer>/cka"):
        info = catalogue.lookup(name)
        assert info is not None and not info.planned and info.source == "tracker"
        assert f"`{name}`" in catalogue.markdown_table()
    assert catalogue.direction_of("features/enc/cka") == "min"
    layout = catalogue.tensorboard_layout(["ntk/lr_eig_max", "features/enc/cka"])
    assert list(layout) == ["stability", "features"]


def test_layout_hparams_and_report_come_from_the_catalogue():
    from lazy_monitor.cli import report

    names = catalogue.tracker_metric_names(["fc"], targets=True, classification=True)
    layout = catalogue.tensorboard_layout(names)
    assert list(layout) == [
        "kernel drift",
        "linearization",
        "spectrum",
        "parameters",
        "stability",
        "health",
    ]
    # with the callbacks' log10 companions, they come first
    logged = names + list(catalogue.log10_companions(dict.fromkeys(names, 0.5)))
    assert list(catalogue.tensorboard_layout(logged))[:2] == ["drift (log10)", "kernel drift"]
    charted = {p for charts in layout.values() for _, tags in charts.values() for p in tags}
    assert all(any(re.search(p, n) for p in charted) for n in names)
    assert catalogue.hparams_metrics(names) == [n for n in names if "_layer/" not in n]
    assert report.KEY_METRICS == ("ntk/rel_change", "params/rel_change", "lin/rel_error")
    assert {report.VERDICT_METRIC, report.HEALTH_METRIC} <= {m.name for m in catalogue.CATALOGUE}


def test_log10_companions_floor_nan_and_layers():
    got = catalogue.log10_companions(
        {
            "ntk/rel_change": 1e-3,
            "lin/rel_error": 0.0,
            "params/rel_change": float("nan"),
            "ntk_layer/blocks.0/rel_change": 0.1,
            "params_layer/blocks.0/rel_change": 0.1,  # no companion
            "ntk/eig_max": 3.0,
        }
    )
    assert set(got) == {
        "drift/log10_ntk_rel_change",
        "drift/log10_lin_rel_error",
        "drift/log10_params_rel_change",
        "drift_layer/blocks.0/log10_rel_change",
    }
    assert got["drift/log10_ntk_rel_change"] == pytest.approx(-3.0)
    assert got["drift/log10_lin_rel_error"] == math.log10(catalogue.LOG10_FLOOR)
    assert math.isnan(got["drift/log10_params_rel_change"])
    assert got["drift_layer/blocks.0/log10_rel_change"] == pytest.approx(-1.0)
    assert all(catalogue.lookup(name) is not None for name in got)


def test_threshold_direction_comes_from_the_catalogue_unless_given():
    assert Threshold.on("lin/agreement", 0.9).direction == "min"
    assert Threshold.on("ntk_layer/*/rel_change", 0.3).direction == "max"
    assert Threshold.on("ntk/eig_max", 5.0).direction == "max"  # no lazy side: a maximum
    assert Threshold.on("lin/agreement", 0.9, "max").direction == "max"
    th = Threshold("ntk_layer/*/rel_change", 0.3, "max")
    assert th.select(["ntk_layer/a/rel_change", "ntk/rel_change"]) == ["ntk_layer/a/rel_change"]
    assert not th.satisfied(float("nan")) and th.violated(float("nan")) == "nan is not finite"
    with pytest.raises(ValueError, match="direction must be 'max' or 'min'"):
        Threshold("ntk/rel_change", 0.1, "upper")


def test_minimum_policy_checks_the_end_and_from_the_given_step():
    assert checks_minimum(0, min_from_step=None, final=True)
    assert not checks_minimum(5, min_from_step=None, final=False)
    assert checks_minimum(5, min_from_step=5, final=False)
    assert not checks_minimum(0, min_from_step=1, final=False)


def test_cli_modules_and_catalogue_import_without_torch():
    code = (
        "import sys; import lazy_monitor.catalogue, lazy_monitor.thresholds, lazy_monitor.cli.main;"
        "print(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_surface():
    import lazy_monitor
    import lazy_monitor.metrics
    from lazy_monitor.callbacks._gate import KernelDriftError, KernelDriftWarning
    from lazy_monitor.core.kernels import NtkImplementation

    assert lazy_monitor.NtkImplementation is NtkImplementation
    assert lazy_monitor.KernelDriftError is KernelDriftError
    assert lazy_monitor.KernelDriftWarning is KernelDriftWarning
    assert lazy_monitor.metrics is lazy_monitor.metrics  # the module, importable by name
    assert callable(lazy_monitor.metrics.kernel_rel_change)


def test_the_deprecated_alias_modules_are_gone():
    # 0.1 is unreleased: lazy_monitor.models / lazy_monitor.datasets were aliases of demo/
    for name in ("lazy_monitor.models", "lazy_monitor.datasets"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(name)


def _module_imports() -> dict[str, set[str]]:
    """Module-level ``lazy_monitor`` imports of every package module (AST, no import)."""
    import ast

    pkg = os.path.join(ROOT, "lazy_monitor")
    graph: dict[str, set[str]] = {}
    for folder, _, files in os.walk(pkg):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            tree = ast.parse(open(path, encoding="utf-8").read())
            deps = set()
            for node in tree.body:  # module level only: lazy imports inside functions are fine
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    base = node.module
                    deps |= {f"{base}.{a.name}" for a in node.names} | {base}
                elif isinstance(node, ast.Import):
                    deps |= {a.name for a in node.names}
            graph[mod] = {d for d in deps if d.startswith("lazy_monitor")}
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_import_cycles_between_package_modules():
    graph = _module_imports()
    # a package's __init__ re-exporting its submodules is not a cycle of logic
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            assert state.get(d) != 1, "import cycle: " + " -> ".join([*path, m, d])
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
