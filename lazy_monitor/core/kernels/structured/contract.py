"""Per-example factors ``(G, A)`` of one structured weight and the exact contraction
strategies of :mod:`..cost` built on them: outer product (T = 1), Gram over positions, and
per-example gradients (chunked over output channels)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._common import (
    contract_rows,
    reduce_full,
    symmetric_block,
)
from .broadcast import _elementwise_rows
from .capture import _per_example, _Use, _weight_shape

# Elements of temporary tensors inside one contraction (per-example gradient chunk, Gram
# intermediates); the contraction loops over chunks to stay below it.
_WORK_ELEMENTS = 2**25


def _conv_columns(inp: Tensor, weight_shape: tuple[int, ...], meta: dict) -> Tensor:
    """Unfold a conv input to ``(N, groups, C_in/groups·prod(kernel), T)`` (a view of
    ``F.unfold``'s output, channel-major like the conv's own output)."""
    spatial = len(weight_shape) - 2
    kernel = tuple(weight_shape[2:])
    groups = int(meta.get("groups", 1))

    def tup(v: Any) -> tuple[int, ...]:
        return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * spatial

    stride, dilation = tup(meta.get("stride", 1)), tup(meta.get("dilation", 1))
    padding = meta.get("padding", 0)
    if isinstance(padding, str):
        if padding == "same":  # PyTorch pads total // 2 before and the rest after
            totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
            pads: list[int] = []
            for total in reversed(totals):
                pads += [total // 2, total - total // 2]
            inp = F.pad(inp, pads)
        padding = 0
    padding = tup(padding)
    if spatial == 1:
        inp, kernel = inp.unsqueeze(2), (1, *kernel)
        stride, dilation, padding = (1, *stride), (1, *dilation), (0, *padding)
    cols = F.unfold(inp, kernel, dilation=dilation, padding=padding, stride=stride)
    n, _, t = cols.shape
    return cols.view(n, groups, -1, t)


@dataclasses.dataclass
class _Factors:
    """Per-example factors of one structured weight, channel-major:

    * ``a``: inputs ``(N, g, d_in, T)`` -- with a row of ones appended when the bias is
      folded in -- or token ids ``(N, T)`` for an embedding;
    * ``g``: output-gradients ``(N, O, g, d_out, T)``.
    """

    inputs: list[tuple[str, Tensor, dict]]  # (op, layer input, conv meta) per use
    g: Tensor
    onehot: bool
    fold_bias: bool
    weight_shape: tuple[int, ...]

    def rows(self, i: slice) -> _Factors:
        inputs = [(op, inp[i], meta) for op, inp, meta in self.inputs]
        return _Factors(inputs, self.g[i], self.onehot, self.fold_bias, self.weight_shape)

    def columns(self) -> Tensor:
        """``A``: built on demand, because a conv's unfolded input is ``prod(kernel)`` times
        larger than the input itself (which is all that is stored)."""
        parts = []
        for op, inp, meta in self.inputs:
            n = inp.shape[0]
            if op == "linear":
                parts.append(inp.reshape(n, 1, -1, self.weight_shape[1]).transpose(2, 3))
            elif op == "conv":
                parts.append(_conv_columns(inp, self.weight_shape, meta))
            else:
                parts.append(inp.reshape(n, -1))
        if self.onehot:
            return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if self.fold_bias:  # [A; 1] gives [dW, db]: y = [W, b] [A; 1]
            parts = [torch.cat([p, p.new_ones(*p.shape[:2], 1, p.shape[3])], 2) for p in parts]
        return torch.cat(parts, dim=3) if len(parts) > 1 else parts[0]


def _weight_factors(
    uses: list[_Use], grads: list[Tensor], weight: Tensor, fold_bias: bool
) -> _Factors:
    """``grads[k]``: ``(N, O, *per-example y shape)`` output-gradients of use ``k``."""
    g_parts = []
    shape = _weight_shape(uses[0], weight)
    n = grads[0].shape[0]
    for use, grad in zip(uses, grads):
        n, o = grad.shape[:2]
        if use.op == "linear":
            g_parts.append(grad.reshape(n, o, 1, -1, shape[0]).transpose(3, 4))
        elif use.op == "conv":
            groups = int(use.meta.get("groups", 1))
            g_parts.append(grad.reshape(n, o, groups, weight.shape[0] // groups, -1))
        else:
            idx = use.inp.reshape(n, -1)
            g = grad.reshape(n, o, 1, idx.shape[1], weight.shape[1]).transpose(3, 4)
            pad = use.meta.get("padding_idx")
            if pad is not None:  # no gradient flows to the padding row
                pad = pad if pad >= 0 else weight.shape[0] + pad
                g = g * (idx != pad).reshape(n, 1, 1, 1, -1).to(g.dtype)
            g_parts.append(g)
    g = torch.cat(g_parts, dim=4) if len(g_parts) > 1 else g_parts[0]
    inputs = [(u.op, _per_example(u.inp, n), u.meta) for u in uses]
    return _Factors(inputs, g, uses[0].op == "embedding", fold_bias, shape)


def _row_grad(use: _Use, grad: Tensor, name: str, numel: int) -> Tensor:
    """Per-example gradient rows (N, numel) of a bias (``Σ_t g``), of a normalisation scale
    (``Σ_t g·x̂``) or of an elementwise parameter (:func:`~.broadcast._elementwise_rows`)
    from the output-gradient ``grad`` (N, *y.shape[1:]) of one use."""
    n = grad.shape[0]
    if use.op == "elementwise":
        return _elementwise_rows(grad, use.inp, use.meta, numel)
    if use.op == "norm" and use.weight == name:
        grad = grad * use.inp
    if use.op == "linear" or use.meta.get("layout") == "trailing":
        return grad.reshape(n, -1, numel).sum(1)
    return grad.reshape(n, numel, -1).sum(2)


def _contract_outer(fr: _Factors, fc: _Factors, kind: str, with_bias: bool) -> tuple[Tensor, ...]:
    """T = 1: ``K_W = Σ_g (G Gᵀ) ∘ (A Aᵀ)`` and (``with_bias``) ``K_b = Σ_g G Gᵀ``, sharing
    the ``G Gᵀ`` matmul."""
    n, o = fr.g.shape[:2]
    m = fc.g.shape[0]
    a_r, a_c = fr.columns(), fc.columns()
    k_w: Optional[Tensor] = None
    k_b: Optional[Tensor] = None
    for gi in range(fr.g.shape[2]):
        gr, gc = fr.g[:, :, gi, :, 0], fc.g[:, :, gi, :, 0]  # (N, O, d_out)
        if fr.onehot:
            aa = (a_r.reshape(n, 1) == a_c.reshape(1, m)).to(gr.dtype)
        else:
            aa = a_r[:, gi, :, 0] @ a_c[:, gi, :, 0].t()
        if kind == "full":
            gg = (gr.reshape(n * o, -1) @ gc.reshape(m * o, -1).t()).view(n, o, m, o)
            aa = aa[:, None, :, None]
        else:
            gg = torch.bmm(gr.transpose(0, 1), gc.permute(1, 2, 0))  # (O, N, M)
            if kind == "trace":
                gg = gg.sum(0)
        if with_bias:
            k_b = gg if k_b is None else k_b + gg
            kw = gg * aa
        else:
            kw = gg.mul_(aa)
        k_w = kw if k_w is None else k_w + kw
    assert k_w is not None
    return (k_w,) if k_b is None else (k_w, k_b)


def _contract_gram(fr: _Factors, fc: _Factors, kind: str) -> Tensor:
    """``K[n,a,m,b] = Σ_g Σ_{t,s} G[n,a,:,t]·(A A ᵀ)[n,t,m,s] G[m,b,:,s]`` evaluated as
    ``Z = (A_n A_mᵀ) G_m`` then ``G_n · Z``, chunked over rows so that ``Z`` stays bounded."""
    n, o, groups, d_out, t = fr.g.shape
    m, s = fc.g.shape[0], fc.g.shape[4]
    rows = max(1, _WORK_ELEMENTS // max(1, t * (m * s + o * d_out)))
    out = torch.zeros((n, m, o, o), dtype=fr.g.dtype, device=fr.g.device)
    a_r, a_c = fr.columns(), fc.columns()
    for gi in range(groups):
        # gc[m, s, (j, b)] = G[m, b, j, s], so Z's trailing axes (t, j, b) flatten as a view.
        gc = fc.g[:, :, gi].permute(0, 3, 2, 1).reshape(m, s, d_out * o)
        if not fc.onehot:
            ac = a_c[:, gi].transpose(1, 2).reshape(m * s, -1)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            r = r1 - r0
            # aat[m, s, (n, t)] = A[m, s]·A[n, t]: one GEMM whose rows are already grouped by
            # column example.
            if fr.onehot:
                aat = (a_c.reshape(m, s, 1) == a_r[r0:r1].reshape(1, 1, r * t)).to(gc.dtype)
            else:
                ar = a_r[r0:r1, gi].transpose(1, 2).reshape(r * t, -1)
                aat = (ac @ ar.t()).view(m, s, r * t)
            gr = fr.g[r0:r1, :, gi].transpose(2, 3).reshape(r, o, t * d_out)
            # per column example j: Z = aat[j]ᵀ G_j, Z[n, (t, j'), b], then K[n, :, j, :] =
            # G_n Z[n] (one bmm over the row examples). Z of one column example at a time stays
            # in cache for the product that reads it: the product reads every element of Z
            # only O times, so Z for all columns at once (written to memory, read back) made
            # it memory-bound (1.5-1.8x slower on ResNet-18's stage-3/4 shapes).
            for j in range(m):
                z = (aat[j].t() @ gc[j]).view(r, t * d_out, o)
                out[r0:r1, j] += torch.bmm(gr, z)
    return reduce_full(out.permute(0, 2, 1, 3), kind)


def _per_example_grads(g: Tensor, a: Tensor, j0: int, j1: int) -> Tensor:
    """``dW[n, a] = G[n, a] Aᵀ[n]`` for output channels ``j0:j1`` of every group:
    (N, O, g·(j1-j0)·d_in). One bmm over (example, group) -- no broadcast copies."""
    n, o, groups, _, t = g.shape
    j = j1 - j0
    gg = g[:, :, :, j0:j1].transpose(1, 2).reshape(n * groups, o * j, t)
    aa = a.reshape(n * groups, -1, t).transpose(1, 2)  # (N·g, T, d_in)
    dw = torch.bmm(gg, aa).view(n, groups, o, j, -1)  # (N, g, O, j, d_in)
    return dw.transpose(1, 2).reshape(n, o, -1)


def _contract_per_example(fr: _Factors, fc: _Factors, kind: str, same: bool) -> Tensor:
    """Per-example gradients built from ``(G, A)``, chunked over output channels."""
    n, o, groups, d_out, _ = fr.g.shape
    m = fc.g.shape[0]
    a_r = fr.columns()
    a_c = a_r if same else fc.columns()
    d_in = a_r.shape[2]
    rows = n if same else n + m  # a symmetric block builds one side only
    step = max(1, _WORK_ELEMENTS // max(1, rows * o * groups * d_in))
    total: Optional[Tensor] = None
    for j0 in range(0, d_out, step):
        j1 = min(d_out, j0 + step)
        dr = _per_example_grads(fr.g, a_r, j0, j1)
        if same:
            k = symmetric_block(n, kind, lambda i, j, dr=dr: contract_rows(dr[i], dr[j], kind))
        else:
            k = contract_rows(dr, _per_example_grads(fc.g, a_c, j0, j1), kind)
        total = k if total is None else total.add_(k)
    assert total is not None
    return total
