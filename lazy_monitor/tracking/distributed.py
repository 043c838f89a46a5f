"""Split a kernel measurement across the processes of a distributed run (framework-free).

The kernel is a sum over parameters, ``K = Σ_p K_p`` (and a layer's kernel the sum over its
parameters), so each of ``W`` processes computes the blocks of its share of the parameters and
one ``all_reduce(SUM)`` of the per-layer kernels (or of the total kernel without per-layer
metrics) gives every process the same complete kernels. The shares are balanced with the
engine's shapes-only cost model (:func:`lazy_monitor.core.kernels.plan.estimate_param_costs`):
largest cost first, each to the least loaded process (LPT), deterministic, so every process
derives the same assignment without communicating.

The reduction is a hook: :class:`KernelSharding` takes the process's rank, the world size and a
function that sums a tensor over the processes. :meth:`KernelSharding.from_process_group`
builds it on ``torch.distributed`` (any backend, optional process group); the Lightning
callback passes ``trainer.strategy.reduce(t, reduce_op="sum")``; another adapter (Hugging
Face ``accelerate``: ``accelerator.reduce(t, "sum")``) passes its own.

Every process still runs the cheap parts of a measurement itself (one forward, one jvp, the
eigendecomposition, the metrics) on identical inputs; the metrics are finally taken from rank 0
(one more small reduction) so that decisions made on them (a drift gate) agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lazy_monitor._validation import check_callable, check_int

__all__ = ["KernelSharding", "SHARDED_STRATEGIES", "balance", "check_strategy"]


#: Strategies whose sharded parameters cannot be measured (class names, matched along the
#: MRO): FSDP1's flat parameters (Lightning's ``FSDPStrategy``, which also requires a GPU) and
#: DeepSpeed ZeRO partitions. FSDP2 (``ModelParallelStrategy`` with ``fully_shard``: DTensor
#: parameters) is measured with the local shards by
#: :class:`~lazy_monitor.tracking.sharded.ShardedMeasurement`.
SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy")


def check_strategy(strategy: Any) -> None:
    """Raise if ``strategy`` (a training framework's strategy object) shards the parameters in
    a way the monitor cannot measure (:data:`SHARDED_STRATEGIES`).

    Raises:
        ValueError: naming the strategy and the alternatives.
    """
    names = [cls.__name__ for cls in type(strategy).__mro__]
    hit = next((n for n in SHARDED_STRATEGIES if n in names), None)
    if hit is None:
        return
    raise ValueError(
        f"KernelRegimeMonitor does not support {type(strategy).__name__} ({hit}): it shards the "
        "parameters into flat or partitioned buffers that the monitor cannot differentiate "
        "shard by shard. Alternatives: ModelParallelStrategy with fully_shard (FSDP2) in "
        "configure_model, measured with each rank's own parameter shards; strategy='ddp' (or "
        "'ddp_spawn') with KernelRegimeMonitor(split_across_ranks=True), which splits "
        "the kernel work across ranks; monitor a submodule that is not sharded "
        "(KernelRegimeMonitor(submodule=...)); or measure offline with KernelTracker on a "
        "consolidated checkpoint"
    )


def balance(costs: Mapping[str, float], world_size: int) -> list[list[str]]:
    """Assign names to ``world_size`` bins, largest cost first, each to the least loaded bin
    (ties to the lower rank). Deterministic for the same ``costs``.

    >>> balance({"a": 5.0, "b": 3.0, "c": 3.0, "d": 1.0}, 2)
    [['a', 'd'], ['b', 'c']]
    """
    bins: list[list[str]] = [[] for _ in range(world_size)]
    loads = [0.0] * world_size
    for name in sorted(costs, key=lambda k: (-costs[k], k)):
        r = min(range(world_size), key=lambda i: (loads[i], i))
        bins[r].append(name)
        loads[r] += costs[name]
    return bins


class KernelSharding:
    """How one process takes part in a kernel measurement split across ``world_size`` processes.

    Args:
        rank: this process's index in ``[0, world_size)``.
        world_size: number of processes sharing the work (``1``: no split).
        all_reduce: ``tensor -> tensor`` summing over the processes (every process calls it
            with a tensor of the same shape and dtype and gets the sum; may work in place).

    Raises:
        TypeError / ValueError: a non-integer or out-of-range rank / world size, a
            non-callable ``all_reduce``.

    Example::

        sharding = KernelSharding.from_process_group()          # after init_process_group
        tracker = KernelTracker(model, probe, sharding=sharding)
    """

    def __init__(self, rank: int, world_size: int, all_reduce: Callable[[Tensor], Tensor]) -> None:
        self.world_size = check_int("world_size", world_size, minimum=1, fix="e.g. 2")
        self.rank = check_int("rank", rank, minimum=0, fix="the process index")
        if self.rank >= self.world_size:
            raise ValueError(
                f"rank must be smaller than world_size={world_size}, got {rank!r}; pass the "
                "process index in the group"
            )
        if all_reduce is None:
            raise TypeError("all_reduce must be a callable tensor -> summed tensor, got None")
        self.all_reduce = check_callable(
            "all_reduce", all_reduce, fix="a function tensor -> sum over processes"
        )

    @classmethod
    def from_process_group(cls, group: Optional[Any] = None) -> KernelSharding:
        """Use ``torch.distributed`` (initialised by the caller) on ``group`` (default: world)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "KernelSharding.from_process_group() needs an initialised torch.distributed "
                "process group; call torch.distributed.init_process_group(...) first"
            )

        def all_reduce(t: Tensor) -> Tensor:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
            return t

        return cls(dist.get_rank(group), dist.get_world_size(group), all_reduce)

    @property
    def active(self) -> bool:
        """Whether there is anything to split (more than one process)."""
        return self.world_size > 1

    def share(self, costs: Mapping[str, float]) -> list[str]:
        """The names this process computes (see :func:`balance`)."""
        return balance(costs, self.world_size)[self.rank]

    def sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the processes (a contiguous copy is reduced)."""
        out = self.all_reduce(tensor.contiguous().clone())
        return tensor if out is None else out

    def from_rank_zero(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Rank 0's values on every process (sum of rank 0's values and zeros on the others:
        NaN and ±inf survive, so does every finite value exactly)."""
        names = list(metrics)
        values = torch.tensor([float(metrics[k]) for k in names], dtype=torch.float64)
        if self.rank != 0:
            values = torch.zeros_like(values)
        values = self.sum(values)
        return {k: float(v) for k, v in zip(names, values.tolist())}


