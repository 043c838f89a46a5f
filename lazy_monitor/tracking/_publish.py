"""What :class:`~lazy_monitor.tracking.session.MonitorSession` hands its adapters to publish:
the logged metrics, the console line, the HParams and a drift gate's verdict across processes.

``session`` is a ``MonitorSession`` (typed ``Any``: this module must not import the session
module, which imports it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

from lazy_monitor import catalogue
from lazy_monitor.tracking.collectives import Collectives
from lazy_monitor.tracking.network import device_of

__all__ = ["HEADLINE_METRICS", "check_gate", "headline", "hparams", "loggable"]

#: What a console line shows (the full set goes to the loggers).
HEADLINE_METRICS = (
    "ntk/rel_change",
    "lin/rel_error",
    "params/rel_change",
    "regime/lazy",
    "monitor/overhead",
)


def hparams(session: Any) -> dict[str, Any]:
    """The session's settings as ``lazy_monitor/*`` HParams (strings for non-numbers), plus
    the measured kernel once resolved."""
    out = {f"lazy_monitor/{k}": v for k, v in session.settings().items()}
    out.update(
        {
            "lazy_monitor/every_n_steps": session.every_n_steps,
            "lazy_monitor/log_spaced_until": session.log_spaced_until,
            "lazy_monitor/max_overhead": str(session.max_overhead),
            "lazy_monitor/implementation": session.kernel.implementation,
            "lazy_monitor/max_memory": str(session.kernel.max_memory),
        }
    )
    out["lazy_monitor/submodule"] = str(session.submodule)
    out["lazy_monitor/projection"] = str(session.kernel.projection)
    out["lazy_monitor/layer_groups"] = str(session.layer_groups)
    cfg = session.tracker.kernel_config if session.tracker is not None else None
    if cfg:
        out["lazy_monitor/kernel_kind"] = cfg["kind"]
        out["lazy_monitor/kernel_projection"] = str(cfg["projection"])
    return out


def loggable(
    metrics: Mapping[str, float], health_logged: set[str], is_reference: bool
) -> dict[str, float]:
    """What goes to the loggers: the metrics, their ``drift/`` log10 companions after the
    reference, ``health/*`` only from its first non-zero value on (``health_logged``: the
    names already logged, updated)."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if name.startswith("health/") and name not in health_logged:
            if value == 0:
                continue
            health_logged.add(name)
        out[name] = value
    if not is_reference:  # every change is 0 there: no floor value on the axis
        out.update(catalogue.log10_companions(metrics))
    return out


def headline(step: int, metrics: Mapping[str, float]) -> str:
    """One console line: the :data:`HEADLINE_METRICS` at ``step``."""
    parts = [f"{n}={metrics[n]:.4g}" for n in HEADLINE_METRICS if n in metrics]
    return f"[lazy_monitor] step {step}: " + ", ".join(parts)


def check_gate(
    session: Any,
    gate: Any,
    step: int,
    metrics: Mapping[str, float],
    *,
    final: bool,
    repeat: bool,
) -> Optional[str]:
    """Check a :class:`~lazy_monitor.tracking.gate.DriftGate` on this measurement on every
    process of ``session``; when any process trips, trip the gate everywhere with the reason
    of the lowest such rank and return it (None: no trip, or already tripped)."""
    if gate.tripped:
        return None
    local = gate.check(metrics, step, final=final, repeat=repeat)
    collectives = session.collectives
    if collectives.world_size > 1:
        device = device_of(session.tracker.model) if session.tracker is not None else None
        reason = collectives.first(local, device=_collective_device(device, collectives))
    else:
        reason = local
    if reason is None:
        return None
    gate.trip(reason, step)
    return reason


def _collective_device(device: Optional[torch.device], collectives: Collectives) -> Any:
    # TorchDistributed picks the backend's device itself; others (a Lightning strategy) take
    # tensors where the model is
    from lazy_monitor.tracking.collectives import TorchDistributed

    return None if isinstance(collectives, TorchDistributed) else device
