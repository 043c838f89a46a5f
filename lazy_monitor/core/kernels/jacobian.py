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

import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor

from .._functional import FunctionalModel, InputBatch, batch_size, map_batch, slice_batch
from ._common import (
    JACOBIAN_ROW_COPIES,
    _BlockSink,
    block_size_for,
    blocked_contract,
    contract_rows,
    symmetric_block,
    warn_once,
)

__all__ = ["JacobianRows", "jacobian_ntk", "loop_jacobian", "per_example_jacobian"]

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
    """``{name: (N, O, numel)}``: Jacobian rows of each example w.r.t. ``params[names]``
    (``vmap(jacrev)``; raises where ``vmap`` cannot run the model, see :class:`JacobianRows`)."""
    fixed = {k: v.detach() for k, v in params.items() if k not in names}
    wrt = {k: params[k].detach() for k in names}

    def f_single(p: dict[str, Tensor], xs: InputBatch) -> Tensor:
        one = map_batch(xs, lambda t: t.unsqueeze(0))
        return fm({**fixed, **p}, one)[0]

    jac = torch.func.vmap(torch.func.jacrev(f_single), in_dims=(None, 0), chunk_size=vmap_chunk)(
        wrt, x
    )
    return {k: v.reshape(v.shape[0], v.shape[1], -1) for k, v in jac.items()}


def loop_jacobian(
    fm: FunctionalModel, params: Mapping[str, Tensor], names: Sequence[str], x: InputBatch
) -> dict[str, Tensor]:
    """``{name: (N, O, numel)}`` by a plain loop: per example one forward and ``O``
    ``torch.autograd.grad`` calls. No ``vmap``, so it runs on every model autograd can
    differentiate (RNN kernels, ops without batching rules, custom ``autograd.Function``,
    Python control flow on values); memory is one example's graph plus the rows."""
    fixed = {k: v.detach() for k, v in params.items() if k not in names}
    wrt = {k: params[k].detach().requires_grad_() for k in names}
    n = batch_size(x)
    rows: dict[str, list[Tensor]] = {k: [] for k in names}
    for i in range(n):
        out = fm({**fixed, **wrt}, slice_batch(x, slice(i, i + 1)))[0]
        o = out.shape[0]
        per = {
            k: torch.zeros((o, v.numel()), dtype=v.dtype, device=v.device) for k, v in wrt.items()
        }
        # an example whose output does not depend on the parameters keeps zero rows
        for a in range(o if out.requires_grad else 0):
            grads = torch.autograd.grad(
                out[a], list(wrt.values()), retain_graph=a < o - 1, allow_unused=True
            )
            for k, g in zip(wrt, grads):
                if g is not None:
                    per[k][a] = g.reshape(-1)
        for k in names:
            rows[k].append(per[k])
        del out
    return {k: torch.stack(v) for k, v in rows.items()}


class JacobianRows:
    """Per-example Jacobian rows with one decision per engine call: ``vmap(jacrev)`` while it
    runs, the :func:`loop_jacobian` fallback (one warning naming the reason) once it has not.

    ``vmap`` fails on models it cannot batch (RNN kernels, ``PReLU``'s backward, a custom
    ``autograd.Function`` without a vmap rule, ``if`` on tensor values, ops without batching
    rules); any exception it raises means "use the loop", and if the loop fails too that error
    (the model's own) propagates.
    """

    def __init__(self) -> None:
        self.use_loop = False
        self.reason: Optional[str] = None

    def __call__(
        self,
        fm: FunctionalModel,
        params: Mapping[str, Tensor],
        names: Sequence[str],
        x: InputBatch,
    ) -> dict[str, Tensor]:
        if not self.use_loop:
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*performance drop.*")
                    return per_example_jacobian(fm, params, names, x)
            except Exception as err:  # noqa: BLE001 - any vmap failure: try the plain loop
                result = loop_jacobian(fm, params, names, x)
                self.use_loop = True
                where, what, fix = vmap_failure(fm.model, err)
                self.reason = f"{what} in {where}"
                warn_once(
                    fm.model,
                    f"vmap: {self.reason}",
                    f"torch.func.vmap cannot run {where}: {what}. The empirical NTK uses a "
                    f"per-example loop of torch.autograd.grad there (same kernel, slower); "
                    f"fix: {fix}",
                    stacklevel=2,
                )
                return result
        return loop_jacobian(fm, params, names, x)