def sharded_kernel(
    sharding: KernelSharding,
    compute: Callable[[Sequence[str]], tuple[Tensor, dict[str, Tensor]]],
    costs: Mapping[str, float],
    layers: Mapping[str, Sequence[str]],
    template: Tensor,
) -> Optional[tuple[Tensor, dict[str, Tensor]]]:
    """The complete kernel and per-layer kernels, each process computing its share.

    Args:
        sharding: this process's place in the split.
        compute: ``names -> (kernel, {name: block})`` for a non-empty subset of the parameters
            (one engine call with ``params=`` that subset and ``return_blocks=True``); may raise
            ``RuntimeError`` (reported to every process, see Returns).
        costs: ``{name: cost}`` for every tracked parameter (the same on every process).
        layers: ``{layer: [parameter names]}`` (empty: only the total kernel is needed).
        template: a zero-filled tensor of the kernel's shape, dtype and device (for a process
            without a share).

    Returns:
        ``(kernel, {layer: kernel})``, identical on every process; ``None`` if ``compute``
        raised a ``RuntimeError`` on any process (so that all of them can retry the same way
        together instead of one raising while the others wait in the reduction). The error is
        re-raised on the process where it happened if it is not a ``RuntimeError``.
    """
    names = sharding.share(costs)
    failed = 0.0
    blocks: dict[str, Tensor] = {}
    kernel = template
    if names:
        try:
            kernel, blocks = compute(names)
        except RuntimeError:
            failed = 1.0
            kernel, blocks = template, {}
    # One reduction: [failure flag, per-layer kernels...] (or [flag, kernel]).
    parts = [template.new_full((1,), failed)]
    if layers:
        for layer_names in layers.values():
            mine = [blocks[n] for n in layer_names if n in blocks]
            parts.append(sum(mine[1:], mine[0]).reshape(-1) if mine else template.reshape(-1))
    else:
        parts.append(kernel.to(template.dtype).reshape(-1))
    flat = sharding.sum(torch.cat(parts))
    if float(flat[0]) > 0:
        return None
    size = template.numel()
    chunks = flat[1:].split(size)
    if not layers:
        return chunks[0].reshape(template.shape), {}
    per_layer = {layer: c.reshape(template.shape) for layer, c in zip(layers, chunks)}
    total = torch.stack(list(per_layer.values())).sum(0)
    return total, per_layer
