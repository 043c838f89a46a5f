"""Parameters broadcast over the examples, and batch-shared inputs of supported ops.

* Elementwise uses ``y = x ∘ P`` (``x * P``, ``x + P``, ``x - P``, ``P - x``,
  ``torch.add(x, P, alpha=c)``) of a parameter ``P`` that broadcasts against a tensor ``x``
  carrying the examples on dim 0 (``P`` has no dim for the examples, or one of size 1) into
  ``y`` of ``x``'s shape, and ``P.expand(N, ...)`` (a ViT ``cls_token``): per-example rows
  ``dP[n] = c · Σ_broadcast G[n] (· x[n])``, with ``G`` the output-gradient of ``y``
  (HF RMSNorm ``weight * x``, ViT ``x + position_embeddings``, timm LayerScale ``x * gamma``).
* A supported op (Linear/Conv/Embedding, ``a @ W``) whose input is shared by the batch
  (dim 0 of size 1: GPT-2's and BERT's ``position_ids (1, T)``) runs once, as in the model,
  and hands the model its output *expanded* to the batch, ``(N, ...)``, with the input
  expanded likewise: the values are the same, but the gradient of the expanded output has one
  row per example, so the op's weight gets the ordinary per-example factors. Whether the model
  computes the same with the expanded output (code reading ``.shape[0]`` or indexing row 0 of
  it might not) is checked on the probe pass (:func:`~.capture._forward`: output bitwise
  equal to a plain forward, else no expansion) and by the two-sided batch-mapping check.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

# op -> "mul" | "add" | "sub" (out-of-place, two tensor operands)
_ELEMENTWISE = {
    torch.mul: "mul",
    Tensor.mul: "mul",
    Tensor.__mul__: "mul",
    Tensor.__rmul__: "mul",
    torch.add: "add",
    Tensor.add: "add",
    Tensor.__add__: "add",
    Tensor.__radd__: "add",
    torch.sub: "sub",
    Tensor.sub: "sub",
    Tensor.__sub__: "sub",
}

_EXPANDS = {Tensor.expand, Tensor.expand_as, torch.broadcast_to}


def _broadcast_shape(p: Tensor, out: Tensor) -> Optional[tuple[int, ...]]:
    """``P``'s shape aligned with one example of ``out`` (``out.shape[1:]``, ones where ``P``
    broadcasts), or None if ``P`` does not broadcast into ``out`` without a batch dim (or
    one of size 1)."""
    if out.dim() < 1 or p.dim() > out.dim():
        return None
    shape = tuple(p.shape)
    if len(shape) == out.dim():
        if shape[0] != 1:
            return None  # P has a row per example (or any other dim-0 layout): no rule
        shape = shape[1:]
    full = (1,) * (out.dim() - 1 - len(shape)) + shape
    if any(f not in (1, s) for f, s in zip(full, out.shape[1:])):
        return None
    return full


def _bind_elementwise(
    func: Any, args: tuple, kwargs: dict, out: Any, by_id: dict[int, str]
) -> Optional[tuple[str, Optional[Tensor], dict]]:
    """``(name, x, meta)`` of an elementwise / expand use of one parameter, None for any
    other call. ``x``: the per-example operand (None for an expand); ``meta``: ``mul``,
    ``scale`` (``c``) and ``full`` (:func:`_broadcast_shape`)."""
    if not isinstance(out, Tensor) or "out" in kwargs or not out.is_floating_point():
        return None
    if func in _EXPANDS:
        p = args[0] if args else kwargs.get("input")
        name = by_id.get(id(p)) if isinstance(p, Tensor) else None
        full = None if name is None else _broadcast_shape(p, out)
        return None if full is None else (name, None, {"mul": False, "scale": 1.0, "full": full})
    kind = _ELEMENTWISE.get(func)
    if kind is None or len(args) + len(kwargs) > 3:
        return None
    a = args[0] if args else kwargs.get("input")
    b = args[1] if len(args) > 1 else kwargs.get("other")
    alpha = args[2] if len(args) > 2 else kwargs.get("alpha", 1)
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return None
    if (id(a) in by_id) == (id(b) in by_id):
        return None  # no parameter, or two: no rule
    p, x, second = (b, a, True) if id(b) in by_id else (a, b, False)
    full = _broadcast_shape(p, out)
    if full is None or x.shape != out.shape or x.dtype != out.dtype or p.dtype != out.dtype:
        return None
    # y = a + alpha·b, a - alpha·b: the coefficient of P; mul has no alpha
    scale = 1.0 if kind == "mul" or not second else float(alpha) * (-1.0 if kind == "sub" else 1)
    return by_id[id(p)], x, {"mul": kind == "mul", "scale": scale, "full": full}


def _expandable(inp: Any, out: Any, batch: int) -> bool:
    """A supported op's input and output shared by a batch of ``batch > 1`` examples (dim 0
    of size 1): its output is handed to the model expanded to the batch."""
    return (
        batch > 1
        and isinstance(inp, Tensor)
        and isinstance(out, Tensor)
        and inp.dim() >= 1
        and out.dim() >= 1
        and inp.shape[0] == 1
        and out.shape[0] == 1
    )


def _expand_rows(t: Tensor, batch: int) -> Tensor:
    """``t (1, ...)`` as a ``(batch, ...)`` view (no copy; the same values in every row)."""
    return t.expand(batch, *t.shape[1:])


def _elementwise_rows(grad: Tensor, x: Tensor, meta: dict, numel: int) -> Tensor:
    """Per-example rows ``(N, numel)`` of ``P`` from the output-gradient ``grad (N, *y)`` of an
    elementwise use ``y = x ∘ P``: ``c · G (· x)`` summed over the dims ``P`` broadcasts."""
    n = grad.shape[0]
    g = grad * x if meta["mul"] else grad
    dims = [i + 1 for i, (f, s) in enumerate(zip(meta["full"], g.shape[1:])) if f == 1 and s != 1]
    if dims:
        g = g.sum(dims)
    g = g.reshape(n, numel)
    return g if meta["scale"] == 1.0 else g * meta["scale"]
