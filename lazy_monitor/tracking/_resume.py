"""The monitor session's setting checks and what a resumed state's settings mean.

A saved monitor state carries the settings its reference was measured with
(:meth:`MonitorSession.settings`). On resume, :func:`differing_settings` compares them with the
session's: settings that only change how the same reference is measured (:data:`RESTORABLE`)
are restored with their saved values, settings that name another reference (:data:`FIXED`:
another network, another probe) refuse the state (:func:`refuse_other_reference`), unless the
session was asked to start a new reference (``reset_reference=True``); :func:`resume_settings`
says what the saved reference is rebuilt with and :func:`continues` tells a continued ``fit``
from a new start.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

from torch import nn

from lazy_monitor._validation import check_str, message
from lazy_monitor.tracking._state import fingerprint, same_fingerprint
from lazy_monitor.tracking.kernel_config import KernelConfig
from lazy_monitor.tracking.layers import DEFAULT_LAYER_GROUPS
from lazy_monitor.tracking.probe import Probe

__all__ = [
    "FIXED",
    "RESTORABLE",
    "check_feature_modules",
    "check_per_layer",
    "continues",
    "differing_settings",
    "refuse_other_reference",
    "resume_settings",
    "saved_settings",
]

# Settings that may differ in a resumed run: the saved reference is restored with the saved value.
RESTORABLE = (
    "probe_size",
    "seed",
    "kind",
    "projection",
    "projection_seed",
    "per_layer",
    "layer_groups",
)
# Settings that name another reference: a resumed run with another value raises.
FIXED = ("submodule", "probe")


def check_per_layer(value: Any) -> tuple[bool, Optional[int]]:
    """``per_layer`` -> (on, at most this many layer groups)."""
    if isinstance(value, bool):
        return value, DEFAULT_LAYER_GROUPS if value else None
    if isinstance(value, int) and value >= 1:
        return True, value
    raise TypeError(
        message(
            "per_layer",
            "True, False or a number of layer groups >= 1",
            value,
            f"True groups the network into at most {DEFAULT_LAYER_GROUPS} layer groups",
        )
    )


def check_feature_modules(value: Any) -> Union[list[str], bool, None]:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, Sequence) and not isinstance(value, str) and value:
        return [check_str(f"feature_modules[{i}]", m) for i, m in enumerate(value)]
    raise TypeError(
        message(
            "feature_modules",
            "True, False/None or a non-empty list of module names",
            value,
            "e.g. feature_modules=['fc1', 'readout'] (names from model.named_modules())",
        )
    )


def differing_settings(
    saved: Mapping[str, Any], mine: Mapping[str, Any], given: Optional[Probe], probe: Probe
) -> dict[str, tuple[Any, Any]]:
    """``{setting: (saved, mine)}`` for each setting that differs; an explicit probe ``given``
    is compared with the saved ``probe`` batch itself (``"probe"`` then names both)."""
    differs = {k: (saved[k], mine[k]) for k in saved if k in mine and saved[k] != mine[k]}
    differs.pop("probe", None)  # "given" vs "drawn" alone: the probe itself is compared
    if given is not None and not _same_probe(given, probe):
        differs["probe"] = ("the saved probe batch", "another probe batch")
    return differs


def refuse_other_reference(differs: Mapping[str, tuple[Any, Any]], owner: str, step: int) -> None:
    """Raise when a differing setting names another reference (:data:`FIXED`).

    Raises:
        ValueError: naming each such setting, both values and the two ways out.
    """
    fixed = {k: v for k, v in differs.items() if k in FIXED}
    if not fixed:
        return
    both = ", ".join(f"{k}={s!r} (saved) vs {m!r} (this {owner})" for k, (s, m) in fixed.items())
    raise ValueError(
        f"{owner}: the checkpoint's monitor state was measured with other settings that name "
        f"another reference: {both}. Resume with the saved settings, or pass "
        f"{owner}(..., reset_reference=True) to start a new reference K0 at step {step}"
    )


def _same_probe(given: Probe, saved: Probe) -> bool:
    if not same_fingerprint(fingerprint(given[0]), fingerprint(saved[0])):
        return False
    return True


def saved_settings(state: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a state was measured with (states before settings were saved: the few the
    tracker's configuration tells)."""
    settings = state.get("settings")
    if isinstance(settings, Mapping):
        return dict(settings)
    config = state.get("tracker", {}).get("config", {})
    out: dict[str, Any] = {}
    if "num_examples" in config:
        out["probe_size"] = int(config["num_examples"])
    if "per_layer" in config:
        out["per_layer"] = bool(config["per_layer"])
    return out


def resume_settings(
    state: Mapping[str, Any],
    mine: Mapping[str, Any],
    given: Optional[Probe],
    kernel: KernelConfig,
    per_layer: bool,
    owner: str,
    step: int,
) -> tuple[Probe, KernelConfig, bool, dict[str, Any]]:
    """What a saved ``state`` is rebuilt with: the saved probe, the kernel configuration and
    per-layer switch (the session's when they are the saved ones, else the saved ones, with one
    warning naming them) and the saved settings that differ from ``mine``.

    Raises:
        ValueError: a differing setting names another reference (:func:`refuse_other_reference`).
    """
    probe = (state["probe_x"], state["probe_y"])
    saved = saved_settings(state)
    differs = differing_settings(saved, mine, given, probe)
    refuse_other_reference(differs, owner, step)
    if differs:
        # the saved reference with the saved settings: the saved probe (always used), the
        # saved kernel configuration (kind="auto" without a projection adopts any), the
        # saved per-layer switch (the saved layer grouping is adopted by the tracker)
        if {"kind", "projection", "projection_seed"} & set(differs):
            kernel = dataclasses.replace(kernel, kind="auto", projection=None, topk=None)
        if "per_layer" in differs:
            per_layer = bool(saved["per_layer"])
        names = ", ".join(f"{k}={s!r} (this {owner}: {m!r})" for k, (s, m) in differs.items())
        warnings.warn(
            f"{owner}: resuming the saved reference K0 with the settings it was "
            f"measured with: {names}. Pass the saved settings to silence this, or "
            "reset_reference=True to start a new reference with this monitor's settings",
            UserWarning,
            stacklevel=5,  # the adapter's caller (through MonitorSession._restore and start)
        )
    return probe, kernel, per_layer, {k: saved[k] for k in differs if k in saved}


def continues(tracker: Any, last_step: Optional[int], network: nn.Module, step: int) -> bool:
    """A second start on the network a session's ``tracker`` already measures, at a later step
    (a continued ``fit``): the reference of the start of training is kept."""
    return (
        tracker is not None
        and tracker.started
        and tracker.model is network
        and last_step is not None
        and step >= last_step
        and step > 0
    )
