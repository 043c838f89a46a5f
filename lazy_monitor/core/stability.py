r"""Learning-rate stability of gradient descent seen through the empirical NTK (catapult metrics).

The quantity
-----------
For the loss ``L(θ) = 1/(2N) Σ_n ‖f(x_n; θ) − y_n‖²`` (squared error, summed over the ``O``
outputs, averaged over the ``N`` examples: "½·mean") one gradient-descent step with learning rate
η moves the training outputs, to first order in η, by

    f_{t+1} − f_t = −(η/N) K (f_t − y),        K = J Jᵀ  (the (N·O) × (N·O) empirical NTK),

so the residual along the top eigenvector of ``K`` is multiplied by ``1 − η λmax(K)/N``. The
linearised dynamics are stable iff

    lr_eig_max := η · λmax(K) / N  <  2.

Lewkowycz, Bahri, Dyer, Sohl-Dickstein & Gur-Ari 2020 ("The large learning rate phase of deep
learning: the catapult mechanism") show for wide networks trained with this loss that

* ``lr_eig_max < 2``: lazy phase, λmax stays about constant;
* ``2 < lr_eig_max < 4`` (derived for their two-layer linear model; they report about 12 for
  their wide ReLU nets; measured by this tool: about 4 with one hidden layer, 8-9 with three,
  docs/science.md): the *catapult* phase -- the loss first grows (a spike), then λmax drops
  until ``η λmax/N < 2`` and training converges in a flatter region;
* above that window training diverges.

The numbers 2 and 4 are for this loss normalisation. With a loss that averages over all ``N·O``
entries (``torch.nn.functional.mse_loss`` with ``reduction="mean"``, which also drops the ½) the
gradient is ``2/(N·O)`` instead of ``1/N`` times the residual: the critical value of
``η λmax(K)/N`` becomes ``O``, i.e. compare ``2·lr_eig_max/O`` with 2.

``N`` is the probe size. When the kernel is measured on a probe that is a random subset of the
training set rather than the training set itself, ``λmax(K_probe)/N_probe`` is an *estimate* of
``λmax(K_train)/N_train`` (for networks whose top eigenvalue is carried by a mean mode it scales
like ``N``); the estimate is exact when the probe is the full training batch.

What changes for other losses and optimisers (do not over-read the number)
-------------------------------------------------------------------------
* **Cross-entropy / logistic loss.** The function-space Hessian of the loss is no longer the
  identity but ``H_ℓ = diag(p) − p pᵀ`` per example (softmax), whose eigenvalues are at most ½
  (¼ for the binary logistic loss) and shrink to 0 as the model becomes confident. The relevant
  quantity is ``η λmax(H_ℓ^{1/2} K H_ℓ^{1/2})/N``, which is smaller than ``lr_eig_max`` and drifts
  during training. The threshold 2 and the catapult window are derived for MSE only;
  ``lr_eig_max`` is then a scale, not a stability test.
* **Adaptive optimisers (Adam, RMSProp, Adagrad, ...).** The step is preconditioned, so the
  function-space dynamics are not driven by the plain eNTK ``J Jᵀ``. Malladi et al. 2023 ("A
  Kernel-Based View of Language Model Fine-Tuning") show that early Adam/SignGD fine-tuning
  follows a different (sign-based, asymmetric) kernel; the stability edge of adaptive methods
  concerns the *preconditioned* sharpness (Cohen et al. 2022, "Adaptive Gradient Methods at the
  Edge of Stability"). With these optimisers ``lr_eig_max`` and the catapult flag are logged for
  reference but carry no stability meaning.
* **SGD with momentum, weight decay, mini-batches.** Momentum β moves the GD threshold from 2 to
  ``2(1 + β)``; mini-batch noise and weight decay shift it further. The metric does not model them.

Nothing here is a theorem about a given run: :class:`CatapultDetector` is a heuristic that reads
the two signatures Lewkowycz et al. describe (``lr_eig_max > 2``, then a drop of λmax).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

__all__ = ["CATAPULT_THRESHOLD", "CatapultDetector", "current_lr", "lr_eig_max"]

#: ``η·λmax(K)/N`` above which linearised gradient descent on the ½·mean squared error is
#: unstable (Lewkowycz et al. 2020).
CATAPULT_THRESHOLD = 2.0

_STATE_FORMAT = 1


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def lr_eig_max(lr: float, eig_max: float, n: int) -> float:
    r"""``η · λmax(K) / N``: the MSE stability number of gradient descent (Lewkowycz et al. 2020).

    Linearised GD on ``1/(2N) Σ_n ‖f(x_n) − y_n‖²`` is stable iff this is below 2; between 2 and
    about 4 the catapult phase (more for deeper ReLU nets, docs/science.md), above it divergence.
    See the module docstring for other loss normalisations, cross-entropy and adaptive optimisers.

    Args:
        lr: learning rate η (>= 0, finite).
        eig_max: largest eigenvalue of the kernel matrix ``K`` on the probe: the ``(N·O) × (N·O)``
            matrix of a full kernel (``ntk/eig_max`` of :class:`~lazy_monitor.KernelTracker`).
            NaN/inf propagate (a non-finite kernel gives a non-finite number).
        n: number of probe examples ``N`` (>= 1).

    Returns:
        ``lr * eig_max / n`` as a float.

    Raises:
        TypeError: an argument that is not a real number (``n``: not an int).
        ValueError: ``lr`` negative or non-finite, ``n < 1``.

    Example::

        lr_eig_max(0.5, eig_max=metrics["ntk/eig_max"], n=64)   # > 2: above the MSE edge
    """
    lr = _real("lr", lr)
    eig = _real("eig_max", eig_max)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be an int (the probe size), got {n!r} ({type(n).__name__})")
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr must be finite and >= 0, got {lr}")
    if n < 1:
        raise ValueError(f"n must be >= 1 (the number of probe examples), got {n}")
    return lr * eig / int(n)


def current_lr(optimizer: Any) -> float:
    """The learning rate of the first parameter group of ``optimizer``.

    Works for any ``torch.optim.Optimizer`` (the value a scheduler has set, read at call time),
    for Lightning's ``LightningOptimizer`` wrapper (both ``lightning.pytorch`` and
    ``pytorch_lightning``), and for a list/tuple of optimizers such as ``trainer.optimizers``
    (the first one). A tensor learning rate (``torch.optim`` accepts them) is converted to float.

    Raises:
        ValueError: an empty list of optimizers, or an optimizer with no parameter group.
        TypeError: an object without ``param_groups`` (and no wrapped ``.optimizer``), or a first
            group without a numeric ``"lr"``.

    Example::

        metrics["opt/lr"] = current_lr(optimizer)
    """
    if isinstance(optimizer, (list, tuple)):
        if not optimizer:
            raise ValueError("no optimizer: the list is empty; pass the optimizer being trained")
        optimizer = optimizer[0]
    groups = getattr(optimizer, "param_groups", None)
    if groups is None and hasattr(optimizer, "optimizer"):  # a wrapper (LightningOptimizer)
        groups = getattr(optimizer.optimizer, "param_groups", None)
    if groups is None:
        raise TypeError(
            f"{type(optimizer).__name__} has no param_groups; pass a torch.optim.Optimizer (or "
            "Lightning's wrapper / trainer.optimizers)"
        )
    if len(groups) == 0:
        raise ValueError(f"{type(optimizer).__name__} has no parameter group")
    lr = groups[0].get("lr")
    if hasattr(lr, "item"):  # tensor learning rate
        lr = lr.item()
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"param_groups[0]['lr'] must be a number, got {lr!r}")
    return float(lr)


class CatapultDetector:
    r"""Flags a catapult: ``lr·λmax/N`` exceeded the edge, and λmax fell afterwards.

    Heuristic after Lewkowycz et al. 2020 (MSE, gradient descent): in the catapult phase the loss
    spikes and the top kernel eigenvalue *decreases* until ``η λmax/N < 2``. The detector reads
    one ``(lr_eig_max, eig_max)`` pair per measurement:

    1. *armed* at the first measurement with ``lr_eig_max > threshold`` (default 2); the
       reference ``λ_ref`` is the largest λmax seen from that measurement on (a running max, so
       a λmax that first grows and then falls is measured from its peak);
    2. *fires* at a later measurement with ``λmax < (1 − rel_drop) · λ_ref``. ``rel_drop``
       (default 0.1, i.e. a 10 % fall) is far above the relative rounding noise of a float32
       kernel (~1e-6) and below the factor-of-several drops of a catapult; it is a heuristic;
    3. *latched*: once fired, :meth:`update` returns 1.0 for the rest of the run (the kernel was
       reshaped by a catapult at some point).

    Non-finite inputs (a diverged run) are ignored: they neither arm nor fire the detector;
    divergence is ``health/nonfinite``'s job. A fall of λmax without a preceding exceedance
    (e.g. ordinary feature learning) does not fire. With sparse measurements the detector sees
    the catapult only if one measurement falls before the drop (typically the one at step 0).

    Args:
        threshold: value of ``lr_eig_max`` that arms the detector (> 0; 2 for ½·mean MSE).
        rel_drop: relative fall of λmax below its peak that counts as "fell" (in (0, 1)).

    Raises:
        ValueError: ``threshold`` not finite and > 0, ``rel_drop`` not in (0, 1).

    Example::

        detector = CatapultDetector()
        for step, m in measurements:
            m["ntk/lr_eig_max"] = lr_eig_max(lr, m["ntk/eig_max"], n=len(probe))
            m["regime/catapult"] = detector.update(m["ntk/lr_eig_max"], m["ntk/eig_max"])
    """

    def __init__(self, threshold: float = CATAPULT_THRESHOLD, rel_drop: float = 0.1) -> None:
        threshold = _real("threshold", threshold)
        rel_drop = _real("rel_drop", rel_drop)
        if not math.isfinite(threshold) or threshold <= 0:
            raise ValueError(f"threshold must be finite and > 0, got {threshold}")
        if not 0.0 < rel_drop < 1.0:
            raise ValueError(
                f"rel_drop must be in (0, 1) (e.g. 0.1 for a 10 % fall), got {rel_drop}"
            )
        self.threshold = threshold
        self.rel_drop = rel_drop
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new run)."""
        self.armed = False
        self.fired = False
        self.peak_eig: float = math.nan

    def update(self, lr_eig_max: float, eig_max: float) -> float:
        """Feed one measurement; return ``regime/catapult`` (1.0 once fired, else 0.0).

        Args:
            lr_eig_max: ``η λmax/N`` at this measurement (:func:`lr_eig_max`).
            eig_max: λmax of the kernel at this measurement.
        """
        r, eig = _real("lr_eig_max", lr_eig_max), _real("eig_max", eig_max)
        if self.fired:
            return 1.0
        if not (math.isfinite(r) and math.isfinite(eig)):
            return 0.0
        if self.armed:
            if eig < (1.0 - self.rel_drop) * self.peak_eig:
                self.fired = True
                return 1.0
            self.peak_eig = max(self.peak_eig, eig)
        elif r > self.threshold:
            self.armed = True
            self.peak_eig = eig
        return 0.0

    def decision(self) -> tuple[bool, str]:
        """``(fired, reason)`` in words, for logs: why the flag is (not) set."""
        if self.fired:
            return True, (
                f"lr*eig_max/N exceeded {self.threshold:g} and eig_max then fell by more than "
                f"{self.rel_drop:.0%} below its peak {self.peak_eig:.4g}"
            )
        if self.armed:
            return False, (
                f"lr*eig_max/N exceeded {self.threshold:g}; eig_max has not fallen by "
                f"{self.rel_drop:.0%} below its peak {self.peak_eig:.4g} (yet)"
            )
        return False, f"lr*eig_max/N has not exceeded {self.threshold:g}"

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only (JSON- and ``weights_only``-safe)."""
        return {
            "format": _STATE_FORMAT,
            "threshold": self.threshold,
            "rel_drop": self.rel_drop,
            "armed": self.armed,
            "fired": self.fired,
            "peak_eig": self.peak_eig,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: not a CatapultDetector state, or saved with another threshold/rel_drop.
        """
        keys = {"format", "threshold", "rel_drop", "armed", "fired", "peak_eig"}
        if not isinstance(state, Mapping) or not keys <= set(state):
            raise ValueError(f"not a CatapultDetector state_dict (expected keys {sorted(keys)})")
        if state["format"] != _STATE_FORMAT:
            raise ValueError(f"unsupported CatapultDetector state format {state['format']!r}")
        for key in ("threshold", "rel_drop"):
            if float(state[key]) != getattr(self, key):
                raise ValueError(
                    f"the state was saved with {key}={state[key]!r} but this detector has "
                    f"{key}={getattr(self, key)!r}; build it with the same settings"
                )
        self.armed = bool(state["armed"])
        self.fired = bool(state["fired"])
        self.peak_eig = float(state["peak_eig"])

    def __repr__(self) -> str:
        return (
            f"CatapultDetector(threshold={self.threshold:g}, rel_drop={self.rel_drop:g}, "
            f"armed={self.armed}, fired={self.fired})"
        )
