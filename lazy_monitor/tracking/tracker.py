"""KernelTracker: regime metrics of a live model relative to its snapshot at θ₀.

Framework-agnostic: a plain training loop, a Lightning callback or any other trainer calls
:meth:`KernelTracker.start` once before training and :meth:`KernelTracker.measure` every few
steps, and gets a flat ``dict[str, float]`` to log.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from lazy_monitor import catalogue
from lazy_monitor._state import check_schema, stamp
from lazy_monitor._validation import (
    check_bool,
    check_callable,
    check_choice,
    check_float,
    check_int,
    check_mapping,
    check_str,
)
from lazy_monitor.core import _functional as F
from lazy_monitor.core import metrics as M
from lazy_monitor.core._functional import InputBatch, OutputFn
from lazy_monitor.core.kernels import empirical_ntk
from lazy_monitor.core.linearization import Linearization
from lazy_monitor.thresholds import Threshold
from lazy_monitor.tracking._state import LastMeasurement, Reference, fingerprint, same_fingerprint
from lazy_monitor.tracking.layers import group_layers
from lazy_monitor.tracking.regime import Measurement, lazy_decision, regime_metrics

__all__ = ["KernelTracker", "DEFAULT_LAZY_THRESHOLDS", "LOWER_BOUND_METRICS", "MAX_SPECTRUM_SIZE"]

#: Kernel kinds of the engine: ``(N, N, O, O)``, ``(N, N)`` summed over outputs, ``(N, N, O)``.
KINDS = ("full", "trace", "diagonal")

#: Default lazy-regime thresholds: a heuristic, not a result from the literature (no paper gives
#: canonical values). 10 % relative kernel movement and a linear model that explains 90 % of the
#: function's movement on the probe are comfortably met by wide NTK-parameterised MLPs trained with
#: small learning rates and clearly violated once features learn.
DEFAULT_LAZY_THRESHOLDS: dict[str, float] = {"ntk/rel_change": 0.1, "lin/rel_error": 0.1}

#: Kernel matrix size (``N·O`` for full/diagonal, ``N`` for trace) above which the tracker warns
#: that the per-measurement float64 eigendecomposition (``O(M³)``) becomes the dominant cost.
MAX_SPECTRUM_SIZE = 2048

#: Metrics whose lazy threshold is a lower bound (lazy means close to 1); every other
#: thresholded metric is bounded from above. Derived from :mod:`lazy_monitor.catalogue`.
LOWER_BOUND_METRICS = tuple(
    m.name
    for m in catalogue.CATALOGUE
    if m.direction == "min" and not m.planned and not m.is_pattern
)


class KernelTracker:
    r"""Tracks how far a model has moved from the kernel (lazy) regime around its θ₀ snapshot.

    :meth:`start` snapshots θ₀ (a frozen :class:`~lazy_monitor.Linearization`), the probe outputs
    ``f₀ = f(probe; θ₀)``, the empirical NTK ``K₀ = J(θ₀) J(θ₀)ᵀ`` on the probe (and per layer) and
    the top-k eigenvectors of ``K₀``. Each :meth:`measure` recomputes the kernel at the current
    parameters with one engine call (total and per-layer blocks together), one float64
    eigendecomposition, one forward pass for ``f`` and one ``torch.func.jvp`` for
    ``f_lin = f₀ + J(θ₀)(θ − θ₀)``, and returns these metrics (see :mod:`lazy_monitor.metrics`
    for the formulas and references):

    The names, their formulas, directions and papers are the entries of
    :data:`lazy_monitor.catalogue.CATALOGUE` with ``source="tracker"`` (``ntk/*``, ``params/*``,
    ``lin/*``, the per-layer ``ntk_layer/<layer>/rel_change`` and
    ``params_layer/<layer>/rel_change``, ``regime/lazy`` and ``health/nonfinite``);
    ``ntk/alignment`` needs ``targets``, ``lin/agreement`` class-index targets, the per-layer
    names ``per_layer=True``. The values are computed by the pure function
    :func:`lazy_monitor.tracking.regime.regime_metrics` of the reference and the measurement.

    :meth:`metric_names` returns exactly these keys, in this order, for the configuration.

    Evaluation semantics: everything is computed in eval mode (BatchNorm running statistics,
    dropout off) in full precision, and leaves the model's weights, buffers, ``.grad``, training
    flags and every RNG state untouched. The probe is moved to the model's device for each
    measurement. Buffers are part of the function: ``f`` and ``K`` use the model's current
    buffers (e.g. BatchNorm running statistics) while ``f_lin`` keeps those of θ₀ (see
    :class:`~lazy_monitor.Linearization`), so buffer drift shows up in ``lin/rel_error``.

    Tracked parameters: the kernel, ``f_lin`` and the ``params/*`` metrics are over the
    parameters that are trainable (``requires_grad=True``) when :meth:`start` is called, by
    name, whatever their ``requires_grad`` is later: freezing or unfreezing layers during
    training (e.g. Lightning's ``BackboneFinetuning``, progressive unfreezing) does not change
    what is measured. Parameters frozen at :meth:`start` are constants at their current value in
    ``f`` and ``K`` and at their θ₀ value in ``f_lin``, so training them later shows up in
    ``lin/rel_error``. If a tracked parameter disappears from ``model.named_parameters()`` or
    changes shape, :meth:`measure` warns once and returns NaN metrics with
    ``health/nonfinite = 1`` instead of raising mid-training.

    Examples must be independent in eval mode (the kernel is a per-example NTK):
    :meth:`start` raises ``ValueError`` if the first two probe examples give different outputs
    evaluated together and alone (a layer that mixes the examples of a batch). With
    ``implementation="auto"``, a model whose control flow depends on the data (which defeats
    the structured engine) makes the tracker warn once and use ``"jacobian"`` from then on.

    Cost per measurement: one kernel (see :func:`lazy_monitor.empirical_ntk`), one forward, one
    jvp (a few plain forwards), and one ``eigh`` of the ``M × M`` float64 kernel matrix,
    ``M = N·O`` for ``kind="full"`` (``N`` for ``"trace"``; ``O`` blocks of ``N × N`` for
    ``"diagonal"``), growing like ``M³`` (a warning is issued above ``MAX_SPECTRUM_SIZE =
    2048``; measured times in ``benchmarks/RESULTS.md``). Memory:
    one copy of the parameters (θ₀), ``K₀`` and, with ``per_layer``, one kernel per layer.

    Args:
        model: the network being trained.
        probe: fixed inputs batched on dim 0 (a tensor, a tuple/list passed positionally or a
            dict passed as keyword arguments); ``N`` examples. Keep it small (16–128): the kernel
            costs ``N²`` and the spectrum ``(N·O)³``.
        targets: optional targets of the probe, for ``ntk/alignment``: class indices ``(N,)``
            (integer; also enables ``lin/agreement``) or regression targets ``(N,)``/``(N, O)``
            (float; ``(N, C)`` with any ``C`` for ``kind="trace"``).
        kind: kernel kind, ``"full"`` ``(N, N, O, O)``, ``"trace"`` ``(N, N)`` (summed over
            outputs; cheapest) or ``"diagonal"`` ``(N, N, O)``.
        implementation: kernel implementation passed to :func:`lazy_monitor.empirical_ntk`
            (``"auto"`` chooses by cost).
        per_layer: also report per-layer kernel and parameter changes.
        lazy_thresholds: ``{metric name or glob: bound}`` defining ``regime/lazy``; the
            direction is the catalogue's lazy side: upper limits for ``ntk/rel_change``,
            ``ntk/distance``, ``ntk/velocity``, ``params/*``, ``lin/rel_error``, ``lin/rmse``
            and the per-layer ``…/rel_change`` metrics (e.g. ``"ntk_layer/*/rel_change"``),
            lower limits for ``ntk/eig_overlap`` and ``lin/agreement``. Default :data:`DEFAULT_LAZY_THRESHOLDS`
            (``ntk/rel_change ≤ 0.1`` and ``lin/rel_error ≤ 0.1``), a heuristic.
        output_fn: maps the model's output to a tensor (e.g. ``lambda out: out.logits``).
        topk: dimension ``k`` of the eigenspaces compared by ``ntk/eig_overlap``. Default: 10
            for a trace kernel; for full/diagonal kernels the multiple of ``O`` closest to 10
            from above (``O·⌈10/O⌉``), because the NTK of a network with ``O`` outputs is close to
            ``Θ ⊗ I_O`` and each eigenvalue of ``Θ`` appears ``O`` times -- cutting inside such a
            near-degenerate cluster makes the overlap noisy. Capped at ``M``.
        snapshot_device: where θ₀, ``f₀``, ``K₀`` live and the metrics are computed (``None``:
            the model's device; ``"cpu"`` keeps them off the accelerator, the kernel is copied
            there for each measurement).
        chunk_size: examples per block in the kernel engine (``None``: chosen by a memory
            budget).
        layer_groups: with ``per_layer``, at most this many layer groups (module hierarchy,
            normalization layers folded into their block:
            :func:`lazy_monitor.tracking.layers.group_layers`); ``None``: one per module.

    Raises:
        TypeError: an argument of the wrong type (``model`` not an ``nn.Module``,
            ``output_fn`` not callable, ``targets`` not a tensor, ``per_layer="false"``, ...).
        ValueError: a bad value of the right type: empty/mismatched probe, targets of the wrong
            length/shape/range or constant, unknown ``kind``, ``implementation`` rejected by the
            engine, unknown threshold names or bad threshold values, bad
            ``topk``/``chunk_size``/``snapshot_device``.

    Example::

        tracker = KernelTracker(model, x_probe, targets=y_probe)
        logger.log(tracker.start())                       # step 0: all changes are 0
        for step in range(1, steps + 1):
            train_step()
            if step % 50 == 0:
                logger.log(tracker.measure(step))        # {"ntk/rel_change": ..., ...}

    Run as a doctest:

    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    >>> tracker = KernelTracker(model, torch.randn(6, 3), targets=torch.tensor([0, 1] * 3))
    >>> start = tracker.start()
    >>> start["ntk/rel_change"], start["regime/lazy"]
    (0.0, 1.0)
    >>> with torch.no_grad():
    ...     _ = model[0].weight.mul_(3.0)  # a large weight change: features move
    >>> after = tracker.measure(step=1)
    >>> after["ntk/rel_change"] > 0.1, after["regime/lazy"]
    (True, 0.0)
    """

    def __init__(
        self,
        model: nn.Module,
        probe: InputBatch,
        *,
        targets: Optional[Tensor] = None,
        kind: str = "full",
        implementation: str = "auto",
        per_layer: bool = True,
        lazy_thresholds: Optional[Mapping[str, float]] = None,
        output_fn: Optional[OutputFn] = None,
        topk: Optional[int] = None,
        snapshot_device: Union[str, torch.device, None] = None,
        chunk_size: Optional[int] = None,
        layer_groups: Optional[int] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_callable("output_fn", output_fn, fix="e.g. output_fn=lambda out: out.logits")
        check_choice("kind", kind, KINDS)
        check_str("implementation", implementation, fix="e.g. implementation='auto'")
        check_bool("per_layer", per_layer)
        check_int("chunk_size", chunk_size, minimum=1, optional=True)
        check_int("layer_groups", layer_groups, minimum=1, optional=True, fix="None: per module")
        #: at most this many per-layer groups (tracking/layers.py); None: one per module
        self.layer_groups = layer_groups
        self.model = model
        self.kind = kind
        self.implementation = implementation
        self.per_layer = per_layer
        self.output_fn = output_fn
        self.chunk_size = chunk_size
        self.snapshot_device = F.as_device(snapshot_device, "snapshot_device")

        self.probe = probe
        #: Number of probe examples ``N``.
        self.probe_size = F.batch_size(probe)
        self._probe_cache: Optional[tuple[torch.device, InputBatch]] = None
        self._param_names = list(F.resolve_params(model))
        self._layers = self._group_layers()

        # One side-effect-free forward: checks the model runs on the probe and gives O.
        f = self._forward()
        self.num_outputs = f.shape[1]
        size = self.probe_size * (1 if kind == "trace" else self.num_outputs)
        self._matrix_size = size
        if size > MAX_SPECTRUM_SIZE:
            warnings.warn(
                f"the kernel matrix is {size}×{size} (N={self.probe_size}, O={self.num_outputs}, "
                f"kind={kind!r}); its float64 eigendecomposition at every measure() costs "
                f"O({size}³) time and {8 * size * size / 2**20:.0f} MiB. Use a smaller probe or "
                "kind='trace' if measurements are too slow.",
                stacklevel=2,
            )

        self.targets, self.classification = self._check_targets(targets)
        self.topk = self._check_topk(topk)
        # Validate implementation / kind / output_fn against the engine on one example, now
        # rather than at the first measurement mid-training.
        self._engine_call(F.slice_batch(self._probe_on_model_device(), slice(0, 1)), False)
        self._names = self._build_names()
        self.lazy_thresholds = self._check_thresholds(lazy_thresholds)
        self._probe_fingerprint = fingerprint(probe)
        self._reference = Reference()
        self._last = LastMeasurement()
        self._reset()

    # ------------------------------------------------------------------ validation
    def _check_targets(self, targets: Optional[Tensor]) -> tuple[Optional[Tensor], bool]:
        if targets is None:
            return None, False
        outputs = None if self.kind == "trace" else self.num_outputs
        return M.alignment_targets(targets, self.probe_size, self.num_outputs, outputs)

    def _check_topk(self, topk: Optional[int]) -> int:
        m = self._matrix_size
        if topk is None:
            o = 1 if self.kind == "trace" else self.num_outputs
            return min(m, o * math.ceil(10 / o))
        check_int("topk", topk, minimum=1, optional=True)
        if topk > m:
            raise ValueError(
                f"topk={topk} exceeds the kernel matrix size {m} (N={self.probe_size}"
                f"{'' if self.kind == 'trace' else f', O={self.num_outputs}'}); pass topk <= {m}"
            )
        return topk

    def _check_thresholds(self, thresholds: Optional[Mapping[str, float]]) -> dict[str, float]:
        if thresholds is None:
            thresholds = DEFAULT_LAZY_THRESHOLDS
        check_mapping("lazy_thresholds", thresholds, fix="e.g. {'ntk/rel_change': 0.1}")
        if not thresholds:
            raise ValueError(
                "lazy_thresholds is empty, so regime/lazy would always be 1; pass at least one "
                "threshold, or None for the defaults"
            )
        allowed = catalogue.lazy_threshold_names(self._names)
        out, parsed = {}, []
        for name, value in thresholds.items():
            th = Threshold.on(name, 0.0) if isinstance(name, str) else None
            if th is None or not th.select(allowed):
                raise ValueError(
                    f"lazy_thresholds has unknown or unsupported metric {name!r}; thresholds can "
                    f"be set on {', '.join(allowed)} (or a glob such as 'ntk_layer/*/rel_change')"
                )
            lower = th.direction == "min"
            value = check_float(
                f"lazy_thresholds[{name!r}]",
                value,
                minimum=0.0,
                maximum=1.0 if lower else None,
                fix="a lower bound on a value in [0, 1]" if lower else "",
            )
            out[name] = value
            parsed.append(Threshold(name, value, th.direction))
        self._thresholds = tuple(parsed)
        return out

    def _build_names(self) -> list[str]:
        return catalogue.tracker_metric_names(
            list(self._layers),
            targets=self.targets is not None,
            classification=self.classification,
            per_layer=self.per_layer,
        )

    # ------------------------------------------------------------------ public state
    def metric_names(self) -> list[str]:
        """Exactly the keys :meth:`start` and :meth:`measure` return, in order."""
        return list(self._names)

    @property
    def layers(self) -> list[str]:
        """Layer names used in the per-layer metrics (module prefixes of the parameters)."""
        return list(self._layers)

    @property
    def started(self) -> bool:
        """Whether θ₀/K₀ have been captured (by :meth:`start` or :meth:`load_state_dict`)."""
        return self._lin is not None

    @property
    def kernel0(self) -> Optional[Tensor]:
        """``K₀`` on the probe, in the engine's shape for ``kind`` (None before :meth:`start`)."""
        return self._reference.kernel0

    @property
    def last_kernel(self) -> Optional[Tensor]:
        """The kernel of the last :meth:`start`/:meth:`measure` call."""
        return self._last.last_kernel

    @property
    def last_eigenvalues(self) -> Optional[Tensor]:
        """Ascending float64 eigenvalues ``(M,)`` of the last kernel matrix."""
        return self._last.last_eigenvalues

    @property
    def last_step(self) -> Optional[int]:
        """The step of the last :meth:`start`/:meth:`measure` call."""
        return self._last.last_step

    @property
    def num_examples(self) -> int:
        """Deprecated alias of :attr:`probe_size`."""
        warnings.warn(
            "KernelTracker.num_examples is deprecated; use probe_size",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.probe_size

    def _reset(self) -> None:
        self._lin: Optional[Linearization] = None
        self._reference.reset()
        self._last.reset()
        self._warned_params = False

    # ------------------------------------------------------------------ computation
    def _model_device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def _probe_on_model_device(self) -> InputBatch:
        dev = self._model_device()
        if self._probe_cache is None or self._probe_cache[0] != dev:
            self._probe_cache = (dev, F.map_batch(self.probe, lambda t: t.to(dev)))
        return self._probe_cache[1]

    def _metric_device(self) -> torch.device:
        return self.snapshot_device if self.snapshot_device is not None else self._model_device()

    def _forward(self) -> Tensor:
        """``f(probe; θ)`` at the model's current parameters, ``(N, O)``, without side effects."""
        x = self._probe_on_model_device()
        params = self._current_params()
        fm = F.FunctionalModel(self.model, self.output_fn, F.compute_dtype(params, x))
        with F.side_effect_guard(self.model), torch.no_grad():
            return fm(fm.cast_params(params), fm.cast_inputs(x)).detach()

    def _kernel(self) -> tuple[Tensor, dict[str, Tensor]]:
        """Total kernel and per-layer kernels (one engine call), on the metric device."""
        dev = self._metric_device()
        try:
            result = self._engine_call()
        except RuntimeError as err:
            # Data-dependent control flow defeats the structured plan; every implementation
            # computes the same kernel, so K₀ stays valid after switching.
            if self.implementation != "auto" or "implementation='jacobian'" not in str(err):
                raise
            warnings.warn(
                f"the structured kernel failed on the probe ({err}); KernelTracker switches to "
                "implementation='jacobian' for this and later measurements. Pass "
                "implementation='jacobian' to silence this warning.",
                RuntimeWarning,
                stacklevel=3,
            )
            self.implementation = "jacobian"
            result = self._engine_call()
        if not self.per_layer:
            return result.to(dev), {}
        kernel, blocks = result
        layers = {}
        for layer, names in self._layers.items():
            missing = [n for n in names if n not in blocks]
            if missing:
                raise RuntimeError(
                    f"the kernel engine returned no block for parameters {missing}; the model's "
                    "trainable parameters changed since the tracker was built -- build a new "
                    "KernelTracker for the changed model"
                )
            layers[layer] = torch.stack([blocks[n] for n in names]).sum(0).to(dev)
        return kernel.to(dev), layers

    def _engine_call(self, x: Optional[InputBatch] = None, blocks: Optional[bool] = None) -> Any:
        return empirical_ntk(
            self.model,
            self._probe_on_model_device() if x is None else x,
            params=self._current_params(),
            return_blocks=self.per_layer if blocks is None else blocks,
            **self._engine_options(),
        )

    def _engine_options(self) -> dict[str, Any]:
        """The engine settings, in one place: a new engine option (``projection``,
        ``max_memory``, a ``kernel_config`` dict) is added here (and to :meth:`_config` if it
        shapes the stored kernels)."""
        return {
            "kind": self.kind,
            "implementation": self.implementation,
            "output_fn": self.output_fn,
            "chunk_size": self.chunk_size,
        }

    def _current_params(self) -> dict[str, Tensor]:
        """θ of the tracked parameters (those trainable at :meth:`start`), whatever their
        ``requires_grad`` is now."""
        live = dict(self.model.named_parameters())
        return {n: live[n].detach() for n in self._param_names}

    def _params_problem(self) -> Optional[str]:
        """Why the tracked parameters can no longer be measured (None if they can): a tracked
        name is gone from ``model.named_parameters()`` or its shape changed."""
        live = dict(self.model.named_parameters())
        missing = [n for n in self._param_names if n not in live]
        if missing:
            return (
                f"parameters {missing[:4]}{'...' if len(missing) > 4 else ''} tracked since "
                "start() are no longer parameters of the model"
            )
        shapes0 = {} if self._lin is None else self._lin.params0
        changed = [
            n for n, t in shapes0.items() if n in live and tuple(live[n].shape) != tuple(t.shape)
        ]
        if changed:
            return (
                f"parameters {changed[:4]}{'...' if len(changed) > 4 else ''} changed shape since "
                "start()"
            )
        return None

    def _group_layers(self) -> dict[str, list[str]]:
        if self.layer_groups is None:
            return M.group_by_layer(self._param_names)
        return group_layers(self.model, self._param_names, self.layer_groups)

    def _set_param_names(self, names: list[str], regroup: bool = False) -> None:
        """Fix the tracked parameter set (and the per-layer metric names that follow from it)."""
        if names == self._param_names and not regroup:
            return
        self._param_names = list(names)
        self._layers = self._group_layers()
        self._names = self._build_names()
        self.lazy_thresholds = self._check_thresholds(self.lazy_thresholds)

    def _check_batch_independent(self, lin: Linearization) -> None:
        """Raise if the model's output on an example depends on the other examples of the batch
        (eval mode, side-effect free): the per-example structured kernel would be wrong."""
        if self.probe_size < 2:
            return
        x = self._probe_on_model_device()
        both = lin.f0(F.slice_batch(x, slice(0, 2)))
        alone = torch.cat([lin.f0(F.slice_batch(x, slice(i, i + 1))) for i in range(2)])
        tol = 1e-10 if both.dtype == torch.float64 else 1e-4
        diff = float(torch.linalg.vector_norm((both - alone).double()))
        scale = float(torch.linalg.vector_norm(both.double()))
        if not diff <= tol * max(scale, torch.finfo(both.dtype).tiny) and math.isfinite(scale):
            raise ValueError(
                "the model's output on a probe example depends on the other examples of the "
                f"batch in eval mode (relative difference {diff / max(scale, 1e-300):.3g} between "
                "the first two examples evaluated together and alone): a layer couples examples "
                "(e.g. subtracting a batch mean, attention across the batch, BatchNorm without "
                "running statistics). The kernel of a batch-coupled model is not a per-example "
                "NTK; remove or replace the batch-coupling layer (e.g. BatchNorm with "
                "track_running_stats=True, LayerNorm)"
            )

    def _nan_metrics(self, problem: str) -> dict[str, float]:
        if not self._warned_params:
            self._warned_params = True
            warnings.warn(
                f"KernelTracker cannot measure: {problem}; the metrics are NaN with "
                "health/nonfinite=1 from now on. Build a new KernelTracker for the changed model.",
                RuntimeWarning,
                stacklevel=3,
            )
        out = {name: math.nan for name in self._names}
        out["regime/lazy"] = 0.0
        out["health/nonfinite"] = 1.0
        return out

    def start(self, step: int = 0) -> dict[str, float]:
        """Snapshot θ₀, ``f₀``, ``K₀`` (and per-layer ``K₀``) and the top-k eigenvectors of ``K₀``.

        Calling it again re-snapshots at the current parameters.

        Args:
            step: the training step of the snapshot (default 0).

        Returns:
            The metrics at θ₀: every change is exactly 0 (``ntk/rel_change``, ``ntk/distance``,
            ``ntk/velocity``, ``params/*``, ``lin/rel_error``, ``lin/rmse``, per-layer),
            ``ntk/eig_overlap`` and ``lin/agreement`` are 1, ``regime/lazy`` is 1 (if the
            kernel is finite), plus the spectrum and alignment of ``K₀``.

        The parameters trainable now are the tracked ones for every later :meth:`measure`
        (the per-layer metric names follow them).

        Raises:
            ValueError: the model has no trainable parameter, couples the examples of a batch
                in eval mode (its output on a probe example depends on the others), or a
                per-layer threshold names a layer without trainable parameters.
        """
        step = self._check_step(step, first=True)
        self._reset()
        self._set_param_names(list(F.resolve_params(self.model)))
        lin = self._new_linearization()
        self._check_batch_independent(lin)
        kernel, layer_kernels = self._kernel()
        f0 = self._forward().to(self._metric_device())
        spectrum = M.kernel_spectrum(kernel)
        self._lin = lin
        ref = self._reference
        ref.f0, ref.kernel0, ref.layer_kernels0 = f0, kernel, layer_kernels
        ref.eigvecs0 = spectrum[1][:, -self.topk :].contiguous()
        current = Measurement(kernel, layer_kernels, spectrum, f0, f0, self._params0())
        return self._finish(step, current)

    def measure(self, step: int) -> dict[str, float]:
        """The metrics at the model's current parameters.

        Args:
            step: the current training step; must be larger than the previous call's (the
                velocity divides by the difference).

        Returns:
            ``dict[str, float]`` with exactly the keys of :meth:`metric_names`.

        Raises:
            RuntimeError: :meth:`start` (or :meth:`load_state_dict`) was not called.
            ValueError: ``step`` is not an int larger than :attr:`last_step`.
        """
        if self._lin is None:
            raise RuntimeError(
                "KernelTracker.measure() was called before start(); call tracker.start() before "
                "training (or load_state_dict() when resuming)"
            )
        step = self._check_step(step, first=False)
        problem = self._params_problem()
        if problem is not None:
            return self._nan_metrics(problem)
        dev = self._metric_device()
        self._reference.to(dev)  # follow the model (snapshot_device=None, e.g. model.cuda())
        self._last.to(dev)
        kernel, layer_kernels = self._kernel()
        f = self._forward().to(dev)
        out0, f_lin = self._lin.f0_and_f_lin(
            self._probe_on_model_device(), params=self._current_params()
        )
        # f_lin = f₀ + J(θ₀)Δθ with the stored f₀: at θ = θ₀ this is exactly f₀ (= f), so the
        # 0/0 of lin/rel_error is exact instead of rounding noise between forward and jvp.
        f0 = self._reference.f0
        f_lin = f0 + (f_lin.to(dev) - out0.to(dev)).to(f0.dtype)
        params = {n: t.to(dev) for n, t in self._current_params().items()}
        current = Measurement(kernel, layer_kernels, M.kernel_spectrum(kernel), f, f_lin, params)
        return self._finish(step, current)

    def _new_linearization(self) -> Linearization:
        """θ₀ = the tracked parameters now (frozen), on the snapshot device."""
        return Linearization(
            self.model,
            self._current_params(),
            output_fn=self.output_fn,
            device=self.snapshot_device,
        )

    def _params0(self) -> dict[str, Tensor]:
        assert self._lin is not None
        dev = self._metric_device()
        return {n: t.to(dev) for n, t in self._lin.params0.items()}

    def _check_step(self, step: int, first: bool) -> int:
        step = check_int("step", step, minimum=0, fix="pass the global training step")
        last = self._last.last_step
        if not first and last is not None and step <= last:
            raise ValueError(
                f"step must increase between measurements: got step={step} after "
                f"step={last}; pass the global training step"
            )
        return step

    def _finish(self, step: int, current: Measurement) -> dict[str, float]:
        """Metrics of ``current`` against the reference; then ``current`` becomes the last."""
        out = regime_metrics(
            self._reference,
            current,
            params0=self._params0(),
            last=self._last,
            step=step,
            targets=self.targets,
            classification=self.classification,
            topk=self.topk,
            layers=self._layers if self.per_layer else {},
            lazy_thresholds=self._thresholds,
            names=self._names,
        )
        self._last.last_kernel = current.kernel
        self._last.last_eigenvalues = current.spectrum[0]
        self._last.last_step = step
        return out

    def regime_decision(self, metrics: Mapping[str, float]) -> tuple[bool, str]:
        """Whether ``metrics`` satisfy every lazy threshold, and why not.

        NaN never satisfies a threshold.

        Args:
            metrics: a result of :meth:`measure` (at least the thresholded names).

        Returns:
            ``(lazy, reason)``; ``reason`` lists each violated threshold as
            ``"ntk/rel_change = 0.231 > 0.1"`` (empty when lazy).

        Raises:
            ValueError: ``metrics`` lacks a thresholded name.
        """
        missing = [th.metric for th in self._thresholds if not th.select(metrics)]
        if missing:
            raise ValueError(
                f"metrics lack the thresholded names {missing}; pass a result of measure()"
            )
        return lazy_decision(self._thresholds, metrics)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`measure` needs to continue a run: θ₀ (the Linearization snapshot),
        ``f₀``, ``K₀``, per-layer ``K₀``, the top-k eigenvectors of ``K₀``, the last kernel and
        step (for the velocity), and a fingerprint of the probe and the configuration that
        shapes the stored tensors. Only CPU tensors and plain Python values: safe for
        ``torch.load(..., weights_only=True)``.
        """
        state: dict[str, Any] = stamp({"config": self._config(), "started": self.started})
        if not self.started:
            return state
        assert self._lin is not None
        state["linearization"] = self._lin.state_dict()
        state.update(self._reference.state_dict())
        state.update(self._last.state_dict())
        return state

    def _config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "per_layer": self.per_layer,
            "topk": self.topk,
            "num_examples": self.probe_size,
            "num_outputs": self.num_outputs,
            "param_names": list(self._param_names),
            "layer_groups": self.layer_groups,
            "probe": self._probe_fingerprint,
            "targets": None if self.targets is None else fingerprint(self.targets),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`; later :meth:`measure` calls give the
        same metrics as the saved tracker would have.

        Raises:
            ValueError: not a KernelTracker state, or saved with a different configuration
                (kind, per_layer, topk, probe, targets, model parameters).
        """
        check_schema(state, "KernelTracker", required=("format", "config", "started"))
        saved, mine = state["config"], self._config()
        for key in ("kind", "per_layer", "topk", "num_examples", "num_outputs"):
            if saved.get(key) != mine[key]:
                raise ValueError(
                    f"the state was saved with {key}={saved.get(key)!r} but this tracker has "
                    f"{key}={mine[key]!r}; build the tracker with the same settings and model"
                )
        for key in ("probe", "targets"):
            a, b = saved.get(key), mine[key]
            if (a is None) != (b is None) or (a is not None and not same_fingerprint(a, b)):
                raise ValueError(
                    f"the state was saved with a different {key} batch; build the tracker with "
                    f"the same {key} it was saved with (metrics relative to K₀ would be wrong)"
                )
        names = list(saved.get("param_names", []))
        live = dict(self.model.named_parameters())
        if state["started"] and (not names or any(n not in live for n in names)):
            raise ValueError(
                f"the state tracks parameters {names[:4]}... that are not all parameters of "
                f"{type(self.model).__name__}; build the tracker with the same model"
            )
        self._reset()
        if not state["started"]:
            return
        # the saved per-layer K₀ fixes the grouping (states before layer_groups: per module)
        regroup = saved.get("layer_groups") != self.layer_groups
        self.layer_groups = saved.get("layer_groups")
        self._set_param_names(names, regroup=regroup)
        lin = self._new_linearization()
        lin.load_state_dict(state["linearization"])
        dev = self._metric_device()
        self._reference.load_state_dict(state, dev)
        self._last.load_state_dict(state, dev)
        self._lin = lin
