"""lazy_monitor: is your network still in the lazy (kernel / NTK) regime?

Layers (dependencies point down only):

* ``lazy_monitor.core`` -- pure math on tensors: the empirical NTK engine
  (:func:`empirical_ntk`, :class:`NtkImplementation`), the frozen linearization
  (:class:`Linearization`, :class:`LinearizedModel`) and the regime metrics, public as
  :mod:`lazy_monitor.metrics`.
* ``lazy_monitor.catalogue`` / ``lazy_monitor.thresholds`` -- torch-free: every metric's name,
  direction, chart, formula and paper; the one :class:`Threshold` type.
* ``lazy_monitor.tracking`` -- :class:`KernelTracker`, framework-agnostic: holds θ₀/K₀ and turns a
  model state into a flat ``dict[str, float]`` of metrics.
* ``lazy_monitor.callbacks`` -- thin Lightning callbacks (both ``lightning.pytorch`` and
  ``pytorch_lightning``), :class:`KernelDriftError`, :class:`KernelDriftWarning`.
* ``lazy_monitor.cli`` -- the ``lazy-monitor`` command.

Names are imported lazily, so ``import lazy_monitor`` does not import Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "empirical_ntk": "lazy_monitor.core.kernels",
    "NtkImplementation": "lazy_monitor.core.kernels",
    "empirical_ntk_fn": "lazy_monitor.core.kernels",
    "estimate_ntk_cost": "lazy_monitor.core.kernels",
    "NtkConfig": "lazy_monitor.core.kernels",
    "Linearization": "lazy_monitor.core.linearization",
    "LinearizedModel": "lazy_monitor.core.linearization",
    "metrics": "lazy_monitor.metrics",
    "catalogue": "lazy_monitor.catalogue",
    "Threshold": "lazy_monitor.thresholds",
    "KernelTracker": "lazy_monitor.tracking",
    "MonitorSession": "lazy_monitor.tracking.session",
    "KernelConfig": "lazy_monitor.tracking",
    "KernelRegimeMonitor": "lazy_monitor.callbacks",
    "KernelDriftGate": "lazy_monitor.callbacks",
    "KernelDriftError": "lazy_monitor.callbacks",
    "KernelDriftWarning": "lazy_monitor.callbacks",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lazy_monitor' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if module.__name__.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
