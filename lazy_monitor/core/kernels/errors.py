"""Typed errors of the kernel engine, and the one wording of a model that cannot run on a probe.

Fallback decisions inside the engine travel as these types (never by matching message text):
the structured path raises :class:`StructuredPlanError` when the plan made on the probe examples
does not hold for a later block (``implementation="auto"`` then recomputes with the Jacobian
contraction), and :class:`ForwardADUnsupportedError` says that an op of the model has no
forward-mode AD rule (``implementation="ntvp"`` needs one). :class:`NtkBudgetError` is the one
refusal of a computation whose estimated memory or time exceeds its budget, raised before
anything large is allocated.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from .._functional import OutputSelectionError

__all__ = [
    "ForwardADUnsupportedError",
    "NtkBudgetError",
    "StructuredPlanError",
    "check_materialized",
    "probe_error",
]


class StructuredPlanError(RuntimeError):
    """The structured plan (parameter uses found on the probe examples) cannot be made or does
    not hold for some examples: data-dependent control flow. ``implementation="auto"`` handles
    it (and any other failure of the structured attempt) by using the Jacobian contraction; an
    explicit ``"structured"`` raises it, naming ``"auto"`` and ``"jacobian"``."""


class ForwardADUnsupportedError(NotImplementedError):
    """An op of the model has no forward-mode AD rule, so ``implementation="ntvp"`` (one jvp per
    kernel row) cannot run on it; ``"jacobian"`` or ``"auto"`` use reverse mode only."""


class NtkBudgetError(ValueError):
    """A kernel computation (or a tracker's measurement) is estimated to need more memory than
    ``max_memory`` or more time than the time limit. Raised before any large allocation; the
    message has the estimate, the budget and the fixes (``output_fn``, ``projection``, ``kind``,
    a smaller probe, a larger budget).

    Attributes:
        estimate: the numbers behind the refusal (bytes or seconds, shapes), by name.
    """

    def __init__(self, message: str, estimate: Optional[dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.estimate = dict(estimate or {})


def check_materialized(model: nn.Module) -> None:
    """Raise if a parameter or buffer of ``model`` has no data: on the ``meta`` device (built
    under ``torch.device("meta")`` or ``init_empty_weights``) or a lazy module's
    ``UninitializedParameter``. The kernel of such a model is not defined."""
    from torch.nn.parameter import UninitializedTensorMixin

    empty = [
        name
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if t.is_meta or isinstance(t, UninitializedTensorMixin)
    ]
    if empty:
        listing = ", ".join(empty[:4]) + (", ..." if len(empty) > 4 else "")
        raise ValueError(
            f"{type(model).__name__} has {len(empty)} parameters/buffers without data (on the "
            f"meta device or uninitialised: {listing}); materialise the model first (e.g. "
            "model.to_empty(device='cpu') then load or initialise its weights, or run one "
            "forward of a lazy module) before measuring its kernel"
        )


def _shapes(x: Any) -> Any:
    if isinstance(x, Tensor):
        return tuple(x.shape)
    if isinstance(x, dict):
        return {k: _shapes(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_shapes(v) for v in x)
    return type(x).__name__


def _out_of_memory(err: BaseException) -> bool:
    import torch

    text = str(err)
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or (
        "can't allocate memory" in text or "out of memory" in text.lower()
    )


def probe_error(err: Exception, model: nn.Module, probe: Any, name: str = "the probe") -> Exception:
    """The model's own error on ``probe`` (its forward failed), reworded for the user: with the
    probe's shape, what the model's first layer expects and the tuple hint for several
    positional inputs; an allocation failure is a :class:`NtkBudgetError` (the probe is too
    large, not misshapen) and a model without data gets :func:`check_materialized`'s message.
    An :class:`~lazy_monitor.core._functional.OutputSelectionError` is returned as it is: the
    output, not the probe, needs the fix (``output_fn``)."""
    if isinstance(err, OutputSelectionError):
        return err
    text = str(err)
    shapes = _shapes(probe)
    try:
        check_materialized(model)
    except ValueError as meta:
        return meta
    if _out_of_memory(err):
        return NtkBudgetError(
            f"the model's forward on {name} (shape {shapes}) ran out of memory: {text}; use a "
            "smaller probe (fewer examples or shorter sequences)"
        )
    hints = [f"{name} has shape {shapes}"]
    first = next(
        (m for m in model.modules() if not list(m.children()) and list(m.parameters(False))), None
    )
    for attr, axis in (
        ("in_features", "last dim"),
        ("in_channels", "dim 1"),
        ("input_size", "last dim"),
    ):
        if first is not None and hasattr(first, attr):
            hints.append(
                f"the model's first layer {type(first).__name__} expects {axis} = "
                f"{getattr(first, attr)} ({attr})"
            )
            break
    if isinstance(err, TypeError) and "argument" in text:
        hints.append(
            "a model with several inputs forward(a, b) takes the probe as a tuple of tensors "
            "(a, b), all batched on dim 0"
        )
    return type(err)(f"the model cannot run on {name}: {text}; " + "; ".join(hints))
