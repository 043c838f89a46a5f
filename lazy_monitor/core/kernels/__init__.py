"""Empirical NTK engine: :func:`empirical_ntk` and its implementations (:class:`NtkImplementation`)."""

from .config import NtkConfig, NtkImplementation
from .empirical import empirical_ntk, empirical_ntk_fn, projection_matrix
from .errors import ForwardADUnsupportedError, NtkBudgetError, StructuredPlanError
from .estimate import DEFAULT_MAX_MEMORY, estimate_ntk_cost, resolve_kernel_config

__all__ = [
    "DEFAULT_MAX_MEMORY",
    "ForwardADUnsupportedError",
    "NtkBudgetError",
    "NtkConfig",
    "NtkImplementation",
    "StructuredPlanError",
    "empirical_ntk",
    "empirical_ntk_fn",
    "estimate_ntk_cost",
    "projection_matrix",
    "resolve_kernel_config",
]
