"""Helpers shared by the kernel implementations: kinds, the block sink and the blocked driver.

Every implementation writes its result as per-parameter blocks into a :class:`_BlockSink`, one
rectangle ``[rows, cols]`` of the ``(N1, N2, ...)`` kernel at a time, so that the same code path
serves the summed kernel and ``return_blocks=True``, and so that the example dimension can be
processed in blocks whose size is set by a memory budget.
"""

from __future__ import annotations

import contextvars
import warnings
import weakref
from collections.abc import Iterator
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .config import KINDS  # noqa: F401 - re-exported

# Memory (bytes) the engine may hold in per-example factors (Jacobian rows, layer inputs and
# output-gradients) at once. Forward/backward working memory comes on top, so this is set well
# below the 2 GiB a ResNet-18 at N=128 may use.
DEFAULT_FACTOR_BUDGET = 1024 * 2**20

# The budget of the running engine call (``max_memory``); a context variable so that nested or
# concurrent calls do not see each other's budget.
_FACTOR_BUDGET: contextvars.ContextVar[int] = contextvars.ContextVar(
    "factor_budget", default=DEFAULT_FACTOR_BUDGET
)


def factor_budget() -> int:
    """Bytes of per-example factors the running engine call may hold."""
    return _FACTOR_BUDGET.get()


# Internal layouts (chosen so that every contraction writes contiguous memory without permutes):
#   full -> (N1, O, N2, O);  trace -> (N1, N2);  diagonal -> (O, N1, N2).
# ``finalize`` converts to the public layouts (N1, N2, O, O) / (N1, N2) / (N1, N2, O).


def kernel_shape(kind: str, n1: int, n2: int, o: int) -> tuple[int, ...]:
    """Internal shape of a kernel of kind ``kind``."""
    if kind == "full":
        return (n1, o, n2, o)
    if kind == "trace":
        return (n1, n2)
    return (o, n1, n2)


def region(t: Tensor, kind: str, rows: slice, cols: slice) -> Tensor:
    """View of examples ``rows`` x ``cols`` of an internal-layout kernel."""
    if kind == "full":
        return t[rows, :, cols, :]
    if kind == "trace":
        return t[rows, cols]
    return t[:, rows, cols]


def transpose_block(block: Tensor, kind: str) -> Tensor:
    """``K(x2, x1)`` from ``K(x1, x2)`` (internal layout)."""
    if kind == "full":
        return block.permute(2, 3, 0, 1)
    return block.transpose(-1, -2)


def finalize(kernel: Tensor, kind: str) -> Tensor:
    """Internal layout -> public layout (contiguous)."""
    if kind == "full":
        return kernel.permute(0, 2, 1, 3).contiguous()
    if kind == "diagonal":
        return kernel.permute(1, 2, 0).contiguous()
    return kernel


def reduce_full(block: Tensor, kind: str) -> Tensor:
    """Internal full ``(N1, O, N2, O)`` -> internal block of kind ``kind``."""
    if kind == "full":
        return block
    diag = block.diagonal(dim1=1, dim2=3)  # (N1, N2, O)
    return diag.sum(-1) if kind == "trace" else diag.permute(2, 0, 1)


def contract_rows(j1: Tensor, j2: Tensor, kind: str) -> Tensor:
    """Internal kernel block from per-example rows ``j1: (N1, O, F)`` and ``j2: (N2, O, F)``.

    full: ``K[n, a, m, b] = Σ_f j1[n, a, f] j2[m, b, f]`` (one matmul); trace/diagonal only
    need ``a == b`` (one batched matmul over outputs).
    """
    n1, o, _ = j1.shape
    n2 = j2.shape[0]
    if kind == "full":
        k = j1.reshape(n1 * o, -1) @ j2.reshape(n2 * o, -1).t()
        return k.view(n1, o, n2, o)
    k = torch.bmm(j1.transpose(0, 1), j2.permute(1, 2, 0))  # (O, N1, N2)
    return k.sum(0) if kind == "trace" else k


