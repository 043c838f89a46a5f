"""Multiply-adds of the calls that dominate a forward pass, counted on the probe pass for the
cost model's [FP] (:func:`~..cost.choose_path`)."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _first(args: tuple, kwargs: dict, *names: str) -> Optional[Tensor]:
    """The first of ``args`` or, by name, of ``kwargs``; None if it is not a Tensor."""
    t = args[0] if args else next((kwargs[k] for k in names if k in kwargs), None)
    return t if isinstance(t, Tensor) else None


def _matmul_macs(args: tuple, kwargs: dict, out: Any) -> int:
    """``|out| · k`` with ``k`` the contracted size (last dim of the left operand)."""
    a = args[1] if len(args) > 2 else kwargs.get("mat1", kwargs.get("batch1"))
    if isinstance(a, Tensor) and isinstance(out, Tensor) and a.dim() >= 1:
        return out.numel() * a.shape[-1]
    return 0


def _left_macs(args: tuple, kwargs: dict, out: Any) -> int:
    a = _first(args, kwargs, "input")
    if isinstance(a, Tensor) and isinstance(out, Tensor) and a.dim() >= 1:
        return out.numel() * a.shape[-1]
    return 0


def _conv_macs(args: tuple, kwargs: dict, out: Any) -> int:
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    if isinstance(w, Tensor) and isinstance(out, Tensor) and w.dim() >= 1:
        return out.numel() * (w.numel() // w.shape[0])
    return 0


def _attention_macs(args: tuple, kwargs: dict, out: Any) -> int:
    q = _first(args, kwargs, "query")
    k = args[1] if len(args) > 1 else kwargs.get("key")
    if isinstance(q, Tensor) and isinstance(k, Tensor) and q.dim() >= 2 and k.dim() >= 2:
        return 2 * (q.numel() // q.shape[-1]) * k.shape[-2] * q.shape[-1]
    return 0


# Multiply-adds of the calls that dominate a forward pass (the cost model's [FP]).
_MAC_COUNTERS = {
    F.linear: _left_macs,
    torch.matmul: _left_macs,
    Tensor.matmul: _left_macs,
    Tensor.__matmul__: _left_macs,
    torch.mm: _left_macs,
    Tensor.mm: _left_macs,
    torch.bmm: _left_macs,
    Tensor.bmm: _left_macs,
    torch.addmm: _matmul_macs,
    Tensor.addmm: _matmul_macs,
    torch.baddbmm: _matmul_macs,
    Tensor.baddbmm: _matmul_macs,
    F.conv1d: _conv_macs,
    F.conv2d: _conv_macs,
    F.conv_transpose1d: _conv_macs,
    F.conv_transpose2d: _conv_macs,
    F.scaled_dot_product_attention: _attention_macs,
}
