"""Jacobian contraction: materialise per-example Jacobian rows, then ``K = J Jᵀ``.

For parameters ``θ_p`` (one block at a time),

    J_p[n, a, :] = ∂f_a(x_n) / ∂θ_p        (N, O, P_p)
    K_p[n, m, a, b] = Σ_f J_p[n, a, f] J_p[m, b, f]

computed with ``vmap(jacrev(f_single))`` over examples (``O`` vector-Jacobian products per
example), i.e. method 1 of Novak et al. 2022, "Fast Finite Width Neural Tangent Kernel":
time ``N·O·[FP] + N²·O²·P``, memory ``N·O·P_p + N²·O²`` when streamed per parameter block.

This is the generic path: it works for any parameter of any model that ``torch.func`` can
``vmap``, and it is the fallback of the structured implementation for parameters without a
structured rule (normalisation layers, custom ops, tied weights with mixed uses).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor

from .._functional import FunctionalModel, InputBatch, map_batch, slice_batch
from ._common import (
    _BlockSink,
    block_size_for,
    blocked_contract,
    contract_rows,
    symmetric_block,
)

__all__ = ["jacobian_ntk"]

# Jacobian entries held per parameter group and example block: groups are formed so that one
# block of N_block·O·P_group entries stays under the factor budget.
_GROUP_ELEMENTS = 2**24


def _group(params: Mapping[str, Tensor], names: Sequence[str], per_param: int) -> list[list[str]]:
    """Greedy groups of parameters with ``per_param * Σ numel`` under ``_GROUP_ELEMENTS``, so
    that small parameters (biases, norms) share one forward/backward pass."""
    groups: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name in names:
        k = params[name].numel() * per_param
        if current and size + k > _GROUP_ELEMENTS:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += k
    if current:
        groups.append(current)
    return groups


def per_example_jacobian(
    fm: FunctionalModel,
    params: Mapping[str, Tensor],
    names: Sequence[str],
    x: InputBatch,
    vmap_chunk: Optional[int] = None,
) -> dict[str, Tensor]:
    """``{name: (N, O, numel)}``: Jacobian rows of each example w.r.t. ``params[names]``."""
    fixed = {k: v.detach() for k, v in params.items() if k not in names}
    wrt = {k: params[k].detach() for k in names}

    def f_single(p: dict[str, Tensor], xs: InputBatch) -> Tensor:
        one = map_batch(xs, lambda t: t.unsqueeze(0))
        return fm({**fixed, **p}, one)[0]

    jac = torch.func.vmap(torch.func.jacrev(f_single), in_dims=(None, 0), chunk_size=vmap_chunk)(
        wrt, x
    )
    return {k: v.reshape(v.shape[0], v.shape[1], -1) for k, v in jac.items()}


def jacobian_ntk(
    fm: FunctionalModel,
    params: Mapping[str, Tensor],
    names: Sequence[str],
    x1: InputBatch,
    x2: Optional[InputBatch],
    n1: int,
    n2: Optional[int],
    n_out: int,
    sink: _BlockSink,
    chunk_size: Optional[int] = None,
) -> None:
    """Add the Jacobian-contraction blocks of ``names`` to ``sink``.

    Parameters are grouped (small ones together) so that each group costs one
    ``vmap(jacrev)`` pass per example block; within a group the example dimension is
    processed in blocks of ``chunk_size`` examples (default: as many as the factor budget
    allows), the row block's Jacobian kept while column blocks stream past.
    """
    itemsize = torch.finfo(sink.dtype).bits // 8
    n_max = max(n1, n2 or 0)
    per_example = max(1, n_out)
    for group in _group(params, names, per_example * n_max):
        width = sum(params[k].numel() for k in group)
        block = block_size_for(width * n_out * itemsize, n_max, chunk_size)

        def factors(side: int, rows: slice, group: list[str] = group) -> dict[str, Tensor]:
            x = x1 if side == 1 else x2
            return per_example_jacobian(fm, params, group, slice_batch(x, rows))

        def contract(
            fa: dict[str, Tensor], fb: dict[str, Tensor], rows: slice, cols: slice
        ) -> None:
            for name, ja in fa.items():
                if fa is fb:  # diagonal block of a symmetric kernel
                    block = symmetric_block(
                        ja.shape[0],
                        sink.kind,
                        lambda i, j, ja=ja: contract_rows(ja[i], ja[j], sink.kind),
                    )
                else:
                    block = contract_rows(ja, fb[name], sink.kind)
                sink.add(name, block, rows, cols)

        blocked_contract(n1, n2, block, factors, contract)
