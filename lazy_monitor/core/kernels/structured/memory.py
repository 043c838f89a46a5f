"""Memory plan: factor and activation bytes per example, layer groups whose factors fit
the budget (ending at cut points where the probe has them), row and column example blocks."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Optional

import torch
from torch import Tensor

from .._common import (
    factor_budget,
)
from .capture import _Capture
from .cuts import _cut_points
from .planning import _make_plan, _Plan, _sub_plan


def _name_bytes(cap: _Capture, plan: _Plan, params: Mapping[str, Tensor], o: int) -> dict[str, int]:
    """Bytes of factors per example of each planned parameter, from the probe pass:
    ``O·|y| + |x|`` per structured weight use (output-gradients and layer input), plus
    ``O·numel`` for per-example gradient rows (biases, norms, ``stored`` weights, which are
    built one output at a time). Folded and shared biases ride with their weight. A tied
    weight whose other rows take a Linear strategy (``"tied+…"``, :mod:`.tied`) holds a
    masked copy of its dense uses' ``G`` (``F.linear``) or input (``a @ W``) during the
    contraction: counted twice."""
    sizes = {name: 0 for name in (*plan.weights, *plan.biases)}
    for use in cap.uses:
        strategy = plan.weights.get(use.weight or "")
        if strategy is not None and strategy != "stored":
            # G and the layer input, per example (dim 0 may hold N·r rows)
            g_bytes = o * use.out.numel() // cap.n * use.out.element_size()
            a_bytes = use.inp.numel() // cap.n * use.inp.element_size()
            sizes[use.weight] += g_bytes + a_bytes
            if strategy.startswith("tied+") and use.op == "linear":
                sizes[use.weight] += a_bytes if use.meta.get("transposed") else g_bytes
    for name, strategy in plan.weights.items():
        if strategy == "stored":
            sizes[name] += o * params[name].numel() * params[name].element_size()
    for name in plan.biases:
        sizes[name] += o * params[name].numel() * params[name].element_size()
    return sizes


def _factor_bytes_per_example(
    cap: _Capture, plan: _Plan, params: Mapping[str, Tensor], o: int
) -> int:
    """Bytes of factors that one example needs (:func:`_name_bytes`, summed)."""
    return max(1, sum(_name_bytes(cap, plan, params, o).values()))


def _activation_bytes_per_example(cap: _Capture, plan: _Plan, o: int) -> int:
    """Rough bytes per example of one forward/backward pass: inputs and outputs of every
    captured use, twice over for what autograd keeps besides them (nonlinearities, residual
    sums), plus the output-gradients ``O·|y|`` of ``stored`` weights, which live only for the
    pass that builds their per-example gradients."""
    total = sum(
        2 * (u.out.numel() * u.out.element_size() + u.inp.numel() * u.inp.element_size())
        + (
            o * u.out.numel() * u.out.element_size()
            if plan.weights.get(u.weight) == "stored"
            else 0
        )
        for u in cap.uses
    )
    return max(1, total // cap.n)


def _layer_groups(
    sizes: Mapping[str, int], capacity: int, cuts: frozenset[str] = frozenset()
) -> list[list[str]]:
    """Consecutive (forward-order) groups of parameters whose factors for all rows fit
    ``capacity`` bytes per example; a parameter larger than that is a group of its own.
    With ``cuts`` (names that start a new segment at a cut point), whole segments are packed
    where they fit, so that groups end at cuts."""
    segments: list[list[str]] = []
    for name in sizes:
        if segments and name not in cuts:
            segments[-1].append(name)
        else:
            segments.append([name])
    packed: list[tuple[list[str], int]] = []
    for names in segments:
        size = sum(sizes[k] for k in names)
        if size > capacity:  # an oversize segment is packed name by name
            packed.extend(([k], sizes[k]) for k in names)
        else:
            packed.append((names, size))
    groups: list[list[str]] = []
    load = 0
    for names, size in packed:
        if groups and load + size <= capacity:
            groups[-1].extend(names)
            load += size
        else:
            groups.append(list(names))
            load = size
    return groups


def _work_plan(
    params: Mapping[str, Tensor],
    cap: _Capture,
    plan: _Plan,
    n1: int,
    n2: Optional[int],
    o: int,
    keep_blocks: bool,
    chunk_size: Optional[int],
    out: Optional[Tensor] = None,
) -> list[tuple[_Plan, int, Optional[_CutSpec]]]:
    """``(plan, factor bytes per example, cut spec)`` pieces processed one after the other.

    When the factors of every parameter for all rows fit the budget: one piece. Otherwise the
    parameters are split into consecutive groups whose factors for all rows fit: each group
    costs one forward and a backward down to its first layer for all examples, and its
    per-example gradients are built once. Blocking the *examples* instead rebuilds every factor for every pair of
    example blocks (ResNet-18, N = 128: each per-example gradient ~9 times). Only a parameter
    whose factors alone do not fit is processed in example blocks, with the strategy re-chosen
    for the rebuilds. An explicit ``chunk_size`` keeps example blocks for everything.

    With ``out`` (the probe pass's output, graph alive) and a symmetric kernel, groups end at
    cut points (:func:`_cut_points`) where the probe has them and are processed last group
    first: each group caches ``∂out/∂h`` at the cut before it, so the backward of an earlier
    group starts there instead of at the output (ResNet-18, N = 128: ~1 backward pass of
    every layer in all instead of ~2). The caches are taken out of the factor budget.
    """
    n_max = max(n1, n2 or 0)
    # forward order (first use), so that a group's backward stops at its first layer: the
    # groups of late layers are cheap to differentiate
    # A tied weight (embedding and LM head) counts at its last use: its group is the last one
    # (its backward reaches the embedding anyway), so that the cuts between the layers still
    # separate every earlier group from the output.
    first: dict[str, int] = {}
    for i, use in enumerate(cap.uses):
        for k in (use.weight, use.bias):
            if k is not None and (k not in first or plan.weights.get(k, "").startswith("tied")):
                first[k] = i
    sizes = dict(
        sorted(
            _name_bytes(cap, plan, params, o).items(),
            key=lambda kv: first.get(kv[0], len(cap.uses)),
        )
    )
    total = max(1, sum(sizes.values()))
    capacity = _row_capacity(n1, n2)
    if (total <= capacity) if chunk_size is None else (chunk_size >= n1):
        return [(plan, total, None)]
    n_cols = n1 if n2 is None else n2

    def blocked(sub: _Plan, size: int) -> tuple[_Plan, int]:
        _, col_block = _block_sizes(n1, n2, chunk_size, size)
        col_blocks = -(-n_cols // col_block) / (2.0 if n2 is None else 1.0)
        full = _make_plan(
            params, cap, n_max, o, keep_blocks, builds=1.0 + col_blocks, symmetric=n2 is None
        )
        sub = _sub_plan(full, [*sub.weights, *sub.biases])
        return sub, _factor_bytes_per_example(cap, sub, params, o)

    if chunk_size is not None:
        return [(*blocked(plan, total), None)]
    if out is not None and n2 is None:
        work = _cut_work(params, cap, plan, sizes, capacity, n1, o, out, first)
        if work is not None:
            return work
    work = []
    for names in _layer_groups(sizes, capacity):
        sub = _sub_plan(plan, names)
        size = max(1, sum(sizes[k] for k in names))
        work.append(((sub, size) if size <= capacity else blocked(sub, size)) + (None,))
    return work


@dataclasses.dataclass
class _CutSpec:
    """A layer group's cut roles (:class:`_CutPass` before its buffers exist)."""

    end: Optional[str]
    stores: dict[str, tuple[tuple[int, ...], torch.dtype]]  # cut -> per-example shape, dtype
    grad_names: list[str]


def _cut_work(
    params: Mapping[str, Tensor],
    cap: _Capture,
    plan: _Plan,
    sizes: Mapping[str, int],
    capacity: int,
    n: int,
    o: int,
    out: Tensor,
    first: Mapping[str, int],
) -> Optional[list[tuple[_Plan, int, Optional[_CutSpec]]]]:
    """Layer groups ending at cut points, last group first, or None when there is no cut
    whose cache fits a quarter of the budget or a group would not fit what the caches leave
    (two caches are alive at once: the one a group starts from and the one it writes)."""
    order = list(sizes)
    points = _cut_points(out, cap, order)
    per_example = {k: o * math.prod(shape) * dtype.itemsize for k, (shape, dtype) in points.items()}
    usable = {k: points[k] for k, b in per_example.items() if n * b <= factor_budget() // 4}
    if not usable:
        return None
    reserve = 2 * max(per_example[k] for k in usable)
    room = capacity - reserve
    groups = _layer_groups(sizes, room, frozenset(usable))
    if len(groups) < 2 or any(sum(sizes[k] for k in g) > room for g in groups):
        return None
    position = {k: i for i, k in enumerate(order)}
    ends: list[Optional[str]] = []
    for g in groups:
        after = position[g[-1]] + 1
        ends.append(next((k for k in order[after:] if k in usable), None))
    work: list[tuple[_Plan, int, Optional[_CutSpec]]] = []
    for i, g in enumerate(groups):
        needed = {e for e in ends[:i] if e is not None}
        stores = {k: usable[k] for k in g if k in needed}
        # parameters before the group require grad, so that a cut at its first layer has a graph
        start = first.get(g[0], 0)
        grad_names = [k for k in params if first.get(k, start) < start] if stores else []
        size = max(1, sum(sizes[k] for k in g))
        work.append((_sub_plan(plan, g), size, _CutSpec(ends[i], stores, grad_names)))
    return work[::-1]


def _row_capacity(n1: int, n2: Optional[int]) -> int:
    """Factor bytes per example with which all ``n1`` row examples fit one block: the whole
    budget for a symmetric kernel (no column factors stream past the rows), three quarters
    otherwise (a quarter is left for the streamed column blocks)."""
    return int(factor_budget() if n2 is None else 0.75 * factor_budget()) // n1


def _block_sizes(
    n1: int, n2: Optional[int], chunk_size: Optional[int], per_example_bytes: int
) -> tuple[int, int]:
    """Examples per row block (factors kept) and per column block (factors streamed)."""
    if chunk_size is not None:
        return chunk_size, chunk_size
    if n2 is None and per_example_bytes <= _row_capacity(n1, n2):
        return n1, n1  # one symmetric block: no column factors stream past the rows
    n_cols = n1 if n2 is None else n2
    row_block = max(1, int(0.75 * factor_budget() // per_example_bytes))
    col_block = max(1, int(0.25 * factor_budget() // per_example_bytes))
    if row_block >= n1:
        return n1, max(col_block, min(n_cols, n1))
    return row_block, col_block
