"""Cut points between layer groups: layer inputs that separate every earlier layer from the
output (:func:`_cut_points`) and the cotangent caches of one group's factor passes
(:class:`_CutPass`, roles re-verified on every pass's graph by :func:`_cut_roles`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from .capture import _Capture, _example0_gradients


def _separated(root: Tensor, cut: Tensor, targets: Sequence[Tensor]) -> bool:
    """Whether every autograd path from ``root`` to the ``targets`` passes through ``cut``.

    A walk of the autograd graph from ``root`` that does not cross the edge into ``cut``
    (its node and output number: views and every other consumer of ``cut`` lead into that
    edge, so they count as passing through it) must not reach a target's node. Structural,
    so exact: then ``∂root/∂target = (∂root/∂cut)(∂cut/∂target)`` for any values.
    """
    if root.grad_fn is None or cut.grad_fn is None:
        return False
    stop_node, stop_nr = cut.grad_fn, cut.output_nr
    goal = {t.grad_fn for t in targets if t.grad_fn is not None}
    seen = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        if node in goal:
            return False
        seen.add(node)
        for nxt, nr in node.next_functions:
            if nxt is not None and not (nxt is stop_node and nr == stop_nr):
                stack.append(nxt)
    return True


def _cut_points(
    out: Tensor, cap: _Capture, order: Sequence[str]
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Cut points of the probe pass: ``{name: (per-example shape, dtype) of the cut}`` for every
    ``name`` (in forward order) whose first call's input ``h`` separates everything before
    it from the output -- every use of an earlier parameter and every earlier cut reaches the
    output only through ``h`` (:func:`_separated`, e.g. the input of a ResNet block or of a
    transformer layer) -- and carries the examples row by row on dim 0 (verified like the
    uses in :func:`_verify_batch_mapping`). A later layer group's backward caches ``∂out/∂h``
    there, so an earlier group's backward starts at ``h`` instead of at the output.
    """
    n = out.shape[0]
    handles: dict[str, list[Tensor]] = {}
    for use in cap.uses:
        for k in (use.weight, use.bias):
            if k is not None:
                handles.setdefault(k, []).append(use.out)
    candidates: dict[str, Tensor] = {}
    before: list[Tensor] = []
    for i, name in enumerate(order):
        h = cap.entry(name)
        if (
            i > 0
            and h is not None
            and h.grad_fn is not None
            and h.dim() >= 1
            and h.shape[0] == n
            and h.is_floating_point()
            and _separated(out, h, before)
        ):
            candidates[name] = h
        before.extend(handles.get(name, []))
        if h is not None and h.grad_fn is not None:
            before.append(h)
    if not candidates or n < 2:
        return {}
    # rows per example: the gradient of example 0's outputs must vanish on the other rows
    names = list(candidates)
    grads = _example0_gradients(out, [candidates[k] for k in names])
    return {
        k: (tuple(candidates[k].shape[1:]), candidates[k].dtype)
        for k, g in zip(names, grads)
        if g is not None and not bool((g[1:] != 0).any())
    }


@dataclasses.dataclass
class _CutPass:
    """Cotangent caching for the factor passes of one layer group (see :func:`_cut_points`).

    ``end``: the cut after the group, whose cached ``∂out/∂h`` (``end_cot``, ``(N, O, *h)``)
    starts the backward (None, or a failed check: the backward starts at the output).
    ``stores``: cuts inside the group whose ``∂out/∂h`` earlier groups need, written into
    the ``(N, O, *h)`` buffers. ``grad_names``: parameters before the group made to require
    grad, so that a cut at the group's first layer has a graph. ``failed``: stores that could
    not be verified in some pass (their buffers must not be used).
    """

    end: Optional[str]
    end_cot: Optional[Tensor]
    stores: dict[str, Tensor]
    grad_names: list[str]
    failed: set[str] = dataclasses.field(default_factory=set)
    done: bool = False  # every row of the stores was written

    def rows(self, i: slice) -> _CutPass:
        return _CutPass(
            self.end,
            None if self.end_cot is None else self.end_cot[i],
            {k: v[i] for k, v in self.stores.items()},
            self.grad_names,
            self.failed,
        )


def _cut_roles(
    cuts: Optional[_CutPass], cap: _Capture, out: Tensor, targets: list[Tensor]
) -> tuple[Optional[Tensor], Optional[Tensor], dict[str, Tensor]]:
    """``(root, root_cot, {store name: cut tensor})`` of one pass, every role verified on
    this pass's graph: a store must be a per-example tensor of the cache's shape with a
    graph (else it is marked failed), the root must separate the targets and the stores from
    the output (else the backward starts at the output)."""
    if cuts is None:
        return None, None, {}
    n = out.shape[0]

    def matches(h: Optional[Tensor], cache: Tensor) -> bool:
        # a graph, and the cache's per-example shape, dtype and device
        return (
            h is not None
            and h.grad_fn is not None
            and tuple(h.shape) == (n, *cache.shape[2:])
            and (h.dtype, h.device) == (cache.dtype, cache.device)
        )

    stores: dict[str, Tensor] = {}
    for k, buf in cuts.stores.items():
        h = cap.entry(k)
        if matches(h, buf):
            stores[k] = h
        else:
            cuts.failed.add(k)
    if cuts.end is None or cuts.end_cot is None:
        return None, None, stores
    h = cap.entry(cuts.end)
    if not matches(h, cuts.end_cot) or not _separated(out, h, [*targets, *stores.values()]):
        return None, None, stores
    return h, cuts.end_cot, stores