# (pattern in the error text, what it means, how to get the batched path back)
_VMAP_CAUSES = (
    (
        r"\.item\(\)|data-dependent control flow",
        "a .item() call or Python control flow on tensor values",
        "compute on tensors instead (torch.where, masks) in {where}'s forward",
    ),
    (
        r"requires_grad_\(\)",
        "a requires_grad_() call on an activation",
        "drop requires_grad_() from {where}'s forward (or its forward hook)",
    ),
    (
        r"autograd\.Function",
        "a custom torch.autograd.Function without a vmap rule",
        "give it generate_vmap_rule = True and a separate setup_context",
    ),
    (
        r"[Bb]atching rule not implemented for (aten::[\w.]+)",
        "{op} has no vmap batching rule in this torch version",
        "none needed for the values; a torch version with a batching rule for {op} "
        "restores the batched path",
    ),
)


def vmap_failure(model: torch.nn.Module, err: BaseException) -> tuple[str, str, str]:
    """``(where, what, fix)`` of a ``vmap`` failure: the innermost submodule of ``model`` on
    the error's traceback (by name), the cause in words (the op where torch names one) and
    what to change. torch's message is quoted only when it is one short line, never cut."""
    names = {id(m): (name, m) for name, m in model.named_modules()}
    where_text = type(model).__name__
    tb = err.__traceback__
    while tb is not None:  # the innermost frame whose ``self`` is one of the model's modules
        obj = tb.tb_frame.f_locals.get("self")
        if isinstance(obj, torch.nn.Module) and id(obj) in names:
            name, module = names[id(obj)]
            where_text = f"{name!r} ({type(module).__name__})" if name else type(model).__name__
        tb = tb.tb_next
    text = str(err)
    for pattern, what, fix in _VMAP_CAUSES:
        match = re.search(pattern, text)
        if match:
            op = match.group(1) if match.groups() else ""
            return where_text, what.format(op=op), fix.format(op=op, where=where_text)
    first = text.strip().splitlines()[0] if text.strip() else ""
    quoted = f": {type(err).__name__}: {first}" if 0 < len(first) <= 160 else ""
    return (
        where_text,
        f"an op in its forward or backward has no working batching rule{quoted}",
        f"make {where_text}'s forward vmap-compatible (no in-place writes into tensors of "
        "another shape, no .item(), no ops without batching rules)",
    )


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
    rows_fn: Optional[JacobianRows] = None,
) -> None:
    """Add the Jacobian-contraction blocks of ``names`` to ``sink``.

    Parameters are grouped (small ones together) so that each group costs one
    ``vmap(jacrev)`` pass per example block; within a group the example dimension is
    processed in blocks of ``chunk_size`` examples (default: as many as the factor budget
    allows), the row block's Jacobian kept while column blocks stream past.
    """
    rows_fn = rows_fn if rows_fn is not None else JacobianRows()
    itemsize = torch.finfo(sink.dtype).bits // 8
    n_max = max(n1, n2 or 0)
    per_example = max(1, n_out)
    for group in _group(params, names, per_example * n_max):
        width = sum(params[k].numel() for k in group)
        # an example's rows cost JACOBIAN_ROW_COPIES times their size at the peak (measured)
        block = block_size_for(JACOBIAN_ROW_COPIES * width * n_out * itemsize, n_max, chunk_size)

        def factors(side: int, rows: slice, group: list[str] = group) -> dict[str, Tensor]:
            x = x1 if side == 1 else x2
            return rows_fn(fm, params, group, slice_batch(x, rows))

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
