"""The empirical NTK of a model whose parameters are sharded across processes (FSDP2).

Under ``torch.distributed.fsdp.fully_shard`` every parameter is a ``DTensor`` of which each
process holds one shard (``Shard(0)`` on a one-dimensional device mesh); the full parameter
exists only transiently, one ``fully_shard`` unit at a time, inside the model's own forward and
backward. The kernel engine (``torch.func.functional_call`` on full tensors) cannot run on such
a model, and gathering it on one rank is what sharding avoids. :class:`ShardedKernelTracker`
measures through the model's own forward/backward instead:

* **Jacobian rows.** One forward of the probe (eval mode), then one backward per row
  ``(example i, output a)`` -- or per projected output ``g_r = f·R[:, r]/√k`` when the kernel
  configuration has a projection -- with ``retain_graph``. FSDP2 unshards each unit for its
  backward and reduce-scatters the gradient, so each process reads the *local shard*
  ``p.grad.to_local()`` of the full gradient row (every rank runs the same backward on the same
  probe: FSDP2's average of identical per-rank gradients is that gradient). The rows of the
  probe are independent examples (checked at :meth:`start`), so the gradient of ``f_a(x_i)``
  with the whole probe in the batch is the per-example gradient.
* **Row exchange** (default when FSDP2 manages every tracked parameter, ``W > 1``): rank ``r``
  back-propagates rows ``r, r + W, ...`` instead of all of them, and for the measurement each
  FSDP2 group's reduce-scatter is replaced (``_reduce_scatter_comm``, divide factor 1) by an
  ``all_to_all`` of the unsharded gradients: every rank receives its shard of the ``W`` rows of
  the pass, so a kernel costs ``⌈N·R/W⌉`` backward passes per rank instead of ``N·R``. The
  FSDP2 internals it uses are checked; without them (or ``exchange_rows = False``) every rank
  back-propagates every row through FSDP2's own reduce-scatter (a custom
  ``set_gradient_divide_factor`` is undone).
* **Kernel.** ``K = Σ_p J_p J_pᵀ`` is a sum over parameters, hence over shards: each process
  forms the Gram matrices of its local rows (per layer) and one ``all_reduce(SUM)`` gives
  every process the complete kernel and per-layer kernels (the same decomposition as
  :mod:`lazy_monitor.tracking.distributed`). ``"trace"`` sums the diagonal output blocks,
  ``"diagonal"`` keeps them, ``"full"`` keeps all blocks -- of the projected outputs when the
  configuration has a projection (the engine's ``R``, same seed).
* **Linearization.** ``f_lin = f₀ + J(θ₀)(θ − θ₀)`` with ``J(θ₀)Δθ = Σ_ranks J₀,local Δθ_local``
  (one ``all_reduce``): the local rows of ``J(θ₀)`` are kept from :meth:`start` when they fit
  ``max_memory``, otherwise recomputed at each measurement with θ₀'s local shards (and θ₀'s
  buffers) swapped in and restored bit for bit afterwards. No forward-mode AD through the FSDP
  hooks is needed.
* **Parameters.** θ₀ is stored as local shards (``to_local()``), never as full tensors;
  ``params/*`` are computed from all-reduced squared norms.
* **Features.** ``features/<layer>/cka`` uses forward hooks on the model's own forward, so it
  works unchanged.

Side-effect free like the unsharded tracker: every parameter's ``.grad`` (a training step may
be mid-accumulation), the modules' train/eval flags, the buffers and the RNG states are
restored; every process runs the same loop in lockstep (the collectives of FSDP2 and of the
reduction). Cost per measurement: ``⌈N·R/W⌉`` backward passes per rank (``R = O``, or ``k``
with a projection; ``N·R`` without the row exchange), each with FSDP2's per-unit all-gather and
the exchange, plus as many again at θ₀ when ``J(θ₀)``'s rows do not fit ``max_memory``.

Replicated (plain-tensor) parameters of a partly sharded model are counted once (on rank 0).
Tensor parallelism (``Shard(1)``, ``Replicate`` placements, meshes of more than one dimension)
is not supported: construction raises.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lazy_monitor.core import _functional as F
from lazy_monitor.core.kernels import projection_matrix
from lazy_monitor.tracking import kernel_config as kc
from lazy_monitor.tracking.distributed import KernelSharding
from lazy_monitor.tracking.features import kernel_budget
from lazy_monitor.tracking.tracker import KernelTracker

__all__ = ["ShardedKernelTracker", "has_sharded_params", "mesh_sharding"]

_STATE_FORMAT = 1


def _dtensor_type() -> Optional[type]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support
        return None
    return DTensor


def _is_dtensor(t: Any) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def has_sharded_params(model: nn.Module) -> bool:
    """Whether any trainable parameter of ``model`` is a ``DTensor`` (FSDP2 / tensor parallel)."""
    return any(p.requires_grad and _is_dtensor(p) for p in model.parameters())


def _local(t: Tensor) -> Tensor:
    """The process's shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if _is_dtensor(t) else t


