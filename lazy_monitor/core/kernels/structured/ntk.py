"""The structured kernel: probe plan, auto's cached path choice, layer groups run one after
the other over example blocks, Jacobian contraction of the fallback parameters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor

from ..._functional import FunctionalModel, InputBatch, map_batch, slice_batch
from .._common import (
    _BlockSink,
    check_same_outputs,
    contract_rows,
    factor_budget,
    kernel_shape,
    symmetric_block,
    symmetric_blocks,
    symmetric_fraction,
)
from .._memo import ModelMemo, call_key
from ..errors import StructuredPlanError
from ..jacobian import JacobianRows, jacobian_ntk
from .capture import _cached_verification, _Capture, _forward
from .contract import _contract_gram, _contract_outer, _contract_per_example
from .cuts import _CutPass
from .memory import _activation_bytes_per_example, _block_sizes, _work_plan
from .passes import _factors_in_passes
from .planning import _choose_path, _make_plan, _Plan
from .tied import contract_tied


def structured_ntk(
    fm: FunctionalModel,
    params: Mapping[str, Tensor],
    x1: InputBatch,
    x2: Optional[InputBatch],
    n1: int,
    n2: Optional[int],
    kind: str,
    dtype: torch.dtype,
    device: torch.device,
    keep_blocks: bool,
    chunk_size: Optional[int],
    rows_fn: Optional[JacobianRows] = None,
    choose: bool = False,
    n_out: Optional[int] = None,
) -> _BlockSink:
    """Compute the kernel with structured rules where they apply, the Jacobian path elsewhere.

    A probe pass on the first example finds the parameter uses and sizes the example blocks
    (factors of ``row`` examples are kept while blocks of ``col`` examples stream past).
    ``n_out``: outputs per example if the caller knows them. ``choose``
    (``implementation="auto"``): parameters whose structured contraction would cost
    more than Jacobian rows -- or all of them, when the Jacobian path is cheaper for the whole
    kernel -- go to the Jacobian remainder (:func:`_choose_path`).
    """
    key = call_key(fm, params, x1, x2) + (keep_blocks,)
    if choose and _PATHS.get(fm, key, ()) == "jacobian":
        # auto chose the Jacobian path for this model and these shapes before: skip the probe
        # (``n_out``: the caller's outputs per example, else one example's forward)
        o = n_out
        if o is None:
            with torch.no_grad():
                o = fm(params, slice_batch(x1, slice(0, 1))).shape[1]
        sink = _BlockSink(
            kind, kernel_shape(kind, n1, n2 or n1, o), dtype, device, keep_blocks, x2 is None
        )
        jacobian_ntk(fm, params, list(params), x1, x2, n1, n2, o, sink, chunk_size, rows_fn)
        return sink
    # The plan and its memory split, remembered for the same probe examples (a tracker's
    # repeated measurements): skips the probe pass and its verification backward. Every
    # factor pass still checks that the uses it captures are the plan's
    # (:class:`~..errors.StructuredPlanError` otherwise); a remembered plan that fails that
    # check is forgotten and the call starts over from a fresh probe pass.
    plan_key = (key, choose, factor_budget(), chunk_size)
    probe_values = [slice_batch(x1, slice(0, min(n1, 2)))]
    remembered = _PLANS.get(fm, plan_key, probe_values)
    args = (fm, params, x1, x2, n1, n2, kind, dtype, device, keep_blocks, chunk_size, rows_fn)
    if remembered is not None:
        try:
            return _run_plan(*args, *remembered)
        except StructuredPlanError:
            _PLANS.forget(fm, plan_key)
    plan, out, cap, o = _probe_plan(fm, params, x1, x2, n1, n2, keep_blocks, choose)
    if choose:
        _PATHS.put(fm, key, (), plan.path)
    work = [
        (part, size, _activation_bytes_per_example(cap, part, o), spec)
        for part, size, spec in _work_plan(
            params, cap, plan, n1, n2, o, keep_blocks, chunk_size, out
        )
    ]
    del out, cap
    _PLANS.put(fm, plan_key, probe_values, (plan, work, o))
    return _run_plan(*args, plan, work, o)


def _run_plan(
    fm: FunctionalModel,
    params: Mapping[str, Tensor],
    x1: InputBatch,
    x2: Optional[InputBatch],
    n1: int,
    n2: Optional[int],
    kind: str,
    dtype: torch.dtype,
    device: torch.device,
    keep_blocks: bool,
    chunk_size: Optional[int],
    rows_fn: Optional[JacobianRows],
    plan: _Plan,
    work: list[tuple[_Plan, int, int, Any]],
    o: int,
) -> _BlockSink:
    """The kernel of ``plan``: its layer groups (``work``: sub-plan, factor bytes and
    activation bytes per example, cut spec) one after the other, then the Jacobian
    remainder."""
    sink = _BlockSink(
        kind,
        kernel_shape(kind, n1, n2 or n1, o),
        dtype,
        device,
        keep_blocks,
        symmetric=x2 is None,
    )
    cache: dict[str, Tensor] = {}  # cut name -> (N, O, *cut) cached ∂out/∂cut
    for i, (part, part_bytes, act_bytes, spec) in enumerate(work):
        cuts = None
        if spec is not None:
            stores = {
                k: torch.empty((n1, o, *shape), dtype=cut_dtype, device=device)
                for k, (shape, cut_dtype) in spec.stores.items()
            }
            end_cot = cache.get(spec.end) if spec.end is not None else None
            cuts = _CutPass(spec.end, end_cot, stores, spec.grad_names)
        if part.weights or part.biases:
            _structured_blocks(
                fm, params, part, x1, x2, n1, n2, o, sink, chunk_size, part_bytes, act_bytes, cuts
            )
        if cuts is not None:
            if cuts.done:
                cache.update((k, v) for k, v in cuts.stores.items() if k not in cuts.failed)
            later = {w[3].end for w in work[i + 1 :] if w[3] is not None}
            for k in [k for k in cache if k not in later]:
                del cache[k]  # no group left starts its backward there
            del cuts
    if plan.fallback:
        jacobian_ntk(fm, params, plan.fallback, x1, x2, n1, n2, o, sink, chunk_size, rows_fn)
    return sink


# auto's whole-call decision per module for the same shapes (the cost model reads shapes only),
# and the structured plan with its memory split for the same probe examples.
_PATHS = ModelMemo()
_PLANS = ModelMemo()


def _probe_plan(
    fm: FunctionalModel,
    params: Mapping[str, Tensor],
    x1: InputBatch,
    x2: Optional[InputBatch],
    n1: int,
    n2: Optional[int],
    keep_blocks: bool,
    choose: bool,
) -> tuple[_Plan, Tensor, _Capture, int]:
    """``(plan, probe output, capture, O)`` from a probe pass on two examples (the first one
    twice if there is only one), so that the batch mapping of every use can be verified: a
    leading dim of 2 that carries the examples row by row."""
    probe_x = (
        slice_batch(x1, slice(0, 2))
        if n1 >= 2
        else map_batch(x1, lambda t: t.repeat(2, *[1] * (t.dim() - 1)))
    )
    wrt = {k: v.detach().requires_grad_() for k, v in params.items()}
    out, cap = _forward(fm, {}, wrt, probe_x, list(wrt))
    o = out.shape[1]
    if o == 0:
        raise ValueError("the model output has 0 entries per example; nothing to differentiate")
    if x2 is not None:
        with torch.no_grad():
            check_same_outputs(o, fm(params, slice_batch(x2, slice(0, 1))).shape[1])
    _cached_verification(fm, params, probe_x, out, cap)
    n_max = max(n1, n2 or 0)
    # a symmetric kernel contracts only the upper example blocks (builds are not halved)
    pairs = symmetric_fraction(n1) if x2 is None else 1.0
    plan = _make_plan(params, cap, n_max, o, keep_blocks, pairs=pairs, symmetric=x2 is None)
    if choose:
        _choose_path(plan, params, cap, n_max, o, pairs)
    if n1 >= 2 and (plan.weights or plan.biases):
        _check_per_example(fm, params, probe_x, out)
    return plan, out, cap, o


def _check_per_example(
    fm: FunctionalModel, params: Mapping[str, Tensor], probe_x: InputBatch, out: Tensor
) -> None:
    """The factor passes run the examples as one batch, the Jacobian path (and the kernel's
    definition) one example at a time: the two agree only if each row of the batched output
    is that example's own output. A model where one example's values decide for the whole
    batch (``if x[0, 0] > 0``) or that normalises over the batch fails this on the probe when
    its two examples disagree. Tolerance: a branch or a batch statistic changes the output by
    O(1), batched vs single GEMMs by rounding only."""
    tol = max(1e-4, 100 * torch.finfo(out.dtype).eps)
    with torch.no_grad():
        for i in range(2):
            alone = fm(params, slice_batch(probe_x, slice(i, i + 1)))[0]
            row = out[i].detach()
            # a non-finite output (a model that gives NaN on a padded row) is compared as it
            # is, not as a scale: its kernel is non-finite either way
            scale = float(row.abs().nan_to_num(0.0, 0.0, 0.0).max()) if row.numel() else 0.0
            if alone.shape != row.shape or not torch.allclose(
                alone, row, rtol=tol, atol=tol * scale, equal_nan=True
            ):
                reason = (
                    f"example {i}'s output computed alone differs from its row of the batched "
                    "output (one example's values decide for the batch, or the model uses "
                    "batch statistics), so the per-example kernel needs the Jacobian path"
                )
                err = StructuredPlanError(
                    f"{reason}; use implementation='auto' (falls back by itself) or 'jacobian'"
                )
                err.reason = reason  # type: ignore[attr-defined] - auto's warning
                raise err


def _structured_blocks(
    fm: FunctionalModel,
    params: Mapping[str, Tensor],
    plan: _Plan,
    x1: InputBatch,
    x2: Optional[InputBatch],
    n1: int,
    n2: Optional[int],
    o: int,
    sink: _BlockSink,
    chunk_size: Optional[int],
    per_example_bytes: int,
    activation_bytes: int = 1,
    cuts: Optional[_CutPass] = None,
) -> None:
    kind = sink.kind
    # Examples per forward/backward pass while factors are built: activations of half the
    # budget (the factors' own budget is separate).
    pass_rows = max(1, int(0.5 * factor_budget()) // max(1, activation_bytes))

    def factors(side: int, rows: slice) -> dict[str, Any]:
        x = slice_batch(x1 if side == 1 else x2, rows)
        n = rows.stop - rows.start
        # cut caches hold all n1 row examples: used only for the one symmetric block
        c = cuts if (side == 1 and n == n1 and x2 is None) else None
        return _factors_in_passes(fm, params, plan, x, n, pass_rows, c)

    def contract(fr: dict, fc: dict, rows: slice, cols: slice, same: bool) -> None:
        n = rows.stop - rows.start
        for name, strategy in plan.weights.items():
            a, b = fr[name], fc[name]
            if strategy == "stored":
                if same:
                    k = symmetric_block(n, kind, lambda i, j, d=a: contract_rows(d[i], d[j], kind))
                else:
                    k = contract_rows(a, b, kind)
                blocks: tuple[Tensor, ...] = (k,)
            elif strategy == "per_example":
                blocks = (_contract_per_example(a, b, kind, same),)
            elif strategy.startswith("tied"):
                blocks = (contract_tied(a, b, kind, same, strategy),)
            else:
                if strategy == "outer":
                    bias = name in plan.shared

                    def fn(i: slice, j: slice, a=a, b=b, bias=bias) -> tuple[Tensor, ...]:
                        return _contract_outer(a.rows(i), b.rows(j), kind, bias)
                else:

                    def fn(i: slice, j: slice, a=a, b=b) -> tuple[Tensor, ...]:
                        return (_contract_gram(a.rows(i), b.rows(j), kind),)

                # outer products are GEMMs of O rows per example: small ones in one block
                rows_per = o if strategy == "outer" else None
                blocks = (
                    symmetric_blocks(n, kind, fn, rows_per)
                    if same
                    else fn(slice(None), slice(None))
                )
            sink.add(name, blocks[0], rows, cols)
            if name in plan.shared:
                sink.add(plan.shared[name], blocks[1], rows, cols)
        for name in plan.biases:
            if same:
                block = symmetric_block(
                    n, kind, lambda i, j, d=fr[name]: contract_rows(d[i], d[j], kind), o
                )
            else:
                block = contract_rows(fr[name], fc[name], kind)
            sink.add(name, block, rows, cols)

    n_cols = n1 if n2 is None else n2
    row_block, col_block = _block_sizes(n1, n2, chunk_size, per_example_bytes)
    for r0 in range(0, n1, row_block):
        rows = slice(r0, min(n1, r0 + row_block))
        fr = factors(1, rows)
        if x2 is None:
            contract(fr, fr, rows, rows, True)
            start = rows.stop
        else:
            start = 0
        for c0 in range(start, n_cols, col_block):
            cols = slice(c0, min(n_cols, c0 + col_block))
            fc = factors(1 if x2 is None else 2, cols)
            contract(fr, fc, rows, cols, False)
            del fc
        del fr
