"""Lightning callbacks: :class:`KernelRegimeMonitor` (measure and log) and :class:`KernelDriftGate`
(act on thresholds).

Two namespaces, one implementation:

* ``lazy_monitor.callbacks.pytorch_lightning`` -- for ``pytorch_lightning.Trainer``;
* ``lazy_monitor.callbacks.lightning`` -- for ``lightning.pytorch.Trainer``.

``from lazy_monitor.callbacks import KernelRegimeMonitor`` (and ``from lazy_monitor import ...``)
gives the ``pytorch_lightning`` classes, because ``pytorch-lightning`` is the package's declared
dependency; if only ``lightning`` is installed it falls back to the ``lightning.pytorch`` ones.
Hooks run under either Trainer when passed in a list, but LightningCLI and Lightning's own
``isinstance`` checks only accept the class of their namespace, so import from the matching
adapter when you use ``lightning.pytorch``. Checkpoint state (``state_key``) is shared.

Imports are lazy: importing this package does not import Lightning.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__all__ = [
    "KernelDriftError",
    "KernelDriftGate",
    "KernelDriftWarning",
    "KernelRegimeMonitor",
    "default_namespace",
]

# error and warning live with the gate; they import no Lightning
_FROM_GATE = ("KernelDriftError", "KernelDriftWarning")


def default_namespace() -> str:
    """The adapter module behind ``lazy_monitor.callbacks.KernelRegimeMonitor``."""
    if importlib.util.find_spec("pytorch_lightning") is not None:
        return "lazy_monitor.callbacks.pytorch_lightning"
    if importlib.util.find_spec("lightning") is not None:
        return "lazy_monitor.callbacks.lightning"
    raise ImportError(
        "lazy_monitor's callbacks need pytorch-lightning or lightning: pip install pytorch-lightning"
    )


def __getattr__(name: str) -> Any:
    if name in _FROM_GATE:
        module = importlib.import_module("lazy_monitor.callbacks._gate")
    elif name in ("KernelRegimeMonitor", "KernelDriftGate"):
        module = importlib.import_module(default_namespace())
    else:
        raise AttributeError(f"module 'lazy_monitor.callbacks' has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
