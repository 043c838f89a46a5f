"""Deprecated: moved to :mod:`lazy_monitor.demo.models` (demo and example support)."""

import warnings

from lazy_monitor.demo.models import *  # noqa: F403
from lazy_monitor.demo.models import __all__  # noqa: F401

warnings.warn(
    "lazy_monitor.models is deprecated; import from lazy_monitor.demo.models",
    DeprecationWarning,
    stacklevel=2,
)
