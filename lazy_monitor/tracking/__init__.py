"""Layer 2: framework-agnostic, stateful tracking of the kernel regime during training.

Everything a training-framework adapter (the Lightning callbacks, a Hugging Face
``TrainerCallback``) needs without importing the framework:

* :class:`KernelConfig` -- the kernel settings (kind, implementation, projection, memory,
  ``topk``, snapshot device), typed and validated once;
* :class:`KernelTracker` -- the reference (θ₀, ``f₀``, ``K₀``) and ``start``/``measure``;
* :mod:`~lazy_monitor.tracking.kernel_config` -- which kernel it measures (``kind="auto"``
  under ``max_memory``, a saved configuration, ``topk``); :mod:`~lazy_monitor.tracking.features`
  -- which modules' features it tracks and their hooks;
* :mod:`~lazy_monitor.tracking.schedule` -- when to measure (:class:`MeasurementSchedule`);
* :mod:`~lazy_monitor.tracking.probe` -- probe validation, deterministic draws from a dataset,
  building a tracker that drops unusable drawn targets (:func:`build_tracker`);
* :mod:`~lazy_monitor.tracking.gate` -- the drift gate's decision and state (:class:`DriftGate`);
* :mod:`~lazy_monitor.tracking.network` -- unwrap DDP / ``torch.compile``, resolve a submodule;
* :mod:`~lazy_monitor.tracking.distributed` -- split a measurement across processes
  (:class:`KernelSharding`); :class:`OverheadBudget` -- keep measuring within a time budget;
* :mod:`~lazy_monitor.tracking.measurement` -- how a tracker evaluates the model (its
  backend): locally, split across processes, or FSDP2-sharded
  (:mod:`~lazy_monitor.tracking.sharded`, chosen when the parameters are DTensors).
"""

from lazy_monitor.tracking.distributed import KernelSharding
from lazy_monitor.tracking.kernel_config import KernelConfig
from lazy_monitor.tracking.schedule import MeasurementSchedule, OverheadBudget
from lazy_monitor.tracking.tracker import (
    DEFAULT_LAZY_THRESHOLDS,
    LOWER_BOUND_METRICS,
    KernelTracker,
)

__all__ = [
    "DEFAULT_LAZY_THRESHOLDS",
    "LOWER_BOUND_METRICS",
    "KernelConfig",
    "KernelSharding",
    "KernelTracker",
    "MeasurementSchedule",
    "OverheadBudget",
]
