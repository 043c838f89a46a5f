"""The empirical NTK of a model whose parameters are sharded across processes (FSDP2).

Under ``torch.distributed.fsdp.fully_shard`` every parameter is a ``DTensor`` of which each
process holds one shard (``Shard(0)`` on a one-dimensional device mesh); the full parameter
exists only transiently, one ``fully_shard`` unit at a time, inside the model's own forward and
backward. The kernel engine (``torch.func.functional_call`` on full tensors) cannot run on such
a model, and gathering it on one rank is what sharding avoids. :class:`ShardedMeasurement`
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
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lazy_monitor._validation import gib
from lazy_monitor.core import _functional as F
from lazy_monitor.core.kernels import projection_matrix
from lazy_monitor.tracking import kernel_config as kc
from lazy_monitor.tracking._fsdp import (
    _check_gradient_sync,
    _grad_scales,
    _is_dtensor,
    _local,
    _reshard,
    _row_exchange_layout,
    _RowExchange,
    guard,
    has_sharded_params,
    mesh_sharding,
    model_call,
)
from lazy_monitor.tracking._state import TrackerState
from lazy_monitor.tracking.distributed import KernelSharding

__all__ = ["ShardedMeasurement", "has_sharded_params", "mesh_sharding"]

_STATE_FORMAT = 1


class _ShardSnapshot:
    """θ₀ of a sharded model as local shards, θ₀'s buffers, and (when they fit) the local rows
    of ``J(θ₀)``; the ``Linearization`` interface :class:`KernelTracker` uses."""

    def __init__(self, measurement: ShardedMeasurement) -> None:
        self.m = measurement
        model = measurement.t.model
        self.names = list(measurement.t._param_names)
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
            return self.m._plain_forward(x)

    def f0_and_f_lin(
        self, x: F.InputBatch, params: Optional[Mapping[str, Tensor]] = None
    ) -> tuple[Tensor, Tensor]:
        """``(0, J(θ₀)(θ − θ₀))`` on the probe (the tracker adds ``f₀``); ``x`` must be the
        probe (the rows of ``J(θ₀)`` are the probe's)."""
        del x, params  # the probe and the model's current parameters
        delta = self.m._local_delta()
        jdelta = self.m._j0_delta(self, delta)
        return torch.zeros_like(jdelta), jdelta

    def state_dict(self) -> dict[str, Any]:
        """θ₀'s local shards of *this* rank (a sharded tracker's state is per rank)."""
        cpu = lambda d: {k: v.detach().cpu().clone() for k, v in d.items()}  # noqa: E731
        sharding = self.m.sharding
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
        sharding = self.m.sharding
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
        model = self.m.t.model
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


class ShardedMeasurement:
    """The measurement backend of a :class:`~lazy_monitor.KernelTracker` whose model's
    parameters FSDP2 shards (``fully_shard``): the same metrics, measured with each process's
    local shards (see :mod:`lazy_monitor.tracking.sharded`). The tracker holds one when a
    trainable parameter of its model is a ``DTensor``; every process of the mesh must build
    the tracker and call ``start``/``measure`` together.

    ``sharding`` (optional) sums over the processes of the parameters' mesh (default:
    :func:`mesh_sharding`, ``torch.distributed`` on the mesh's process group); the kernel
    settings ``implementation`` and ``chunk_size`` are not used (the rows come from the model's
    own backward); ``max_memory`` bounds the local Jacobian rows, the kernels and the
    eigendecomposition. Attribute :attr:`exchange_rows` (default True): use the row exchange
    when the model allows it (see the module docs).

    Raises:
        ValueError: tensor-parallel DTensor layouts, parameters on several meshes, or a
            ``sharding`` whose world size is not the mesh's.
    """

    name = "sharded"

    def __init__(self, tracker: TrackerState, sharding: Optional[KernelSharding]) -> None:
        default = mesh_sharding(tracker.model)  # validates the layout
        if sharding is None:
            sharding = default
        elif not isinstance(sharding, KernelSharding) or sharding.world_size != default.world_size:
            raise ValueError(
                f"sharding must sum over the {default.world_size} processes of the mesh the "
                f"parameters are sharded on, got {sharding!r}; pass sharding=None (the mesh's "
                "process group) or mesh_sharding(model)"
            )
        self.t = tracker
        self.sharding = sharding
        #: one backward pass per ``W`` rows (each rank its own rows, an ``all_to_all``
        #: instead of FSDP2's reduce-scatter) when the model allows it; False: every rank
        #: back-propagates every row through FSDP2's own reduce-scatter
        self.exchange_rows = True
        self._pending: Optional[_ShardSnapshot] = None

    # ------------------------------------------------------------------ the backend interface
    def validate(self) -> None:
        """The kernel engine is not used; the rows come from the model's own backward, which
        the construction forward and ``start`` exercise."""

    def params(self) -> dict[str, Tensor]:
        """The tracked parameters (DTensors: the tracker's θ, never gathered)."""
        live = dict(self.t.model.named_parameters())
        return {n: live[n].detach() for n in self.t._param_names}

    def snapshot(self) -> _ShardSnapshot:
        snap = _ShardSnapshot(self)
        self._pending = snap
        return snap

    def params0(self, lin: Any) -> dict[str, Tensor]:
        """Stand-ins with the norms of θ₀ (see :meth:`measured_params`)."""
        snap = self._snapshot()
        norms0 = self._norms0(snap)
        dev = self.t._metric_device()
        return {
            n: torch.stack([a.sqrt(), a.new_zeros(())]).to(dev) for n, a in zip(snap.names, norms0)
        }

    def measured_params(self, lin: Any, dev: torch.device) -> dict[str, Tensor]:
        """Stand-ins ``[‖θ₀,n‖, ‖θ_n − θ₀,n‖]`` (against ``[‖θ₀,n‖, 0]``): ``params/*`` of the
        full parameters from all-reduced squared norms, without gathering them."""
        snap = self._snapshot()
        norms0 = self._norms0(snap)
        delta = self._local_delta()
        local = torch.stack([self._once(n, delta[n].double().square().sum()) for n in snap.names])
        dist2 = self.sharding.sum(local)
        return {
            n: torch.stack([a.sqrt(), d.sqrt()]).to(dev)
            for n, a, d in zip(snap.names, norms0, dist2)
        }

    def params_problem(self, lin: Any) -> Optional[str]:
        live = dict(self.t.model.named_parameters())
        missing = [n for n in self.t._param_names if n not in live]
        if missing:
            return f"parameters {missing[:4]} tracked since start() are no longer parameters"
        snap = lin if isinstance(lin, _ShardSnapshot) else None
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

    def eval_forward(self, lin: Any) -> Callable[[F.InputBatch], Tensor]:
        # the model's own (sharded) forward: the functional one needs full parameters
        return self._plain_forward

    # ------------------------------------------------------------------ kernel estimate
    def implementation(self, requested: kc.KernelConfig) -> str:
        return "sharded"

    def engine_memory(self, budget: Optional[int]) -> Optional[int]:
        return budget  # no engine: the whole budget bounds the rows and kernels

    def estimate(
        self, kind: str, projection: kc.Projection, max_memory: Optional[int]
    ) -> dict[str, Any]:
        """Bytes per process of a measurement: the local rows ``(N, R, P_local)``, ``J(θ₀)``'s
        rows when they fit (else recomputed at each measurement), the kernels and the
        eigendecomposition. No time model for the model's own backward (``seconds`` NaN)."""
        t = self.t
        n, o = t.probe_size, t.num_outputs
        live = dict(t.model.named_parameters())
        # the largest shard of each parameter (Shard(0) gives ceil(d0 / W) rows to the first
        # ranks): the same number on every process, so every process resolves the same kernel
        w = self.sharding.world_size
        p_local = sum(
            -(-live[name].shape[0] // w) * math.prod(live[name].shape[1:])
            if _is_dtensor(live[name]) and live[name].dim() > 0
            else live[name].numel()
            for name in t._param_names
        )
        itemsize = torch.finfo(next(iter(live.values())).dtype).bits // 8
        layers = len(t._layers) if t.per_layer else 0
        budget = max_memory
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
            "seconds": math.nan,
            "backward_passes": n * r + (0 if store else n * o),
        }

    def describe(self, est: Mapping[str, Any]) -> str:
        return (
            f"per process, N={est['n']}, O={est['o_raw']}, local parameters {est['p_local']}: "
            f"Jacobian rows {gib(est['rows_bytes'])}, kernels {gib(est['kernel_bytes'])}"
        )

    # ------------------------------------------------------------------ evaluation
    def forward(self, strict: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """``f(probe; θ)`` through the model's own (sharded) forward and the features."""
        x = self.t._probe_on_model_device()
        with guard(self.t.model), torch.no_grad(), self.t._hooks(strict) as grams:
            f = model_call(self.t.model, x, self.t.output_fn).detach()
        return f, self.t._on_metric_device(grams)

    def kernel(self) -> tuple[Tensor, dict[str, Tensor]]:
        """Kernel and per-layer kernels from the local Jacobian rows, summed over the mesh."""
        cfg = self.t._resolved
        assert cfg is not None, "the kernel configuration is resolved at start()"
        kind, projection = cfg.kind, cfg.projection
        starting = self.t._lin is None and self._pending is not None
        store = bool(cfg.estimate.get("store_j0", 1))
        if starting and store:
            # at θ₀: the rows of J(θ₀) are kept for f_lin; the kernel's rows are their projection
            j0 = self._rows(None)
            assert self._pending is not None
            self._pending.j0 = j0
            rows = j0 if projection is None else {k: self._project(v) for k, v in j0.items()}
        else:
            rows = self._rows(self._directions())
        kernel, layers = self._reduce_kernels(rows, kind)
        dev = self.t._metric_device()
        return kernel.to(dev), {k: v.to(dev) for k, v in layers.items()}

    # ------------------------------------------------------------------ internals
    def _snapshot(self) -> _ShardSnapshot:
        snap = self.t._lin if self.t._lin is not None else self._pending
        assert isinstance(snap, _ShardSnapshot)
        return snap

    def _once(self, name: str, value: Tensor) -> Tensor:
        """A replicated (plain-tensor) parameter's contribution counts on rank 0 only."""
        live = dict(self.t.model.named_parameters())
        if _is_dtensor(live[name]) or self.sharding.rank == 0:
            return value
        return torch.zeros_like(value)

    def _norms0(self, snap: _ShardSnapshot) -> Tensor:
        if snap.norms0 is None:
            local = torch.stack(
                [self._once(n, snap.params0[n].double().square().sum()) for n in snap.names]
            )
            snap.norms0 = self.sharding.sum(local)
        return snap.norms0

    def _local_delta(self) -> dict[str, Tensor]:
        snap = self._snapshot()
        live = dict(self.t.model.named_parameters())
        return {n: _local(live[n]).detach() - snap.params0[n] for n in snap.names}

    def _j0_delta(self, snap: _ShardSnapshot, delta: Mapping[str, Tensor]) -> Tensor:
        """``J(θ₀)Δθ`` ``(N, O)``: local rows times local Δθ, summed over the mesh."""
        n, o = self.t.probe_size, self.t.num_outputs
        out = torch.zeros(n, o, dtype=torch.float64, device=self.t._model_device())

        def add(name: str, rows: Tensor) -> None:
            d = delta[name].reshape(-1).to(rows.dtype)
            part = (rows.reshape(n, o, -1) @ d).double()
            out.add_(self._once(name, part))

        if snap.j0 is not None:
            for name, rows in snap.j0.items():
                add(name, rows)
        else:
            cfg = self.t._resolved
            assert cfg is not None
            with snap.at_theta0():
                j0 = self._rows(None)
            if cfg.estimate.get("store_j0", 0):
                snap.j0 = j0  # after a load_state_dict: recomputed once, then kept
            for name, rows in j0.items():
                add(name, rows)
        total = self.sharding.sum(out)
        f0 = self.t._reference.f0
        return total.to(f0.dtype if f0 is not None else total.dtype)

    def _directions(self) -> Optional[tuple[Tensor, float]]:
        """The projection ``(R (O, k), scale)`` of the kernel's outputs, None without."""
        cfg = self.t._resolved
        assert cfg is not None
        projection, o = cfg.projection, self.t.num_outputs
        if projection is None:
            return None
        if projection == "sum":
            return torch.ones(o, 1, dtype=torch.float64), 1.0 / math.sqrt(o)
        k = int(projection)
        return projection_matrix(o, k, cfg.projection_seed), 1.0 / math.sqrt(k)

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
        _check_gradient_sync(self.t.model)
        world = self.sharding.world_size
        layout = _row_exchange_layout(self.t.model, self.t._param_names, world)
        if layout is not None and self.exchange_rows:
            return self._rows_exchanged(directions, layout)
        return self._rows_each(directions)

    def _rows_exchanged(
        self, directions: Optional[tuple[Tensor, float]], layout: list
    ) -> dict[str, Tensor]:
        """Rank ``r`` back-propagates rows ``r, r + W, ...``; each FSDP2 group's reduce-scatter
        is replaced by an ``all_to_all`` of the (undivided) unsharded gradients, so every rank
        receives its shard of the ``W`` rows of the pass."""
        x = self.t._probe_on_model_device()
        live = dict(self.t.model.named_parameters())
        n = self.t.probe_size
        sharding = self.sharding
        assert sharding is not None
        world, rank = sharding.world_size, sharding.rank
        saved = [(g, g._reduce_scatter_comm, g.gradient_divide_factor) for g, _ in layout]
        exchanges = [_RowExchange() for _ in layout]
        try:
            for (group, _), exchange in zip(layout, exchanges):
                group._reduce_scatter_comm = exchange
                group.gradient_divide_factor = 1.0  # no pre-division of the unsharded grads
            with guard(self.t.model, grads=True):
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
                                "tracker.measurement.exchange_rows = False"
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
        x = self.t._probe_on_model_device()
        live = dict(self.t.model.named_parameters())
        n = self.t.probe_size
        world = self.sharding.world_size
        scales = _grad_scales(self.t.model, world)
        undo = {name: scales.get(id(live[name]), 1.0) for name in self.t._param_names}
        with guard(self.t.model, grads=True):
            out, rows = self._rows_buffers(x, directions, live)
            count = out.shape[1]
            total = n * count
            for index in range(total):
                i, a = divmod(index, count)
                for p in live.values():
                    p.grad = None
                out[i, a].backward(retain_graph=index + 1 < total)
                for name in self.t._param_names:
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
        groups = self.t._layers if self.t.per_layer else {"": list(self.t._param_names)}
        parts = []
        for names in groups.values():
            k = sum(self._once(nm, torch.einsum(spec, rows[nm], rows[nm])) for nm in names)
            parts.append(k)
        dtype = parts[0].dtype
        flat = torch.cat([p.double().reshape(-1) for p in parts])
        flat = self.sharding.sum(flat).to(dtype)
        chunks = [c.reshape(parts[0].shape) for c in flat.split(parts[0].numel())]
        if not self.t.per_layer:
            return chunks[0], {}
        per_layer = dict(zip(groups, chunks))
        return torch.stack(chunks).sum(0), per_layer

    def _rows_buffers(
        self, x: F.InputBatch, directions: Any, live: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The (projected) probe output ``(N, R)`` with its graph, and zeroed local Jacobian
        rows ``(N, R, P_local)`` per tracked parameter."""
        out = model_call(self.t.model, x, self.t.output_fn)
        if directions is not None:
            r, scale = directions
            out = (out @ r.to(out)) * scale
        n, count = out.shape[0], out.shape[1]
        rows = {
            name: torch.zeros(
                n, count, _local(live[name]).numel(), dtype=out.dtype, device=out.device
            )
            for name in self.t._param_names
        }
        return out, rows

    def _plain_forward(self, x: F.InputBatch) -> Tensor:
        with guard(self.t.model), torch.no_grad():
            return model_call(self.t.model, x, self.t.output_fn).detach()

    def __repr__(self) -> str:
        return f"ShardedMeasurement({type(self.t.model).__name__}, world_size={self.sharding.world_size})"
