"""Layer 4: the ``lazy-monitor`` command line (``demo``, ``report``, ``check``).

``report`` and ``check`` read TensorBoard event files only (no model, no Lightning import), so
they work on logs from any machine; ``demo`` trains small models with the Lightning callback.
"""

from lazy_monitor.cli.main import main

__all__ = ["main"]