# A symmetric contraction whose GEMMs have at most this many rows (examples x rows per
# example) is done as one block: halving the pairs of a small product saves less than the
# extra calls and copies of its sub-blocks cost (MLP 784-1024x3-10, N = 32, O = 10: 10 sub-blocks
# per weight made the whole kernel ~12% slower than one 320-row product per weight).
SINGLE_BLOCK_ROWS = 512


def _symmetric_piece(n: int, rows: Optional[int] = None) -> int:
    """Examples per sub-block; ``rows``: GEMM rows per example of the contraction (``O`` for
    products of per-example rows), None for contractions that loop per example (Gram)."""
    if rows is not None and n * rows <= SINGLE_BLOCK_ROWS:
        return max(1, n)
    return max(8, ceil_div(n, 8))


def symmetric_fraction(n: int, rows: Optional[int] = None) -> float:
    """Fraction of the ``n²`` example pairs that :func:`symmetric_blocks` contracts."""
    p = ceil_div(n, _symmetric_piece(n, rows))
    return (p + 1) / (2 * p)


def symmetric_pairs(n: int, rows: Optional[int] = None) -> int:
    """Sub-block pairs ``(i, j)``, ``i <= j``, that :func:`symmetric_blocks` visits."""
    p = ceil_div(n, _symmetric_piece(n, rows))
    return p * (p + 1) // 2


def symmetric_blocks(
    n: int,
    kind: str,
    fn: Callable[[slice, slice], tuple[Tensor, ...]],
    rows: Optional[int] = None,
) -> tuple[Tensor, ...]:
    """The blocks ``fn(all, all)`` of symmetric kernels computed from their upper sub-blocks
    only (``fn(i, j)``, ``i <= j``), mirroring the rest: about half the work for large ``n``
    (:func:`symmetric_fraction`); ``rows`` as in :func:`_symmetric_piece`."""
    parts = example_blocks(n, _symmetric_piece(n, rows))
    if len(parts) == 1:
        return fn(parts[0], parts[0])
    outs: Optional[list[Tensor]] = None
    for a, i in enumerate(parts):
        for j in parts[a:]:
            blocks = fn(i, j)
            if outs is None:
                outs = []
                for b in blocks:
                    o = b.shape[1] if kind == "full" else (b.shape[0] if kind == "diagonal" else 1)
                    outs.append(b.new_empty(kernel_shape(kind, n, n, o)))
            for out, b in zip(outs, blocks):
                region(out, kind, i, j).copy_(b)
                if i != j:
                    region(out, kind, j, i).copy_(transpose_block(b, kind))
    assert outs is not None
    return tuple(outs)


def symmetric_block(
    n: int, kind: str, fn: Callable[[slice, slice], Tensor], rows: Optional[int] = None
) -> Tensor:
    """:func:`symmetric_blocks` for a single kernel."""
    return symmetric_blocks(n, kind, lambda i, j: (fn(i, j),), rows)[0]


class _BlockSink:
    """Accumulates kernel blocks: one summed kernel, plus one tensor per name if requested."""

    def __init__(
        self,
        kind: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        keep_blocks: bool,
        symmetric: bool,
    ) -> None:
        self.kind = kind
        self.shape = shape
        self.dtype = dtype
        self.device = device
        self.symmetric = symmetric
        self.kernel = torch.zeros(shape, dtype=dtype, device=device)
        self.blocks: Optional[dict[str, Tensor]] = {} if keep_blocks else None

    def declare(self, name: str) -> None:
        """Make sure ``name`` has a block even if nothing is ever added (zero Jacobian)."""
        if self.blocks is not None and name not in self.blocks:
            self.blocks[name] = torch.zeros(self.shape, dtype=self.dtype, device=self.device)

    def add(self, name: str, value: Tensor, rows: slice, cols: slice, mirror: bool = True) -> None:
        """Add ``value`` at ``[rows, cols]``; for a symmetric kernel (unless ``mirror=False``)
        also its mirror image at ``[cols, rows]`` when that is a different block."""
        value = value.to(self.dtype)
        targets = [self.kernel]
        if self.blocks is not None:
            self.declare(name)
            targets.append(self.blocks[name])
        mirror = mirror and self.symmetric and rows != cols
        for t in targets:
            region(t, self.kind, rows, cols).add_(value)
            if mirror:
                region(t, self.kind, cols, rows).add_(transpose_block(value, self.kind))


