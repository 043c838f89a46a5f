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

from lazy_monitor.core.metrics._base import all_finite
from lazy_monitor.core.metrics.alignment import (
    alignment_targets,
    check_targets,
    kernel_alignment,
)
from lazy_monitor.core.metrics.kernel import (
    kernel_distance,
    kernel_layer_changes,
    kernel_matrix,
    kernel_rel_change,
)
from lazy_monitor.core.metrics.outputs import (
    argmax_agreement,
    linearization_error,
    linearization_rmse,
)
from lazy_monitor.core.metrics.params import (
    group_by_layer,
    layer_name,
    param_changes,
    param_distance,
    param_rel_change,
    param_rel_change_by_layer,
)
from lazy_monitor.core.metrics.spectrum import (
    condition_number,
    effective_rank,
    eigenspace_overlap,
    kernel_spectrum,
    numerical_rank,
    spectral_rtol,
    spectrum_stats,
)

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
