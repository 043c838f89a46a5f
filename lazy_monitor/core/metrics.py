r"""Regime metrics: pure functions on kernels, parameters and outputs.

Every function here takes tensors and returns a 0-dim ``float64`` tensor (or a dict / tuple of
them) on the device of its first argument. They have no state and no side effects; the stateful
view over a training run is :class:`lazy_monitor.KernelTracker`.

Conventions shared by all functions:

* **Kernel kinds.** A kernel is any output of :func:`lazy_monitor.empirical_ntk`; its kind is
  read from its number of dimensions:

  =============  ==================  =========================================================
  kind           shape               matrix it stands for
  =============  ==================  =========================================================
  ``"full"``     ``(N1, N2, O, O)``  ``K[(n, a), (m, b)]``, an ``(N1·O) × (N2·O)`` matrix
  ``"trace"``    ``(N1, N2)``        ``Σ_a K[n, m, a, a]``, an ``N1 × N2`` matrix
  ``"diagonal"`` ``(N1, N2, O)``     ``δ_ab K[n, m, a]``: the block-diagonal ``(N1·O) × (N2·O)``
                                     matrix with the ``O`` blocks ``K[:, :, a]``
  =============  ==================  =========================================================

  Frobenius norms and inner products of every kind equal those of the matrix it stands for, so
  :func:`kernel_rel_change` and :func:`kernel_distance` work on the raw tensors. The spectrum of
  a diagonal kernel is the union of the spectra of its ``O`` blocks (:func:`kernel_spectrum`).
* **Precision.** Inputs are cast to ``float64`` before any reduction.
* **Non-finite input.** If any input holds NaN or ±inf, the result is NaN -- never an exception,
  so a diverging run keeps training and logging. :func:`all_finite` tells a caller whether a NaN
  came from its inputs (the tracker reports it as ``health/nonfinite``).
* **0/0.** Ratios whose numerator and denominator are both exactly 0 are 0 (nothing moved); a
  positive numerator over a zero denominator is ``+inf``. Each function states its own cases.

Shape errors (e.g. a kernel and a reference of different shapes) are programming errors and raise
``ValueError`` immediately.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = [
    "alignment_targets",
    "all_finite",
    "argmax_agreement",
    "check_targets",
    "condition_number",
    "numerical_rank",
    "spectral_rtol",
    "effective_rank",
    "eigenspace_overlap",
    "group_by_layer",
    "kernel_alignment",
    "kernel_distance",
    "kernel_layer_changes",
    "kernel_matrix",
    "kernel_rel_change",
    "kernel_spectrum",
    "layer_name",
    "linearization_error",
    "linearization_rmse",
    "param_changes",
    "param_distance",
    "param_rel_change",
    "param_rel_change_by_layer",
    "spectrum_stats",
]

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


# ----------------------------------------------------------------------------- parameters


def layer_name(param_name: str) -> str:
    """The layer a parameter belongs to: its module prefix (``"net.0.weight" -> "net.0"``).

    A parameter registered directly on the root module has no prefix; it is its own layer.
    """
    prefix = param_name.rpartition(".")[0]
    return prefix or param_name


def group_by_layer(names: Iterable[str]) -> dict[str, list[str]]:
    """Parameter names grouped by :func:`layer_name`, in first-appearance order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(layer_name(name), []).append(name)
    return groups


def _param_sums(
    params: Mapping[str, Tensor], params0: Mapping[str, Tensor]
) -> Optional[dict[str, tuple[Tensor, Tensor]]]:
    if set(params) != set(params0):
        missing = sorted(set(params0) - set(params))
        extra = sorted(set(params) - set(params0))
        raise ValueError(
            f"params and params0 must have the same names; missing from params: {missing}, "
            f"not in params0: {extra}"
        )
    if not params:
        raise ValueError("params is empty; pass at least one parameter")
    out = {}
    first_device = next(iter(params.values())).device
    for name, p in params.items():
        p0 = params0[name]
        if p.shape != p0.shape:
            raise ValueError(
                f"params[{name!r}] has shape {tuple(p.shape)} but params0[{name!r}] has "
                f"{tuple(p0.shape)}"
            )
        q = p.detach().to(torch.float64)
        q0 = p0.detach().to(device=q.device, dtype=torch.float64)
        out[name] = ((q - q0).square().sum(), q0.square().sum())
    # A NaN/inf anywhere propagates into these float64 sums (finite float32 squares cannot
    # overflow there), so one check on the sums replaces an isfinite pass over every tensor.
    sums = torch.stack([s.to(first_device) for pair in out.values() for s in pair])
    if not _finite(sums):
        return None
    return out


