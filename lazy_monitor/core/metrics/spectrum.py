"""Kernel spectrum: eigendecomposition, rank / conditioning statistics and eigenspace overlap (see
:mod:`lazy_monitor.core.metrics` for the kernel kinds and conventions)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from lazy_monitor.core.metrics._base import (
    _finite,
    _nan,
    _scalar,
    _square_kind,
)
from lazy_monitor.core.metrics.kernel import (
    kernel_matrix,
)

__all__ = [
    "kernel_spectrum",
    "effective_rank",
    "spectral_rtol",
    "numerical_rank",
    "condition_number",
    "spectrum_stats",
    "eigenspace_overlap",
]

# ----------------------------------------------------------------------------- spectrum


def kernel_spectrum(kernel: Tensor) -> tuple[Tensor, Tensor]:
    r"""Eigendecomposition of the kernel matrix, in float64.

    ``K = U diag(λ) Uᵀ`` for the symmetrised matrix ``(K + Kᵀ)/2`` of :func:`kernel_matrix`:
    ``(N·O) × (N·O)`` for full kernels, ``N × N`` for trace kernels. A diagonal kernel stands for
    a block-diagonal matrix; its spectrum is computed per block (``O`` eigendecompositions of
    ``N × N``) and its eigenvectors are embedded at rows ``n·O + a``, so the result equals that of
    the block-diagonal matrix at a fraction of the cost.

    Cost: one ``torch.linalg.eigh`` of an ``M × M`` float64 matrix, ``O(M³)`` time and ``O(M²)``
    memory (``M = N·O`` full, ``N`` trace; ``O · N³`` for diagonal); measured times in
    ``benchmarks/RESULTS.md``. Prefer a trace kernel or a smaller probe beyond a couple of
    thousand.

    Args:
        kernel: square kernel ``K(x, x)``: ``(N, N, O, O)``, ``(N, N)`` or ``(N, N, O)``.

    Returns:
        ``(eigenvalues (M,), eigenvectors (M, M))``, eigenvalues ascending, eigenvectors in the
        columns. Both NaN-filled on non-finite input or if ``eigh`` fails to converge.

    Raises:
        ValueError: the kernel is not square.
    """
    kind = _square_kind(kernel)
    if kind == "diagonal":
        n, _, o = kernel.shape
        m = n * o
    else:
        m = kernel.shape[0] * (kernel.shape[2] if kind == "full" else 1)
    dev = kernel.device

    def nan_result() -> tuple[Tensor, Tensor]:
        return (
            torch.full((m,), math.nan, dtype=torch.float64, device=dev),
            torch.full((m, m), math.nan, dtype=torch.float64, device=dev),
        )

    if not _finite(kernel):
        return nan_result()
    try:
        if kind != "diagonal":
            mat = kernel_matrix(kernel)
            return torch.linalg.eigh(0.5 * (mat + mat.T))
        blocks = kernel.detach().to(torch.float64).permute(2, 0, 1)  # (O, N, N)
        vals, vecs = torch.linalg.eigh(0.5 * (blocks + blocks.transpose(1, 2)))
    except (RuntimeError, torch.linalg.LinAlgError):
        return nan_result()
    # Embed block a's eigenvectors at rows n·O + a; columns ordered (a, j).
    full_vecs = torch.zeros(n, o, o, n, dtype=torch.float64, device=dev)
    idx = torch.arange(o, device=dev)
    full_vecs[:, idx, idx, :] = vecs.permute(1, 0, 2)  # [n, a, a, j] = vecs[a, n, j]
    full_vecs = full_vecs.reshape(m, m)
    order = torch.argsort(vals.reshape(-1))
    return vals.reshape(-1)[order], full_vecs[:, order]


def effective_rank(eigenvalues: Tensor) -> Tensor:
    r"""Effective rank of a PSD spectrum (Roy & Vetterli 2007, "The effective rank: a measure of
    effective dimensionality").

    .. math:: \mathrm{erank} = \exp\Big(-\sum_i p_i \log p_i\Big),\quad p_i = \lambda_i / \sum_j \lambda_j

    ``1`` for a rank-1 matrix, ``M`` for ``c·I_M``. Eigenvalues below 0 (rounding of a PSD
    kernel) are clamped to 0.

    Args:
        eigenvalues: ``(M,)``.

    Returns:
        0-dim float64 tensor; 0 for an all-zero spectrum; NaN on non-finite input.
    """
    if not _finite(eigenvalues):
        return _nan(eigenvalues)
    lam = eigenvalues.detach().to(torch.float64).clamp_min(0.0)
    total = lam.sum()
    if total == 0:
        return torch.zeros((), dtype=torch.float64, device=lam.device)
    p = lam / total
    p = p[p > 0]
    return torch.exp(-(p * p.log()).sum())


def spectral_rtol(size: int, dtype: torch.dtype) -> float:
    """Relative tolerance below which an eigenvalue of a PSD kernel is zero to working precision.

    ``size · eps(dtype)`` (NumPy's ``matrix_rank`` rule), with ``dtype`` the precision the kernel
    was *computed* in: a float32 kernel decomposed in float64 still carries float32 round-off.
    """
    return float(size) * float(torch.finfo(dtype).eps)


def numerical_rank(eigenvalues: Tensor, rtol: Optional[float] = None) -> Tensor:
    r"""Number of eigenvalues above ``rtol · λ_max`` (the numerical rank of a PSD kernel).

    Args:
        eigenvalues: ``(M,)``.
        rtol: relative tolerance; default :func:`spectral_rtol` of ``M`` and the eigenvalues'
            dtype (pass the kernel's dtype when a float32 kernel was decomposed in float64).

    Returns:
        0-dim float64 tensor (an integer value, 0 for an all-zero spectrum); NaN on non-finite
        input.

    >>> numerical_rank(torch.tensor([1e-9, 0.5, 2.0])).item()  # float32: rtol = 3 · 1.2e-7
    2.0
    """
    if not _finite(eigenvalues):
        return _nan(eigenvalues)
    lam = eigenvalues.detach().to(torch.float64)
    rtol = spectral_rtol(lam.numel(), eigenvalues.dtype) if rtol is None else float(rtol)
    hi = lam.max()
    if hi <= 0:
        return torch.zeros((), dtype=torch.float64, device=lam.device)
    return (lam > rtol * hi).sum().to(torch.float64)


def condition_number(eigenvalues: Tensor, rtol: Optional[float] = None) -> Tensor:
    r"""Condition number ``λ_max / max(λ_min, rtol · λ_max)`` of a PSD spectrum.

    Eigenvalues below ``rtol · λ_max`` are zero to working precision (a float32 kernel with
    ``N·O`` close to or above the parameter count has some, of either sign): their ratio is
    round-off, not a property of the kernel, so the result is capped at ``1 / rtol`` instead of
    being ``inf`` or jumping by orders of magnitude between measurements. A capped value means
    "singular to working precision"; :func:`numerical_rank` says how singular.

    Args:
        eigenvalues: ``(M,)``.
        rtol: relative tolerance; default :func:`spectral_rtol` of ``M`` and the eigenvalues'
            dtype.

    Returns:
        0-dim float64 tensor in ``[1, 1/rtol]``; NaN for an all-zero spectrum or non-finite
        input.

    >>> condition_number(torch.tensor([-4e-7, 1.0, 100.0]), rtol=1e-5).item()
    100000.0
    """
    if not _finite(eigenvalues):
        return _nan(eigenvalues)
    lam = eigenvalues.detach().to(torch.float64)
    rtol = spectral_rtol(lam.numel(), eigenvalues.dtype) if rtol is None else float(rtol)
    lo, hi = lam.min(), lam.max()
    if hi <= 0:
        return _nan(lam)
    return hi / torch.clamp(lo, min=rtol * float(hi))


def spectrum_stats(eigenvalues: Tensor, rtol: Optional[float] = None) -> dict[str, Tensor]:
    """Summary of a kernel spectrum.

    Args:
        eigenvalues: ``(M,)``, e.g. from :func:`kernel_spectrum`.
        rtol: relative tolerance of "zero" for ``cond``/``rank``/``log10_cond`` (default
            :func:`spectral_rtol` of ``M`` and the eigenvalues' dtype; pass
            ``spectral_rtol(M, kernel.dtype)`` for a float32 kernel decomposed in float64).

    Returns:
        ``{"eig_max", "eig_min", "trace", "eff_rank", "cond", "log10_cond", "rank"}``, 0-dim
        float64 tensors: largest and smallest eigenvalue (``eig_min`` is reported unclamped, so
        rounding may make it slightly negative), their sum (= the kernel matrix trace),
        :func:`effective_rank`, :func:`condition_number` (finite, at most ``1/rtol``), its
        ``log10`` and :func:`numerical_rank`. All NaN on non-finite input.
    """
    keys = ("eig_max", "eig_min", "trace", "eff_rank", "cond", "log10_cond", "rank")
    if eigenvalues.numel() == 0:
        raise ValueError("eigenvalues is empty; pass the spectrum of a non-empty kernel")
    if not _finite(eigenvalues):
        nan = _nan(eigenvalues)
        return {k: nan.clone() for k in keys}
    lam = eigenvalues.detach().to(torch.float64)
    if rtol is None:
        rtol = spectral_rtol(lam.numel(), eigenvalues.dtype)
    cond = condition_number(lam, rtol)
    return {
        "eig_max": lam.max(),
        "eig_min": lam.min(),
        "trace": lam.sum(),
        "eff_rank": effective_rank(lam),
        "cond": cond,
        "log10_cond": torch.log10(cond),
        "rank": numerical_rank(lam, rtol),
    }


def eigenspace_overlap(vectors0: Tensor, vectors: Tensor) -> Tensor:
    r"""Overlap of two k-dimensional eigenspaces.

    .. math:: \mathrm{overlap}(U_0, U) = \|U_0^\top U\|_F^2 / k

    the mean squared cosine of the principal angles between the spans: 1 for the same subspace,
    0 for orthogonal ones. Use the top-k eigenvectors of ``K₀`` and ``K`` (the last ``k`` columns
    of :func:`kernel_spectrum`'s eigenvectors). When ``λ_k`` is (nearly) degenerate with
    ``λ_{k+1}`` the top-k space is not unique and the overlap can drop without the kernel moving
    much; choose ``k`` at a spectral gap (e.g. the number of classes).

    Args:
        vectors0: ``(M, k)`` orthonormal columns.
        vectors: ``(M, k)`` orthonormal columns.

    Returns:
        0-dim float64 tensor in ``[0, 1]``; NaN on non-finite input.

    Raises:
        ValueError: shapes differ or are not ``(M, k)`` with ``k ≥ 1``.
    """
    if vectors0.dim() != 2 or vectors0.shape != vectors.shape or vectors0.shape[1] == 0:
        raise ValueError(
            f"vectors0 {tuple(vectors0.shape)} and vectors {tuple(vectors.shape)} must both be "
            "(M, k) with k >= 1"
        )
    if not (_finite(vectors0) and _finite(vectors)):
        return _nan(vectors)
    u = vectors.detach().to(torch.float64)
    u0 = vectors0.detach().to(device=u.device, dtype=torch.float64)
    if torch.equal(u, u0):
        return _scalar(1.0, u)  # exact, where rounding of ‖U₀ᵀU₀‖² could leave 1 - 1e-16
    return ((u0.T @ u).square().sum() / u.shape[1]).clamp(0.0, 1.0)
