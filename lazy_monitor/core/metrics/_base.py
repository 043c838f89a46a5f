"""Shared helpers of :mod:`lazy_monitor.core.metrics`: kernel-kind checks, NaN / 0/0 scalars and
:func:`all_finite` (the conventions are in the package docstring)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Union

import torch
from torch import Tensor

__all__ = ["all_finite"]

_KIND_BY_NDIM = {2: "trace", 3: "diagonal", 4: "full"}

TensorTree = Union[Tensor, Mapping[str, Tensor], Iterable[Tensor]]


# ----------------------------------------------------------------------------- helpers


def _nan(like: Tensor) -> Tensor:
    return torch.full((), math.nan, dtype=torch.float64, device=like.device)


def _scalar(value: float, like: Tensor) -> Tensor:
    return torch.full((), value, dtype=torch.float64, device=like.device)


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` for non-negative scalars with the module's 0/0 convention."""
    if den > 0:
        return num / den
    return torch.zeros_like(num) if num == 0 else torch.full_like(num, math.inf)


def _kind(kernel: Tensor, name: str = "kernel") -> str:
    if not isinstance(kernel, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(kernel).__name__}")
    kind = _KIND_BY_NDIM.get(kernel.dim())
    if kind is None:
        raise ValueError(
            f"{name} has shape {tuple(kernel.shape)}; expected a kernel from empirical_ntk: "
            "(N1, N2, O, O) for kind='full', (N1, N2) for 'trace' or (N1, N2, O) for 'diagonal'"
        )
    if kind == "full" and kernel.shape[2] != kernel.shape[3]:
        raise ValueError(
            f"{name} has shape {tuple(kernel.shape)}; a full kernel is (N1, N2, O, O) with equal "
            "output dimensions"
        )
    return kind


def _square_kind(kernel: Tensor, name: str = "kernel") -> str:
    kind = _kind(kernel, name)
    if kernel.shape[0] != kernel.shape[1]:
        raise ValueError(
            f"{name} has shape {tuple(kernel.shape)}; this metric needs a square kernel "
            "K(x, x) with N1 == N2 (call empirical_ntk(model, x) without x2)"
        )
    return kind


def _same_shape(a: Tensor, b: Tensor, names: tuple[str, str]) -> None:
    _kind(a, names[0])
    _kind(b, names[1])
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} has shape {tuple(a.shape)} but {names[1]} has {tuple(b.shape)}; compare "
            "kernels of the same probe batch and kind"
        )


def _flat_tensors(tree: TensorTree) -> list[Tensor]:
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, Mapping):
        return list(tree.values())
    return list(tree)


def all_finite(*trees: TensorTree) -> bool:
    """``True`` when every element of every tensor is finite (no NaN, no ±inf).

    Args:
        *trees: tensors, mappings of tensors (e.g. parameter dicts) or iterables of tensors.
    """
    return all(_finite(t) for tree in trees for t in _flat_tensors(tree))