def param_changes(
    params: Mapping[str, Tensor],
    params0: Mapping[str, Tensor],
    groups: Optional[Mapping[str, Iterable[str]]] = None,
    *,
    relative_to: str = "model",
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    r"""Distance, relative change and per-group relative change of the parameters, in one pass.

    .. math::
        d = \|\theta - \theta_0\|_2,\qquad
        r = \|\theta - \theta_0\|_2 / \|\theta_0\|_2,\qquad
        r_g = \|\theta_g - \theta_{0,g}\|_2 / \|\theta_0\|_2

    over all parameters (``θ`` is the concatenation of every tensor) and over the parameters of
    each group ``g``. Under NTK parameterization ``r`` decays like ``width^{-1/2}`` (Lee et al.
    2019). Use this when you need several of them (one float64 pass over the parameters); the
    single-value functions below are thin wrappers.

    **Per-group normalisation.** ``r_g`` divides group ``g``'s movement by the *whole model's*
    ``‖θ₀‖`` (``relative_to="model"``, the default and the tracker's ``params_layer/*``): the
    groups then share one scale, ``Σ_g r_g² = r²`` when the groups partition the parameters
    (each ``r_g`` is the part of ``r`` that happens in ``g``), and ``r_g`` is finite whenever
    ``r`` is, also for a group initialised at exactly 0 (LoRA's ``lora_B``, zero biases), whose
    own ratio ``‖Δθ_g‖ / ‖θ₀,g‖`` is ``+inf`` after one step. ``relative_to="group"`` gives
    that own ratio (a zero ``θ₀,g``: 0 if unchanged, else ``+inf``).

    Args:
        params: current parameters by name (e.g. ``dict(model.named_parameters())``).
        params0: reference parameters, same names and shapes (may live on another device).
        groups: ``{group: [param names]}``; default :func:`group_by_layer` (module prefix, so a
            layer's weight and bias form one group). Pass ``{name: [name] for name in params}``
            for per-parameter values.
        relative_to: ``"model"`` (divide by ``‖θ₀‖`` of all parameters) or ``"group"`` (by the
            group's own ``‖θ₀,g‖``).

    Returns:
        ``(d, r, {group: r_g})``, 0-dim float64 tensors. A zero denominator gives 0 if the
        numerator is 0, else ``+inf`` (``relative_to="model"``: only for an all-zero ``θ₀``).
        All NaN on non-finite input.

    Raises:
        ValueError: names or shapes differ, a group names an unknown parameter, or
            ``relative_to`` is not ``"model"``/``"group"``.
    """
    if relative_to not in ("model", "group"):
        raise ValueError(f"relative_to must be 'model' or 'group', got {relative_to!r}")
    sums = _param_sums(params, params0)
    groups = group_by_layer(params) if groups is None else groups
    first = next(iter(params.values()))
    by_group = {}
    total0 = None if sums is None else torch.stack([r for _, r in sums.values()]).sum().sqrt()
    for group, names in groups.items():
        names = list(names)
        unknown = [n for n in names if n not in params]
        if unknown or not names:
            raise ValueError(f"group {group!r} names unknown parameters {unknown} (or none)")
        if sums is None:
            by_group[group] = _nan(first)
            continue
        num = torch.stack([sums[n][0] for n in names]).sum().sqrt()
        if relative_to == "group":
            den = torch.stack([sums[n][1] for n in names]).sum().sqrt()
        else:
            den = total0
        by_group[group] = _ratio(num, den)
    if sums is None:
        return _nan(first), _nan(first), by_group
    num = torch.stack([d for d, _ in sums.values()]).sum().sqrt()
    return num, _ratio(num, total0), by_group


def param_distance(params: Mapping[str, Tensor], params0: Mapping[str, Tensor]) -> Tensor:
    """``‖θ − θ₀‖₂`` over all parameters; see :func:`param_changes` (NaN on non-finite input)."""
    return param_changes(params, params0, {})[0]


def param_rel_change(params: Mapping[str, Tensor], params0: Mapping[str, Tensor]) -> Tensor:
    """``‖θ − θ₀‖₂ / ‖θ₀‖₂`` over all parameters (Lee et al. 2019); see :func:`param_changes`
    for the conventions (``θ₀ = 0``: 0 if unchanged, else ``+inf``; NaN on non-finite input)."""
    return param_changes(params, params0, {})[1]


def param_rel_change_by_layer(
    params: Mapping[str, Tensor],
    params0: Mapping[str, Tensor],
    groups: Optional[Mapping[str, Iterable[str]]] = None,
    *,
    relative_to: str = "model",
) -> dict[str, Tensor]:
    """``{group: ‖θ_g − θ_{0,g}‖ / ‖θ₀‖}`` (the whole model's ``‖θ₀‖``; ``relative_to="group"``:
    the group's own), groups by layer by default; see :func:`param_changes`."""
    return param_changes(params, params0, groups, relative_to=relative_to)[2]


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
