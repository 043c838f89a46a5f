"""The ops with a structured rule -- argument binding of Linear/Conv/Embedding, ``a @ W (+ b)``
and affine normalisation calls -- and the multiply-adds of the calls that dominate a forward
pass, counted on the probe pass for the cost model's [FP] (:func:`~..cost.choose_path`)."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_SIGNATURES = {
    "linear": ("input", "weight", "bias"),
    "conv": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "embedding": (
        "input",
        "weight",
        "padding_idx",
        "max_norm",
        "norm_type",
        "scale_grad_by_freq",
        "sparse",
    ),
}


_OPS = {F.linear: "linear", F.conv1d: "conv", F.conv2d: "conv", F.embedding: "embedding"}


# Normalisations with an elementwise affine ``y = x̂·γ + β``: per-example rows of γ and β are
# direct sums over positions, ``dγ = Σ G·x̂``, ``dβ = Σ G`` (channel dim 1, or trailing dims).
_NORMS = {
    F.batch_norm: (
        "channel",
        ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    ),
    F.group_norm: ("channel", ("input", "num_groups", "weight", "bias", "eps")),
    F.layer_norm: ("trailing", ("input", "normalized_shape", "weight", "bias", "eps")),
    F.rms_norm: ("trailing", ("input", "normalized_shape", "weight", "eps")),  # no bias
}


# ``y = a @ W (+ b)`` with the parameter ``W (d_in, d_out)`` as the right operand: HF
# ``Conv1D`` (GPT-2: ``torch.addmm(bias, x.view(-1, d), W)``), ``x @ W``. These are Linear uses
# with a transposed weight; the kernel does not depend on how a weight's entries are ordered,
# so the factors are built for ``Wᵀ (d_out, d_in)``.
_MATMULS = {
    torch.addmm: "addmm",
    Tensor.addmm: "addmm",
    torch.mm: "mm",
    Tensor.mm: "mm",
    torch.matmul: "mm",
    Tensor.matmul: "mm",
    Tensor.__matmul__: "mm",
}


def _bind_matmul(kind: str, args: tuple, kwargs: dict) -> Optional[dict]:
    """``{"input", "weight", "bias"}`` of a matmul-family call, or None if it is not
    ``a @ W (+ b)`` with a 2-D right operand, a 1-D bias and ``alpha = beta = 1``."""
    if kind == "addmm":  # torch.addmm(input=bias, mat1, mat2, *, beta, alpha)
        names = ("bias", "input", "weight", "beta", "alpha")
        rename = {"input": "bias", "self": "bias", "mat1": "input", "mat2": "weight"}
    else:  # torch.mm(input, mat2), torch.matmul(input, other)
        names = ("input", "weight")
        rename = {"self": "input", "mat2": "weight", "other": "weight"}
    if "out" in kwargs:
        return None
    bound = dict(zip(names, args))
    bound.update({rename.get(k, k): v for k, v in kwargs.items()})
    bias, a, w = bound.get("bias"), bound.get("input"), bound.get("weight")
    if kind == "addmm" and (
        bound.get("beta", 1) != 1
        or bound.get("alpha", 1) != 1
        or not isinstance(bias, Tensor)
        or bias.dim() != 1
    ):
        return None
    if not (isinstance(a, Tensor) and isinstance(w, Tensor) and w.dim() == 2 and a.dim() >= 2):
        return None
    return {"input": a, "weight": w, "bias": bias}


def _bind(func: Any, args: tuple, kwargs: dict) -> Optional[dict]:
    """Arguments by name of a supported op's call (normalisation, Linear/Conv/Embedding,
    ``a @ W (+ b)``); None for any other op or matmul form."""
    if func in _NORMS:
        names = _NORMS[func][1]
    elif func in _OPS:
        names = _SIGNATURES[_OPS[func]]
    elif func in _MATMULS:
        return _bind_matmul(_MATMULS[func], args, kwargs)
    else:
        return None
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _affine_norm(func: Any, layout: str, bound: dict) -> tuple[Tensor, Tensor]:
    """``(x̂, y)`` for a normalisation call: the op without its affine, then the affine."""
    weight, bias = bound.get("weight"), bound.get("bias")
    plain = dict(bound, weight=None)
    if "bias" in _NORMS[func][1]:
        plain["bias"] = None
    xhat = func(**plain)
    if layout == "channel":
        shape = (1, -1) + (1,) * (xhat.dim() - 2)
        weight = None if weight is None else weight.reshape(shape)
        bias = None if bias is None else bias.reshape(shape)
    y = xhat if weight is None else xhat * weight
    return xhat, (y if bias is None else y + bias)


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
