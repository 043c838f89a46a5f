"""Pure metric functions on tensors (the formulas behind :mod:`lazy_monitor.catalogue`).

The public name of :mod:`lazy_monitor.core.metrics`: ``import lazy_monitor.metrics as M``.

>>> import torch
>>> from lazy_monitor.metrics import kernel_rel_change
>>> float(kernel_rel_change(2 * torch.eye(3), torch.eye(3)))
1.0
"""

from lazy_monitor.core.metrics import *  # noqa: F403
from lazy_monitor.core.metrics import __all__  # noqa: F401
