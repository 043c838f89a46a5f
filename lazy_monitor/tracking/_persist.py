"""Saving and restoring a :class:`~lazy_monitor.tracking.tracker.KernelTracker`'s state:
what ``state_dict`` holds (θ₀ snapshot, reference, last measurement, the configuration that
shapes the stored tensors) and how ``load_state_dict`` checks it against the tracker
(:func:`~lazy_monitor.tracking._checks.check_saved_config`) and adopts it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lazy_monitor._state import check_schema, stamp
from lazy_monitor.tracking import _checks
from lazy_monitor.tracking import kernel_config as kc
from lazy_monitor.tracking._state import fingerprint

__all__ = ["config", "load", "save"]


def save(t: Any) -> dict[str, Any]:
    """``t.state_dict()``: CPU tensors and plain Python values only."""
    state: dict[str, Any] = stamp({"config": config(t), "started": t.started})
    if not t.started:
        return state
    assert t._lin is not None
    state["linearization"] = t._lin.state_dict()
    state.update(t._reference.state_dict())
    state.update(t._last.state_dict())
    state["catapult"] = t._catapult.state_dict()
    return state


def config(t: Any) -> dict[str, Any]:
    """The configuration that shapes the stored tensors (compared at load)."""
    cfg = t._resolved
    return {
        "kind": t.kernel.kind if cfg is None else cfg.kind,
        "kernel_config": None if cfg is None else cfg.as_dict(),
        "per_layer": t.per_layer,
        "topk": t.topk,
        "num_examples": t.probe_size,
        "num_outputs": t.num_outputs,
        "param_names": list(t._param_names),
        "layer_groups": t.layer_groups,
        "probe": t._probe_fingerprint,
        "targets": None if t.targets is None else fingerprint(t.targets),
        "feature_modules": list(t._feature_modules),
    }


def load(t: Any, state: Mapping[str, Any]) -> None:
    """``t.load_state_dict(state)``: check ``state`` against ``t``, then adopt it."""
    check_schema(state, "KernelTracker", required=("format", "config", "started"))
    saved = state["config"]
    kernel_config = (
        kc.ResolvedKernel.from_saved(saved, t.kernel, t.measurement.implementation(t.kernel))
        if state["started"]
        else None
    )
    mine = config(t)
    if kernel_config is not None:  # compare with what this tracker will measure
        mine["kind"] = kernel_config.kind
        mine["topk"] = t._layout.check_topk(kernel_config.kind, kernel_config.projection)
    saved_features = saved.get("feature_modules")
    if (
        t._features_default
        and saved_features is not None
        and set(saved_features) <= set(dict(t.model.named_modules()))
    ):
        # Default modules follow the saved tracker (like the tracked parameters: chosen
        # when it was built, e.g. before layers were frozen).
        mine["feature_modules"] = list(saved_features)
    _checks.check_saved_config(saved, mine, started=state["started"], model=t.model)
    if mine["feature_modules"] != t._feature_modules:
        t._feature_modules = list(mine["feature_modules"])
        t._layout.build_names(t._feature_modules, t.lazy_thresholds)
    t._reset()
    if not state["started"]:
        return
    # the saved per-layer K₀ fixes the grouping (states before layer_groups: per module)
    regroup = saved.get("layer_groups") != t.layer_groups
    t._layout.layer_groups = saved.get("layer_groups")
    t._layout.set_param_names(list(saved["param_names"]), t._feature_modules, regroup=regroup)
    assert kernel_config is not None
    t._layout.apply(kernel_config, warn=False)
    t._resolved = kernel_config
    lin = t.measurement.snapshot()
    lin.load_state_dict(state["linearization"])
    dev = t._metric_device()
    t._reference.load_state_dict(state, dev)
    t._last.load_state_dict(state, dev)
    t._lin = lin
    if "catapult" in state:
        t._catapult.load_state_dict(state["catapult"])
    if set(t._reference.feature_grams0) != set(t._feature_modules):
        # A state saved before feature tracking: the θ₀ features from the snapshot (its
        # parameters and buffers), exactly what start() would have recorded.
        x = t._probe_on_model_device()
        with t._hooks() as grams:
            lin.f0(x)
        t._reference.feature_grams0 = t._on_metric_device(grams)
