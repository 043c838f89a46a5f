"""Kernel change and distance: how far ``K_t`` moved from ``K_0`` (see :mod:`lazy_monitor.core.metrics`
for the kernel kinds and conventions)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lazy_monitor.core.metrics._base import (
    _finite,
    _kind,
    _nan,
    _ratio,
    _same_shape,
    _scalar,
)

__all__ = ["kernel_matrix", "kernel_rel_change", "kernel_layer_changes", "kernel_distance"]

# ----------------------------------------------------------------------------- kernels


def kernel_matrix(kernel: Tensor) -> Tensor:
    """The kernel as the ``float64`` matrix it stands for (see the module docstring).

    Args:
        kernel: ``(N1, N2, O, O)``, ``(N1, N2)`` or ``(N1, N2, O)``.

    Returns:
        ``(N1·O, N2·O)`` for full and diagonal kernels (row ``n·O + a``; a diagonal kernel becomes
        block-diagonal in the output index), ``(N1, N2)`` for trace kernels.
    """
    kind = _kind(kernel)
    k = kernel.detach().to(torch.float64)
    if kind == "trace":
        return k
    n1, n2, o = k.shape[:3]
    if kind == "diagonal":
        k = torch.diag_embed(k)  # (N1, N2, O, O) with zero off-diagonal output blocks
    return k.permute(0, 2, 1, 3).reshape(n1 * o, n2 * o)


def kernel_rel_change(kernel: Tensor, kernel0: Tensor) -> Tensor:
    r"""Relative Frobenius change of a kernel from its reference.

    .. math:: \Delta K = \|K - K_0\|_F / \|K_0\|_F

    Under NTK parameterization it is bounded by ``O(width^{-1/2})`` during training (Lee et al.
    2019, "Wide Neural Networks of Any Depth Evolve as Linear Models Under Gradient Descent");
    the measured decay is faster, a log-log slope of about −0.7 to −1 against width (the leading
    change is ``O(1/width)``, Dyer & Gur-Ari 2020; docs/theory.md "Reading the demo",
    ``benchmarks/RESULTS.md``). A scaled kernel ``c K_0`` has ``ΔK = |c - 1|``.

    Args:
        kernel: current kernel, any kind (see module docstring).
        kernel0: reference kernel, same shape.

    Returns:
        0-dim float64 tensor. ``‖K₀‖ = 0``: 0 if ``K == K₀``, else ``+inf``. NaN on non-finite input.

    Raises:
        ValueError: shapes differ or are not kernel shapes.
    """
    _same_shape(kernel, kernel0, ("kernel", "kernel0"))
    if not (_finite(kernel) and _finite(kernel0)):
        return _nan(kernel)
    k = kernel.detach().to(torch.float64)
    k0 = kernel0.detach().to(device=k.device, dtype=torch.float64)
    if torch.equal(k, k0):
        return torch.zeros((), dtype=torch.float64, device=k.device)
    return _ratio(torch.linalg.vector_norm(k - k0), torch.linalg.vector_norm(k0))


def kernel_layer_changes(
    layer_kernels: Mapping[str, Tensor],
    layer_kernels0: Mapping[str, Tensor],
    kernel0: Tensor,
) -> dict[str, Tensor]:
    r"""Per-layer kernel change in units of the whole reference kernel.

    .. math:: \Delta K_l = \|K_l - K_{l,0}\|_F / \|K_0\|_F,\qquad K = \textstyle\sum_l K_l

    where ``K_l`` is layer ``l``'s block of the kernel (the sum over its parameters of
    ``J_p J_pᵀ``) and ``K₀`` the *total* reference kernel. One scale for every layer: the
    values compare across layers, ``Σ_l ΔK_l ≥ ‖K − K₀‖ / ‖K₀‖`` (the triangle inequality, with
    equality when the layers' changes point the same way), and ``ΔK_l`` is finite whenever
    ``K₀ ≠ 0``, also for a layer whose own ``K_{l,0}`` is exactly 0 (LoRA's ``lora_A`` while
    ``lora_B = 0``), where ``‖K_l − K_{l,0}‖ / ‖K_{l,0}‖`` would be ``+inf``. For one layer it
    equals :func:`kernel_rel_change`.

    Args:
        layer_kernels: ``{layer: K_l}``, kernels of one kind and shape.
        layer_kernels0: ``{layer: K_{l,0}}``, the same layers and shape.
        kernel0: the total reference kernel ``K₀``, same shape.

    Returns:
        ``{layer: ΔK_l}`` in ``layer_kernels`` order, 0-dim float64 tensors. ``K₀ = 0``: 0 for an
        unchanged layer, else ``+inf``. NaN for every layer if ``K₀`` is non-finite, for a layer
        whose ``K_l`` or ``K_{l,0}`` is.

    Raises:
        ValueError: shapes differ or are not kernel shapes, or a layer has no reference.
    """
    _kind(kernel0, "kernel0")
    missing = [k for k in layer_kernels if k not in layer_kernels0]
    if missing:
        raise ValueError(f"layers {missing} have no reference kernel in layer_kernels0")
    norm0 = (
        torch.linalg.vector_norm(kernel0.detach().to(torch.float64)) if _finite(kernel0) else None
    )
    out = {}
    for layer, k in layer_kernels.items():
        k0 = layer_kernels0[layer]
        _same_shape(k, kernel0, (f"layer_kernels[{layer!r}]", "kernel0"))
        _same_shape(k, k0, (f"layer_kernels[{layer!r}]", f"layer_kernels0[{layer!r}]"))
        if norm0 is None or not (_finite(k) and _finite(k0)):
            out[layer] = _nan(kernel0)
            continue
        a = k.detach().to(device=norm0.device, dtype=torch.float64)
        b = k0.detach().to(device=norm0.device, dtype=torch.float64)
        num = torch.zeros_like(norm0) if torch.equal(a, b) else torch.linalg.vector_norm(a - b)
        out[layer] = _ratio(num, norm0)
    return out


def kernel_distance(kernel1: Tensor, kernel2: Tensor) -> Tensor:
    r"""Kernel distance: one minus the cosine similarity of two kernels.

    .. math:: S(K_1, K_2) = 1 - \langle K_1, K_2 \rangle_F / (\|K_1\|_F \|K_2\|_F)

    (Fort et al. 2020, "Deep learning versus kernel learning: an empirical study of loss landscape
    geometry and the time evolution of the Neural Tangent Kernel".) Invariant to the scale of
    either kernel: ``S(K, cK) = 0`` for ``c > 0``; ``S = 1`` for orthogonal kernels. Range
    ``[0, 2]`` in general, ``[0, 1]`` for kernels with non-negative inner product (e.g. two PSD
    kernels).

    Args:
        kernel1: a kernel, any kind.
        kernel2: a kernel of the same shape.

    Returns:
        0-dim float64 tensor. Both kernels zero: 0; exactly one zero: 1 (no shared direction).
        NaN on non-finite input.

    Raises:
        ValueError: shapes differ or are not kernel shapes.
    """
    _same_shape(kernel1, kernel2, ("kernel1", "kernel2"))
    if not (_finite(kernel1) and _finite(kernel2)):
        return _nan(kernel1)
    k1 = kernel1.detach().to(torch.float64).flatten()
    k2 = kernel2.detach().to(device=k1.device, dtype=torch.float64).flatten()
    n1, n2 = torch.linalg.vector_norm(k1), torch.linalg.vector_norm(k2)
    if n1 == 0 or n2 == 0:
        return _scalar(0.0 if n1 == n2 else 1.0, k1)
    if torch.equal(k1, k2):
        return _scalar(0.0, k1)  # exact, where the rounding of cos could leave 1e-16
    cos = torch.dot(k1, k2) / (n1 * n2)
    # |cos| <= 1 up to rounding; clamp so identical kernels give exactly 0, never -1e-16.
    return 1.0 - cos.clamp(-1.0, 1.0)
