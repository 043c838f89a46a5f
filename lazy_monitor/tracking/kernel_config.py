"""Which kernel a :class:`~lazy_monitor.tracking.tracker.KernelTracker` measures.

:class:`KernelConfig` -- the kernel settings a user chooses, typed and validated once (the
tracker, both Lightning monitors and the HF callback take one). Plain functions of explicit
arguments (no tracker state): :func:`resolve`, the one resolver of ``kind="auto"`` under
``max_memory`` (or check of a forced kind/projection against the estimate), giving a
:class:`ResolvedKernel` (also read back from a saved state, old states included), the kernel
matrix's outputs per example,
the ``topk`` check against it, the spectrum-size warning, and the alignment targets projected
into the kernel's output space.

Which kernel (``kind="auto"``, the default): ``KernelTracker.start`` estimates the memory and
time of one measurement with its measurement backend (the engine's estimate from ``N``, ``O``,
the parameter count and one example's forward FLOPs, :func:`~lazy_monitor.estimate_ntk_cost`;
the sharded backend's bytes per process) and takes the first of

1. ``"full"`` ``(N, N, O, O)``, exact;
2. ``"trace"`` ``(N, N)``, exact (``Σ_a K[:, :, a, a]``; costs ``O`` backward passes per
   example);
3. ``"trace"`` with ``projection=16``: an unbiased estimate of the trace kernel from
   ``k = 16`` random output directions (cost ∝ ``k``, not ``O``),

whose estimate fits ``max_memory`` (the kernel, its per-parameter blocks and their
:data:`KERNEL_COPIES` copies, the engine's per-example factors and the float64
eigendecomposition) and 60 s per kernel. The choice is ``KernelTracker.kernel_config``; the tracker
warns when it is not ``"full"``, and keeps it in ``state_dict``, so a resumed run
measures the same kernel (same projection seed, so the same ``R``). Sequence outputs
``(N, T, V)`` (a language model's logits) are flattened to ``O = T·V``: a tiny GPT-2 on a
short probe gets the exact trace kernel, a 50k vocabulary the projected trace. An explicit
``kind`` (and/or ``projection``) is kept as given; if its estimate does not fit
``max_memory``, ``KernelTracker.start`` raises with the estimate and the fix.

Metrics on a resolved trace or projected kernel (nothing is silently re-interpreted):

* ``"trace"``: the spectrum metrics are those of the ``N × N`` trace kernel (``ntk/eig_max``
  ≈ ``O·`` that of the full kernel for a network with ``K ≈ Θ ⊗ I_O``), ``ntk/eig_overlap``
  compares top-k eigenvectors of ``N × N`` matrices, ``ntk/alignment`` aligns with the
  target kernel ``Σ_a y_a y_aᵀ`` (class indices one-hot); all exact for the trace kernel.
* ``"trace"`` + ``projection=k``: every kernel metric is that of the projected kernel, an
  estimate of the trace kernel's: ``ntk/trace`` and the numerators of the linear metrics
  are unbiased, per-entry std ``≤ √(2/k)·‖J(x)‖·‖J(x')‖``; ratios (``ntk/rel_change``,
  ``ntk/distance``, ``ntk/alignment``) and the spectrum are consistent but noisy estimates
  (noise ∝ ``1/√k``). The same ``R`` is used for ``K₀`` and every later ``K``, so the drift
  metrics measure the kernel's change, not the draw of ``R``.
* ``projection=k`` with ``kind="full"``/``"diagonal"`` (only when forced): the kernel of the
  ``k`` projected outputs ``g = Rᵀ f / √k``; ``ntk/alignment`` uses the targets projected
  the same way (``Rᵀ y / √k``, class indices one-hot first), ``topk`` defaults to a multiple
  of ``k``. ``projection="sum"``: the pseudo-NTK (Mohamadi & Sutherland 2023); with
  ``kind="full"`` the projected one-hot targets are constant, so ``ntk/alignment`` is NaN.
* ``lin/*``, ``params/*`` use the model's outputs and parameters, never the projection.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any, Optional, Protocol, Union

import torch
from torch import Tensor

from lazy_monitor._validation import check_choice, check_int, check_mapping, gib
from lazy_monitor.core._functional import as_device
from lazy_monitor.core.kernels import DEFAULT_MAX_MEMORY, NtkImplementation, projection_matrix
from lazy_monitor.core.kernels.config import KINDS, check_projection, check_projection_seed
from lazy_monitor.core.kernels.errors import NtkBudgetError
from lazy_monitor.core.kernels.estimate import AUTO_PROJECTION, auto_candidates, first_fitting

__all__ = [
    "KERNEL_COPIES",
    "KernelConfig",
    "KernelEstimator",
    "REQUESTED_KINDS",
    "ResolvedKernel",
    "MAX_SPECTRUM_SIZE",
    "check_topk",
    "kernel_outputs",
    "project_targets",
    "resolve",
    "warn_spectrum_size",
]

Projection = Union[None, int, str]

#: What ``kind=`` accepts: a kernel kind, or ``"auto"`` (resolved at ``KernelTracker.start``).
REQUESTED_KINDS = ("auto", *KINDS)
IMPLEMENTATIONS = tuple(m.value for m in NtkImplementation)
_MEMORY_FIX = "bytes, e.g. 2**30; None: no limit"


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelConfig:
    """The kernel settings of a tracker: which kernel, computed how, kept where. Validated
    once, here, at construction: a ``TypeError`` for a wrong type, a ``ValueError`` for a bad
    value, each naming the setting, the value and the fix. Frozen; build a changed copy with
    :func:`dataclasses.replace`.

    Args:
        kind: ``"auto"`` (default: resolved at ``start`` to ``"full"``, ``"trace"`` or
            ``"trace"`` with ``projection=16``, whichever first fits ``max_memory`` and 60 s
            per kernel), or a kind kept as given: ``"full"`` ``(N, N, O, O)``, ``"trace"``
            ``(N, N)`` (summed over outputs), ``"diagonal"`` ``(N, N, O)``.
        implementation: how the engine computes ``J Jᵀ``, one of ``"auto"`` (default),
            ``"structured"``, ``"jacobian"``, ``"ntvp"``
            (:class:`~lazy_monitor.NtkImplementation`).
        projection: ``None`` (exact outputs; ``kind="auto"`` may still choose 16), ``k`` (int
            >= 1: the kernel of ``k`` random output directions) or ``"sum"`` (pseudo-NTK).
            Forced when given.
        projection_seed: seed of the projection matrix ``R`` (``torch.Generator`` seed in
            ``[0, 2**64 - 1]``; the same ``R`` at θ₀ and later).
        max_memory: bytes one measurement may hold (kernel, per-parameter blocks and their
            copies, per-example factors, eigendecomposition); default 1 GiB. ``None``: no
            memory limit.
        chunk_size: examples per block in the kernel engine (``None``: chosen by the budget).
        topk: ``k`` of the eigenspaces compared by ``ntk/eig_overlap`` (``None``: 10 for a
            trace kernel, ``O·⌈10/O⌉`` for full/diagonal ones; capped at the matrix size).
        snapshot_device: where θ₀, ``f₀``, ``K₀`` live and the metrics are computed (``None``:
            the model's device; ``"cpu"`` keeps them off the accelerator).

    Example::

        KernelTracker(model, x, kernel=KernelConfig(kind="trace", max_memory=2**31))
        KernelTracker(model, x, kernel={"kind": "trace"})  # the same, as a dict
    """

    kind: str = "auto"
    implementation: str = "auto"
    projection: Projection = None
    projection_seed: int = 0
    max_memory: Optional[int] = DEFAULT_MAX_MEMORY
    chunk_size: Optional[int] = None
    topk: Optional[int] = None
    snapshot_device: Union[str, torch.device, None] = None

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, REQUESTED_KINDS)
        impl = self.implementation
        if isinstance(impl, NtkImplementation):
            object.__setattr__(self, "implementation", impl.value)
        check_choice("implementation", self.implementation, IMPLEMENTATIONS)
        check_projection(self.projection)
        check_projection_seed(self.projection_seed)
        check_int("max_memory", self.max_memory, minimum=1, optional=True, fix=_MEMORY_FIX)
        check_int("chunk_size", self.chunk_size, minimum=1, optional=True, fix="None: automatic")
        check_int("topk", self.topk, minimum=1, optional=True, fix="None: the default")
        object.__setattr__(
            self, "snapshot_device", as_device(self.snapshot_device, "snapshot_device")
        )

    @classmethod
    def coerce(cls, value: Union[KernelConfig, Mapping[str, Any], None]) -> KernelConfig:
        """``value`` as a :class:`KernelConfig`: itself, one built from a dict of its keys
        (unknown keys raise naming the allowed ones), or the defaults for ``None``."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        check_mapping("kernel", value, fix="pass KernelConfig(...) or a dict of its settings")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in value if k not in fields]
        if unknown:
            raise ValueError(
                f"kernel has unknown settings {unknown}; the settings are {', '.join(fields)}"
            )
        return cls(**value)

    def as_dict(self) -> dict[str, Any]:
        """Plain Python values (``snapshot_device`` as its string), e.g. for hparams."""
        d = dataclasses.asdict(self)
        d["snapshot_device"] = None if self.snapshot_device is None else str(self.snapshot_device)
        return d


#: Copies of the kernel and its per-parameter blocks a measurement holds at once (the engine's
#: result, the reference ``K₀`` and per-layer ``K₀``, the last kernel): what the memory
#: estimate of ``kind="auto"`` counts.
KERNEL_COPIES = 3

#: Kernel matrix size (``N·O`` for full/diagonal, ``N`` for trace) above which the tracker warns
#: that the per-measurement float64 eigendecomposition (``O(M³)``) becomes the dominant cost.
MAX_SPECTRUM_SIZE = 2048


def kernel_outputs(kind: str, projection: Projection, num_outputs: int) -> int:
    """Outputs per example of the kernel matrix: 1 for trace, else O or the projected k."""
    if kind == "trace":
        return 1
    if projection is None:
        return num_outputs
    return 1 if projection == "sum" else int(projection)


def check_topk(
    topk: Optional[int], kind: str, projection: Projection, *, probe_size: int, num_outputs: int
) -> int:
    """``topk`` for a kernel of this kind/projection (the default, or the given one if it is
    at most the kernel matrix size ``M``)."""
    o = kernel_outputs(kind, projection, num_outputs)
    m = probe_size * o
    if topk is None:
        return min(m, o * math.ceil(10 / o))
    if topk > m:
        what = "" if o == 1 else f", {o} outputs per example"
        raise ValueError(
            f"topk={topk} exceeds the kernel matrix size {m} (N={probe_size}{what}, "
            f"kind={kind!r}); pass topk <= {m}"
        )
    return topk


def warn_spectrum_size(
    kind: str, projection: Projection, *, probe_size: int, num_outputs: int, stacklevel: int
) -> None:
    """Warn when the kernel matrix exceeds :data:`MAX_SPECTRUM_SIZE` (``stacklevel`` counts
    from this function)."""
    size = probe_size * kernel_outputs(kind, projection, num_outputs)
    if size > MAX_SPECTRUM_SIZE:
        warnings.warn(
            f"the kernel matrix is {size}×{size} (N={probe_size}, O={num_outputs}, "
            f"kind={kind!r}); its float64 eigendecomposition at every measure() costs "
            f"O({size}³) time and {8 * size * size / 2**20:.0f} MiB. Use a smaller probe or "
            "kind='trace' if measurements are too slow.",
            stacklevel=stacklevel,
        )


def project_targets(
    targets: Optional[Tensor],
    classification: bool,
    kind: str,
    projection: Projection,
    seed: int,
    *,
    probe_size: int,
    num_outputs: int,
) -> Optional[Tensor]:
    """The targets in the kernel's output space: as given, except for a projected
    full/diagonal kernel, whose outputs are ``Rᵀ f / √k`` (or ``Σ f / √O``): the targets are
    projected the same way (class indices one-hot over the ``O`` outputs first), float64
    ``(N, k)`` (``(N, 1)`` for ``"sum"``)."""
    t = targets
    if t is None or projection is None or kind == "trace":
        return t
    n, o = probe_size, num_outputs
    if classification:
        y = (
            torch.nn.functional.one_hot(t, o).to(torch.float64)
            if o > 1
            else t.to(torch.float64).reshape(n, 1)
        )
    else:
        y = t.to(torch.float64).reshape(n, -1)
    if projection == "sum":
        return y.sum(1, keepdim=True) / math.sqrt(o)
    k = int(projection)
    return y @ projection_matrix(o, k, seed) / math.sqrt(k)


@dataclasses.dataclass(frozen=True)
class ResolvedKernel:
    """The kernel a tracker measures: ``kind="auto"`` resolved (or a forced kind checked)
    against the budgets at ``start``, or read back from a saved state. Built by :func:`resolve`
    and :meth:`from_saved` only; :attr:`KernelTracker.kernel_config` is :meth:`as_dict`.

    Attributes:
        kind: ``"full"`` | ``"trace"`` | ``"diagonal"``.
        projection: ``None``, ``k`` or ``"sum"`` (see :class:`KernelConfig`).
        projection_seed: the seed of ``R``.
        implementation: the engine's implementation (``"sharded"``: the model's own backward).
        max_memory: the engine's factor budget in bytes (half of the requested budget for the
            engine; the whole budget for the sharded path), or None.
        requested: ``{"kind", "projection", "max_memory"}`` as requested.
        estimated_bytes / estimated_seconds: the estimate of one measurement (None for states
            saved before estimates; NaN seconds where no time model exists).
        estimate: the estimator's numbers (plain ints/floats).
        reason: why ``"auto"`` did not keep the full kernel (empty otherwise).
    """

    kind: str
    projection: Projection
    projection_seed: int
    implementation: str
    max_memory: Optional[int]
    requested: dict[str, Any]
    estimated_bytes: Optional[int]
    estimated_seconds: Optional[float]
    estimate: dict[str, Any]
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """Plain Python values (saved in the tracker's state, logged as hparams)."""
        d = dataclasses.asdict(self)
        d["requested"], d["estimate"] = dict(self.requested), dict(self.estimate)
        return d

    @classmethod
    def from_saved(
        cls, saved: Mapping[str, Any], requested: KernelConfig, implementation: str
    ) -> ResolvedKernel:
        """The kernel a state was measured with, from its saved ``config`` (states written
        before ``kernel_config`` existed: their ``kind``, no projection); raises if it
        contradicts what ``requested`` forces (an explicit ``kind``, ``projection`` or its
        seed). ``implementation`` replaces the saved one (it computes the same kernel)."""
        cfg = saved.get("kernel_config")
        old_kind = saved.get("kind", "full")
        # states written before kernel_config (or one of its keys) existed: their kind, no
        # projection, no estimate
        values: dict[str, Any] = {
            "kind": old_kind,
            "projection": None,
            "projection_seed": requested.projection_seed,
            "max_memory": None,
            "requested": {"kind": old_kind, "projection": None, "max_memory": None},
            "estimated_bytes": None,
            "estimated_seconds": None,
            "estimate": {},
            "reason": "",
        }
        fields = {f.name for f in dataclasses.fields(cls)}
        values.update({k: v for k, v in (cfg or {}).items() if k in fields})
        cfg = values
        forced = {"kind": requested.kind if requested.kind != "auto" else None}
        if requested.projection is not None:
            forced.update(
                projection=requested.projection, projection_seed=requested.projection_seed
            )
        for key, value in forced.items():
            if value is not None and cfg.get(key) != value:
                raise ValueError(
                    f"the state was saved with {key}={cfg.get(key)!r} but this tracker has "
                    f"{key}={value!r}; build the tracker with the same settings and model (or "
                    "kind='auto' without a projection to adopt the saved kernel configuration)"
                )
        return cls(**{**cfg, "implementation": implementation})


class KernelEstimator(Protocol):
    """What :func:`resolve` needs from a way of measuring (the engine, the FSDP2 path)."""

    def implementation(self, requested: KernelConfig) -> str:
        """The implementation recorded in the resolved kernel."""

    def engine_memory(self, budget: Optional[int]) -> Optional[int]:
        """The engine's share of ``max_memory`` (its factor budget)."""

    def estimate(
        self, kind: str, projection: Projection, max_memory: Optional[int]
    ) -> dict[str, Any]:
        """``{"bytes", "seconds" (NaN: no time model), ...}`` of one measurement under the
        budget ``max_memory``."""

    def describe(self, est: Mapping[str, Any]) -> str:
        """The estimate's breakdown, for the error when it does not fit."""


def resolve(
    requested: KernelConfig,
    estimator: KernelEstimator,
    *,
    max_memory: Optional[int],
    num_outputs: int,
    max_seconds: Optional[float],
    stacklevel: int,
) -> ResolvedKernel:
    """The one resolver of ``kind="auto"``: the first of ``full``, ``trace`` and ``trace`` with
    ``projection=16`` (only when ``16 < O``; with a forced projection: ``full`` and ``trace`` of
    it) whose estimate fits ``max_memory`` bytes (the kernel's share of the requested budget)
    and ``max_seconds`` (where the estimator has a time model), else the cheapest. A forced kind is estimated as given. Warns (``stacklevel``
    counts from this function) when ``"auto"`` does not keep the full kernel.

    Raises:
        ValueError: the choice's estimate exceeds ``max_memory`` (a forced configuration, or
            even the cheapest candidate), with the estimate and the fix.
    """
    budget, projection = max_memory, requested.projection
    if requested.kind == "auto":
        candidates = auto_candidates(projection, num_outputs, AUTO_PROJECTION)
    else:
        candidates = [(requested.kind, projection)]

    def fits(est: Mapping[str, Any]) -> bool:
        seconds = float(est["seconds"])
        slow = max_seconds is not None and math.isfinite(seconds) and seconds > max_seconds
        return (budget is None or est["bytes"] <= budget) and not slow

    # lazily: each estimate costs a forward
    (kind, proj), estimates = first_fitting(
        candidates, lambda c: estimator.estimate(*c, budget), fits
    )
    est = estimates[-1]
    if budget is not None and est["bytes"] > budget:
        forced = requested.kind != "auto" or projection is not None
        raise NtkBudgetError(
            f"the kernel kind={kind!r}, projection={proj!r} is estimated at "
            f"{gib(est['bytes'])} per measurement ({estimator.describe(est)}), more than "
            f"max_memory={gib(budget)}; "
            + ("use kind='auto' (and no projection) to let the tracker choose, " if forced else "")
            + "raise max_memory, use a smaller probe, or per_layer=False"
        )
    reason = ""
    if len(estimates) > 1:
        full = estimates[0]

        def cost(e: Mapping[str, Any]) -> str:
            s = float(e["seconds"])
            return gib(e["bytes"]) + (f" and {s:.3g} s" if math.isfinite(s) else "")

        reason = (
            f"full kernel estimated at {cost(full)} does not fit max_memory="
            f"{'None' if budget is None else gib(budget)}"
            + ("" if max_seconds is None else f", max_seconds={max_seconds:g}")
            + "; using kind='trace'"
            + ("" if proj is None else f" with projection={proj!r}")
            + f" (estimated {cost(est)})"
        )
        warnings.warn(
            f"KernelTracker(kind='auto'): {reason}. Pass kernel=KernelConfig(kind='full', "
            "max_memory=...) to force the full kernel; see tracker.kernel_config",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
    seconds = float(est["seconds"])
    return ResolvedKernel(
        kind=kind,
        projection=proj,
        projection_seed=requested.projection_seed,
        implementation=estimator.implementation(requested),
        max_memory=estimator.engine_memory(budget),
        requested={
            "kind": requested.kind,
            "projection": projection,
            "max_memory": budget,  # the kernel's share (feature Grams take the rest)
        },
        estimated_bytes=int(est["bytes"]),
        estimated_seconds=seconds,
        estimate={k: v for k, v in est.items() if isinstance(v, (int, float))},
        reason=reason,
    )
