"""A weight with uses of different kinds: a tied input embedding and LM head, a weight used
both as ``F.linear(x, W)`` and as ``x @ W``.

For ``W (V, d)`` the per-example gradient is the sum of its uses' contributions, each a sum
of outer products of a row factor (length ``V``) and a column factor (length ``d``):

=====================  ============================  ===========================
use                    rows ``V`` carry              columns ``d`` carry
=====================  ============================  ===========================
``y = a Wᵀ`` (linear)  ``G[n, a, t]`` (d_out = V)    ``A[n, t]``
``y = a @ W``          ``A[n, t]`` (d_in = V)        ``G[n, a, t]``
``y = W[ids]``         ``e_{ids[n, t]}`` (one-hot)   ``G[n, a, t]``
=====================  ============================  ===========================

so ``K[n,a,m,b] = <dW[n,a], dW[m,b]>`` is a sum over rows. An embedding contributes only to
the rows of the token ids that occur, so for a pair of example blocks with ids ``S`` (at
most ``N·T`` rows, usually far fewer than ``V``) the kernel splits exactly into

* rows ``S``: the per-example gradient of *all* uses restricted to those rows,
  ``(N, O, |S|·d)``, built from the factors chunk by chunk and contracted
  (:func:`_restricted_rows`);
* the other rows: only the dense uses of one orientation contribute, so the existing
  Linear strategies (``gram``/``outer``/``per_example`` of :mod:`.contract`) apply to their
  factors with the ``S`` channels zeroed (:func:`_masked`).

Without an embedding use, or with dense uses of both orientations (``F.linear`` and
``@`` of one weight), ``S`` is every row: the per-example gradient built in row chunks.
No ``V × d`` per-example gradient is held at once either way (chunks of
:data:`~.contract._WORK_ELEMENTS`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from .._common import contract_rows, symmetric_block
from ..cost import tied_costs
from .capture import _Use
from .contract import (
    _WORK_ELEMENTS,
    _contract_gram,
    _contract_outer,
    _Factors,
    _weight_factors,
)

# a use's role in a tied weight: "linear" (rows carry G), "transposed" (rows carry A),
# "embedding" (rows carry the one-hot ids)
_PARTS = ("linear", "transposed", "embedding")


def _part(use: _Use) -> str:
    if use.op == "embedding":
        return "embedding"
    return "transposed" if use.meta.get("transposed", False) else "linear"


def tied_supported(roles: list[tuple[str, _Use]], weight: Tensor) -> bool:
    """A 2-D weight used only as a weight of Linear-type or Embedding ops (no bias/norm role,
    no convolution)."""
    return weight.dim() == 2 and all(
        role == "weight" and u.op in ("linear", "embedding") for role, u in roles
    )


def tied_plan(
    uses: list[_Use],
    weight: Tensor,
    n: int,
    o: int,
    probe_n: int,
    builds: float,
    pairs: float,
    id_blocks: int = 2,
) -> tuple[str, float]:
    """``(strategy, cost)`` of a tied weight (``probe_n`` examples in the captured pass; the
    rows of a pair of example blocks are the ids of ``id_blocks`` blocks of ``n`` examples):
    ``"tied"`` (per-example gradient of every row) or ``"tied+<rest>"`` (rows of the
    occurring ids, and the Linear strategy ``rest`` for the dense uses on the other rows),
    whichever the cost model prices lower."""
    v, d = weight.shape
    t = {p: 0 for p in _PARTS}  # positions per example of each kind of use
    for u in uses:
        p = _part(u)
        size = (
            u.inp.numel() if p == "embedding" else u.out.numel() // (d if p == "transposed" else v)
        )
        t[p] += size // max(1, probe_n)
    s = min(v, id_blocks * n * t["embedding"])  # at most, ids of every position
    options = tied_costs(n, o, t, v, d, s, builds=builds, pairs=pairs)
    strategy = min(options, key=options.__getitem__)
    return strategy, options[strategy]


def tied_macs(uses: list[_Use], weight: Tensor, probe_n: int) -> float:
    """Multiply-adds per example of the uses (an embedding lookup: one per element)."""
    v, d = weight.shape
    total = 0
    for u in uses:
        inner = {"linear": d, "transposed": v, "embedding": 1}[_part(u)]
        total += u.out.numel() * inner
    return float(total // max(1, probe_n))


@dataclasses.dataclass
class _TiedFactors:
    """The factors of each kind of use of one tied weight (:class:`~.contract._Factors`)."""

    parts: dict[str, _Factors]
    shape: tuple[int, int]  # the weight's (V, d)

    def rows(self, i: slice) -> _TiedFactors:
        return _TiedFactors({k: f.rows(i) for k, f in self.parts.items()}, self.shape)


def tied_factors(uses: list[_Use], grads: list[Tensor], weight: Tensor) -> _TiedFactors:
    """Factors of every kind of use (``grads[k]``: output-gradients of ``uses[k]``)."""
    parts: dict[str, _Factors] = {}
    for p in _PARTS:
        sel = [(u, g) for u, g in zip(uses, grads) if _part(u) == p]
        if sel:
            parts[p] = _weight_factors([u for u, _ in sel], [g for _, g in sel], weight, False)
    return _TiedFactors(parts, (weight.shape[0], weight.shape[1]))


def _restricted_rows(f: _TiedFactors, idx: Tensor) -> Tensor:
    """``dW[n, a][idx]`` summed over every use: ``(N, O, len(idx)·d)``."""
    out: Optional[Tensor] = None
    for p, fp in f.parts.items():
        n, o = fp.g.shape[:2]
        if p == "linear":  # Σ_t G[.., idx, t] A[t]ᵀ
            g = fp.g[:, :, 0].index_select(2, idx)  # (N, O, c, T)
            a = fp.columns()[:, 0].transpose(1, 2)  # (N, T, d)
            part = torch.bmm(g.reshape(n, -1, g.shape[3]), a).view(n, o, -1)
        else:  # Σ_t R[idx, t] G[t]ᵀ, R = A (transposed use) or the one-hot ids (embedding)
            cols = fp.columns()
            if p == "embedding":
                r = (cols.unsqueeze(1) == idx.view(1, -1, 1)).to(fp.g.dtype)  # (N, c, T)
            else:
                r = cols[:, 0].index_select(1, idx)  # (N, c, T)
            g = fp.g[:, :, 0]  # (N, O, d, T)
            d = g.shape[2]
            part = torch.bmm(r, g.reshape(n, o * d, -1).transpose(1, 2))  # (N, c, O·d)
            part = part.view(n, -1, o, d).transpose(1, 2).reshape(n, o, -1)
        out = part if out is None else out.add_(part)
    assert out is not None
    return out


def _masked(f: _Factors, part: str, idx: Tensor) -> _Factors:
    """The factors of the dense uses with rows ``idx`` of ``W`` removed: ``G``'s channels
    (linear) or ``A``'s features (``a @ W``) at ``idx`` zeroed, in a copy."""
    if part == "linear":
        g = f.g.clone()
        g[:, :, :, idx] = 0
        return _Factors(f.inputs, g, f.onehot, f.fold_bias, f.weight_shape)
    inputs = []
    for op, inp, meta in f.inputs:
        inp = inp.clone()
        inp[..., idx] = 0
        inputs.append((op, inp, meta))
    return _Factors(inputs, f.g, f.onehot, f.fold_bias, f.weight_shape)


