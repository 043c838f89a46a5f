"""KernelTracker: regime metrics of a live model relative to its snapshot at θ₀.

Framework-agnostic: a plain training loop, a Lightning callback or any other trainer calls
:meth:`KernelTracker.start` once before training and :meth:`KernelTracker.measure` every few
steps, and gets a flat ``dict[str, float]`` to log.

Metric names: their formulas, directions and papers are the entries of
:data:`lazy_monitor.catalogue.CATALOGUE` with ``source="tracker"`` (``ntk/*``, ``params/*``,
``lin/*``, the per-layer ``ntk_layer/<layer>/rel_change`` and
``params_layer/<layer>/rel_change``, ``regime/lazy``, ``health/nonfinite``, ``opt/lr``,
``ntk/lr_eig_max``, ``regime/catapult`` and ``features/<layer>/cka``);
``ntk/alignment`` needs ``targets``, ``lin/agreement`` class-index targets, the per-layer
names ``per_layer=True``, the feature names tracked ``feature_modules``.

Stability (Lewkowycz et al. 2020, :mod:`lazy_monitor.core.stability`): pass the learning
rate of the step, ``start(lr=...)`` / ``measure(step, lr=...)``, to get ``opt/lr`` and
``ntk/lr_eig_max = lr · λmax(K) / N`` (the MSE stability number, catapult above 2), and
``regime/catapult`` (a :class:`~lazy_monitor.core.stability.CatapultDetector`: 1 once
``ntk/lr_eig_max`` exceeded 2 and λmax then fell by 10 %; the step-0 measurement counts).
Without ``lr`` both are NaN. λmax is that of the ``(N·O) × (N·O)`` kernel matrix, so
``ntk/lr_eig_max`` is computed for ``kind="full"`` and for a single output; with
``kind="trace"`` (λmax of ``Σ_a K_aa``, up to ``O`` times the full one) or ``"diagonal"``
(cross-output blocks dropped) and ``O > 1`` it is NaN rather than a wrong number.

Features (Kornblith et al. 2019, :mod:`lazy_monitor.core.features`): the outputs of the
tracked modules on the probe are recorded with forward hooks in the forward that computes
``f`` (no extra pass), and ``features/<layer>/cka`` is their linear CKA with the features at
θ₀ (1 = unchanged up to rotation and scale). Only the ``(N, N)`` centred Gram matrix at θ₀
is stored per module. The values are computed by the pure function
:func:`lazy_monitor.tracking.regime.regime_metrics` of the reference and the measurement.

Evaluation semantics: everything is computed in eval mode (BatchNorm running statistics,
dropout off) in full precision, and leaves the model's weights, buffers, ``.grad``, training
flags and every RNG state untouched. The probe is moved to the model's device for each
measurement. Buffers are part of the function: ``f`` and ``K`` use the model's current
buffers (e.g. BatchNorm running statistics) while ``f_lin`` keeps those of θ₀ (see
:class:`~lazy_monitor.Linearization`), so buffer drift shows up in ``lin/rel_error``.

Tracked parameters: the kernel, ``f_lin`` and the ``params/*`` metrics are over the
parameters that are trainable (``requires_grad=True``) when :meth:`KernelTracker.start` is called, by
name, whatever their ``requires_grad`` is later: freezing or unfreezing layers during
training (e.g. Lightning's ``BackboneFinetuning``, progressive unfreezing) does not change
what is measured. Parameters frozen at :meth:`KernelTracker.start` are constants at their current value in
``f`` and ``K`` and at their θ₀ value in ``f_lin``, so training them later shows up in
``lin/rel_error``. If a tracked parameter disappears from ``model.named_parameters()`` or
changes shape, :meth:`KernelTracker.measure` warns once and returns NaN metrics with
``health/nonfinite = 1`` instead of raising mid-training.

Examples must be independent in eval mode (the kernel is a per-example NTK):
:meth:`KernelTracker.start` raises ``ValueError`` if the first two probe examples give different outputs
evaluated together and alone (a layer that mixes the examples of a batch). With
``implementation="auto"``, a model whose control flow depends on the data (which defeats
the structured engine) is measured with the Jacobian contraction by the engine itself (same
kernel; the engine warns).

Cost per measurement: one kernel (see :func:`lazy_monitor.empirical_ntk`), one forward, one
jvp (a few plain forwards), and one ``eigh`` of the ``M × M`` float64 kernel matrix,
``M = N·O`` for ``kind="full"`` (``N`` for ``"trace"``; ``O`` blocks of ``N × N`` for
``"diagonal"``), growing like ``M³`` (a warning is issued above ``MAX_SPECTRUM_SIZE =
2048``; measured times in ``benchmarks/RESULTS.md``). Memory:
one copy of the parameters (θ₀), ``K₀`` and, with ``per_layer``, one kernel per layer.

Example, run as a doctest:

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

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from lazy_monitor import catalogue
from lazy_monitor._validation import (
    check_bool,
    check_callable,
    check_int,
)
from lazy_monitor.core import _functional as F
from lazy_monitor.core import metrics as M
from lazy_monitor.core._functional import InputBatch, OutputFn
from lazy_monitor.core.kernels import (
    DEFAULT_MAX_MEMORY,
)
from lazy_monitor.core.kernels import errors as kernel_errors
from lazy_monitor.core.kernels import estimate as kernel_estimate
from lazy_monitor.core.stability import CatapultDetector
from lazy_monitor.tracking import _checks, _persist
from lazy_monitor.tracking import kernel_config as kc
from lazy_monitor.tracking._layout import MetricLayout
from lazy_monitor.tracking._state import LastMeasurement, Reference, fingerprint
from lazy_monitor.tracking.distributed import KernelSharding
from lazy_monitor.tracking.features import (
    check_feature_modules,
    fit_feature_budget,
    gram_hooks,
    kernel_budget,
    report_feature_selection,
)
from lazy_monitor.tracking.kernel_config import (  # noqa: F401 - re-exported
    KERNEL_COPIES,
    MAX_SPECTRUM_SIZE,
    KernelConfig,
)
from lazy_monitor.tracking.measurement import choose as choose_measurement
from lazy_monitor.tracking.regime import Measurement, regime_metrics

__all__ = [
    "KernelTracker",
    "DEFAULT_LAZY_THRESHOLDS",
    "DEFAULT_MAX_MEMORY",
    "LOWER_BOUND_METRICS",
    "MAX_SPECTRUM_SIZE",
]

#: Time budget of ``kind="auto"``: estimated seconds of one kernel above which the tracker
#: takes the next cheaper kernel (full -> trace -> projected trace).
MAX_SECONDS = 60.0

#: Default lazy-regime thresholds: a heuristic, not a result from the literature (no paper gives
#: canonical values). 10 % relative kernel movement and a linear model that explains 90 % of the
#: function's movement on the probe are comfortably met by wide NTK-parameterised MLPs trained with
#: small learning rates and clearly violated once features learn.
DEFAULT_LAZY_THRESHOLDS: dict[str, float] = {"ntk/rel_change": 0.1, "lin/rel_error": 0.1}

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
    ``f_lin = f₀ + J(θ₀)(θ − θ₀)``, and returns the metrics :meth:`metric_names` lists, in that
    order, for the configuration (formulas and references: :mod:`lazy_monitor.metrics`). Which
    names, stability (``opt/lr``, ``ntk/lr_eig_max``, ``regime/catapult``), features, evaluation
    semantics, tracked parameters, the batch-independence check and a doctest: see
    :mod:`lazy_monitor.tracking.tracker`. Which kernel ``kind="auto"`` measures and what the
    metrics of a trace or projected kernel mean: :mod:`lazy_monitor.tracking.kernel_config`.
    How the model is evaluated (locally, split across processes, FSDP2 shards):
    :attr:`measurement` (:mod:`lazy_monitor.tracking.measurement`).

    Args:
        model: the network being trained.
        probe: fixed inputs batched on dim 0 (a tensor, a tuple/list passed positionally or a
            dict passed as keyword arguments); ``N`` examples. Keep it small (16–128): the kernel
            costs ``N²`` and the spectrum ``(N·O)³``.
        targets: optional targets of the probe, for ``ntk/alignment``: class indices ``(N,)``
            (integer; also enables ``lin/agreement``) or regression targets ``(N,)``/``(N, O)``
            (float; ``(N, C)`` with any ``C`` for ``kind="trace"``).
        kernel: the kernel settings, a :class:`~lazy_monitor.KernelConfig` or a dict of its
            keys (``kind``, ``implementation``, ``projection``, ``projection_seed``,
            ``max_memory``, ``chunk_size``, ``topk``, ``snapshot_device``); ``None``: the
            defaults (``kind="auto"`` under ``max_memory`` = :data:`DEFAULT_MAX_MEMORY` = 1 GiB,
            see above). Not counted in ``max_memory``: θ₀ (one copy of the parameters) and the
            model's own forward/backward activations.
        per_layer: also report per-layer kernel and parameter changes.
        lazy_thresholds: ``{metric name or glob: bound}`` defining ``regime/lazy``; the
            direction is the catalogue's lazy side: upper limits for ``ntk/rel_change``,
            ``ntk/distance``, ``ntk/velocity``, ``params/*``, ``lin/rel_error``, ``lin/rmse``
            and the per-layer ``…/rel_change`` metrics (e.g. ``"ntk_layer/*/rel_change"``),
            lower limits for ``ntk/eig_overlap`` and ``lin/agreement``. Default :data:`DEFAULT_LAZY_THRESHOLDS`
            (``ntk/rel_change ≤ 0.1`` and ``lin/rel_error ≤ 0.1``), a heuristic.
        output_fn: maps the model's output to a tensor (e.g. ``lambda out: out.logits``).
        feature_modules: modules whose output features are tracked (``features/<name>/cka``):
            ``True`` (default) -- the hidden representations: the modules owning trainable
            parameters (:func:`~lazy_monitor.core.features.default_feature_modules`, the
            grouping of the per-layer kernel) less the output layer, skipping with a warning
            those that cannot be tracked (not called exactly once per forward, output not
            batched on dim 0); a list of names from ``model.named_modules()`` (each must be
            trackable: an error at construction otherwise; the output layer may be named);
            ``False`` or ``None``: no feature metrics. Either way a module whose features are
            the same for every probe example is omitted (one info line), and the Grams count
            against ``max_memory`` (:mod:`lazy_monitor.tracking.features`).
        sharding: split each kernel computation across the processes of a distributed run
            (:class:`~lazy_monitor.tracking.distributed.KernelSharding`): every process
            computes the blocks of its share of the parameters and one sum-reduction completes
            the kernels; every process must call :meth:`start`/:meth:`measure` together and
            gets the same metrics. ``None``: this process computes everything. A model whose
            trainable parameters are DTensors (FSDP2 ``fully_shard``) is measured by a
            :class:`~lazy_monitor.tracking.sharded.ShardedMeasurement` (:attr:`measurement`),
            with each process's shards, summed over the parameters' mesh (default
            ``sharding``).
        layer_groups: with ``per_layer``, at most this many layer groups (module hierarchy,
            normalization layers folded into their block:
            :func:`lazy_monitor.tracking.layers.group_layers`); ``None``: one per module.

    Raises:
        TypeError: an argument of the wrong type (``model`` not an ``nn.Module``,
            ``output_fn`` not callable, ``targets`` not a tensor, ``per_layer="false"``, ...).
        ValueError: a bad value of the right type: empty/mismatched probe, targets of the wrong
            length/shape/range or constant, a bad kernel setting (:class:`KernelConfig`),
            ``implementation`` rejected by the engine on this model, unknown threshold names or
            bad threshold values, ``topk`` above the kernel matrix size.

    Example::

        tracker = KernelTracker(model, x_probe, targets=y_probe)
        logger.log(tracker.start())                       # step 0: all changes are 0
        for step in range(1, steps + 1):
            train_step()
            if step % 50 == 0:
                logger.log(tracker.measure(step))        # {"ntk/rel_change": ..., ...}
    """

    def __init__(
        self,
        model: nn.Module,
        probe: InputBatch,
        *,
        targets: Optional[Tensor] = None,
        kernel: Union[KernelConfig, Mapping[str, Any], None] = None,
        per_layer: bool = True,
        lazy_thresholds: Optional[Mapping[str, float]] = None,
        output_fn: Optional[OutputFn] = None,
        feature_modules: Union[Sequence[str], bool, None] = True,
        sharding: Optional[KernelSharding] = None,
        layer_groups: Optional[int] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        #: The kernel settings as requested (:class:`KernelConfig`, validated); the measured
        #: kernel is :attr:`kernel_config` once started.
        self.kernel = KernelConfig.coerce(kernel)
        check_callable("output_fn", output_fn, fix="e.g. output_fn=lambda out: out.logits")
        check_bool("per_layer", per_layer)
        check_int("layer_groups", layer_groups, minimum=1, optional=True, fix="None: per module")
        self.model = model
        self._resolved: Optional[kc.ResolvedKernel] = None
        self.per_layer = per_layer
        self.output_fn = output_fn
        _checks.check_sharding(sharding)
        #: how this tracker evaluates the model: local, split across processes, or
        #: FSDP2-sharded (:mod:`lazy_monitor.tracking.measurement`)
        self.measurement = choose_measurement(self, sharding)
        #: the sum over processes the measurement uses (None: this process only)
        self.sharding = self.measurement.sharding

        self.probe = probe
        #: Number of probe examples ``N``.
        self.probe_size = F.batch_size(probe)
        self._probe_cache: Optional[tuple[torch.device, InputBatch]] = None
        #: the tracked parameters, their layer groups, the metric names and the thresholds
        self._layout = MetricLayout(model, self.kernel, per_layer, layer_groups, self.probe_size)

        _checks.check_probe_finite(probe)
        kernel_errors.check_materialized(model)
        kernel_estimate.check_probe_size(
            self.probe_size, self.kernel.max_memory, kernel_copies=kc.KERNEL_COPIES
        )
        # One side-effect-free forward: checks the model runs on the probe, gives O and which
        # feature modules can be tracked.
        candidates, strict = check_feature_modules(model, feature_modules)
        candidates = fit_feature_budget(candidates, strict, self.probe_size, self.kernel.max_memory)
        self._features_default = feature_modules is True
        self._feature_modules = candidates
        self._feature_select: Optional[dict[str, str]] = {}  # this forward chooses the modules
        try:
            f, feats = self.measurement.forward(strict=strict)
        except (RuntimeError, TypeError) as err:
            raise _checks.probe_error(err, model, probe) from err
        self._feature_modules = report_feature_selection(candidates, feats, self._feature_select)
        self._feature_select = None
        self.num_outputs = f.shape[1]
        #: the probe targets as checked (None without ``targets``); class indices or not
        self.targets, self.classification = self._layout.check_outputs(self.num_outputs, targets)
        self.measurement.validate()
        given = DEFAULT_LAZY_THRESHOLDS if lazy_thresholds is None else lazy_thresholds
        self._layout.build_names(self._feature_modules, given)
        self._probe_fingerprint = fingerprint(probe)
        self._reference = Reference()
        self._last = LastMeasurement()
        self._catapult = CatapultDetector()
        self._reset()

    # ------------------------------------------------------------------ public state
    def metric_names(self) -> list[str]:
        """Exactly the keys :meth:`start` and :meth:`measure` return, in order."""
        return list(self._layout.names)

    @property
    def layers(self) -> list[str]:
        """Layer names used in the per-layer metrics (module prefixes of the parameters)."""
        return list(self._layers)

    @property
    def feature_modules(self) -> list[str]:
        """Modules whose features are tracked (``features/<name>/cka``), in metric order."""
        return list(self._feature_modules)

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
    def kernel_config(self) -> Optional[dict[str, Any]]:
        """The kernel this tracker measures (None before :meth:`start`/:meth:`load_state_dict`):
        ``{"kind", "projection", "projection_seed", "implementation", "max_memory" (the
        engine's factor budget in bytes), "requested" ({"kind", "projection", "max_memory"} as
        passed), "estimated_bytes", "estimated_seconds", "estimate" (the estimator's dict),
        "reason" (why ``"auto"`` did not keep the full kernel; empty otherwise)}``. Plain
        Python values (log it as hparams; it is saved in :meth:`state_dict`)."""
        return None if self._resolved is None else self._resolved.as_dict()

    @property
    def topk(self) -> Optional[int]:
        """``k`` of ``ntk/eig_overlap`` for the measured kernel (None before it is resolved)."""
        return self._layout.topk

    @property
    def lazy_thresholds(self) -> dict[str, float]:
        """The ``regime/lazy`` thresholds ``{metric name or glob: bound}`` (checked)."""
        return self._layout.lazy_thresholds

    @property
    def layer_groups(self) -> Optional[int]:
        """At most this many per-layer groups (tracking/layers.py); None: one per module."""
        return self._layout.layer_groups

    @property
    def _param_names(self) -> list[str]:
        return self._layout.param_names  # the measurement backends read these two

    @property
    def _layers(self) -> dict[str, list[str]]:
        return self._layout.layers

    @property
    def last_step(self) -> Optional[int]:
        """The step of the last :meth:`start`/:meth:`measure` call."""
        return self._last.last_step

    def _reset(self) -> None:
        #: θ₀: a frozen Linearization (the sharded backend: its own snapshot of local shards)
        self._lin: Any = None
        self._resolved = None
        self._layout.reset()
        self._reference.reset()
        self._last.reset()
        self._catapult.reset()

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
        dev = self.kernel.snapshot_device
        return dev if dev is not None else self._model_device()

    def _hooks(self, strict: bool = True) -> Any:
        """Forward hooks recording the centred Gram ``(N, N)`` of each tracked module's output
        (see :func:`lazy_monitor.tracking.features.gram_hooks`)."""
        return gram_hooks(
            self.model, self._feature_modules, self.probe_size, strict, self._feature_select
        )

    def _on_metric_device(self, grams: Mapping[str, Tensor]) -> dict[str, Tensor]:
        dev = self._metric_device()
        return {m: grams[m].to(dev) for m in self._feature_modules if m in grams}

    # ------------------------------------------------------------------ kernel configuration
    def _resolve(self) -> kc.ResolvedKernel:
        """``kind="auto"`` resolved (or a forced kind checked) against ``max_memory`` and
        :data:`MAX_SECONDS` with the measurement's estimate (:func:`kc.resolve`)."""
        cfg = kc.resolve(
            self.kernel,
            self.measurement,
            # the feature Grams are held beside the kernel: the kernel gets the rest
            max_memory=kernel_budget(
                self.kernel.max_memory, len(self._feature_modules), self.probe_size
            ),
            num_outputs=self.num_outputs,
            max_seconds=MAX_SECONDS,  # read here: tests patch this module's constant
            stacklevel=3,  # the caller of start()
        )
        kernel_estimate.check_seconds(cfg.estimate, kind=cfg.kind)  # forced settings too
        return cfg

    def start(self, step: int = 0, *, lr: Optional[float] = None) -> dict[str, float]:
        """Snapshot θ₀, ``f₀``, ``K₀`` (and per-layer ``K₀``) and the top-k eigenvectors of ``K₀``.

        Calling it again re-snapshots at the current parameters.

        Args:
            step: the training step of the snapshot (default 0).
            lr: the learning rate the next optimizer step uses (``opt/lr``,
                ``ntk/lr_eig_max``; None: NaN).

        Returns:
            The metrics at θ₀: every change is exactly 0 (``ntk/rel_change``, ``ntk/distance``,
            ``ntk/velocity``, ``params/*``, ``lin/rel_error``, ``lin/rmse``, per-layer),
            ``ntk/eig_overlap``, ``lin/agreement`` and ``features/*/cka`` are 1,
            ``regime/lazy`` is 1 (if the kernel is finite), plus the spectrum and alignment of
            ``K₀`` and ``ntk/lr_eig_max`` at θ₀.

        The parameters trainable now are the tracked ones for every later :meth:`measure`
        (the per-layer metric names follow them).

        Resolves :attr:`kernel_config` first (``kind="auto"``: warns when it is not the full
        kernel).

        Raises:
            ValueError: the model has no trainable parameter, couples the examples of a batch
                in eval mode (its output on a probe example depends on the others), a
                per-layer threshold names a layer without trainable parameters, the kernel's
                memory estimate exceeds ``max_memory`` (a forced ``kind``/``projection``, or
                even the cheapest ``"auto"`` choice; the message has the estimate and the
                fix), or ``topk`` exceeds the resolved kernel matrix size. The memory and time
                refusals are :class:`~lazy_monitor.core.kernels.errors.NtkBudgetError` (a
                ValueError); one measurement estimated above
                :data:`~lazy_monitor.core.kernels.estimate.SECONDS_LIMIT` (600 s, 10x the
                time budget of ``"auto"``) is refused for forced settings too.
        """
        step = _checks.check_step(step, None)
        lr = _checks.check_lr(lr)
        self._reset()
        self._layout.set_param_names(list(F.resolve_params(self.model)), self._feature_modules)
        lin = self.measurement.snapshot()
        _checks.check_batch_independent(
            self.measurement.eval_forward(lin), self._probe_on_model_device()
        )
        cfg = self._resolve()
        self._layout.apply(cfg, warn=True)  # topk checked before the kernel is adopted
        self._resolved = cfg
        kernel, layer_kernels = self.measurement.kernel()
        f0, grams0 = self.measurement.forward()
        f0 = f0.to(self._metric_device())
        spectrum = M.kernel_spectrum(kernel)
        self._lin = lin
        ref = self._reference
        ref.f0, ref.kernel0, ref.layer_kernels0 = f0, kernel, layer_kernels
        ref.eigvecs0 = spectrum[1][:, -self.topk :].contiguous()
        ref.feature_grams0 = grams0
        current = Measurement(
            kernel, layer_kernels, spectrum, f0, f0, self.measurement.params0(lin), grams0
        )
        return self._finish(step, current, lr)

    def measure(self, step: int, *, lr: Optional[float] = None) -> dict[str, float]:
        """The metrics at the model's current parameters.

        Args:
            step: the current training step; must be larger than the previous call's (the
                velocity divides by the difference).
            lr: the learning rate the next optimizer step uses (``opt/lr``,
                ``ntk/lr_eig_max``; None: NaN), e.g.
                :func:`~lazy_monitor.core.stability.current_lr` of the optimizer.

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
        step = _checks.check_step(step, self._last.last_step)
        lr = _checks.check_lr(lr)
        problem = self.measurement.params_problem(self._lin)
        if problem is not None:
            return self._layout.nan_metrics(problem)
        dev = self._metric_device()
        self._reference.to(dev)  # follow the model (snapshot_device=None, e.g. model.cuda())
        self._last.to(dev)
        kernel, layer_kernels = self.measurement.kernel()
        f, grams = self.measurement.forward()
        if f.shape[1] != self.num_outputs:
            return self._layout.nan_metrics(
                f"the model gives {f.shape[1]} outputs per probe example, {self.num_outputs} at "
                "start()"
            )
        f = f.to(dev)
        out0, f_lin = self._lin.f0_and_f_lin(
            self._probe_on_model_device(), params=self.measurement.params()
        )
        # f_lin = f₀ + J(θ₀)Δθ with the stored f₀: at θ = θ₀ this is exactly f₀ (= f), so the
        # 0/0 of lin/rel_error is exact instead of rounding noise between forward and jvp.
        f0 = self._reference.f0
        f_lin = f0 + (f_lin.to(dev) - out0.to(dev)).to(f0.dtype)
        params = self.measurement.measured_params(self._lin, dev)
        spectrum = M.kernel_spectrum(kernel)
        current = Measurement(kernel, layer_kernels, spectrum, f, f_lin, params, grams)
        return self._finish(step, current, lr)

    def _finish(self, step: int, current: Measurement, lr: Optional[float]) -> dict[str, float]:
        """Metrics of ``current`` against the reference; then ``current`` becomes the last."""
        out = regime_metrics(
            self._reference,
            current,
            params0=self.measurement.params0(self._lin),
            last=self._last,
            step=step,
            targets=self._layout.kernel_targets,
            classification=self.classification,
            topk=self.topk,
            layers=self._layers if self.per_layer else {},
            lazy_thresholds=self._layout.thresholds,
            names=[n for n in self._layout.names if n != "regime/catapult"],
            lr=lr,
            full_spectrum=self._layout.full_spectrum(self._resolved),
        )
        # Stateful, so not in the pure regime_metrics: fed at every measurement, step 0 too.
        out["regime/catapult"] = self._catapult.update(out["ntk/lr_eig_max"], out["ntk/eig_max"])
        out = {name: out[name] for name in self._layout.names}
        if self.sharding is not None and self.sharding.active:
            out = self.sharding.from_rank_zero(out)  # decisions on them agree on every process
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
        return self._layout.decision(metrics)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`measure` needs to continue a run: θ₀ (the Linearization snapshot),
        ``f₀``, ``K₀``, per-layer ``K₀``, the top-k eigenvectors of ``K₀``, the last kernel and
        step (for the velocity), and a fingerprint of the probe and the configuration that
        shapes the stored tensors. Only CPU tensors and plain Python values: safe for
        ``torch.load(..., weights_only=True)``.
        """
        return _persist.save(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`; later :meth:`measure` calls give the
        same metrics as the saved tracker would have.

        Raises:
            ValueError: not a KernelTracker state, or saved with a different configuration
                (kind, per_layer, topk, probe, targets, model parameters).
        """
        _persist.load(self, state)
