"""Factor passes: one forward and a batched backward over the O one-hot output cotangents
(:func:`_output_gradients`) give the factors of every planned parameter (:func:`_factors`),
split into passes of bounded activation memory (:func:`_factors_in_passes`)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..._functional import FunctionalModel, InputBatch, slice_batch
from ..errors import StructuredPlanError
from .capture import _forward, _per_example, _rows_per_example, _use_rows_ok
from .contract import _Factors, _per_example_grads, _row_grad, _weight_factors
from .cuts import _cut_roles, _CutPass
from .planning import _Plan
from .tied import _TiedFactors, tied_factors

# Above this many bytes of output-gradients for all O outputs at once, backpropagate the O
# one-hot cotangents one at a time: a batched backward also holds O copies of every
# intermediate gradient, which would break the memory bound on large models.
_BATCHED_BACKWARD_BYTES = 32 * 2**20


def _output_gradients(
    out: Tensor,
    targets: list[Tensor],
    root: Optional[Tensor] = None,
    root_cot: Optional[Tensor] = None,
) -> Iterator[tuple[Union[int, slice], tuple[Optional[Tensor], ...]]]:
    """``(a, ∂(Σ_n out[n, a]) / ∂targets)`` for every output ``a``, or once
    ``(slice(None), gradients (O, *target.shape))`` for all outputs of a batched backward.

    Examples are independent (eval semantics), so the gradient of ``Σ_n out[n, a]`` at example
    ``n``'s slice of a target is ``∂out[n, a]/∂target[n]``. Small problems use one batched
    backward over the O one-hot cotangents (larger matmuls, ~1.5x faster on an MLP at N = 32);
    large ones, or ops without a batching rule, fall back to O plain backward passes.

    With a cut (``root``, a tensor every path from the targets to ``out`` passes through, and
    ``root_cot`` ``(N, O, *root.shape[1:])``, the cached ``∂out[:, a]/∂root``), the backward
    starts at the cut: the layers after it are not differentiated again.
    """
    if root is None or root_cot is None:
        # the output as its own root: ∂out[:, a]/∂out is one-hot (a view, nothing allocated)
        root = out
        o = out.shape[1]
        root_cot = torch.eye(o, dtype=out.dtype, device=out.device).expand(out.shape[0], o, o)
    o = root_cot.shape[1]
    size = o * sum(t.numel() * t.element_size() for t in targets)
    if size <= _BATCHED_BACKWARD_BYTES:
        cot = root_cot.transpose(0, 1)
        try:
            with warnings.catch_warnings():
                # vmap's "performance drop" note for ops without a batching rule: still correct.
                warnings.filterwarnings("ignore", message=".*performance drop.*")
                batched = torch.autograd.grad(
                    [root],
                    targets,
                    [cot],
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
        except RuntimeError:
            batched = None
        if batched is not None:
            yield slice(None), batched  # every output at once: (O, *target.shape) per target
            return
    for a in range(o):
        yield (
            a,
            torch.autograd.grad(
                [root], targets, [root_cot[:, a]], retain_graph=a < o - 1, allow_unused=True
            ),
        )


def _factors(
    fm: FunctionalModel,
    params: Mapping[str, Tensor],
    plan: _Plan,
    x: InputBatch,
    cuts: Optional[_CutPass] = None,
) -> dict[str, Any]:
    """One forward + one batched backward (O one-hot cotangents) for the examples of ``x``;
    with ``cuts``, the backward starts at the cached cut after the group where it verifiably
    separates the group from the output, and fills the cotangent caches of ``cuts.stores``."""
    names = [*plan.weights, *plan.biases, *plan.folded.values(), *plan.shared.values()]
    wrt = {k: params[k].detach().requires_grad_() for k in names}
    const = {k: v.detach() for k, v in params.items() if k not in wrt}
    entries: list[str] = []
    if cuts is not None:
        for k in cuts.grad_names:
            if k in const:
                const[k].requires_grad_()
        entries = [k for k in (cuts.end, *cuts.stores) if k is not None]
    out, cap = _forward(fm, const, wrt, x, entries, "on" if plan.expand else "off")
    n, o = out.shape
    changed = cap.other & set(wrt)
    ratios: dict[str, tuple[int, ...]] = {}
    for use in cap.uses:
        for k in (use.weight, use.bias):
            if k in wrt:
                ratios[k] = (*ratios.get(k, ()), _rows_per_example(use, n))
                if not _use_rows_ok(use, n):
                    changed.add(k)
    changed.update(k for k in wrt if ratios.get(k, ()) != plan.row_ratios.get(k, ()))
    if changed:  # the plan was made on the probe examples; its uses must hold for every example
        reason = (
            f"parameters {sorted(changed)} are used differently on some examples than on the "
            "probe examples (data-dependent control flow)"
        )
        err = StructuredPlanError(
            f"{reason}; use implementation='jacobian' (or 'auto', which switches by itself)"
        )
        err.reason = reason  # type: ignore[attr-defined] - auto's warning, without the advice
        raise err
    uses = [u for u in cap.uses if (u.weight in wrt) or (u.bias in wrt)]
    weight_uses = [u for u in uses if u.weight in plan.weights]
    row_uses = [(name, u) for name in plan.biases for u in uses if name in (u.bias, u.weight)]
    # O plain backward passes (one per output, all examples at once; cheaper and more robust
    # than vmapping the backward): weight uses keep G in (N, O, ...) buffers, bias and norm
    # rows are reduced right away. A ``stored`` weight's G lives only for this pass: its
    # per-example gradients are built from it below (one unfold, one bmm for all outputs).
    shapes = {id(u): (n, o, *_per_example(u.out, n).shape[1:]) for u in weight_uses}
    grads: dict[int, Tensor] = {}
    rows = {name: out.new_zeros((n, o, params[name].numel())) for name in plan.biases}
    handles = list({id(u): u for u in [*weight_uses, *(u for _, u in row_uses)]}.values())
    targets = [u.out for u in handles]
    root, root_cot, stores = _cut_roles(cuts, cap, out, targets)
    store_names = list(stores)
    for a, ga in _output_gradients(out, [*targets, *stores.values()], root, root_cot):
        # all outputs at once (O, ...): used as (N, O, ...) views, no per-output copies
        whole = isinstance(a, slice)
        for k, g in zip(store_names, ga[len(handles) :]):
            if g is None:
                cuts.stores[k][:, a].zero_()
            else:
                cuts.stores[k][:, a] = g.transpose(0, 1) if whole else g
        by_use = {
            id(u): (
                g.reshape(o, *_per_example(u.out, n).shape).transpose(0, 1)
                if whole
                else _per_example(g, n)
            )
            for u, g in zip(handles, ga)
            if g is not None
        }
        for u in weight_uses:
            if id(u) in by_use and whole:
                grads[id(u)] = by_use[id(u)]
            elif id(u) in by_use:
                if id(u) not in grads:
                    grads[id(u)] = u.out.new_zeros(shapes[id(u)])
                grads[id(u)][:, a] = by_use[id(u)]
        for name, u in row_uses:
            if id(u) in by_use:
                numel = params[name].numel()
                for b in range(o) if whole else (a,):
                    g = by_use[id(u)][:, b] if whole else by_use[id(u)]
                    rows[name][:, b] += _row_grad(u, g, name, numel)
        del ga, by_use
    for u in weight_uses:  # a use the outputs do not depend on: zero output-gradients
        if id(u) not in grads:
            grads[id(u)] = u.out.new_zeros(shapes[id(u)])
    del out, cap
    result: dict[str, Any] = dict(rows)
    for name, strategy in plan.weights.items():
        sel = [u for u in weight_uses if u.weight == name]
        g_sel = [grads.pop(id(u)) for u in sel]
        if strategy.startswith("tied"):
            result[name] = tied_factors(sel, g_sel, params[name])
            continue
        f = _weight_factors(sel, g_sel, params[name], name in plan.folded)
        if strategy == "stored":
            f = _per_example_grads(f.g, f.columns(), 0, f.g.shape[3])  # (N, O, P)
        result[name] = f
        del g_sel
    return result


def _empty_rows(value: Any, n: int) -> Any:
    """Uninitialised factors like ``value`` (one pass's rows) for ``n`` examples."""
    if isinstance(value, Tensor):
        return value.new_empty((n, *value.shape[1:]))
    if isinstance(value, _TiedFactors):
        return _TiedFactors({k: _empty_rows(f, n) for k, f in value.parts.items()}, value.shape)
    inputs = [(op, inp.new_empty((n, *inp.shape[1:])), meta) for op, inp, meta in value.inputs]
    g = value.g.new_empty((n, *value.g.shape[1:]))
    return _Factors(inputs, g, value.onehot, value.fold_bias, value.weight_shape)


def _copy_rows(dst: Any, src: Any, rows: slice) -> None:
    if isinstance(dst, Tensor):
        dst[rows].copy_(src)
        return
    if isinstance(dst, _TiedFactors):
        for k, f in dst.parts.items():
            _copy_rows(f, src.parts[k], rows)
        return
    for (_, d, _), (_, s, _) in zip(dst.inputs, src.inputs):
        d[rows].copy_(s)
    dst.g[rows].copy_(src.g)


def _factors_in_passes(
    fm: FunctionalModel,
    params: Mapping[str, Tensor],
    plan: _Plan,
    x: InputBatch,
    n: int,
    pass_rows: int,
    cuts: Optional[_CutPass] = None,
) -> dict[str, Any]:
    """:func:`_factors` of ``n`` examples, ``pass_rows`` examples per forward/backward pass
    (activation memory), written into preallocated factors for all ``n``."""
    if pass_rows >= n:
        result = _factors(fm, params, plan, x, cuts)
        if cuts is not None:
            cuts.done = True
        return result
    out: dict[str, Any] = {}
    for r0 in range(0, n, pass_rows):
        rows = slice(r0, min(n, r0 + pass_rows))
        part = _factors(
            fm, params, plan, slice_batch(x, rows), None if cuts is None else cuts.rows(rows)
        )
        for name, value in part.items():
            if name not in out:
                out[name] = _empty_rows(value, n)
            _copy_rows(out[name], value, rows)
        del part
    if cuts is not None:
        cuts.done = True
    return out