def _mesh_of(model: nn.Module, names: Sequence[str]) -> Any:
    """The one device mesh of the tracked DTensor parameters; raises for layouts other than
    FSDP2's (``Shard(0)`` on a one-dimensional mesh, the same mesh for every parameter)."""
    from torch.distributed.tensor import Shard

    live = dict(model.named_parameters())
    mesh = None
    for name in names:
        p = live[name]
        if not _is_dtensor(p):
            continue
        placements = tuple(p.placements)
        if p.device_mesh.ndim != 1 or placements != (Shard(0),):
            raise ValueError(
                f"parameter {name!r} is a DTensor with placements {placements} on a "
                f"{p.device_mesh.ndim}-dimensional mesh; KernelTracker measures parameters "
                "sharded by FSDP2 (fully_shard: Shard(0) on a one-dimensional mesh) only, not "
                "tensor-parallel layouts. Apply fully_shard without parallelize_module, or "
                "measure a submodule that is only FSDP-sharded"
            )
        if mesh is None:
            mesh = p.device_mesh
        elif p.device_mesh != mesh:
            raise ValueError(
                f"parameter {name!r} is sharded on another device mesh than the others; "
                "KernelTracker needs every tracked parameter sharded on the same mesh "
                "(one fully_shard mesh for the model)"
            )
    return mesh


def mesh_sharding(
    model: nn.Module,
    reduce: Optional[Callable[[Tensor, Any], Tensor]] = None,
) -> KernelSharding:
    """The :class:`KernelSharding` of the mesh ``model``'s trainable DTensor parameters are
    sharded on: rank and size of the mesh's process group, ``all_reduce`` on that group
    (``reduce(tensor, group) -> sum``, default ``torch.distributed.all_reduce``; the Lightning
    monitor passes its strategy's ``reduce``).

    Raises:
        ValueError: no DTensor parameter, or a layout other than FSDP2's (see module docs).
    """
    import torch.distributed as dist

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    mesh = _mesh_of(model, names)
    if mesh is None:
        raise ValueError(
            f"{type(model).__name__} has no trainable DTensor parameter; use "
            "KernelSharding.from_process_group() for an unsharded model"
        )
    group = mesh.get_group()

    def all_reduce(t: Tensor) -> Tensor:
        if reduce is not None:
            return reduce(t, group)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    return KernelSharding(dist.get_rank(group), dist.get_world_size(group), all_reduce)


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


