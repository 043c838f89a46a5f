"""Optional dependencies (pyproject extras): a missing one fails with its exact install command.

Missing packages are simulated with ``None`` entries in ``sys.modules`` (the import system then
raises ModuleNotFoundError for them), restored by monkeypatch after each test.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

from lazy_monitor import _extras

ROOT = Path(__file__).resolve().parent.parent


def _hide(monkeypatch: pytest.MonkeyPatch, top: str, *reimport: str) -> None:
    """Make package ``top`` (and its loaded submodules) unimportable; forget ``reimport``."""
    for name in [m for m in sys.modules if m == top or m.startswith(top + ".")] + [top]:
        monkeypatch.setitem(sys.modules, name, None)
    for name in reimport:
        monkeypatch.delitem(sys.modules, name, raising=False)


def _expect(extra: str, who: str) -> str:
    return re.escape(f"{who} needs") + r".*" + re.escape(f'pip install "lazy-monitor[{extra}]"')


@pytest.mark.parametrize(
    "module, top, extra",
    [
        ("lazy_monitor.integrations.transformers", "transformers", "hf"),
        ("lazy_monitor.callbacks.lightning", "lightning", "lightning"),
    ],
)
def test_module_import_names_the_extra(monkeypatch, module, top, extra):
    _hide(monkeypatch, top, module)
    with pytest.raises(ImportError, match=_expect(extra, module)) as info:
        importlib.import_module(module)
    assert info.value.name == top


def test_plot_without_matplotlib_names_the_viz_extra(monkeypatch, tmp_path):
    from lazy_monitor.cli import report

    _hide(monkeypatch, "matplotlib")
    with pytest.raises(ImportError, match=_expect("viz", "lazy-monitor report --plot")):
        report.plot_runs([], tmp_path / "x.png")


def test_heatmap_without_matplotlib_names_the_viz_extra(monkeypatch):
    from lazy_monitor.callbacks import _tensorboard as tb

    _hide(monkeypatch, "matplotlib")
    with pytest.raises(ImportError, match=r'pip install "lazy-monitor\[viz\]"'):
        tb.layer_drift_figure([0, 1], ["fc"], [[0.1], [0.2]])


def test_a_missing_package_of_no_extra_keeps_its_own_error(monkeypatch):
    _hide(monkeypatch, "yaml")  # a dependency of a dependency: not ours to explain
    with pytest.raises(ModuleNotFoundError) as info:
        try:
            import yaml  # noqa: F401
        except ModuleNotFoundError as exc:
            _extras.raise_missing(exc, "something")
    assert "lazy-monitor[" not in str(info.value)


def test_the_extras_named_in_messages_exist_in_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = meta["optional-dependencies"]
    assert set(_extras.EXTRAS.values()) <= set(extras)
    for top, extra in _extras.EXTRAS.items():
        # the extra really installs the package (distribution names use '-' for '_')
        assert any(req.lower().startswith(top.replace("_", "-")) for req in extras[extra]), top
    core = " ".join(meta["dependencies"])
    assert not any(top in core for top in ("transformers", "matplotlib", "jsonargparse")), core
    assert "lazy-monitor[all]" in extras["test"]
