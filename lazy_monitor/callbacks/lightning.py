"""``lightning.pytorch`` adapters of the lazy_monitor callbacks.

Use these with ``lightning.pytorch.Trainer`` and in its LightningCLI configs::

    trainer:
      callbacks:
        - class_path: lazy_monitor.callbacks.lightning.KernelRegimeMonitor
          init_args: {probe_size: 32, every_n_steps: 100}

The logic lives in :mod:`lazy_monitor.callbacks._monitor` and :mod:`lazy_monitor.callbacks._gate`; this module only adds ``lightning.pytorch``'s
``Callback`` base so the namespace's ``isinstance`` checks (LightningCLI, callback ordering)
accept the classes. ``state_key`` is the same in both namespaces, so checkpoints are
interchangeable.
"""

from __future__ import annotations

from lazy_monitor._extras import raise_missing

try:
    from lightning.pytorch import Callback
except ModuleNotFoundError as exc:
    raise_missing(exc, "lazy_monitor.callbacks.lightning")

from lazy_monitor.callbacks._gate import KernelDriftError, KernelDriftWarning, _KernelDriftGateBase
from lazy_monitor.callbacks._monitor import _KernelRegimeMonitorBase

__all__ = ["KernelDriftError", "KernelDriftGate", "KernelDriftWarning", "KernelRegimeMonitor"]


class KernelRegimeMonitor(_KernelRegimeMonitorBase, Callback):
    __doc__ = _KernelRegimeMonitorBase.__doc__


class KernelDriftGate(_KernelDriftGateBase, Callback):
    __doc__ = _KernelDriftGateBase.__doc__