class _ShardSnapshot:
    """θ₀ of a sharded model as local shards, θ₀'s buffers, and (when they fit) the local rows
    of ``J(θ₀)``; the ``Linearization`` interface :class:`KernelTracker` uses."""

    def __init__(self, tracker: ShardedKernelTracker) -> None:
        self.tracker = tracker
        model = tracker.model
        self.names = list(tracker._param_names)
        live = dict(model.named_parameters())
        #: tracked parameters' local shards at θ₀ (what ``params0`` means in the tracker)
        self.params0 = {n: _local(live[n]).detach().clone() for n in self.names}
        #: the other floating parameters (constants of f) at θ₀, local shards
        self.constants0 = {
            n: _local(p).detach().clone()
            for n, p in live.items()
            if n not in self.params0 and p.is_floating_point()
        }
        self.buffers0 = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.shapes = {n: list(live[n].shape) for n in self.names}  # global shapes
        self.j0: Optional[dict[str, Tensor]] = None  # local rows (N, O, P_local) at θ₀
        self.norms0: Optional[Tensor] = None  # ‖θ₀,n‖² over all ranks, per tracked name

    # the Linearization interface -----------------------------------------------------
    def f0(self, x: F.InputBatch) -> Tensor:
        """``f(x; θ₀)`` with θ₀'s shards and buffers swapped in (restored after)."""
        with self.at_theta0():
            return self.tracker._plain_forward(x)

    def f0_and_f_lin(
        self, x: F.InputBatch, params: Optional[Mapping[str, Tensor]] = None
    ) -> tuple[Tensor, Tensor]:
        """``(0, J(θ₀)(θ − θ₀))`` on the probe (the tracker adds ``f₀``); ``x`` must be the
        probe (the rows of ``J(θ₀)`` are the probe's)."""
        del x, params  # the probe and the model's current parameters
        delta = self.tracker._local_delta()
        jdelta = self.tracker._j0_delta(self, delta)
        return torch.zeros_like(jdelta), jdelta

    def state_dict(self) -> dict[str, Any]:
        """θ₀'s local shards of *this* rank (a sharded tracker's state is per rank)."""
        cpu = lambda d: {k: v.detach().cpu().clone() for k, v in d.items()}  # noqa: E731
        sharding = self.tracker.sharding
        assert sharding is not None
        return {
            "format": _STATE_FORMAT,
            "sharded": True,
            "rank": sharding.rank,
            "world_size": sharding.world_size,
            "names": list(self.names),
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "params0": cpu(self.params0),
            "constants0": cpu(self.constants0),
            "buffers0": cpu(self.buffers0),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore this rank's own θ₀ shards. Collective: every rank of the mesh calls it, and
        all of them raise if the state of any of them does not fit (e.g. every rank was given
        rank 0's state, which is what a Lightning checkpoint holds for a callback)."""
        sharding = self.tracker.sharding
        assert sharding is not None
        problem = self._state_problem(state, sharding)
        failed = sharding.sum(torch.tensor([0.0 if problem is None else 1.0], dtype=torch.float64))
        if float(failed[0]) > 0:
            raise ValueError(
                (problem or "another rank of the mesh was given a state that is not its own")
                + "; a sharded tracker's state is per rank: save tracker.state_dict() on every "
                "rank and load each rank's own on the same mesh. A Lightning checkpoint keeps "
                "rank 0's callback state only, so KernelRegimeMonitor cannot resume its "
                "reference under ModelParallelStrategy: resume with a new monitor (a new "
                "reference at the resumed step) instead"
            )
        dev = lambda d, ref: {k: v.to(ref[k].device) for k, v in d.items()}  # noqa: E731
        self.params0 = dev(state["params0"], self.params0)
        self.constants0 = dev(state["constants0"], self.constants0)
        self.buffers0 = dev(state["buffers0"], self.buffers0)
        self.j0, self.norms0 = None, None

    def _state_problem(self, state: Mapping[str, Any], sharding: KernelSharding) -> Optional[str]:
        if not state.get("sharded"):
            return (
                "the state holds an unsharded θ₀ (a KernelTracker of an unsharded model), not "
                "the per-rank state of a sharded tracker"
            )
        where = (state.get("rank"), state.get("world_size"))
        if where != (sharding.rank, sharding.world_size):
            return (
                f"the state holds the θ₀ shards of rank {where[0]} of {where[1]}, but this is "
                f"rank {sharding.rank} of {sharding.world_size}"
            )
        mine = {n: tuple(t.shape) for n, t in self.params0.items()}
        saved = {n: tuple(t.shape) for n, t in state["params0"].items()}
        if mine != saved or state.get("shapes") != self.shapes:
            return (
                "the state's θ₀ shards do not match this model's parameters (names or shapes); "
                "build the tracker with the same model and sharding"
            )
        return None

    # helpers -------------------------------------------------------------------------
    @contextlib.contextmanager
    def at_theta0(self) -> Iterator[None]:
        """θ₀'s local shards and buffers in the model for the duration; the current values
        are restored bit for bit (copies, not recomputation)."""
        model = self.tracker.model
        live = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        saved = {**self.params0, **self.constants0}
        current = {n: _local(live[n]).detach().clone() for n in saved}
        current_buffers = {n: b.detach().clone() for n, b in buffers.items()}
        _reshard(model)  # an unsharded unit would keep stale values
        try:
            with torch.no_grad():
                for n, t in saved.items():
                    _local(live[n]).copy_(t)
                for n, b in self.buffers0.items():
                    buffers[n].copy_(b)
            yield
        finally:
            _reshard(model)
            with torch.no_grad():
                for n, t in current.items():
                    _local(live[n]).copy_(t)
                for n, b in current_buffers.items():
                    buffers[n].copy_(b)


def _check_gradient_sync(model: nn.Module) -> None:
    """Raise before any backward if an FSDP2 unit does not reduce-scatter its gradients now
    (``set_requires_gradient_sync(False)``, an accumulation window) or holds accumulated
    unsharded gradients: the measurement's rows would be added to them. Reads FSDP2's
    internal state defensively (an attribute missing in another torch version: no check)."""
    for module in _fsdp_modules(model):
        state = getattr(module, "_get_fsdp_state", lambda: None)()
        for group in getattr(state, "_fsdp_param_groups", None) or []:
            pending = any(
                getattr(fp, "unsharded_accumulated_grad", None) is not None
                for fp in getattr(group, "fsdp_params", [])
            )
            if getattr(group, "reduce_grads", True) is False or pending:
                raise RuntimeError(
                    "an FSDP2 unit has gradient synchronisation off or accumulated unsharded "
                    "gradients (set_requires_gradient_sync(False), inside a gradient "
                    "accumulation window): the sharded kernel's backward passes would add to "
                    "them. Measure after the optimizer step (KernelRegimeMonitor does), or "
                    "with gradient sync on"
                )


def _grad_scales(model: nn.Module, world_size: int) -> dict[int, float]:
    """``{id(sharded parameter): s}`` with ``s · p.grad`` the gradient of the backward: FSDP2
    reduces the identical per-rank gradients to ``Σ_ranks g / d`` with ``d`` the world size
    (default) or ``set_gradient_divide_factor(d)``."""
    scales: dict[int, float] = {}
    for module in _fsdp_modules(model):
        state = getattr(module, "_get_fsdp_state", lambda: None)()
        for group in getattr(state, "_fsdp_param_groups", None) or []:
            factor = getattr(group, "gradient_divide_factor", None)
            if factor is None or float(factor) == world_size:
                continue
            for fp in getattr(group, "fsdp_params", []):
                scales[id(fp.sharded_param)] = float(factor) / world_size
    return scales


def _row_exchange_layout(
    model: nn.Module, names: Sequence[str], world_size: int
) -> Optional[list[tuple[Any, list[tuple[str, int, tuple[int, ...], int]]]]]:
    """The FSDP2 parameter groups holding the tracked parameters, each with its parameters'
    places in one rank's chunk of the reduce-scatter input: ``[(group, [(name, offset,
    local shape, padded numel)])]``. None when the exchange cannot be used (one process, a
    tracked parameter FSDP2 does not manage, or FSDP2 internals this version lacks): every
    process decides the same from the model's structure."""
    if world_size < 2:
        return None
    by_id = {id(p): n for n, p in model.named_parameters()}
    wanted = set(names)
    layout = []
    covered: set[str] = set()
    for module in _fsdp_modules(model):
        state = getattr(module, "_get_fsdp_state", lambda: None)()
        for group in getattr(state, "_fsdp_param_groups", None) or []:
            if not (hasattr(group, "_reduce_scatter_comm") and hasattr(group, "fsdp_params")):
                return None
            entries, offset = [], 0
            for fp in group.fsdp_params:
                p = getattr(fp, "sharded_param", None)
                if p is None or not _is_dtensor(p) or p.dim() == 0:
                    return None
                if not p.requires_grad:  # no gradient: not in the reduce-scatter input
                    continue
                rows = -(-p.shape[0] // world_size)  # FSDP2 pads dim 0 to a multiple of W
                padded = rows * math.prod(p.shape[1:])
                name = by_id.get(id(p))
                if name is None:
                    return None
                entries.append((name, offset, tuple(p.to_local().shape), padded))
                offset += padded
            layout.append((group, entries))
            covered.update(n for n, *_ in entries)
    if not wanted <= covered:
        return None
    return layout


class _RowExchange:
    """A reduce-scatter replacement for one FSDP2 parameter group during a measurement:
    each rank back-propagates a different Jacobian row, and an ``all_to_all`` hands every rank
    its shard of every rank's row (one backward pass yields ``W`` rows instead of one). What
    FSDP2 writes into ``.grad`` is zeros (the gradients are restored after the measurement)."""

    def __init__(self) -> None:
        self.received: list[Tensor] = []

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.empty(size, dtype=dtype, device=device)

    def __call__(
        self,
        output_tensor: Tensor,
        input_tensor: Tensor,
        group: Any,
        op: Any = None,
        async_op: bool = False,
    ) -> None:
        import torch.distributed as dist

        received = torch.empty_like(input_tensor)
        dist.all_to_all_single(received, input_tensor, group=group)
        self.received.append(received)
        output_tensor.zero_()


def _reshard(model: nn.Module) -> None:
    for m in _fsdp_modules(model):
        m.reshard()


class ShardedKernelTracker(KernelTracker):
    """:class:`~lazy_monitor.KernelTracker` of a model whose parameters FSDP2 shards
    (``fully_shard``): the same metrics, measured with each process's local shards (see
    :mod:`lazy_monitor.tracking.sharded`). ``KernelTracker(model, ...)`` returns one when a
    trainable parameter of ``model`` is a ``DTensor``; every process of the mesh must build it
    and call :meth:`start`/:meth:`measure` together.

    Args: those of :class:`~lazy_monitor.KernelTracker`. ``sharding`` (optional) sums over the
    processes of the parameters' mesh (default: :func:`mesh_sharding`, ``torch.distributed``
    on the mesh's process group); ``implementation`` and ``chunk_size`` are not used (the rows
    come from the model's own backward). ``max_memory`` bounds the local Jacobian rows, the
    kernels and the eigendecomposition. Attribute ``exchange_rows`` (default True): use the
    row exchange when the model allows it (see the module docs).

    Raises (besides the :class:`KernelTracker` errors):
        ValueError: tensor-parallel DTensor layouts, parameters on several meshes, or a
            ``sharding`` whose world size is not the mesh's.
    """

    def __init__(self, model: nn.Module, probe: F.InputBatch, **kwargs: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        sharding = kwargs.pop("sharding", None)
        default = mesh_sharding(model)  # validates the layout
        if sharding is None:
            sharding = default
        elif not isinstance(sharding, KernelSharding) or sharding.world_size != default.world_size:
            raise ValueError(
                f"sharding must sum over the {default.world_size} processes of the mesh the "
                f"parameters are sharded on, got {sharding!r}; pass sharding=None (the mesh's "
                "process group) or mesh_sharding(model)"
            )
        #: one backward pass per ``W`` rows (each rank its own rows, an ``all_to_all``
        #: instead of FSDP2's reduce-scatter) when the model allows it; False: every rank
        #: back-propagates every row through FSDP2's own reduce-scatter
        self.exchange_rows = True
        self._pending: Optional[_ShardSnapshot] = None
        super().__init__(model, probe, sharding=sharding, **kwargs)

    # ------------------------------------------------------------------ hooks of KernelTracker
    def _validate_engine(self) -> None:
        """The kernel engine is not used; the rows come from the model's own backward, which
        the construction forward and :meth:`start` exercise."""

    def _new_linearization(self) -> _ShardSnapshot:  # type: ignore[override]
        snap = _ShardSnapshot(self)
        self._pending = snap
        return snap

    def _params0(self) -> dict[str, Tensor]:
        """Stand-ins with the norms of θ₀ (see :meth:`_measured_params`)."""
        snap = self._snapshot()
        norms0 = self._norms0(snap)
        dev = self._metric_device()
        return {
            n: torch.stack([a.sqrt(), a.new_zeros(())]).to(dev) for n, a in zip(snap.names, norms0)
        }

    def _measured_params(self, dev: torch.device) -> dict[str, Tensor]:
        """Stand-ins ``[‖θ₀,n‖, ‖θ_n − θ₀,n‖]`` (against ``[‖θ₀,n‖, 0]``): ``params/*`` of the
        full parameters from all-reduced squared norms, without gathering them."""
        snap = self._snapshot()
        norms0 = self._norms0(snap)
        delta = self._local_delta()
        local = torch.stack([self._once(n, delta[n].double().square().sum()) for n in snap.names])
        dist2 = self.sharding.sum(local)  # type: ignore[union-attr]
        return {
            n: torch.stack([a.sqrt(), d.sqrt()]).to(dev)
            for n, a, d in zip(snap.names, norms0, dist2)
        }

    def _params_problem(self) -> Optional[str]:
        live = dict(self.model.named_parameters())
        missing = [n for n in self._param_names if n not in live]
        if missing:
            return f"parameters {missing[:4]} tracked since start() are no longer parameters"
        snap = self._lin if isinstance(self._lin, _ShardSnapshot) else None
        if snap is not None:
            changed = [
                n
                for n in snap.names
                if list(live[n].shape) != snap.shapes[n]
                or tuple(_local(live[n]).shape) != tuple(snap.params0[n].shape)
            ]
            if changed:
                return f"parameters {changed[:4]} changed shape (or sharding) since start()"
        return None

    def _eval_forward(self, lin: Any) -> Callable[[F.InputBatch], Tensor]:
        # the model's own (sharded) forward: the functional one needs full parameters
        return self._plain_forward

    def _resolve_kernel_config(self) -> dict[str, Any]:
        """``kind="auto"``: the full kernel if the local rows, ``J(θ₀)``'s rows and the kernels
        fit ``max_memory``, else the trace kernel, else the trace of 16 projected outputs
        (with ``J(θ₀)`` recomputed at each measurement); a forced kind/projection is checked."""
        n, o = self.probe_size, self.num_outputs
        live = dict(self.model.named_parameters())
        # the largest shard of each parameter (Shard(0) gives ceil(d0 / W) rows to the first
        # ranks): the same number on every process, so every process resolves the same kernel
        w = self.sharding.world_size  # type: ignore[union-attr]
        p_local = sum(
            -(-live[name].shape[0] // w) * math.prod(live[name].shape[1:])
            if _is_dtensor(live[name]) and live[name].dim() > 0
            else live[name].numel()
            for name in self._param_names
        )
        itemsize = torch.finfo(next(iter(live.values())).dtype).bits // 8
        layers = len(self._layers) if self.per_layer else 0
        budget = kernel_budget(self.max_memory, len(self._feature_modules), n)  # Grams beside

        def estimate(kind: str, projection: Any) -> dict[str, Any]:
            r = kc.kernel_outputs("full", projection, o)  # rows per example
            m = n * kc.kernel_outputs(kind, projection, o)  # kernel matrix size
            numel = {"full": m * m, "trace": n * n, "diagonal": n * n * r}[kind]
            kernels = kc.KERNEL_COPIES * (1 + layers) * numel * 8
            rows = n * r * p_local * itemsize
            j0 = n * o * p_local * itemsize
            eig = 3 * m * m * 8
            base = kernels + rows + eig
            store = budget is None or base + j0 <= budget
            return {
                "n": n,
                "o_raw": o,
                "p_local": p_local,
                "rows_bytes": rows,
                "j0_bytes": j0,
                "kernel_bytes": kernels,
                "eig_bytes": eig,
                "store_j0": int(store),
                "bytes": base + (j0 if store else 0),
                "backward_passes": n * r + (0 if store else n * o),
            }

        if self.kind == "auto":
            choices = [("full", None), ("trace", None), ("trace", 16)]
            if self.projection is not None:
                choices = [("full", self.projection), ("trace", self.projection)]
            for kind, projection in choices:
                est = estimate(kind, projection)
                if budget is None or est["bytes"] <= budget:
                    break
            reason = (
                ""
                if (kind, projection) == choices[0]
                else f"the full kernel's local rows do not fit max_memory={budget}; measuring "
                f"kind={kind!r}, projection={projection!r}"
            )
        else:
            kind, projection, reason = self.kind, self.projection, ""
            est = estimate(kind, projection)
        if budget is not None and est["bytes"] > budget:
            raise ValueError(
                f"the sharded kernel kind={kind!r}, projection={projection!r} needs "
                f"{est['bytes'] / 2**30:.3g} GiB per process (N={n}, O={o}, local parameters "
                f"{p_local}: Jacobian rows {est['rows_bytes'] / 2**30:.3g} GiB, kernels "
                f"{est['kernel_bytes'] / 2**30:.3g} GiB), more than max_memory="
                f"{budget / 2**30:.3g} GiB; raise max_memory, use a smaller probe, a "
                "projection, or per_layer=False"
            )
        if reason:
            warnings.warn(
                f"KernelTracker(kind='auto') on sharded parameters: {reason}",
                UserWarning,
                stacklevel=5,
            )
        return {
            "kind": kind,
            "projection": projection,
            "projection_seed": self.projection_seed,
            "implementation": "sharded",
            "max_memory": budget,
            "requested": {"kind": self.kind, "projection": self.projection, "max_memory": budget},
            "estimated_bytes": int(est["bytes"]),
            "estimated_seconds": math.nan,  # no cost model for the model's own backward
            "estimate": est,
            "reason": reason,
        }

    def _forward(self, strict: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """``f(probe; θ)`` through the model's own (sharded) forward and the features."""
        x = self._probe_on_model_device()
        with self._guard(), torch.no_grad(), self._hooks(strict) as grams:
            f = self._call(x).detach()
        return f, self._on_metric_device(grams)

    def _kernel(self) -> tuple[Tensor, dict[str, Tensor]]:
        """Kernel and per-layer kernels from the local Jacobian rows, summed over the mesh."""
        cfg = self._kernel_config
        assert cfg is not None, "the kernel configuration is resolved at start()"
        kind, projection = cfg["kind"], cfg["projection"]
        starting = self._lin is None and self._pending is not None
        store = bool(cfg["estimate"].get("store_j0", 1))
        if starting and store:
            # at θ₀: the rows of J(θ₀) are kept for f_lin; the kernel's rows are their projection
            j0 = self._rows(None)
            assert self._pending is not None
            self._pending.j0 = j0
            rows = j0 if projection is None else {k: self._project(v) for k, v in j0.items()}
        else:
            rows = self._rows(self._directions())
        kernel, layers = self._reduce_kernels(rows, kind)
        dev = self._metric_device()
        return kernel.to(dev), {k: v.to(dev) for k, v in layers.items()}

    # ------------------------------------------------------------------ internals
    def _snapshot(self) -> _ShardSnapshot:
        snap = self._lin if self._lin is not None else self._pending
        assert isinstance(snap, _ShardSnapshot)
        return snap

    def _once(self, name: str, value: Tensor) -> Tensor:
        """A replicated (plain-tensor) parameter's contribution counts on rank 0 only."""
        live = dict(self.model.named_parameters())
        if _is_dtensor(live[name]) or self.sharding.rank == 0:  # type: ignore[union-attr]
            return value
        return torch.zeros_like(value)

    def _norms0(self, snap: _ShardSnapshot) -> Tensor:
        if snap.norms0 is None:
            local = torch.stack(
                [self._once(n, snap.params0[n].double().square().sum()) for n in snap.names]
            )
            snap.norms0 = self.sharding.sum(local)  # type: ignore[union-attr]
        return snap.norms0

    def _local_delta(self) -> dict[str, Tensor]:
        snap = self._snapshot()
        live = dict(self.model.named_parameters())
        return {n: _local(live[n]).detach() - snap.params0[n] for n in snap.names}

    def _j0_delta(self, snap: _ShardSnapshot, delta: Mapping[str, Tensor]) -> Tensor:
        """``J(θ₀)Δθ`` ``(N, O)``: local rows times local Δθ, summed over the mesh."""
        n, o = self.probe_size, self.num_outputs
        out = torch.zeros(n, o, dtype=torch.float64, device=self._model_device())

        def add(name: str, rows: Tensor) -> None:
            d = delta[name].reshape(-1).to(rows.dtype)
            part = (rows.reshape(n, o, -1) @ d).double()
            out.add_(self._once(name, part))

        if snap.j0 is not None:
            for name, rows in snap.j0.items():
                add(name, rows)
        else:
            cfg = self._kernel_config
            assert cfg is not None
            with snap.at_theta0():
                j0 = self._rows(None)
            if cfg["estimate"].get("store_j0", 0):
                snap.j0 = j0  # after a load_state_dict: recomputed once, then kept
            for name, rows in j0.items():
                add(name, rows)
        total = self.sharding.sum(out)  # type: ignore[union-attr]
        f0 = self._reference.f0
        return total.to(f0.dtype if f0 is not None else total.dtype)

    def _directions(self) -> Optional[tuple[Tensor, float]]:
        """The projection ``(R (O, k), scale)`` of the kernel's outputs, None without."""
        cfg = self._kernel_config
        assert cfg is not None
        projection, o = cfg["projection"], self.num_outputs
        if projection is None:
            return None
        if projection == "sum":
            return torch.ones(o, 1, dtype=torch.float64), 1.0 / math.sqrt(o)
        k = int(projection)
        return projection_matrix(o, k, cfg["projection_seed"]), 1.0 / math.sqrt(k)

    def _project(self, rows: Tensor) -> Tensor:
        """Rows of the projected outputs from the rows of the outputs: ``Σ_a R[a, r] J_a · s``."""
        directions = self._directions()
        assert directions is not None
        r, scale = directions
        return torch.einsum("iap,ar->irp", rows, r.to(rows)) * scale

    def _rows(self, directions: Optional[tuple[Tensor, float]]) -> dict[str, Tensor]:
        """Local Jacobian rows ``{name: (N, R, P_local)}`` of the probe outputs (``R = O``)
        or of the projected outputs, through the model's own graph: ``⌈N·R/W⌉`` backward
        passes with the row exchange (:class:`_RowExchange`), else ``N·R``."""
        _check_gradient_sync(self.model)
        world = self.sharding.world_size  # type: ignore[union-attr]
        layout = _row_exchange_layout(self.model, self._param_names, world)
        if layout is not None and self.exchange_rows:
            return self._rows_exchanged(directions, layout)
        return self._rows_each(directions)

    def _rows_exchanged(
        self, directions: Optional[tuple[Tensor, float]], layout: list
    ) -> dict[str, Tensor]:
        """Rank ``r`` back-propagates rows ``r, r + W, ...``; each FSDP2 group's reduce-scatter
        is replaced by an ``all_to_all`` of the (undivided) unsharded gradients, so every rank
        receives its shard of the ``W`` rows of the pass."""
        x = self._probe_on_model_device()
        live = dict(self.model.named_parameters())
        n = self.probe_size
        sharding = self.sharding
        assert sharding is not None
        world, rank = sharding.world_size, sharding.rank
        saved = [(g, g._reduce_scatter_comm, g.gradient_divide_factor) for g, _ in layout]
        exchanges = [_RowExchange() for _ in layout]
        try:
            for (group, _), exchange in zip(layout, exchanges):
                group._reduce_scatter_comm = exchange
                group.gradient_divide_factor = 1.0  # no pre-division of the unsharded grads
            with self._guard(grads=True):
                out, rows = self._rows_buffers(x, directions, live)
                count = out.shape[1]
                total = n * count
                passes = -(-total // world)
                for t in range(passes):
                    mine = t * world + rank
                    for p in live.values():
                        p.grad = None
                    # a rank without a row left back-propagates zeros (lockstep collectives)
                    target = out[divmod(mine, count)] if mine < total else out[0, 0] * 0.0
                    target.backward(retain_graph=t + 1 < passes)
                    for (_, entries), exchange in zip(layout, exchanges):
                        if len(exchange.received) != 1:
                            raise RuntimeError(
                                "an FSDP2 group reduce-scattered "
                                f"{len(exchange.received)} times in one backward pass; the "
                                "sharded row exchange needs exactly one"
                            )
                        received = exchange.received.pop()
                        chunks = received.reshape(world, -1)
                        used = sum(padded for *_, padded in entries)
                        if chunks.shape[1] != used:
                            raise RuntimeError(
                                "the FSDP2 reduce-scatter layout is not the expected one (a "
                                "tracked parameter without gradient?); measure with "
                                "ShardedKernelTracker.exchange_rows = False"
                            )
                        for source in range(world):
                            index = t * world + source
                            if index >= total:
                                break
                            i, a = divmod(index, count)
                            for name, offset, shape, padded in entries:
                                if name not in rows:
                                    continue
                                local = chunks[source, offset : offset + padded]
                                local = local[: math.prod(shape)]
                                rows[name][i, a] = local.to(rows[name].dtype)
                del out
        finally:
            for group, comm, factor in saved:
                group._reduce_scatter_comm = comm
                group.gradient_divide_factor = factor
        return rows

    def _rows_each(self, directions: Optional[tuple[Tensor, float]]) -> dict[str, Tensor]:
        """One backward per row, every rank the same row, through FSDP2's own reduce-scatter
        (``p.grad`` is the local shard of the row's gradient)."""
        x = self._probe_on_model_device()
        live = dict(self.model.named_parameters())
        n = self.probe_size
        world = self.sharding.world_size  # type: ignore[union-attr]
        scales = _grad_scales(self.model, world)
        undo = {name: scales.get(id(live[name]), 1.0) for name in self._param_names}
        with self._guard(grads=True):
            out, rows = self._rows_buffers(x, directions, live)
            count = out.shape[1]
            total = n * count
            for index in range(total):
                i, a = divmod(index, count)
                for p in live.values():
                    p.grad = None
                out[i, a].backward(retain_graph=index + 1 < total)
                for name in self._param_names:
                    g = live[name].grad
                    if g is None:
                        raise RuntimeError(
                            f"the backward gave no gradient for the tracked parameter {name!r} "
                            "(frozen after start()?); a sharded tracker measures parameters "
                            "that keep requires_grad=True"
                        )
                    rows[name][i, a] = _local(g).reshape(-1)
            for name, factor in undo.items():
                if factor != 1.0:
                    rows[name].mul_(factor)
            del out
        return rows

    def _reduce_kernels(
        self, rows: Mapping[str, Tensor], kind: str
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-layer (or total) Gram matrices of the local rows, one all-reduce."""
        spec = {"full": "iap,jbp->ijab", "trace": "iap,jap->ij", "diagonal": "iap,jap->ija"}[kind]
        groups = self._layers if self.per_layer else {"": list(self._param_names)}
        parts = []
        for names in groups.values():
            k = sum(self._once(nm, torch.einsum(spec, rows[nm], rows[nm])) for nm in names)
            parts.append(k)
        dtype = parts[0].dtype
        flat = torch.cat([p.double().reshape(-1) for p in parts])
        flat = self.sharding.sum(flat).to(dtype)  # type: ignore[union-attr]
        chunks = [c.reshape(parts[0].shape) for c in flat.split(parts[0].numel())]
        if not self.per_layer:
            return chunks[0], {}
        per_layer = dict(zip(groups, chunks))
        return torch.stack(chunks).sum(0), per_layer

    def _rows_buffers(
        self, x: F.InputBatch, directions: Any, live: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The (projected) probe output ``(N, R)`` with its graph, and zeroed local Jacobian
        rows ``(N, R, P_local)`` per tracked parameter."""
        out = self._call(x)
        if directions is not None:
            r, scale = directions
            out = (out @ r.to(out)) * scale
        n, count = out.shape[0], out.shape[1]
        rows = {
            name: torch.zeros(
                n, count, _local(live[name]).numel(), dtype=out.dtype, device=out.device
            )
            for name in self._param_names
        }
        return out, rows

    def _plain_forward(self, x: F.InputBatch) -> Tensor:
        with self._guard(), torch.no_grad():
            return self._call(x).detach()

    def _call(self, x: F.InputBatch) -> Tensor:
        """``output_fn(model(x))`` as ``(N, O)`` (the model's own forward)."""
        if isinstance(x, Tensor):
            out = self.model(x)
        elif isinstance(x, Mapping):
            out = self.model(**x)
        else:
            out = self.model(*x)
        out = F.select_output(out, self.output_fn)
        n = F.batch_size(x)
        if out.dim() == 0 or out.shape[0] != n:
            raise ValueError(
                f"the model output has shape {tuple(out.shape)}, which has no batch dimension "
                f"of size {n} on dim 0; the output must be batched like the inputs"
            )
        return out.reshape(n, -1)

    @contextlib.contextmanager
    def _guard(self, grads: bool = False) -> Iterator[None]:
        """Eval semantics, RNG and flags (``side_effect_guard``), the buffers, and with
        ``grads`` every parameter's ``.grad`` exactly as they were; FSDP units resharded."""
        model = self.model
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        saved = [(p, p.grad) for p in model.parameters()] if grads else []
        try:
            with F.side_effect_guard(model):
                yield
        finally:
            for p, g in saved:
                p.grad = g
            live = dict(model.named_buffers())
            with torch.no_grad():
                for n, b in buffers.items():
                    live[n].copy_(b)
            _reshard(model)

    def __repr__(self) -> str:
        w = self.sharding.world_size if self.sharding is not None else 1
        return f"ShardedKernelTracker({type(self.model).__name__}, world_size={w})"
