"""Brute-force empirical NTK for tests: one ``torch.autograd.grad`` per output entry, float64.

Deliberately independent of lazy_monitor's engine and plumbing: a float64 deep copy of the
model in eval mode, the batched output ``f(X) (N, O)``, and the Jacobian row of every entry
``f[n, a]`` w.r.t. every differentiated parameter. Slow (N·O backward passes); keep cases tiny.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn


def _to64(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach().double() if x.is_floating_point() else x.detach()
    if isinstance(x, Mapping):
        return {k: _to64(v) for k, v in x.items()}
    return type(x)(_to64(v) for v in x)


def _call(model: nn.Module, x: Any) -> Any:
    if isinstance(x, Tensor):
        return model(x)
    if isinstance(x, Mapping):
        return model(**x)
    return model(*x)


def reference_jacobian(
    model: nn.Module,
    x: Any,
    names: Optional[Iterable[str]] = None,
    output_fn: Optional[Callable[[Any], Tensor]] = None,
) -> dict[str, Tensor]:
    """``{name: (N, O, numel)}`` float64 Jacobian rows of the eval-mode model.

    ``names`` default: parameters with ``requires_grad=True``, tied ones once (first name).
    """
    m = copy.deepcopy(model).double().eval()
    named = dict(m.named_parameters())  # de-duplicated: tied parameters once
    if names is None:
        names = [k for k, p in named.items() if p.requires_grad]
    else:
        all_named = dict(m.named_parameters(remove_duplicate=False))
        names = list(names)
        for k in names:
            named[k] = all_named[k]
    for p in m.parameters():
        p.requires_grad_(False)
    wrt = [named[k] for k in names]
    for p in wrt:
        p.requires_grad_(True)
    with torch.enable_grad():
        out = _call(m, _to64(x))
        if output_fn is not None:
            out = output_fn(out)
        n = out.shape[0]
        out = out.reshape(n, -1)
        rows: list[list[Tensor]] = [[] for _ in wrt]
        for i in range(n):
            for a in range(out.shape[1]):
                # .backward() and .grad rather than autograd.grad(inputs=...): the reentrant
                # torch.utils.checkpoint (which a model may call even in eval mode) supports
                # only the former.
                for p in wrt:
                    p.grad = None
                out[i, a].backward(retain_graph=True)
                for j, p in enumerate(wrt):
                    g = p.grad
                    rows[j].append(torch.zeros_like(p).flatten() if g is None else g.flatten())
    o = out.shape[1]
    return {k: torch.stack(r).reshape(n, o, -1) for k, r in zip(names, rows)}


def contract(j1: Tensor, j2: Tensor, kind: str) -> Tensor:
    """Kernel of kind ``kind`` from Jacobian rows ``(N1, O, P)`` and ``(N2, O, P)`` (einsum)."""
    if kind == "full":
        return torch.einsum("naf,mbf->nmab", j1, j2)
    if kind == "trace":
        return torch.einsum("naf,maf->nm", j1, j2)
    if kind == "diagonal":
        return torch.einsum("naf,maf->nma", j1, j2)
    raise ValueError(kind)


def reference_ntk(
    model: nn.Module,
    x1: Any,
    x2: Any = None,
    *,
    kind: str = "full",
    names: Optional[Iterable[str]] = None,
    output_fn: Optional[Callable[[Any], Tensor]] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(kernel, {name: block})`` in float64, by brute force."""
    j1 = reference_jacobian(model, x1, names, output_fn)
    j2 = j1 if x2 is None else reference_jacobian(model, x2, names, output_fn)
    blocks = {k: contract(j1[k], j2[k], kind) for k in j1}
    return sum(blocks.values()), blocks
