"""KernelTracker: regime metrics of a live model relative to its snapshot at θ₀.

Framework-agnostic: a plain training loop, a Lightning callback or any other trainer calls
:meth:`KernelTracker.start` once before training and :meth:`KernelTracker.measure` every few
steps, and gets a flat ``dict[str, float]`` to log.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

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
from lazy_monitor.core.kernels import (
    DEFAULT_MAX_MEMORY,
    NtkConfig,
    empirical_ntk,
)
from lazy_monitor.core.kernels.plan import estimate_param_costs
from lazy_monitor.core.linearization import Linearization
from lazy_monitor.core.stability import CatapultDetector
from lazy_monitor.thresholds import Threshold
from lazy_monitor.tracking import kernel_config as kc
from lazy_monitor.tracking._state import LastMeasurement, Reference, fingerprint, same_fingerprint
from lazy_monitor.tracking.distributed import KernelSharding, sharded_kernel
from lazy_monitor.tracking.features import check_feature_modules, gram_hooks
from lazy_monitor.tracking.kernel_config import (  # noqa: F401 - re-exported
    KERNEL_COPIES,
    MAX_SPECTRUM_SIZE,
)
from lazy_monitor.tracking.layers import group_layers
from lazy_monitor.tracking.regime import Measurement, lazy_decision, regime_metrics

__all__ = [
    "KernelTracker",
    "DEFAULT_LAZY_THRESHOLDS",
    "DEFAULT_MAX_MEMORY",
    "LOWER_BOUND_METRICS",
    "MAX_SPECTRUM_SIZE",
]

#: Kernel kinds of the engine: ``(N, N, O, O)``, ``(N, N)`` summed over outputs, ``(N, N, O)``.
KINDS = ("full", "trace", "diagonal")
#: What ``kind=`` accepts: a kind, or ``"auto"`` (resolved at :meth:`KernelTracker.start`).
REQUESTED_KINDS = ("auto", *KINDS)
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
    ``f_lin = f₀ + J(θ₀)(θ − θ₀)``, and returns these metrics (see :mod:`lazy_monitor.metrics`
    for the formulas and references):

    The names, their formulas, directions and papers are the entries of
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
    the structured engine) is measured with the Jacobian contraction by the engine itself (same
    kernel; the engine warns).

    Which kernel (``kind="auto"``, the default): :meth:`start` estimates the memory and time of
    one measurement from ``N``, ``O``, the parameter count and one example's forward FLOPs
    (:func:`lazy_monitor.core.kernels.resolve_kernel_config`) and takes the first of

    1. ``"full"`` ``(N, N, O, O)``, exact;
    2. ``"trace"`` ``(N, N)``, exact (``Σ_a K[:, :, a, a]``; costs ``O`` backward passes per
       example);
    3. ``"trace"`` with ``projection=16``: an unbiased estimate of the trace kernel from
       ``k = 16`` random output directions (cost ∝ ``k``, not ``O``),

    whose estimate fits ``max_memory`` (the kernel, its per-parameter blocks and their
    :data:`KERNEL_COPIES` copies, the engine's per-example factors and the float64
    eigendecomposition) and 60 s per kernel. The choice is :attr:`kernel_config`; the tracker
    warns when it is not ``"full"``, and keeps it in :meth:`state_dict`, so a resumed run
    measures the same kernel (same projection seed, so the same ``R``). Sequence outputs
    ``(N, T, V)`` (a language model's logits) are flattened to ``O = T·V``: a tiny GPT-2 on a
    short probe gets the exact trace kernel, a 50k vocabulary the projected trace. An explicit
    ``kind`` (and/or ``projection``) is kept as given; if its estimate does not fit
    ``max_memory``, :meth:`start` raises with the estimate and the fix.

    Metrics on a resolved trace or projected kernel (nothing is silently re-interpreted):

    * ``"trace"``: the spectrum metrics are those of the ``N × N`` trace kernel (``ntk/eig_max``
      ≈ ``O·`` that of the full kernel for a network with ``K ≈ Θ ⊗ I_O``), ``ntk/eig_overlap``
      compares top-k eigenvectors of ``N × N`` matrices, ``ntk/alignment`` aligns with the
      target kernel ``Σ_a y_a y_aᵀ`` (class indices one-hot); all exact for the trace kernel.
    * ``"trace"`` + ``projection=k``: every kernel metric is that of the projected kernel, an
      estimate of the trace kernel's: ``ntk/trace`` and the numerators of the linear metrics
      are unbiased, per-entry std ``≤ √(2/k)·‖J(x)‖·‖J(x')‖``; ratios (``ntk/rel_change``,
      ``ntk/distance``, ``ntk/alignment``) and the spectrum are consistent but noisy estimates
      (noise ∝ ``1/√k``). The same ``R`` is used for ``K₀`` and every later ``K``, so the drift
      metrics measure the kernel's change, not the draw of ``R``.
    * ``projection=k`` with ``kind="full"``/``"diagonal"`` (only when forced): the kernel of the
      ``k`` projected outputs ``g = Rᵀ f / √k``; ``ntk/alignment`` uses the targets projected
      the same way (``Rᵀ y / √k``, class indices one-hot first), ``topk`` defaults to a multiple
      of ``k``. ``projection="sum"``: the pseudo-NTK (Mohamadi & Sutherland 2023); with
      ``kind="full"`` the projected one-hot targets are constant, so ``ntk/alignment`` is NaN.
    * ``lin/*``, ``params/*`` use the model's outputs and parameters, never the projection.

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
        kind: ``"auto"`` (default: resolved at :meth:`start` to ``"full"``, ``"trace"`` or
            ``"trace"`` + ``projection=16``, see above), or a kernel kind kept as given:
            ``"full"`` ``(N, N, O, O)``, ``"trace"`` ``(N, N)`` (summed over outputs) or
            ``"diagonal"`` ``(N, N, O)``.
        implementation: kernel implementation passed to :func:`lazy_monitor.empirical_ntk`
            (``"auto"`` chooses by cost).
        projection: ``None`` (default; ``kind="auto"`` may still choose ``16``), ``k`` (int:
            the kernel of ``k`` random output directions, see
            :func:`lazy_monitor.empirical_ntk`) or ``"sum"`` (pseudo-NTK). Forced when given.
        projection_seed: seed of the projection matrix ``R`` (the same ``R`` at θ₀ and later).
        max_memory: bytes one measurement may hold (kernel, per-parameter blocks and their
            copies, per-example factors, eigendecomposition); default
            :data:`DEFAULT_MAX_MEMORY` = 1 GiB, safe on a laptop next to a training run.
            ``None``: no memory limit (the engine's factor budget, the 60 s time budget of
            ``kind="auto"`` still applies). Not counted: θ₀ (one copy of the parameters) and
            the model's own forward/backward activations.
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
        feature_modules: modules whose output features are tracked (``features/<name>/cka``):
            ``True`` (default) -- the modules owning trainable parameters
            (:func:`~lazy_monitor.core.features.default_feature_modules`, the grouping of the
            per-layer kernel), skipping with a warning those that cannot be tracked (not called
            exactly once per forward, output not batched on dim 0); a list of names from
            ``model.named_modules()`` (each must be trackable: an error at construction
            otherwise); ``False`` or ``None``: no feature metrics.
        sharding: split each kernel computation across the processes of a distributed run
            (:class:`~lazy_monitor.tracking.distributed.KernelSharding`): every process
            computes the blocks of its share of the parameters and one sum-reduction completes
            the kernels; every process must call :meth:`start`/:meth:`measure` together and
            gets the same metrics. ``None``: this process computes everything. A model whose
            trainable parameters are DTensors (FSDP2 ``fully_shard``) gets a
            :class:`~lazy_monitor.tracking.sharded.ShardedKernelTracker`, which measures with
            each process's shards and sums over the parameters' mesh (default ``sharding``).
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
        kind: str = "auto",
        implementation: str = "auto",
        per_layer: bool = True,
        lazy_thresholds: Optional[Mapping[str, float]] = None,
        output_fn: Optional[OutputFn] = None,
        topk: Optional[int] = None,
        snapshot_device: Union[str, torch.device, None] = None,
        chunk_size: Optional[int] = None,
        feature_modules: Union[Sequence[str], bool, None] = True,
        sharding: Optional[KernelSharding] = None,
        projection: Union[None, int, str] = None,
        projection_seed: int = 0,
        max_memory: Optional[int] = DEFAULT_MAX_MEMORY,
        layer_groups: Optional[int] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_callable("output_fn", output_fn, fix="e.g. output_fn=lambda out: out.logits")
        check_choice("kind", kind, REQUESTED_KINDS)
        check_str("implementation", implementation, fix="e.g. implementation='auto'")
        check_bool("per_layer", per_layer)
        check_int("chunk_size", chunk_size, minimum=1, optional=True)
        # one wording for the engine options: the engine's own validation
        NtkConfig(projection=projection, projection_seed=projection_seed)
        check_int(
            "max_memory",
            max_memory,
            minimum=1,
            optional=True,
            fix="bytes, e.g. 2**30; None: no limit",
        )
        check_int("layer_groups", layer_groups, minimum=1, optional=True, fix="None: per module")
        #: at most this many per-layer groups (tracking/layers.py); None: one per module
        self.layer_groups = layer_groups
        self.model = model
        #: The requested kind (``"auto"`` or a kind); the measured one is in
        #: :attr:`kernel_config` once started.
        self.kind = kind
        self.implementation = implementation
        self.projection = projection
        self.projection_seed = projection_seed
        self.max_memory = max_memory
        self._kernel_config: Optional[dict[str, Any]] = None
        self.per_layer = per_layer
        self.output_fn = output_fn
        self.chunk_size = chunk_size
        self.snapshot_device = F.as_device(snapshot_device, "snapshot_device")
        if sharding is not None and not isinstance(sharding, KernelSharding):
            raise TypeError(
                f"sharding must be a KernelSharding or None, got {type(sharding).__name__}; "
                "e.g. KernelSharding.from_process_group()"
            )
        self.sharding = sharding
        self._param_costs: Optional[dict[str, float]] = None

        self.probe = probe
        #: Number of probe examples ``N``.
        self.probe_size = F.batch_size(probe)
        self._probe_cache: Optional[tuple[torch.device, InputBatch]] = None
        self._param_names = list(F.resolve_params(model))
        self._layers = self._group_layers()

        bad = [
            where
            for where, t in F._leaves(probe)
            if t.is_floating_point() and not t.isfinite().all()
        ]
        if bad:
            # A non-finite probe makes every metric NaN for the whole run: refuse it now
            # (non-finite *weights* are a training outcome and give NaN metrics instead).
            raise ValueError(
                f"the probe contains NaN or inf (in {', '.join(bad)}); pass finite probe inputs (e.g. "
                "torch.nan_to_num(x) or other examples)"
            )
        # One side-effect-free forward: checks the model runs on the probe, gives O and which
        # feature modules can be tracked.
        candidates, strict = check_feature_modules(model, feature_modules)
        self._features_default = feature_modules is True
        self._feature_modules = candidates
        try:
            f, feats = self._forward(strict=strict)
        except (RuntimeError, TypeError) as err:
            raise _probe_error(err, model, probe) from err
        self._feature_modules = [m for m in candidates if m in feats]
        dropped = [m for m in candidates if m not in feats]
        if dropped:
            warnings.warn(
                f"KernelTracker does not track the features of {dropped}: not called exactly once "
                "per forward, or output not batched on dim 0 with the probe's examples. Pass "
                "feature_modules=[...] to choose the modules (or False for none).",
                stacklevel=2,
            )
        self.num_outputs = f.shape[1]
        if kind != "auto":
            kc.warn_spectrum_size(
                kind,
                self.projection,
                probe_size=self.probe_size,
                num_outputs=self.num_outputs,
                stacklevel=3,
            )

        self.targets, self.classification = self._check_targets(targets)
        self._topk = check_int("topk", topk, minimum=1, optional=True)
        # the largest kernel matrix the configuration can give (before "auto" is resolved)
        self._check_topk(kind if kind != "auto" else "full", self.projection)
        self._validate_engine()
        self._names = self._build_names()
        self.lazy_thresholds = self._check_thresholds(lazy_thresholds)
        self._probe_fingerprint = fingerprint(probe)
        self._reference = Reference()
        self._last = LastMeasurement()
        self._catapult = CatapultDetector()
        self._reset()

    def __new__(cls, model: Any = None, *args: Any, **kwargs: Any) -> KernelTracker:
        # --- sharded route (lazy_monitor/tracking/sharded.py): a model whose trainable
        # parameters are DTensors (FSDP2 fully_shard) is measured through its own sharded
        # forward/backward by the subclass; everything else is this class.
        if cls is KernelTracker and isinstance(model, nn.Module):
            from lazy_monitor.tracking.sharded import ShardedKernelTracker, has_sharded_params

            if has_sharded_params(model):
                cls = ShardedKernelTracker
        return super().__new__(cls)

    # ------------------------------------------------------------------ validation
    def _validate_engine(self) -> None:
        """Validate implementation / output_fn / projection against the engine on one example,
        now rather than at the first measurement mid-training. Bounded: one output (the same
        code paths -- structured plan, vmap or its loop fallback, forward AD for ntvp -- at
        the cost of O = 1, not of a 1000-class head)."""
        one = F.slice_batch(self._probe_on_model_device(), slice(0, 1))
        empirical_ntk(
            self.model,
            one,
            params=self._current_params(),
            kind="trace",
            implementation=self.implementation,
            output_fn=self.output_fn,
            projection="sum" if self.projection is None else self.projection,
        )

    def _check_targets(self, targets: Optional[Tensor]) -> tuple[Optional[Tensor], bool]:
        if targets is None:
            return None, False
        # only an explicit trace kernel accepts regression targets of another width than O
        # ("auto" may resolve to "full")
        outputs = None if self.kind == "trace" else self.num_outputs
        return M.alignment_targets(targets, self.probe_size, self.num_outputs, outputs)

    def _check_topk(self, kind: str, projection: Union[None, int, str]) -> int:
        """``topk`` for a kernel of this kind/projection (see :func:`kc.check_topk`)."""
        return kc.check_topk(
            self._topk,
            kind,
            projection,
            probe_size=self.probe_size,
            num_outputs=self.num_outputs,
        )

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
            feature_layers=self._feature_modules,
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
        return None if self._kernel_config is None else dict(self._kernel_config)

    @property
    def topk(self) -> Optional[int]:
        """``k`` of ``ntk/eig_overlap`` for the measured kernel (None before it is resolved)."""
        return self._topk_resolved

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
        self._kernel_config = None
        self._topk_resolved: Optional[int] = None
        self._kernel_targets: Optional[Tensor] = None
        self._reference.reset()
        self._last.reset()
        self._catapult.reset()
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

    def _forward(self, strict: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """``f(probe; θ)`` at the model's current parameters, ``(N, O)``, without side effects,
        and the tracked modules' features ``{module: (N, D)}`` recorded in the same forward."""
        x = self._probe_on_model_device()
        params = self._current_params()
        fm = F.FunctionalModel(self.model, self.output_fn, F.compute_dtype(params, x))
        with F.side_effect_guard(self.model), torch.no_grad(), self._hooks(strict) as grams:
            f = fm(fm.cast_params(params), fm.cast_inputs(x)).detach()
        return f, self._on_metric_device(grams)

    def _hooks(self, strict: bool = True) -> Any:
        """Forward hooks recording the centred Gram ``(N, N)`` of each tracked module's output
        (see :func:`lazy_monitor.tracking.features.gram_hooks`)."""
        return gram_hooks(self.model, self._feature_modules, self.probe_size, strict=strict)

    def _on_metric_device(self, grams: Mapping[str, Tensor]) -> dict[str, Tensor]:
        dev = self._metric_device()
        return {m: grams[m].to(dev) for m in self._feature_modules if m in grams}

    def _full_spectrum(self) -> bool:
        """Whether λmax of the measured kernel matrix is that of the ``(N·O) × (N·O)`` NTK
        (what ``ntk/lr_eig_max`` is defined with): a full kernel, or a trace/diagonal kernel of a
        single output (then the same matrix). Any other kind (e.g. a projected kernel) is not.
        Tests the kind resolved at start (``"auto"`` is resolved there)."""
        cfg = self._kernel_config
        kind = self.kind if cfg is None else cfg["kind"]
        if cfg is not None and cfg["projection"] is not None:
            return False  # the kernel of projected outputs, not the NTK's spectrum
        if kind == "full":
            return True
        return kind in ("trace", "diagonal") and self.num_outputs == 1

    def _kernel(self) -> tuple[Tensor, dict[str, Tensor]]:
        """Total kernel and per-layer kernels (one engine call), on the metric device."""
        dev = self._metric_device()
        if self.sharding is not None and self.sharding.active:
            kernel, layers = self._sharded_kernel()
            return kernel.to(dev), {k: v.to(dev) for k, v in layers.items()}
        # (data-dependent control flow: implementation="auto" falls back inside the engine)
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

    def _sharded_kernel(self) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`_kernel` with the work split across processes (see
        :mod:`lazy_monitor.tracking.distributed`); the same result on every process."""
        assert self.sharding is not None
        x = self._probe_on_model_device()
        params = self._current_params()
        if self._param_costs is None or list(self._param_costs) != self._param_names:
            self._param_costs = estimate_param_costs(
                self.model, x, params=params, output_fn=self.output_fn
            )
        cfg = self._kernel_config
        assert cfg is not None, "the kernel configuration is resolved at start()"
        n, kind = self.probe_size, cfg["kind"]
        o = kc.kernel_outputs(kind, cfg["projection"], self.num_outputs)
        shape = {"full": (n, n, o, o), "trace": (n, n), "diagonal": (n, n, o)}[kind]
        dtype = F.compute_dtype(params, x)
        template = torch.zeros(shape, dtype=dtype, device=self._model_device())
        layers = self._layers if self.per_layer else {}
        for attempt in range(2):
            errors: list[RuntimeError] = []

            def compute(names: Any, errors: list = errors) -> tuple[Tensor, dict[str, Tensor]]:
                try:
                    return empirical_ntk(
                        self.model,
                        x,
                        params={k: params[k] for k in names},
                        return_blocks=True,
                        **self._engine_options(),
                    )
                except RuntimeError as err:
                    errors.append(err)
                    raise

            result = sharded_kernel(self.sharding, compute, self._param_costs, layers, template)
            if result is not None:
                return result
            # Some process failed: all switch together (as in _kernel) or all raise.
            if attempt == 0 and self.implementation == "auto":
                if errors:
                    warnings.warn(
                        f"the structured kernel failed on the probe ({errors[0]}); "
                        "KernelTracker switches to implementation='jacobian' on every process.",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                self.implementation = "jacobian"
                cfg["implementation"] = "jacobian"  # what _engine_options passes on
                continue
            if errors:
                raise errors[0]
            raise RuntimeError(
                "the kernel computation failed on another process of the split measurement "
                "(its error is raised there); every process stops measuring"
            )
        raise AssertionError("unreachable")

    def _engine_call(self, x: Optional[InputBatch] = None, blocks: Optional[bool] = None) -> Any:
        return empirical_ntk(
            self.model,
            self._probe_on_model_device() if x is None else x,
            params=self._current_params(),
            return_blocks=self.per_layer if blocks is None else blocks,
            **self._engine_options(),
        )

    def _engine_options(self) -> dict[str, Any]:
        """The engine settings, in one place (the resolved :attr:`kernel_config`)."""
        cfg = self._kernel_config
        assert cfg is not None, "the kernel configuration is resolved at start()"
        return {
            "kind": cfg["kind"],
            "implementation": cfg["implementation"],
            "projection": cfg["projection"],
            "projection_seed": cfg["projection_seed"],
            "max_memory": cfg["max_memory"],
            "output_fn": self.output_fn,
            "chunk_size": self.chunk_size,
        }

    # ------------------------------------------------------------------ kernel configuration
    def _resolve_kernel_config(self) -> dict[str, Any]:
        """Resolve ``kind="auto"`` (or check a forced kind/projection) against ``max_memory``:
        see :func:`lazy_monitor.tracking.kernel_config.resolve`."""
        return kc.resolve(
            self.model,
            self._probe_on_model_device(),
            self._current_params(),
            kind=self.kind,
            projection=self.projection,
            projection_seed=self.projection_seed,
            implementation=self.implementation,
            max_memory=self.max_memory,
            per_layer=self.per_layer,
            output_fn=self.output_fn,
            max_seconds=MAX_SECONDS,  # read here: tests patch this module's constant
            stacklevel=5,  # the same frame as before the move (kc.resolve is one deeper)
        )

    def _apply_kernel_config(self, cfg: dict[str, Any], warn: bool) -> None:
        """Adopt a resolved (or restored) kernel configuration: ``topk`` and the alignment
        targets follow the kernel's outputs."""
        kind, projection = cfg["kind"], cfg["projection"]
        self._topk_resolved = self._check_topk(kind, projection)
        shape = {"probe_size": self.probe_size, "num_outputs": self.num_outputs}
        if warn and self.kind == "auto":
            kc.warn_spectrum_size(kind, projection, stacklevel=5, **shape)
        self._kernel_targets = kc.project_targets(
            self.targets, self.classification, kind, projection, cfg["projection_seed"], **shape
        )
        self._kernel_config = cfg

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
        forward = self._eval_forward(lin)
        both = forward(F.slice_batch(x, slice(0, 2)))
        alone = torch.cat([forward(F.slice_batch(x, slice(i, i + 1))) for i in range(2)])
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

    def _eval_forward(self, lin: Linearization) -> Callable[[F.InputBatch], Tensor]:
        """The side-effect-free eval-mode forward ``x -> f(x) (n, O)`` for the batch check."""
        return lin.f0

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
                fix), or ``topk`` exceeds the resolved kernel matrix size.
        """
        step = self._check_step(step, first=True)
        lr = self._check_lr(lr)
        self._reset()
        self._set_param_names(list(F.resolve_params(self.model)))
        lin = self._new_linearization()
        self._check_batch_independent(lin)
        self._apply_kernel_config(self._resolve_kernel_config(), warn=True)
        kernel, layer_kernels = self._kernel()
        f0, grams0 = self._forward()
        f0 = f0.to(self._metric_device())
        spectrum = M.kernel_spectrum(kernel)
        self._lin = lin
        ref = self._reference
        ref.f0, ref.kernel0, ref.layer_kernels0 = f0, kernel, layer_kernels
        ref.eigvecs0 = spectrum[1][:, -self.topk :].contiguous()
        ref.feature_grams0 = grams0
        current = Measurement(
            kernel, layer_kernels, spectrum, f0, f0, self._params0(), ref.feature_grams0
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
        step = self._check_step(step, first=False)
        lr = self._check_lr(lr)
        problem = self._params_problem()
        if problem is not None:
            return self._nan_metrics(problem)
        dev = self._metric_device()
        self._reference.to(dev)  # follow the model (snapshot_device=None, e.g. model.cuda())
        self._last.to(dev)
        kernel, layer_kernels = self._kernel()
        f, grams = self._forward()
        f = f.to(dev)
        out0, f_lin = self._lin.f0_and_f_lin(
            self._probe_on_model_device(), params=self._current_params()
        )
        # f_lin = f₀ + J(θ₀)Δθ with the stored f₀: at θ = θ₀ this is exactly f₀ (= f), so the
        # 0/0 of lin/rel_error is exact instead of rounding noise between forward and jvp.
        f0 = self._reference.f0
        f_lin = f0 + (f_lin.to(dev) - out0.to(dev)).to(f0.dtype)
        params = self._measured_params(dev)
        spectrum = M.kernel_spectrum(kernel)
        current = Measurement(kernel, layer_kernels, spectrum, f, f_lin, params, grams)
        return self._finish(step, current, lr)

    def _new_linearization(self) -> Linearization:
        """θ₀ = the tracked parameters now (frozen), on the snapshot device."""
        return Linearization(
            self.model,
            self._current_params(),
            output_fn=self.output_fn,
            device=self.snapshot_device,
        )

    def _measured_params(self, dev: torch.device) -> dict[str, Tensor]:
        """θ for the ``params/*`` metrics, on ``dev`` (compared with :meth:`_params0`)."""
        return {n: t.to(dev) for n, t in self._current_params().items()}

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

    @staticmethod
    def _check_lr(lr: Optional[float]) -> Optional[float]:
        return check_float(
            "lr", lr, minimum=0.0, optional=True, fix="pass the optimizer's learning rate or None"
        )

    def _finish(self, step: int, current: Measurement, lr: Optional[float]) -> dict[str, float]:
        """Metrics of ``current`` against the reference; then ``current`` becomes the last."""
        out = regime_metrics(
            self._reference,
            current,
            params0=self._params0(),
            last=self._last,
            step=step,
            targets=self._kernel_targets,
            classification=self.classification,
            topk=self.topk,
            layers=self._layers if self.per_layer else {},
            lazy_thresholds=self._thresholds,
            names=[n for n in self._names if n != "regime/catapult"],
            lr=lr,
            full_spectrum=self._full_spectrum(),
        )
        # Stateful, so not in the pure regime_metrics: fed at every measurement, step 0 too.
        out["regime/catapult"] = self._catapult.update(out["ntk/lr_eig_max"], out["ntk/eig_max"])
        out = {name: out[name] for name in self._names}
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
        state["catapult"] = self._catapult.state_dict()
        return state

    def _config(self) -> dict[str, Any]:
        cfg = self._kernel_config
        return {
            "kind": self.kind if cfg is None else cfg["kind"],
            "kernel_config": None if cfg is None else dict(cfg),
            "per_layer": self.per_layer,
            "topk": self.topk,
            "num_examples": self.probe_size,
            "num_outputs": self.num_outputs,
            "param_names": list(self._param_names),
            "layer_groups": self.layer_groups,
            "probe": self._probe_fingerprint,
            "targets": None if self.targets is None else fingerprint(self.targets),
            "feature_modules": list(self._feature_modules),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`; later :meth:`measure` calls give the
        same metrics as the saved tracker would have.

        Raises:
            ValueError: not a KernelTracker state, or saved with a different configuration
                (kind, per_layer, topk, probe, targets, model parameters).
        """
        check_schema(state, "KernelTracker", required=("format", "config", "started"))
        saved = state["config"]
        kernel_config = (
            kc.saved_kernel_config(
                saved,
                kind=self.kind,
                projection=self.projection,
                projection_seed=self.projection_seed,
                implementation=self.implementation,
            )
            if state["started"]
            else None
        )
        mine = self._config()
        if kernel_config is not None:  # compare with what this tracker will measure
            mine["kind"] = kernel_config["kind"]
            mine["topk"] = self._check_topk(kernel_config["kind"], kernel_config["projection"])
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
        saved_features = saved.get("feature_modules")
        if (
            self._features_default
            and saved_features is not None
            and set(saved_features) <= set(dict(self.model.named_modules()))
        ):
            # Default modules follow the saved tracker (like the tracked parameters: chosen
            # when it was built, e.g. before layers were frozen).
            mine["feature_modules"] = list(saved_features)
        if saved_features is not None and list(saved_features) != mine["feature_modules"]:
            raise ValueError(
                f"the state was saved with feature_modules={saved['feature_modules']!r} but this "
                f"tracker tracks {mine['feature_modules']!r}; build it with the same "
                "feature_modules"
            )
        names = list(saved.get("param_names", []))
        live = dict(self.model.named_parameters())
        if state["started"] and (not names or any(n not in live for n in names)):
            raise ValueError(
                f"the state tracks parameters {names[:4]}... that are not all parameters of "
                f"{type(self.model).__name__}; build the tracker with the same model"
            )
        if mine["feature_modules"] != self._feature_modules:
            self._feature_modules = list(mine["feature_modules"])
            self._names = self._build_names()
            self.lazy_thresholds = self._check_thresholds(self.lazy_thresholds)
        self._reset()
        if not state["started"]:
            return
        # the saved per-layer K₀ fixes the grouping (states before layer_groups: per module)
        regroup = saved.get("layer_groups") != self.layer_groups
        self.layer_groups = saved.get("layer_groups")
        self._set_param_names(names, regroup=regroup)
        assert kernel_config is not None
        self._apply_kernel_config(kernel_config, warn=False)
        lin = self._new_linearization()
        lin.load_state_dict(state["linearization"])
        dev = self._metric_device()
        self._reference.load_state_dict(state, dev)
        self._last.load_state_dict(state, dev)
        self._lin = lin
        if "catapult" in state:
            self._catapult.load_state_dict(state["catapult"])
        if set(self._reference.feature_grams0) != set(self._feature_modules):
            # A state saved before feature tracking: the θ₀ features from the snapshot (its
            # parameters and buffers), exactly what start() would have recorded.
            x = self._probe_on_model_device()
            with self._hooks() as grams:
                lin.f0(x)
            self._reference.feature_grams0 = self._on_metric_device(grams)


def _probe_error(err: Exception, model: nn.Module, probe: InputBatch) -> Exception:
    """The model's own error on the probe, with the probe's shape, what the model's first
    layer expects, and the tuple hint for several positional inputs."""
    if isinstance(err, F.OutputSelectionError):  # the output, not the probe: output_fn is the fix
        return err
    shapes = F.map_batch(probe, lambda t: tuple(t.shape))
    hints = [f"the probe has shape {shapes}"]
    first = next(
        (m for m in model.modules() if not list(m.children()) and list(m.parameters(False))), None
    )
    if first is not None:
        for attr, axis in (
            ("in_features", "last dim"),
            ("in_channels", "dim 1"),
            ("input_size", "last dim"),
        ):
            if hasattr(first, attr):
                hints.append(
                    f"the model's first layer {type(first).__name__} expects {axis} = "
                    f"{getattr(first, attr)} ({attr})"
                )
                break
    text = str(err)
    if isinstance(err, TypeError) and "argument" in text:
        hints.append(
            "a model with several inputs forward(a, b) takes the probe as a tuple of tensors "
            "(a, b), all batched on dim 0"
        )
    return type(err)(f"the model cannot run on the probe: {text}; " + "; ".join(hints))
