"""Deprecated: moved to :mod:`lazy_monitor.demo.datasets` (demo and example support)."""

import warnings

from lazy_monitor.demo.datasets import *  # noqa: F403
from lazy_monitor.demo.datasets import __all__  # noqa: F401

warnings.warn(
    "lazy_monitor.datasets is deprecated; import from lazy_monitor.demo.datasets",
    DeprecationWarning,
    stacklevel=2,
)
