"""The collectives a monitor needs across processes, behind one small interface.

A measurement under data parallelism runs on every process at the same steps: the kernel may be
split across processes (:class:`~lazy_monitor.tracking.distributed.KernelSharding` sums the
blocks), the overhead budget's clock-based decision is taken on process 0 and broadcast, and a
drift gate trips on every process when one trips. :class:`Collectives` is that interface: rank,
world size, a sum-reduction of tensors, an object broadcast and a boolean ``any``.

Two implementations: :class:`Collectives` itself (one process: every operation is the identity)
and :class:`TorchDistributed` (``torch.distributed``: ``torchrun``, the Hugging Face Trainer,
``accelerate launch``). The Lightning adapter implements it on the strategy
(:mod:`lazy_monitor.callbacks._monitor`). Framework-free.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["Collectives", "TorchDistributed", "default_collectives"]


class Collectives:
    """One process: rank 0 of 1; reductions and broadcasts return their input.

    Subclasses override :attr:`rank`, :attr:`world_size`, :meth:`reduce_sum` and
    :meth:`broadcast`; :meth:`any` and :meth:`first` are built on them.
    """

    @property
    def rank(self) -> int:
        """This process's index in ``[0, world_size)``."""
        return 0

    @property
    def world_size(self) -> int:
        """Number of processes."""
        return 1

    def reduce_sum(self, tensor: Tensor, group: Optional[Any] = None) -> Tensor:
        """``tensor`` summed over the processes of ``group`` (default: all); same shape on every
        process. Every process must call it with a tensor of the same shape and dtype."""
        return tensor

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Process ``src``'s ``obj`` (a picklable value) on every process."""
        return obj

    def any(self, flag: bool, device: Optional[torch.device] = None) -> bool:
        """Whether ``flag`` is true on at least one process."""
        if self.world_size <= 1:
            return bool(flag)
        t = torch.tensor([float(bool(flag))], device=device)
        return float(self.reduce_sum(t)[0]) > 0

    def first(self, value: Optional[str], device: Optional[torch.device] = None) -> Optional[str]:
        """The ``value`` of the lowest rank whose value is not None (None if no rank has one):
        every process gets the same string."""
        if self.world_size <= 1:
            return value
        flags = torch.zeros(self.world_size, dtype=torch.float64, device=device)
        flags[self.rank] = float(value is not None)
        flags = self.reduce_sum(flags)
        ranks = [r for r, f in enumerate(flags.tolist()) if f > 0]
        if not ranks:
            return None
        return self.broadcast(value, src=ranks[0])


class TorchDistributed(Collectives):
    """``torch.distributed`` on ``group`` (default: the world); initialised by the launcher
    (``torchrun``, the Trainer's ``accelerate``). One process when it is not initialised."""

    def __init__(self, group: Optional[Any] = None) -> None:
        self.group = group

    @staticmethod
    def _dist() -> Any:
        import torch.distributed as dist

        return dist if dist.is_available() and dist.is_initialized() else None

    @property
    def rank(self) -> int:
        dist = self._dist()
        return 0 if dist is None else int(dist.get_rank(self.group))

    @property
    def world_size(self) -> int:
        dist = self._dist()
        return 1 if dist is None else int(dist.get_world_size(self.group))

    def _device(self) -> torch.device:
        # NCCL reduces CUDA tensors only; gloo and others take CPU tensors
        dist = self._dist()
        if dist is not None and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def reduce_sum(self, tensor: Tensor, group: Optional[Any] = None) -> Tensor:
        dist = self._dist()
        if dist is None:
            return tensor
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group if group is None else group)
        return tensor

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        dist = self._dist()
        if dist is None or self.world_size <= 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group, device=self._device())
        return box[0]

    def any(self, flag: bool, device: Optional[torch.device] = None) -> bool:
        return super().any(flag, device=device or self._device())

    def first(self, value: Optional[str], device: Optional[torch.device] = None) -> Optional[str]:
        return super().first(value, device=device or self._device())


def default_collectives() -> Collectives:
    """:class:`TorchDistributed` when ``torch.distributed`` is initialised, else one process."""
    return TorchDistributed() if TorchDistributed._dist() is not None else Collectives()
