"""Empirical NTK engine: :func:`empirical_ntk` and its implementations (:class:`NtkImplementation`)."""

from .config import NtkConfig, NtkImplementation
from .empirical import empirical_ntk, empirical_ntk_fn, projection_matrix
from .errors import ForwardADUnsupportedError, StructuredPlanError

__all__ = [
    "ForwardADUnsupportedError",
    "NtkConfig",
    "NtkImplementation",
    "StructuredPlanError",
    "empirical_ntk",
    "empirical_ntk_fn",
    "projection_matrix",
]
