"""Kernel-target alignment: target validation and centred alignment of a kernel with ``Y Yᵀ`` (see
:mod:`lazy_monitor.core.metrics` for the kernel kinds and conventions)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from lazy_monitor.core.metrics._base import (
    _finite,
    _nan,
    _square_kind,
)

__all__ = ["check_targets", "alignment_targets", "kernel_alignment"]


def check_targets(targets: Tensor, n: int, *, batch: str = "the kernel is over") -> bool:
    """Validate targets of ``n`` examples; True when they are class indices.

    Class indices are integer (or bool) targets of shape ``(N,)``; float targets are regression
    targets ``(N,)`` or ``(N, C)``.

    Raises:
        TypeError: not a tensor. ValueError: not batched over ``n`` examples on dim 0, or
            integer targets that are not of shape ``(N,)``.
    """
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a Tensor, got {type(targets).__name__}")
    if targets.dim() == 0 or targets.shape[0] != n:
        raise ValueError(
            f"targets have shape {tuple(targets.shape)} but {batch} {n} examples; pass "
            f"one target per probe example (shape ({n},) or ({n}, C))"
        )
    if targets.dtype == torch.bool or not (targets.is_floating_point() or targets.is_complex()):
        if targets.dim() != 1:
            raise ValueError(
                f"integer targets are class indices and must have shape ({n},), got "
                f"{tuple(targets.shape)}; pass float targets for (multi-output) regression"
            )
        return True
    return False


def alignment_targets(
    targets: Tensor, n: int, num_outputs: int, outputs: Optional[int]
) -> tuple[Tensor, bool]:
    """Validate probe targets for :func:`kernel_alignment` and ``lin/agreement`` up front.

    Args:
        targets: class indices ``(N,)`` (integer) or regression targets ``(N,)``/``(N, C)``.
        n: probe examples ``N``. num_outputs: the model's outputs per example ``O``.
        outputs: outputs the kernel keeps per example (``O`` for full/diagonal kernels, None for
            a trace kernel, where regression targets may have any width).

    Returns:
        ``(targets on CPU, is_classification)``; class indices as ``int64``.

    Raises:
        TypeError: not a real tensor. ValueError: wrong length or shape, class indices out of
            range, a single class, non-finite or constant regression targets.
    """
    o = num_outputs
    is_class = check_targets(targets, n, batch="the probe has")
    t = targets.detach().cpu()
    if is_class:
        t = t.long()
        classes = 2 if o == 1 else o
        bad = (t < 0) | (t >= classes)
        if bool(bad.any()):
            raise ValueError(
                f"class index {int(t[bad][0])} of targets is outside [0, {classes}) for a "
                f"model with {o} output{'s' if o > 1 else ''} per example; pass class "
                "indices matching the model's outputs, or float targets for regression"
            )
        if bool((t == t[0]).all()):
            raise ValueError(
                f"all probe targets are class {int(t[0])}; the centred alignment is undefined "
                "for one class. Use a probe batch with at least two classes (or targets=None)"
            )
        return t, True
    if t.is_complex():
        raise TypeError("targets must be real (class indices or float regression targets)")
    if outputs is not None:
        width = 1 if t.dim() == 1 else int(torch.tensor(t.shape[1:]).prod())
        if width != o:
            raise ValueError(
                f"regression targets have {width} values per example but the model has {o} "
                f"outputs; pass targets of shape ({n}, {o}), or use kind='trace'"
            )
    if not bool(torch.isfinite(t).all()):
        raise ValueError("targets contain NaN or inf; pass finite targets")
    flat = t.reshape(n, -1).double()
    if bool((flat == flat[0]).all()):
        raise ValueError(
            "all probe targets are equal; the centred alignment is undefined for constant "
            "targets. Use a probe with varied targets (or targets=None)"
        )
    return t, False


def _target_matrix(targets: Tensor, n: int, outputs: Optional[int], num_classes: Optional[int]):
    if check_targets(targets, n):
        idx = targets.long()
        if num_classes is not None and outputs is not None and num_classes != outputs:
            raise ValueError(
                f"num_classes={num_classes} but the kernel has {outputs} outputs per example; "
                "one-hot targets must match the outputs (omit num_classes)"
            )
        classes = num_classes if num_classes is not None else outputs
        if classes is None:
            classes = int(idx.max()) + 1 if idx.numel() else 1
        if classes == 1 and outputs == 1:
            # One output unit for a binary classifier: the target is the class itself.
            return idx.to(torch.float64).unsqueeze(1)
        bad = (idx < 0) | (idx >= classes)
        if bool(bad.any()):
            raise ValueError(
                f"class index {int(idx[bad][0])} is outside [0, {classes}); the kernel has "
                f"{classes} outputs per example (pass num_classes= for a trace kernel)"
            )
        return torch.nn.functional.one_hot(idx, classes).to(torch.float64)
    y = targets.detach().to(torch.float64)
    y = y.unsqueeze(1) if y.dim() == 1 else y.reshape(n, -1)
    if outputs is not None and y.shape[1] != outputs:
        raise ValueError(
            f"regression targets have {y.shape[1]} values per example but the kernel has "
            f"{outputs} outputs; use targets of shape ({n}, {outputs}) or a trace kernel"
        )
    return y


def kernel_alignment(
    kernel: Tensor, targets: Tensor, *, num_classes: Optional[int] = None
) -> Tensor:
    r"""Centred kernel–target alignment.

    .. math::
        A(K, Y) = \frac{\langle K_c, L_c \rangle_F}{\|K_c\|_F \, \|L_c\|_F},\quad
        K_c = H K H,\; L_c = H\, \mathrm{vec}(Y)\mathrm{vec}(Y)^\top H,\; H = H_N \otimes I_O,\;
        H_N = I_N - \tfrac{1}{N} \mathbf{1}\mathbf{1}^\top

    (Cortes, Mohri & Rostamizadeh 2012, "Algorithms for learning kernels based on centered
    alignment"; per layer in Baratin et al. 2021, "Implicit regularization via neural feature
    alignment"). ``H`` centres over examples separately for each output, which removes the
    per-output mean function (e.g. the output-bias contribution ``I_O ⊗ 11ᵀ``). Centring the
    targets as well as the kernel makes ``A(Y Yᵀ, Y) = 1`` exactly; ``A`` is in ``[-1, 1]`` and
    scale invariant. Since ``L_c`` is centred, ``⟨K_c, L_c⟩ = ⟨K, L_c⟩``.

    The target kernel has the same kind as ``K``: ``L[(n,a),(m,b)] = Y_c[n,a] Y_c[m,b]`` (full),
    ``Σ_a Y_c[n,a] Y_c[m,a]`` (trace), ``Y_c[n,a] Y_c[m,a]`` (diagonal). The trace form is the
    same trace over outputs as the kernel's, taken on the targets: ``L = H Y Yᵀ H``, an
    ``N × N`` matrix whatever ``O`` is. For class indices ``(Y Yᵀ)[n, m] = [y_n = y_m]``, so a
    language-model head (``O`` = vocabulary) needs neither the ``(N, O)`` one-hot nor any
    ``O × O`` matrix: ``O(N²)`` time and memory. A projected trace kernel (``projection=k``, an
    estimate of the trace kernel) is aligned with the same ``L``; a projected full/diagonal
    kernel is aligned with the targets projected like its outputs (the tracker does this,
    :func:`lazy_monitor.tracking.kernel_config.project_targets`). Cost ``O(N² O²)`` (full),
    ``O(N² O)`` (diagonal), ``O(N² C)`` (trace; ``C`` = 1 for class indices): never more than
    the kernel itself.

    Args:
        kernel: square kernel ``K(x, x)``: ``(N, N, O, O)``, ``(N, N)`` or ``(N, N, O)``.
        targets: class indices ``(N,)`` (integer; one-hot encoded with ``O`` classes; for a
            trace kernel only their equality matters) or regression targets
            ``(N,)``/``(N, C)`` (float; ``C`` must equal ``O`` for full/diagonal kernels). With
            ``O = 1`` integer targets are used as the scalar target (binary classifier).
        num_classes: number of classes (default: ``O``; for a trace kernel only a range check
            of the indices).

    Returns:
        0-dim float64 tensor. ``K_c = 0`` (the kernel carries no centred structure): 0.
        ``L_c = 0`` (constant targets, alignment undefined): NaN. NaN on non-finite input.

    Raises:
        ValueError: non-square kernel, wrong number of targets, class index out of range, or
            regression targets whose width does not match ``O``.
    """
    kind = _square_kind(kernel)
    n = kernel.shape[0]
    if kind == "trace":
        return _trace_alignment(kernel, _target_gram(targets, n, num_classes))
    outputs = kernel.shape[2]
    y = _target_matrix(targets, n, outputs, num_classes).to(kernel.device)
    if not (_finite(kernel) and _finite(y)):
        return _nan(kernel)
    k = _centred(kernel)  # K_c = H K H, per output pair
    yc = y - y.mean(0, keepdim=True)
    if kind == "full":
        inner = torch.einsum("nmab,na,mb->", k, yc, yc)
        l_norm = (yc * yc).sum()  # ‖vec(Yc) vec(Yc)ᵀ‖_F = ‖Yc‖²_F
    else:
        inner = torch.einsum("nma,na,ma->", k, yc, yc)
        l_norm = (yc * yc).sum(0).square().sum().sqrt()
    return _aligned(inner, torch.linalg.vector_norm(k), l_norm)


def _centred(kernel: Tensor) -> Tensor:
    """``H K H`` over the example axes in float64, in one kernel-sized copy (centred in place)."""
    k = kernel.detach().to(torch.float64, copy=True)
    k.sub_(k.mean(0, keepdim=True))
    return k.sub_(k.mean(1, keepdim=True))


def _aligned(inner: Tensor, k_norm: Tensor, l_norm: Tensor) -> Tensor:
    """``inner / (‖K_c‖ ‖L_c‖)`` with :func:`kernel_alignment`'s zero cases."""
    if l_norm == 0:
        return _nan(inner)
    if k_norm == 0:
        return torch.zeros((), dtype=torch.float64, device=inner.device)
    return (inner / (k_norm * l_norm)).clamp(-1.0, 1.0)


def _target_gram(targets: Tensor, n: int, num_classes: Optional[int]) -> Tensor:
    """The target kernel of a trace kernel, ``Y Yᵀ`` ``(N, N)`` float64, built without an
    ``O``-sized (let alone ``O × O``) intermediate for class indices: the one-hot rows give
    ``(Y Yᵀ)[n, m] = [y_n = y_m]`` whatever the number of classes."""
    if check_targets(targets, n):
        idx = targets.detach().long()
        bad = idx < 0
        if num_classes is not None:
            bad |= idx >= num_classes
        if bool(bad.any()):
            raise ValueError(
                f"class index {int(idx[bad][0])} is outside [0, {num_classes}); pass class "
                "indices below num_classes (or omit num_classes)"
            )
        return (idx[:, None] == idx[None, :]).to(torch.float64)
    y = targets.detach().to(torch.float64).reshape(n, -1)
    if not _finite(y):
        return torch.full((n, n), math.nan, dtype=torch.float64, device=y.device)
    y = y - y[:1]  # an exact shift (centring removes it): constant targets give exactly 0
    return y @ y.T


def _trace_alignment(kernel: Tensor, gram: Tensor) -> Tensor:
    """:func:`kernel_alignment` of a trace kernel ``(N, N)`` against a target Gram ``Y Yᵀ``:
    ``⟨K, H G H⟩ / (‖H K H‖ ‖H G H‖)``, ``O(N²)`` memory."""
    gram = gram.to(kernel.device)
    if not (_finite(kernel) and _finite(gram)):
        return _nan(kernel)
    k = _centred(kernel)  # K_c = H K H
    lc = gram - gram.mean(0, keepdim=True)
    lc = lc - lc.mean(1, keepdim=True)  # L_c = H Y Yᵀ H = Y_c Y_cᵀ
    return _aligned((k * lc).sum(), torch.linalg.vector_norm(k), torch.linalg.vector_norm(lc))