def _rest(fr: _Factors, fc: _Factors, kind: str, same: bool, strategy: str) -> Tensor:
    """The Linear strategy ``strategy`` (``outer``/``gram``, :func:`~.cost.tied_costs`) on
    the masked dense factors."""

    def fn(i: slice, j: slice) -> Tensor:
        a, b = fr.rows(i), fc.rows(j)
        if strategy == "outer":
            return _contract_outer(a, b, kind, False)[0]
        return _contract_gram(a, b, kind)

    if same:
        return symmetric_block(fr.g.shape[0], kind, fn)
    return fn(slice(None), slice(None))


def contract_tied(
    fr: _TiedFactors, fc: _TiedFactors, kind: str, same: bool, strategy: str
) -> Tensor:
    """The kernel block of a tied weight between the examples of ``fr`` and ``fc`` (the same
    examples when ``same``): see the module docstring."""
    emb_r = fr.parts.get("embedding")
    g0 = next(iter(fr.parts.values())).g
    device = g0.device
    rest = strategy.partition("+")[2]
    if rest:
        assert emb_r is not None
        ids = [emb_r.columns().reshape(-1)]
        if not same:
            ids.append(fc.parts["embedding"].columns().reshape(-1))
        rows = torch.unique(torch.cat(ids)).long()
    else:
        rows = torch.arange(fr.shape[0], device=device)
    n, o = g0.shape[:2]
    m = n if same else next(iter(fc.parts.values())).g.shape[0]
    # temporaries per row of W: (N, O, d) rows and (N, O, T) gathered G / one-hot ids
    width = fr.shape[1] + sum(f.g.shape[4] for f in fr.parts.values())
    step = max(1, _WORK_ELEMENTS // max(1, (n + (0 if same else m)) * o * width))
    total: Optional[Tensor] = None
    for j0 in range(0, rows.numel(), step):
        idx = rows[j0 : j0 + step]
        dr = _restricted_rows(fr, idx)
        if same:
            k = symmetric_block(n, kind, lambda i, j, d=dr: contract_rows(d[i], d[j], kind))
        else:
            k = contract_rows(dr, _restricted_rows(fc, idx), kind)
        total = k if total is None else total.add_(k)
    if rest:
        part = "linear" if "linear" in fr.parts else "transposed"
        mr = _masked(fr.parts[part], part, rows)
        mc = mr if same else _masked(fc.parts[part], part, rows)
        k = _rest(mr, mc, kind, same, rest)
        total = k if total is None else total.add_(k)
    assert total is not None
    return total
