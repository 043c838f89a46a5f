"""Which modules' features a :class:`~lazy_monitor.tracking.tracker.KernelTracker` tracks, and
the forward hooks that record them (framework-free, no tracker state).

The default set is the *hidden* representations: the modules owning trainable parameters,
less the output layer (its output is the network's output, which must move for the network to
learn anything; ``lin/*`` track it) and less modules whose features are the same for every probe
example at θ₀ (CKA is undefined for them: LoRA's ``lora_B = 0``, a BERT segment embedding with
one segment). A module named in ``feature_modules=[...]`` is tracked even if it is the output
layer. The ``(N, N)`` float64 Grams of the tracked modules count against ``max_memory``
(:func:`feature_gram_bytes`): checked before the first Gram is computed.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

from torch import nn

from lazy_monitor._validation import check_str, gib
from lazy_monitor.core.features import centered_gram, default_feature_modules, feature_hooks

__all__ = [
    "check_feature_modules",
    "feature_gram_bytes",
    "fit_feature_budget",
    "gram_hooks",
    "kernel_budget",
    "report_feature_selection",
]

_log = logging.getLogger("lazy_monitor")


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


def feature_gram_bytes(num_modules: int, probe_size: int) -> int:
    """Peak bytes of the feature CKA of ``num_modules`` modules on ``N = probe_size`` examples:
    a float64 ``(N, N)`` Gram per module at θ₀ and one now, plus one ``(N, N)`` temporary of
    the CKA (the ``(N, D)`` features are freed in the forward hook)."""
    if num_modules == 0:
        return 0
    return (2 * num_modules + 1) * probe_size * probe_size * 8


def kernel_budget(max_memory: Optional[int], num_modules: int, probe_size: int) -> Optional[int]:
    """What ``max_memory`` leaves for the kernel next to the feature Grams (None: no limit)."""
    if max_memory is None:
        return None
    return max(1, max_memory - feature_gram_bytes(num_modules, probe_size))


def fit_feature_budget(
    candidates: Sequence[str], strict: bool, probe_size: int, max_memory: Optional[int]
) -> list[str]:
    """The candidates if their Grams (:func:`feature_gram_bytes`) fit ``max_memory``; else the
    default set is dropped with one warning and an explicit list raises, before any Gram is
    computed.

    Raises:
        ValueError: an explicit ``feature_modules`` list over ``max_memory``.
    """
    need = feature_gram_bytes(len(candidates), probe_size)
    if max_memory is None or need <= max_memory:
        return list(candidates)
    msg = (
        f"the feature CKA of {len(candidates)} module(s) needs {gib(need)} of "
        f"(N, N) float64 Grams at N={probe_size} (2 per module + 1), more than "
        f"max_memory={gib(max_memory)}"
    )
    if strict:
        raise ValueError(
            f"{msg}; track fewer modules (feature_modules=[...] or False), use a smaller probe, "
            "or raise max_memory"
        )
    warnings.warn(
        f"KernelTracker does not track features: {msg}. Pass feature_modules=[...] with fewer "
        "modules, a smaller probe or a larger max_memory to track them.",
        UserWarning,
        stacklevel=3,
    )
    return []


def report_feature_selection(
    candidates: Sequence[str], tracked: Mapping[str, Any], reasons: Mapping[str, str]
) -> list[str]:
    """The tracked modules (candidates with a Gram, in candidate order) after the selecting
    forward (:func:`gram_hooks` with ``select=reasons``); one warning for untrackable default
    modules (called more than once, no tensor), one info line for the output layer, outputs
    shared by the batch and constant features."""
    kept = [m for m in candidates if m in tracked and m not in reasons]
    by = {r: [m for m in candidates if reasons.get(m) == r] for r in set(reasons.values())}

    def short(names: list[str]) -> str:
        more = f" and {len(names) - 4} more" if len(names) > 4 else ""
        return f"{names[:4]!r}{more}"

    if by.get("untrackable"):
        warnings.warn(
            f"KernelTracker does not track the features of {short(by['untrackable'])}: not "
            "called exactly once per forward, or output not batched on dim 0 with the probe's "
            "examples. Pass feature_modules=[...] to choose the modules (or False for none).",
            stacklevel=3,
        )
    parts = []
    if by.get("output"):
        parts.append(
            f"{short(by['output'])} is the output layer (its output is the model's: lin/* "
            "tracks it; name it in feature_modules to get its CKA)"
        )
    if by.get("unbatched"):
        parts.append(
            f"{short(by['unbatched'])} output(s) one tensor shared by the whole batch (e.g. "
            "position embeddings): no per-example features"
        )
    if by.get("constant"):
        parts.append(
            f"{short(by['constant'])} output(s) the same features for every probe example at "
            "θ₀ (CKA undefined, e.g. LoRA's lora_B = 0)"
        )
    if parts:
        _log.info("KernelTracker: no features/<layer>/cka for %s", "; ".join(parts))
    return kept


def gram_hooks(
    model: nn.Module,
    modules: Sequence[str],
    probe_size: int,
    strict: bool = True,
    select: Optional[dict[str, str]] = None,
) -> Any:
    """Forward hooks (a context manager yielding ``{module: (N, N)}``) recording the centred
    Gram of each module's output (computed in the hook: a wide layer's ``N·D`` features are
    not kept). ``select``: the tracker's first forward, which chooses the modules (see
    :func:`lazy_monitor.core.features.feature_hooks`)."""
    return feature_hooks(
        model, modules, probe_size, strict=strict, transform=centered_gram, select=select
    )
