"""Typed errors of the kernel engine.

Fallback decisions inside the engine travel as these types (never by matching message text):
the structured path raises :class:`StructuredPlanError` when the plan made on the probe examples
does not hold for a later block (``implementation="auto"`` then recomputes with the Jacobian
contraction), and :class:`ForwardADUnsupportedError` says that an op of the model has no
forward-mode AD rule (``implementation="ntvp"`` needs one).
"""

from __future__ import annotations

__all__ = ["ForwardADUnsupportedError", "StructuredPlanError"]


class StructuredPlanError(RuntimeError):
    """The structured plan (parameter uses found on the probe examples) does not hold for some
    examples: data-dependent control flow. ``implementation="auto"`` handles it internally by
    using the Jacobian contraction; an explicit ``"structured"`` raises it."""


class ForwardADUnsupportedError(NotImplementedError):
    """An op of the model has no forward-mode AD rule, so ``implementation="ntvp"`` (one jvp per
    kernel row) cannot run on it; ``"jacobian"`` or ``"auto"`` use reverse mode only."""
