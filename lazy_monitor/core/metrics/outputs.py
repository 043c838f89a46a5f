"""Linearization quality: how far the network ``f`` is from its linearization ``f_lin`` (see
:mod:`lazy_monitor.core.metrics` for the conventions)."""

from __future__ import annotations

import torch
from torch import Tensor

from lazy_monitor.core.metrics._base import (
    _finite,
    _nan,
    _ratio,
)

__all__ = ["linearization_error", "linearization_rmse", "argmax_agreement"]

# ----------------------------------------------------------------------------- linearization


def _outputs(f: Tensor, other: Tensor, names: tuple[str, str]) -> tuple[Tensor, Tensor]:
    if f.shape != other.shape:
        raise ValueError(
            f"{names[0]} has shape {tuple(f.shape)} but {names[1]} has {tuple(other.shape)}; "
            "compare outputs on the same probe batch"
        )
    a = f.detach().to(torch.float64)
    return a, other.detach().to(device=a.device, dtype=torch.float64)


def linearization_error(f: Tensor, f_lin: Tensor, f0: Tensor, *, atol: float = 0.0) -> Tensor:
    r"""Relative error of the linearization on the change of the outputs.

    .. math:: \|f - f_{lin}\|_F / \|f - f_0\|_F

    with ``f = f(x; θ)``, ``f_lin = f(x; θ₀) + J(θ₀)(θ − θ₀)``, ``f₀ = f(x; θ₀)``: the fraction of
    the function's movement the linear model fails to explain (Lee et al. 2019 compare f and
    f_lin directly). 0 in the lazy limit; around 1 or more once features move. By Liu, Zhu & Belkin
    2020 the numerator is ``O(‖H‖ ‖θ − θ₀‖²)``.

    Args:
        f: current outputs ``(N, O)`` (any shape, equal for all three).
        f_lin: linearized outputs, same shape.
        f0: outputs at θ₀, same shape.
        atol: norms ``‖f − f_lin‖`` and ``‖f − f₀‖`` at or below ``atol`` count as exactly 0, so
            that rounding noise between two evaluations of the same function (e.g. on another
            device) is not read as a ratio of two noise terms. The tracker passes
            ``100 · eps(dtype) · ‖f₀‖``.

    Returns:
        0-dim float64 tensor. ``f == f_lin``: 0 (also at θ = θ₀, where all three agree). ``f == f₀``
        but ``f ≠ f_lin``: ``+inf``. NaN on non-finite input.

    Raises:
        ValueError: shapes differ or ``atol`` is negative.
    """
    if not atol >= 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    a, b = _outputs(f, f_lin, ("f", "f_lin"))
    _, c = _outputs(f, f0, ("f", "f0"))
    if not (_finite(a) and _finite(b) and _finite(c)):
        return _nan(a)
    num, den = torch.linalg.vector_norm(a - b), torch.linalg.vector_norm(a - c)
    zero = torch.zeros_like(num)
    return _ratio(num if num > atol else zero, den if den > atol else zero)


def linearization_rmse(f: Tensor, f_lin: Tensor) -> Tensor:
    r"""Root-mean-square difference between the network and its linearization,
    ``sqrt(mean((f − f_lin)²))`` over all entries (Lee et al. 2019, Fig. 2 "RMSE").

    Args:
        f: current outputs ``(N, O)``.
        f_lin: linearized outputs, same shape.

    Returns:
        0-dim float64 tensor in the units of the outputs; NaN on non-finite input.

    Raises:
        ValueError: shapes differ or are empty.
    """
    a, b = _outputs(f, f_lin, ("f", "f_lin"))
    if a.numel() == 0:
        raise ValueError("f is empty; pass outputs of at least one example")
    if not (_finite(a) and _finite(b)):
        return _nan(a)
    return (a - b).square().mean().sqrt()


def argmax_agreement(f: Tensor, f_lin: Tensor) -> Tensor:
    r"""Fraction of examples on which the network and its linearization predict the same class.

    ``mean_n [argmax_a f[n, a] == argmax_a f_lin[n, a]]``. With one output per example the
    output is assumed to be a binary classifier's **logit** and the predicted class is ``f > 0``
    (a model that outputs a probability, e.g. after a sigmoid, would need the threshold 0.5:
    give the tracker ``output_fn=lambda p: p - 0.5``, which leaves the kernel unchanged).

    Args:
        f: logits ``(N, O)`` (or ``(N,)`` for one logit; a probability is not a logit).
        f_lin: linearized logits, same shape.

    Returns:
        0-dim float64 tensor in ``[0, 1]``; NaN on non-finite input.

    Raises:
        ValueError: shapes differ or are empty.
    """
    a, b = _outputs(f, f_lin, ("f", "f_lin"))
    if a.numel() == 0 or a.dim() == 0:
        raise ValueError("f must be batched logits (N, O) with N >= 1")
    if not (_finite(a) and _finite(b)):
        return _nan(a)
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if a.shape[1] == 1:
        same = (a[:, 0] > 0) == (b[:, 0] > 0)
    else:
        same = a.argmax(1) == b.argmax(1)
    return same.to(torch.float64).mean()
