"""Which modules' features a :class:`~lazy_monitor.tracking.tracker.KernelTracker` tracks, and
the forward hooks that record them (framework-free, no tracker state)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

from torch import nn

from lazy_monitor._validation import check_str
from lazy_monitor.core.features import centered_gram, default_feature_modules, feature_hooks

__all__ = ["check_feature_modules", "gram_hooks"]


def check_feature_modules(
    model: nn.Module, modules: Union[Sequence[str], bool, None]
) -> tuple[list[str], bool]:
    """``(candidate module names, strict)`` for ``feature_modules=``: the default set
    (``True``) is filtered later, a given list must be trackable as a whole; ``False``/``None``:
    none."""
    if modules is None or modules is False:
        return [], True
    if modules is True:
        try:
            return default_feature_modules(model), False
        except ValueError:  # no submodule owns a parameter: nothing to track by default
            return [], False
    if isinstance(modules, str) or not isinstance(modules, Sequence):
        raise TypeError(
            f"feature_modules must be True, False/None or a list of module names, got "
            f"{modules!r}; e.g. feature_modules=['fc1', 'readout']"
        )
    names = [check_str(f"feature_modules[{i}]", m) for i, m in enumerate(modules)]
    if len(set(names)) != len(names) or not names:
        raise ValueError(
            f"feature_modules must list distinct module names, got {modules!r}; pass False "
            "for no feature metrics"
        )
    return names, True


def gram_hooks(
    model: nn.Module, modules: Sequence[str], probe_size: int, strict: bool = True
) -> Any:
    """Forward hooks (a context manager yielding ``{module: (N, N)}``) recording the centred
    Gram of each module's output (computed in the hook: a wide layer's ``N·D`` features are
    not kept)."""
    return feature_hooks(model, modules, probe_size, strict=strict, transform=centered_gram)