def example_blocks(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def block_pairs(n1: int, n2: Optional[int], block: int) -> Iterator[tuple[slice, Optional[slice]]]:
    """Order in which to visit ``(rows, cols)`` example blocks.

    Yields ``(rows, None)`` to mean "the diagonal block of a symmetric kernel" and
    ``(rows, cols)`` otherwise. For a symmetric kernel only blocks with ``cols >= rows`` are
    visited (the sink mirrors them).
    """
    rows_list = example_blocks(n1, block)
    if n2 is None:
        for i, rows in enumerate(rows_list):
            yield rows, None
            for cols in rows_list[i + 1 :]:
                yield rows, cols
    else:
        for rows in rows_list:
            for cols in example_blocks(n2, block):
                yield rows, cols


def blocked_contract(
    n1: int,
    n2: Optional[int],
    block: int,
    factors: Callable[[int, slice], object],
    contract: Callable[[object, object, slice, slice], None],
) -> None:
    """Drive a factor/contract computation over example blocks with bounded memory.

    ``factors(side, rows)`` computes the per-example factors of examples ``rows`` of input
    ``side`` (1 or 2); ``contract(f_rows, f_cols, rows, cols)`` adds their kernel block. The
    factors of the current row block are kept while the column blocks stream past, so with
    ``B = ceil(N / block)`` blocks a symmetric kernel costs ``B (B + 1) / 2`` factor
    computations of ``block`` examples (one when everything fits in one block).
    """
    current: Optional[slice] = None
    f_rows = None
    for rows, cols in block_pairs(n1, n2, block):
        if rows != current:
            f_rows = None  # free before computing the next
            f_rows = factors(1, rows)
            current = rows
        if cols is None:
            contract(f_rows, f_rows, rows, rows)
        else:
            f_cols = factors(1 if n2 is None else 2, cols)
            contract(f_rows, f_cols, rows, cols)
            del f_cols


#: Copies of one example's Jacobian rows ``(O, numel)`` the Jacobian path holds at its peak (the
#: rows, the per-use gradients summed into them, vmap's batched intermediates): measured 3.2x
#: and 3.3x on a GPT-2 with tied embeddings (O = 2000 and 4000, peak RSS over the rows). The
#: engine's memory check (estimate.py) and the Jacobian path's block size both use it.
JACOBIAN_ROW_COPIES = 3


def block_size_for(bytes_per_example: float, n: int, chunk_size: Optional[int]) -> int:
    """Examples per block: the user's ``chunk_size``, else as many as fit the factor budget
    (two blocks are alive at once)."""
    if chunk_size is not None:
        return max(1, min(chunk_size, n))
    fit = int(factor_budget() // max(2.0 * bytes_per_example, 1.0))
    return max(1, min(n, fit))


def check_same_outputs(o1: int, o2: int) -> None:
    """Both inputs must give the same output size per example."""
    if o1 != o2:
        raise ValueError(
            f"the model gives {o1} outputs per example on x1 but {o2} on x2; the kernel needs "
            "the same output size for both (e.g. equal sequence lengths)"
        )


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# (model, reason) pairs already warned about: one warning per model and reason, not per call
# (a tracker measures the same model hundreds of times).
_WARNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def warn_once(model: Any, reason: str, message: str, stacklevel: int = 2) -> None:
    """``warnings.warn(message, RuntimeWarning)`` the first time ``reason`` comes up for
    ``model`` (every time for an object that cannot be weakly referenced)."""
    try:
        seen = _WARNED.setdefault(model, set())
    except TypeError:
        seen = set()
    if reason in seen:
        return
    seen.add(reason)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)
