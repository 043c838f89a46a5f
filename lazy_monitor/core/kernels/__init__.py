"""Empirical NTK engine: :func:`empirical_ntk` and its implementations (:class:`NtkImplementation`)."""

from .empirical import NtkImplementation, empirical_ntk

__all__ = ["NtkImplementation", "empirical_ntk"]
