"""Small state objects that move, save and load themselves (the model is torchmetrics'
``Metric.add_state``): fields are registered once with their default, and :meth:`reset`,
:meth:`to`, :meth:`state_dict` and :meth:`load_state_dict` iterate the registry instead of
listing the fields by hand.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional, Protocol

import torch
from torch import Tensor, nn

from lazy_monitor.core import _functional as F
from lazy_monitor.tracking.distributed import KernelSharding
from lazy_monitor.tracking.kernel_config import KernelConfig, ResolvedKernel

__all__ = [
    "LastMeasurement",
    "Reference",
    "StateRegistry",
    "TrackerState",
    "fingerprint",
    "same_fingerprint",
]


def _map_tensors(value: Any, fn: Any) -> Any:
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


class StateRegistry:
    """A set of named fields: tensors, ``dict[str, Tensor]`` or plain Python values."""

    def __init__(self) -> None:
        self._defaults: dict[str, Any] = {}
        self._missing_ok: set[str] = set()

    def add_state(self, name: str, default: Any = None, *, missing_ok: bool = False) -> None:
        """Register ``name`` with the value :meth:`reset` restores (a dict default is copied).

        ``missing_ok``: a field added in a later version; a state saved before it loads with
        the default (the owner may then rebuild it)."""
        self._defaults[name] = default
        if missing_ok:
            self._missing_ok.add(name)
        setattr(self, name, dict(default) if isinstance(default, dict) else default)

    def reset(self) -> None:
        for name, default in self._defaults.items():
            setattr(self, name, dict(default) if isinstance(default, dict) else default)

    def to(self, device: torch.device) -> None:
        """Move every tensor to ``device`` (a no-op for those already there)."""
        for name in self._defaults:
            setattr(self, name, _map_tensors(getattr(self, name), lambda t: t.to(device)))

    def state_dict(self) -> dict[str, Any]:
        """Detached CPU clones of the tensors, plain values as they are."""
        return {
            name: _map_tensors(getattr(self, name), lambda t: t.detach().cpu().clone())
            for name in self._defaults
        }

    def load_state_dict(self, state: Mapping[str, Any], device: Optional[torch.device]) -> None:
        for name, default in self._defaults.items():
            if name not in state and name in self._missing_ok:
                setattr(self, name, dict(default) if isinstance(default, dict) else default)
                continue
            value = state[name]
            setattr(self, name, _map_tensors(value, lambda t: t.to(device)) if device else value)


class Reference(StateRegistry):
    """What a measurement is compared with, captured at :meth:`KernelTracker.start`.

    ``f0`` ``(N, O)``; ``kernel0`` in the engine's shape for the kind (``(N, N, O, O)``,
    ``(N, N)`` or ``(N, N, O)``); ``layer_kernels0`` one such kernel per layer (empty without
    ``per_layer``); ``eigvecs0`` ``(M, k)`` the top-k eigenvectors of the kernel matrix;
    ``feature_grams0`` ``{module: (N, N)}`` float64 centred Gram matrices ``H Φ₀ Φ₀ᵀ H`` of the
    tracked modules' features at θ₀ (for ``features/<layer>/cka``; absent from states saved
    before feature tracking existed; the tracker rebuilds them from θ₀). θ₀ itself is the tracker's
    frozen :class:`~lazy_monitor.Linearization`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.add_state("f0")
        self.add_state("kernel0")
        self.add_state("layer_kernels0", {})
        self.add_state("eigvecs0")
        self.add_state("feature_grams0", {}, missing_ok=True)


class LastMeasurement(StateRegistry):
    """The previous measurement (for ``ntk/velocity`` and the TensorBoard extras): its kernel,
    its ascending eigenvalues ``(M,)`` and its step."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("last_kernel")
        self.add_state("last_eigenvalues")
        self.add_state("last_step")


def fingerprint(x: F.InputBatch) -> list[list[float]]:
    """Shape and two weighted sums per input tensor (CPU, float64): identifies a probe batch in a
    checkpoint without storing it."""
    leaves: list[Tensor] = []
    F.map_batch(x, lambda t: leaves.append(t) or t)
    out = []
    for t in leaves:
        v = t.detach().to("cpu", torch.float64).flatten()
        w = torch.sin(torch.arange(v.numel(), dtype=torch.float64) * 0.7 + 0.3)
        out.append([float(s) for s in t.shape] + [float(v.sum()), float((v * w).sum())])
    return out


def same_fingerprint(a: list[list[float]], b: list[list[float]]) -> bool:
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        return False
    return all(
        math.isclose(p, q, rel_tol=1e-9, abs_tol=1e-9) for x, y in zip(a, b) for p, q in zip(x, y)
    )


class TrackerState(Protocol):
    """What a measurement backend reads from the tracker that holds it (its settings and the
    tracked parameter set, which :meth:`KernelTracker.start` fixes)."""

    model: nn.Module
    output_fn: Optional[F.OutputFn]
    per_layer: bool
    probe_size: int
    num_outputs: int
    kernel: KernelConfig
    sharding: Optional[KernelSharding]
    _resolved: Optional[ResolvedKernel]
    _reference: Reference
    _lin: Any  # the θ₀ snapshot once started (the backend's own type)

    @property
    def _param_names(self) -> list[str]: ...
    @property
    def _layers(self) -> dict[str, list[str]]: ...
    def _probe_on_model_device(self) -> F.InputBatch: ...
    def _model_device(self) -> torch.device: ...
    def _metric_device(self) -> torch.device: ...
    def _hooks(self, strict: bool = True) -> Any: ...
    def _on_metric_device(self, grams: Mapping[str, Tensor]) -> dict[str, Tensor]: ...
