"""FSDP2 internals the sharded measurement (:mod:`lazy_monitor.tracking.sharded`) relies on:
DTensor detection, the parameters' mesh, FSDP2's gradient reduction state, the layout of its
reduce-scatter (for the row exchange) and the model's own forward under a side-effect guard.
Reads FSDP2 internals defensively: an attribute missing in another torch version disables the
feature that needs it (checked, never assumed).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lazy_monitor.core import _functional as F
from lazy_monitor.tracking.distributed import KernelSharding

__all__ = ["has_sharded_params", "mesh_sharding"]


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


def model_call(model: nn.Module, x: F.InputBatch, output_fn: Optional[F.OutputFn]) -> Tensor:
    """``output_fn(model(x))`` as ``(N, O)`` (the model's own forward)."""
    if isinstance(x, Tensor):
        out = model(x)
    elif isinstance(x, Mapping):
        out = model(**x)
    else:
        out = model(*x)
    out = F.select_output(out, output_fn)
    n = F.batch_size(x)
    if out.dim() == 0 or out.shape[0] != n:
        raise ValueError(
            f"the model output has shape {tuple(out.shape)}, which has no batch dimension "
            f"of size {n} on dim 0; the output must be batched like the inputs"
        )
    return out.reshape(n, -1)


@contextlib.contextmanager
def guard(model: nn.Module, grads: bool = False) -> Iterator[None]:
    """Eval semantics, RNG and flags (``side_effect_guard``), the buffers, and with
    ``grads`` every parameter's ``.grad`` exactly as they were; FSDP units resharded."""
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
