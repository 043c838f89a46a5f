"""Layer 2: framework-agnostic, stateful tracking of the kernel regime during training."""

from lazy_monitor.tracking.tracker import (
    DEFAULT_LAZY_THRESHOLDS,
    LOWER_BOUND_METRICS,
    KernelTracker,
)

__all__ = ["DEFAULT_LAZY_THRESHOLDS", "LOWER_BOUND_METRICS", "KernelTracker"]
