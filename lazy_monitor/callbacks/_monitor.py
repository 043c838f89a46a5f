"""``KernelRegimeMonitor``: measure the kernel regime during ``fit`` and log it (namespace-free).

The class here is a mixin: it implements the hooks but derives from no ``Callback``. The adapters
in :mod:`lazy_monitor.callbacks.lightning` and :mod:`lazy_monitor.callbacks.pytorch_lightning`
combine it with the ``Callback`` of their namespace, so LightningCLI's subclass checks pass in
each namespace while both share one implementation and one ``state_key`` (checkpoints move freely
between them). Nothing here imports ``lightning`` or ``pytorch_lightning``; the framework-free
pieces (tracker, schedule, probe drawing) live in :mod:`lazy_monitor.tracking`.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Literal, Optional, Union

import torch
from torch import Tensor, nn

from lazy_monitor import catalogue
from lazy_monitor._state import check_schema, stamp
from lazy_monitor._validation import (
    check_bool,
    check_callable,
    check_choice,
    check_int,
    check_mapping,
    check_str,
    message,
)
from lazy_monitor.callbacks import _tensorboard as tb
from lazy_monitor.callbacks._identity import _Identified, check_unique
from lazy_monitor.core._functional import as_device, map_batch, side_effect_guard
from lazy_monitor.core.kernels import DEFAULT_MAX_MEMORY, NtkConfig, NtkImplementation
from lazy_monitor.core.stability import current_lr
from lazy_monitor.tracking.distributed import KernelSharding, check_strategy
from lazy_monitor.tracking.layers import DEFAULT_LAYER_GROUPS
from lazy_monitor.tracking.network import device_of as _device_of
from lazy_monitor.tracking.network import resolve_submodule as _resolve_submodule
from lazy_monitor.tracking.probe import (
    Probe,
    build_tracker,
    default_batch_to_probe,
    draw_probe,
    split_probe,
    validate_probe,
)
from lazy_monitor.tracking.probe import (
    probe_size as _probe_size,
)
from lazy_monitor.tracking.schedule import MeasurementSchedule, OverheadBudget
from lazy_monitor.tracking.sharded import has_sharded_params, mesh_sharding
from lazy_monitor.tracking.tracker import REQUESTED_KINDS

_log = logging.getLogger("lazy_monitor")

__all__ = ["DEFAULT_EVERY_N_STEPS", "DEFAULT_PROBE_SIZE", "_KernelRegimeMonitorBase"]

#: Default cadence: one measurement with the default probe (32 examples, full kernel) costs as
#: much as a handful of training steps of an MLP / small CNN at batch 128, so 500 steps keep the
#: monitor's share of the fit time at a few percent (measured: benchmarks/RESULTS.md).
DEFAULT_EVERY_N_STEPS = 500
#: Default probe size when neither ``probe`` nor ``probe_size`` is given.
DEFAULT_PROBE_SIZE = 32


def _global_step(trainer: Any) -> int:
    return int(trainer.global_step)


def _log_step(trainer: Any) -> int:
    # What `self.log` and LearningRateMonitor put on the x-axis (number of batches that stepped).
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def _optimizer_lr(trainer: Any) -> Optional[float]:
    """Learning rate of the first param group of the first optimizer, read now (after any
    scheduler step); None (``opt/lr`` and ``ntk/lr_eig_max`` NaN) if the trainer has none."""
    try:
        return current_lr(trainer.optimizers)
    except (AttributeError, TypeError, ValueError):
        return None


def _check_feature_modules(value: Any) -> Union[list[str], bool, None]:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, Sequence) and not isinstance(value, str) and value:
        return [check_str(f"feature_modules[{i}]", m) for i, m in enumerate(value)]
    raise TypeError(
        message(
            "feature_modules",
            "True, False/None or a non-empty list of module names",
            value,
            "e.g. feature_modules=['fc1', 'readout'] (names from model.named_modules())",
        )
    )


class _KernelRegimeMonitorBase(_Identified):
    r"""Track the empirical NTK during ``fit`` and log whether training stays lazy.

    A thin Lightning wrapper around :class:`lazy_monitor.KernelTracker`: at train start it fixes a
    probe batch and snapshots :math:`\theta_0`, :math:`f_0` and
    :math:`K_0 = J(\theta_0) J(\theta_0)^\top` on it; at every measurement it evaluates
    :math:`K_t`, the parameter change and the linearization
    :math:`f_{lin}(x) = f(x;\theta_0) + J(\theta_0)(\theta_t-\theta_0)` (Lee et al. 2019) and logs
    the tracker's metrics (``ntk/rel_change`` :math:`=\|K_t-K_0\|_F/\|K_0\|_F`,
    ``lin/rel_error``, ``params/rel_change``, ``regime/lazy``, ... see README).

    When it measures (``step`` = ``trainer.global_step``, i.e. optimizer steps, so gradient
    accumulation counts one step per ``accumulate_grad_batches`` batches):

    * at train start (step 0; the reference :math:`K_0`, every change is exactly 0),
    * right after the optimizer step that reaches a multiple of ``every_n_steps`` (in
      ``on_train_batch_end``, so epoch-end callbacks and checkpoints see it), and after the
      steps ``1, 2, 4, 8, ...`` below ``log_spaced_until``,
    * at train end (unless that step was just measured).

    Where values go: every logger in ``trainer.loggers`` (``log_metrics``, rank 0 only) at the
    x-axis of ``self.log`` (``fit_loop.epoch_loop._batches_that_stepped``): the value after
    ``k`` optimizer steps is at ``x = k``, where the loss computed at the same weights is; and
    ``trainer.callback_metrics`` as tensors (every rank) so ``EarlyStopping(monitor=
    "ntk/rel_change")`` and ``ModelCheckpoint`` can use them. With a TensorBoard logger also: a
    custom-scalars layout (categories "drift (log10)", "kernel drift", "linearization" open;
    the others -- "spectrum", "parameters", "stability", "features", "health" -- collapsed), the ``drift/log10_*`` companions (what the
    Time Series tab shows first, one unit per decade; not at step 0), ``health/*`` only once it
    is non-zero, a histogram of the kernel's eigenvalues per measurement (``ntk/eigenvalues``),
    optionally the kernel as an image (``ntk/kernel``), a per-layer drift heatmap, texts (TEXT
    tab) at regime transitions and a markdown run summary at train end, and an HParams entry
    written at fit start (see ``log_hparams``).

    Learning rate and stability: at every measurement the monitor reads the current learning
    rate of the first param group of the first optimizer (``trainer.optimizers[0]``, after any
    scheduler step) and passes it to the tracker, which logs ``opt/lr``,
    ``ntk/lr_eig_max = lr · λmax(K)/N`` (Lewkowycz et al. 2020's MSE stability number; NaN for
    ``kind="trace"``/``"diagonal"`` with several outputs) and ``regime/catapult``. The
    number is a gradient-descent criterion for the ½·mean squared error: with cross-entropy,
    momentum or adaptive optimizers (Adam) it is a scale, not a stability test (see
    :mod:`lazy_monitor.core.stability`). Feature movement: ``features/<layer>/cka`` (linear
    CKA of each tracked module's probe features with those at θ₀, Kornblith et al. 2019).

    Side-effect free: measurements run on the unwrapped network (DDP ``.module``,
    ``torch.compile`` ``_orig_mod``) in eval semantics, float32 outside autocast, with gradients
    enabled even inside ``inference_mode``; weights, buffers (BatchNorm statistics), ``.grad``,
    train/eval flags and all RNG states are left untouched, so training is bit-identical with
    and without the monitor.

    Resume: the probe, :math:`\theta_0`, :math:`f_0`, :math:`K_0`, the previous kernel and the last
    measured step are in :meth:`state_dict` (CPU tensors and plain Python, loadable with
    ``weights_only=True``). The reference is captured in ``on_train_start`` only when nothing was
    restored; a ``fit`` without a checkpoint (or from a checkpoint without monitor state) starts
    a new reference at its own start -- except a continued ``fit`` (the same trainer and
    network, e.g. ``max_steps`` raised and ``fit`` called again), which keeps the reference of
    the start of training and does not re-log the step it continues from.

    Fail at start or never: a measurement that fails during training (an error nobody could
    foresee at train start) logs NaN metrics with ``health/nonfinite = 1`` and warns once per
    fit; training continues. A resumed run logs the same values as an uninterrupted one
    whenever Lightning itself resumes the same training trajectory (it does for a
    ``ModelCheckpoint(every_n_train_steps=...)`` checkpoint at an epoch boundary; mid-epoch
    positions without a stateful dataloader replay different batches, changing the training).

    Under DDP every rank takes part in each measurement (the probe is drawn from the dataset, not
    the rank's shard, so it is the same everywhere) and only rank 0 logs. With
    ``split_across_ranks=True`` (default) each rank computes the kernel blocks of its share of the
    parameters and the strategy's ``reduce(..., "sum")`` completes them; the metrics are rank 0's
    on every rank. Under ``ModelParallelStrategy`` with FSDP2 (``fully_shard`` in
    ``configure_model``) the kernel is measured with each rank's parameter shards and summed
    over the mesh (:mod:`lazy_monitor.tracking.sharded`; ``N·O`` backward passes per kernel).
    ``FSDPStrategy`` (FSDP1 flat parameters) and DeepSpeed are rejected at ``setup`` with the
    alternatives.

    Args:
        probe: the probe batch: inputs ``x`` (a tensor, or a dict of tensors passed as keyword
            arguments) or a pair ``(x, y)``; targets ``y`` enable ``ntk/alignment`` and
            ``lin/agreement``. Mutually exclusive with ``probe_size``.
        probe_size: number of probe examples ``N``; draw this many examples from the train dataloader's dataset at the first
            train start, with an own generator seeded by ``seed`` (global RNGs and the loader's
            order are unaffected). Default (neither given): ``32``. The kernel costs grow like
            ``probe_size**2``.
        every_n_steps: measure every this many optimizer steps. The default (500) keeps the
            overhead at a few percent when one step costs at least ~1/50 of a measurement (MLP-1024
            or a small CNN at batch 128 on a CPU, ``benchmarks/bench_overhead.py``); raise it for
            very cheap steps, lower it (or use ``log_spaced_until``) for finer curves.
        log_spaced_until: also measure at steps ``1, 2, 4, ...`` below this step (kernels move
            fastest early, Fort et al. 2020). ``0`` disables.
        submodule: dotted attribute path of the network inside the LightningModule (e.g.
            ``"net"``); ``None`` evaluates the LightningModule's own ``forward``.
        batch_to_probe: maps a collated training batch to ``x`` or ``(x, y)``; needed for dict
            batches or batches with extra fields. Default: a tensor is ``x``, a tuple/list gives
            ``(batch[0], batch[1])``. May also be overridden as a method in a subclass.
        seed: seed of the probe draw.
        use_targets: pass the probe targets ``y`` to the tracker (``ntk/alignment``,
            ``lin/agreement``). Targets of a drawn probe that the alignment cannot use (all
            class labels equal, integer labels not of shape ``(N,)`` or out of range, float
            targets whose width is not the model's output size, ...) are dropped with a warning;
            targets of an explicit ``probe=(x, y)`` must fit (an error at train start otherwise).
        kind: ``"auto"`` (default): resolved at train start to ``"full"``, ``"trace"`` or
            ``"trace"`` with a 16-direction projection so that a measurement fits
            ``max_memory`` (see :class:`~lazy_monitor.KernelTracker`); the choice is logged
            once (a warning when it is not ``"full"``, an info line on the ``lazy_monitor``
            logger, the HParams entry) and kept in checkpoints. Or a kind kept as given:
            ``"full"`` ``(N, N, O, O)``, ``"trace"`` ``(N, N)`` (sum over outputs),
            ``"diagonal"`` ``(N, N, O)``; a forced kind that does not fit ``max_memory``
            raises at train start.
        projection: ``None``, ``k`` (int) or ``"sum"``: measure the kernel of projected outputs
            (see :func:`lazy_monitor.empirical_ntk`); forced when given.
        projection_seed: seed of the projection (the same ``R`` for ``K₀`` and every ``K``).
        max_memory: bytes one measurement may hold (default 1 GiB; ``None``: no limit).
        implementation: kernel implementation passed to the tracker (``"auto"`` picks by cost).
        per_layer: also log ``ntk_layer/<layer>/rel_change`` and ``params_layer/<layer>/rel_change``
            (and ``drift_layer/<layer>/log10_rel_change``, a heatmap ``drift_layer/heatmap``).
        layer_groups: at most this many per-layer groups: the network's module hierarchy cut
            at one depth, normalization layers folded into their block
            (:func:`lazy_monitor.tracking.layers.group_layers`; e.g. ``transformer.h.0`` ...
            for GPT-2). ``None``: one group per module (hundreds of tags on a deep net).
        output_fn: maps the network output to a tensor (e.g. ``lambda out: out.logits``).
        lazy_thresholds: thresholds of ``regime/lazy`` passed to the tracker (its defaults if None).
        topk: number of leading eigenvectors for ``ntk/eig_overlap`` (tracker default if None).
        chunk_size: probe chunk size for the kernel engine (tracker default if None).
        snapshot_device: where the tracker keeps θ₀, K₀ and computes metrics (e.g. ``"cpu"`` to
            save accelerator memory; None: the model's device).
        log_eigenvalues: TensorBoard histogram ``ntk/eigenvalues`` at every measurement.
        log_kernel_image: TensorBoard image ``ntk/kernel`` (grey: 0.5 = 0) at every measurement.
        log_hparams: TensorBoard HParams entry at fit start (before Lightning's own, which
            TensorBoard then ignores): the LightningModule's (and datamodule's)
            ``save_hyperparameters`` values, marked as the columns that differ between runs,
            the monitor's ``lazy_monitor/*`` settings and the metrics
            (:data:`~lazy_monitor.callbacks._tensorboard.HPARAMS_METRICS`).
        log_layer_image: with ``per_layer``, a heatmap image of the per-layer kernel change
            (layer groups × measurements, log colour) at log-spaced measurements and at the end.
        feature_modules: modules of the network whose probe features are tracked
            (``features/<name>/cka``): ``True`` (default) the modules owning trainable parameters
            (those that cannot be tracked are skipped with a warning), a list of names from
            ``network.named_modules()``, or ``False``/``None`` for none. Passed to the tracker.
        split_across_ranks: under DDP (any strategy with several processes), each rank
            computes the kernel blocks of its share of the parameters (balanced by the engine's
            cost model) and ``trainer.strategy.reduce(..., "sum")`` completes the kernels; every
            rank gets the same metrics (:mod:`lazy_monitor.tracking.distributed`). ``False``:
            every rank computes the whole kernel.
        max_overhead: budget for the monitor's own cost, as a share of the wall time since train
            start (e.g. ``0.02``); ``None``: no budget. Measurements are timed and scheduled ones
            are skipped while measuring would exceed the budget
            (:class:`lazy_monitor.tracking.schedule.OverheadBudget`): ``every_n_steps`` /
            ``log_spaced_until`` stay the densest cadence, the budget only drops steps of it;
            the step-0 reference and the final measurement are always taken. With a budget the
            monitor also logs ``monitor/seconds`` (the last measurement) and
            ``monitor/overhead`` (share of wall time so far); the accounting is in the state,
            so a resumed fit continues it.

    Raises:
        ValueError: at construction for invalid values (each message names the value and the
            fix); at setup for an unknown ``submodule`` or a second monitor in the Trainer
            (both would log the same tags); at train start for a probe that cannot be
            drawn (e.g. ``probe_size`` larger than the dataset) or targets of an explicit
            ``probe=(x, y)`` that do not fit the model's outputs.
        TypeError: at construction for an argument of the wrong type (e.g.
            ``per_layer="false"``) or a probe that is neither ``x`` nor ``(x, y)``; at train
            start for training batches that ``batch_to_probe`` cannot split.

    Example::

        from lightning.pytorch import Trainer
        from lazy_monitor.callbacks.lightning import KernelRegimeMonitor

        trainer = Trainer(max_steps=2000, callbacks=[KernelRegimeMonitor(probe_size=32)])
    """

    def __init__(
        self,
        probe: Optional[Any] = None,
        probe_size: Optional[int] = None,
        every_n_steps: int = DEFAULT_EVERY_N_STEPS,
        log_spaced_until: int = 0,
        submodule: Optional[str] = None,
        batch_to_probe: Optional[Callable[[Any], Any]] = None,
        seed: int = 0,
        use_targets: bool = True,
        kind: Literal["auto", "full", "trace", "diagonal"] = "auto",
        implementation: str = "auto",
        per_layer: bool = True,
        layer_groups: Optional[int] = DEFAULT_LAYER_GROUPS,
        output_fn: Optional[Callable[[Any], Tensor]] = None,
        lazy_thresholds: Optional[dict[str, float]] = None,
        topk: Optional[int] = None,
        chunk_size: Optional[int] = None,
        snapshot_device: Optional[str] = None,
        log_eigenvalues: bool = True,
        log_kernel_image: bool = False,
        log_hparams: bool = True,
        feature_modules: Union[list[str], bool, None] = True,
        split_across_ranks: bool = True,
        max_overhead: Optional[float] = None,
        projection: Optional[Any] = None,
        projection_seed: int = 0,
        max_memory: Optional[int] = DEFAULT_MAX_MEMORY,
        log_layer_image: bool = True,
    ) -> None:
        if probe is not None and probe_size is not None:
            raise ValueError(
                f"pass either probe=... or probe_size={probe_size}, not both (probe_size draws a "
                "probe from the training data)"
            )
        self._probe: Optional[Probe] = None
        if probe is not None:
            self._probe = split_probe(probe, "KernelRegimeMonitor(probe=...)")
            validate_probe(self._probe, "KernelRegimeMonitor(probe=...)")
            self.probe_size = _probe_size(self._probe)
        else:
            size = DEFAULT_PROBE_SIZE if probe_size is None else probe_size
            self.probe_size = check_int("probe_size", size, minimum=1, fix="e.g. probe_size=32")
        self._schedule = MeasurementSchedule(every_n_steps, log_spaced_until)
        if submodule is not None and (not isinstance(submodule, str) or not submodule.strip(".")):
            raise ValueError(
                f"submodule must be a dotted attribute path such as 'net' or None, got {submodule!r}"
            )
        check_callable("batch_to_probe", batch_to_probe, fix="batch -> x or (x, y)")
        if batch_to_probe is not None and probe is not None:
            raise ValueError(
                "batch_to_probe only applies to a probe drawn from the training data; with an "
                "explicit probe=... pass the already converted (x, y)"
            )
        self.kind = check_choice("kind", kind, REQUESTED_KINDS)
        NtkConfig(projection=projection, projection_seed=projection_seed)  # one wording
        self.projection = projection
        self.projection_seed = projection_seed
        self.max_memory = check_int(
            "max_memory", max_memory, minimum=1, optional=True, fix="bytes; None: no limit"
        )
        self.implementation = check_str("implementation", implementation, fix="e.g. 'auto'")
        NtkImplementation.parse(implementation)  # raises naming the allowed values
        self.output_fn = check_callable("output_fn", output_fn, fix="output -> Tensor")
        check_mapping(
            "lazy_thresholds", lazy_thresholds, optional=True, fix="e.g. {'ntk/rel_change': 0.1}"
        )
        self.lazy_thresholds = None if lazy_thresholds is None else dict(lazy_thresholds)
        self.seed = check_int("seed", seed, minimum=0, fix="use a non-negative integer seed")
        self.topk = check_int("topk", topk, minimum=1, optional=True, fix="None: tracker default")
        self.chunk_size = check_int(
            "chunk_size", chunk_size, minimum=1, optional=True, fix="None for no chunking"
        )
        as_device(snapshot_device, "snapshot_device")  # raises naming the value
        self.snapshot_device = snapshot_device
        self.use_targets = check_bool("use_targets", use_targets)
        self.per_layer = check_bool("per_layer", per_layer)
        self.layer_groups = check_int(
            "layer_groups", layer_groups, minimum=1, optional=True, fix="None: one per module"
        )
        self.log_layer_image = check_bool("log_layer_image", log_layer_image)
        self.log_eigenvalues = check_bool("log_eigenvalues", log_eigenvalues)
        self.log_kernel_image = check_bool("log_kernel_image", log_kernel_image)
        self.log_hparams = check_bool("log_hparams", log_hparams)
        self.feature_modules = _check_feature_modules(feature_modules)
        self.split_across_ranks = check_bool("split_across_ranks", split_across_ranks)
        self._budget = None if max_overhead is None else OverheadBudget(max_overhead)
        self.max_overhead = None if self._budget is None else self._budget.max_overhead
        self.submodule = submodule
        self._batch_to_probe = batch_to_probe

        self._tracker: Any = None
        self._restored: Optional[dict[str, Any]] = None
        self._current_probe: Optional[Probe] = None
        self._last_step: Optional[int] = None
        self._last_metrics: dict[str, float] = {}
        self._batch_start_step: Optional[int] = None
        self._listeners: list[Any] = []
        self._layout_written: set[int] = set()
        self._warned_failure = False
        # TensorBoard extras of the current fit (rank 0): heatmap history, texts written
        self._layer_history: list[tuple[int, dict[str, float]]] = []
        self._layer_images = self._layer_drawn = self._layer_log_step = 0
        self._texts = 0
        self._transitions = 0
        self._maxima: dict[str, float] = {}
        self._health_logged: set[str] = set()
        #: Wall-clock seconds spent measuring in this process (for overhead reports).
        self.measure_seconds = 0.0
        self.num_measurements = 0

    # ------------------------------------------------------------------ settings
    @property
    def every_n_steps(self) -> int:
        """Measurement cadence in optimizer steps (kept by the schedule)."""
        return self._schedule.every_n_steps

    @property
    def log_spaced_until(self) -> int:
        """Extra measurements at steps 1, 2, 4, ... below this step (kept by the schedule)."""
        return self._schedule.log_spaced_until

    # ------------------------------------------------------------------ public helpers
    @property
    def tracker(self) -> Any:
        """The :class:`KernelTracker` of the current fit (None before train start)."""
        return self._tracker

    def _identity(self) -> dict[str, Any]:
        """The settings in ``state_key`` (see :mod:`lazy_monitor.callbacks._identity`)."""
        probe = "given" if self._probe is not None else "drawn"
        return dict(
            probe=probe,
            probe_size=self.probe_size,
            seed=self.seed,
            submodule=self.submodule,
            kind=self.kind,
            per_layer=self.per_layer,
        )

    def _base_state_key(self) -> str:
        # "auto" shares the key of "full" (the previous default): checkpoints of monitors
        # with default arguments keep loading; the tracker restores the saved kernel
        kind = "full" if self.kind == "auto" else self.kind
        return self._generate_state_key(**{**self._identity(), "kind": kind})  # type: ignore[attr-defined]

    def batch_to_probe(self, batch: Any) -> Any:
        """Map a collated training batch to ``x`` or ``(x, y)`` (override or pass the argument)."""
        if self._batch_to_probe is not None:
            return self._batch_to_probe(batch)
        return default_batch_to_probe(batch)

    def metric_names(self) -> list[str]:
        """Metric names of the current fit (the tracker's), empty before train start."""
        return list(self._tracker.metric_names()) if self._tracker is not None else []

    def _add_listener(self, listener: Any) -> None:
        if all(existing is not listener for existing in self._listeners):
            self._listeners.append(listener)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_one_monitor(getattr(trainer, "callbacks", ()))  # ours, not Lightning's message
        self._claim()
        # fail before training on a wrong submodule path or a strategy that shards parameters
        _resolve_submodule(pl_module, self.submodule)
        check_strategy(trainer.strategy)
        self._layout_written = set()  # one custom-scalar layout per writer and fit

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # Before Lightning's own hparams write (trainer._log_hyperparams): the first one in an
        # event file is the one TensorBoard shows.
        # Under fast_dev_run Lightning swaps the loggers for ones that write no file (and logs
        # no hparams itself): there is nothing to write into.
        if self.log_hparams and trainer.is_global_zero and not getattr(trainer, "fast_dev_run", 0):
            self._write_hparams(trainer, pl_module)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        network = _resolve_submodule(pl_module, self.submodule)
        self._layer_history, self._layer_images, self._layer_drawn, self._texts = [], 0, 0, 0
        self._transitions, self._maxima, self._health_logged = 0, {}, set()
        device = _device_of(network)
        restored, self._restored = self._restored, None
        if self._budget is not None:
            self._budget = OverheadBudget(self._budget.max_overhead)
            if restored is not None and restored.get("budget"):
                self._budget.load_state_dict(restored["budget"])
            self._budget.start_clock()
        self._warned_failure = False
        if restored is not None:
            probe = (restored["probe_x"], restored["probe_y"])
            self._tracker = self._build_tracker(network, probe, device, trainer)
            self._tracker.load_state_dict(restored["tracker"])
            self._last_step = restored["last_step"]
            self._last_metrics = dict(restored.get("last_metrics", {}))
            self._notify_start(trainer)
            return
        if self._continues(network, trainer):
            # A continued `fit` (same trainer and network, max_steps raised): θ₀ stays the start
            # of training, nothing is re-measured at this step (its logged point is kept).
            self._notify_start(trainer)
            return
        self._last_metrics = {}
        if self._probe is not None:
            probe = self._probe
        else:
            probe = draw_probe(
                trainer.train_dataloader, self.probe_size, self.seed, self.batch_to_probe
            )
        self._tracker = self._build_tracker(network, probe, device, trainer)
        self._last_step = None
        self._notify_start(trainer)
        start = functools.partial(self._tracker.start, lr=_optimizer_lr(trainer))
        metrics = self._safely(network, start, _global_step(trainer), start=True)
        if trainer.is_global_zero:
            cfg = self._tracker.kernel_config
            _log.info(
                "KernelRegimeMonitor measures kind=%r, projection=%r (requested kind=%r; "
                "estimated %.3g GiB, %.3g s per kernel)%s",
                cfg["kind"],
                cfg["projection"],
                self.kind,
                cfg["estimated_bytes"] / 2**30,
                cfg["estimated_seconds"],
                f": {cfg['reason']}" if cfg["reason"] else "",
            )
        self._record(trainer, _global_step(trainer), metrics, final=False, reference=True)

    def _continues(self, network: nn.Module, trainer: Any) -> bool:
        """Whether this train start continues the previous fit of this monitor: the tracker is
        started on this very network and the trainer's step did not go back."""
        tracker, last = self._tracker, self._last_step
        return (
            tracker is not None
            and tracker.started
            and tracker.model is network
            and last is not None
            and _global_step(trainer) >= last
            and _global_step(trainer) > 0
        )

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch_start_step = _global_step(trainer)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # After the optimizer step, before epoch-end callbacks (EarlyStopping, ModelCheckpoint)
        # read callback_metrics and before a checkpoint is written: both see this measurement.
        if self._tracker is None:
            return
        step = _global_step(trainer)
        if step == self._batch_start_step or not self._is_due(trainer, step):
            return
        # `_batches_that_stepped` is incremented right after this hook: log at the value it is
        # about to take, the x-axis `self.log` uses for the loss at these weights.
        self._measure(trainer, pl_module, step, final=False, log_step=_log_step(trainer) + 1)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._tracker is None:
            return
        step = _global_step(trainer)
        if step != self._last_step:
            self._measure(trainer, pl_module, step, final=True)
        else:
            # the last scheduled measurement is also the final one: listeners already saw it
            self._notify(trainer, step, self._last_metrics, final=True, repeat=True)
        if trainer.is_global_zero:
            if self._layer_drawn != len(self._layer_history):  # last measurement was scheduled
                self._draw_layers(trainer)
            self._write_summary(trainer, step)

    def _is_due(self, trainer: Any, step: int) -> bool:
        budget = self._budget
        if budget is None:
            return self._schedule.is_due(step, self._last_step)
        if not budget.candidate(self._schedule, step, self._last_step):
            return False  # clock-free: the same on every rank
        fits = budget.allows()
        if trainer.world_size > 1:
            # Clocks differ between ranks: act on rank 0's decision, so the ranks measure (and
            # reduce a split kernel) together and gates see the same steps.
            fits = bool(trainer.strategy.broadcast(fits, src=0))
        if not fits:
            budget.skip(step)
        return fits

    def state_dict(self) -> dict[str, Any]:
        if self._tracker is None:
            return dict(self._restored) if self._restored is not None else {}
        x, y = self._current_probe  # type: ignore[misc]
        return stamp(
            {
                "tracker": self._tracker.state_dict(),
                "probe_x": map_batch(x, lambda t: t.detach().cpu().clone()),
                "probe_y": None if y is None else y.detach().cpu().clone(),
                "last_step": self._last_step,
                "last_metrics": {k: float(v) for k, v in self._last_metrics.items()},
                "budget": None if self._budget is None else self._budget.state_dict(),
            }
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_schema(
            state_dict, "KernelRegimeMonitor", required=("tracker", "probe_x", "last_step")
        )
        self._restored = dict(state_dict)

    # ------------------------------------------------------------------ internals
    def _build_tracker(
        self, network: nn.Module, probe: Probe, device: torch.device, trainer: Any = None
    ) -> Any:
        optional = {
            "sharding": self._sharding(trainer, network),
            "lazy_thresholds": self.lazy_thresholds,
            "output_fn": self.output_fn,
            "topk": self.topk,
            "chunk_size": self.chunk_size,
            "snapshot_device": self.snapshot_device,
            "projection": self.projection,
        }
        tracker, self._current_probe = build_tracker(
            network,
            probe,
            device,
            drawn=self._probe is None,
            use_targets=self.use_targets,
            kind=self.kind,
            implementation=self.implementation,
            per_layer=self.per_layer,
            feature_modules=self.feature_modules,
            projection_seed=self.projection_seed,
            max_memory=self.max_memory,
            layer_groups=self.layer_groups if self.per_layer else None,
            **{k: v for k, v in optional.items() if v is not None},
        )
        return tracker

    def _sharding(
        self, trainer: Any, network: Optional[nn.Module] = None
    ) -> Optional[KernelSharding]:
        """Split the kernel over the ranks with the strategy's own collective."""
        # --- sharded parameters (FSDP2 under ModelParallelStrategy; tracking/sharded.py): the
        # kernel is always summed over the parameters' mesh, with the strategy's reduce on the
        # mesh's process group, whatever split_across_ranks says.
        if trainer is not None and network is not None and has_sharded_params(network):
            strategy = trainer.strategy
            return mesh_sharding(
                network, lambda t, group: strategy.reduce(t, group=group, reduce_op="sum")
            )
        # ---
        world = int(getattr(trainer, "world_size", 1) or 1)
        if not self.split_across_ranks or world <= 1:
            return None
        strategy = trainer.strategy
        return KernelSharding(
            trainer.global_rank, world, lambda t: strategy.reduce(t, reduce_op="sum")
        )

    def _timed(self, fn: Callable[..., dict[str, float]], *args: Any) -> dict[str, float]:
        start = time.perf_counter()
        out = fn(*args)
        seconds = time.perf_counter() - start
        self.measure_seconds += seconds
        self.num_measurements += 1
        if self._budget is not None:
            self._budget.record(seconds)
            out = dict(out)
            out["monitor/seconds"] = seconds
            out["monitor/overhead"] = self._budget.overhead()
        return out

    def _measure(
        self, trainer: Any, pl_module: Any, step: int, final: bool, log_step: Optional[int] = None
    ) -> None:
        network = _resolve_submodule(pl_module, self.submodule)
        measure = functools.partial(self._tracker.measure, lr=_optimizer_lr(trainer))
        metrics = self._safely(network, measure, step)
        self._record(trainer, step, metrics, final=final, log_step=log_step)

    def _safely(
        self,
        network: nn.Module,
        fn: Callable[[int], dict[str, float]],
        step: int,
        start: bool = False,
    ) -> dict[str, float]:
        """``fn(step)`` under the side-effect guard. Everything a measurement needs was
        exercised when the tracker was built; a later failure nobody could foresee (an op
        without an autograd rule on this device, out of memory, ...) must not end a training
        run: the metrics are NaN with ``health/nonfinite = 1`` and ``regime/lazy = 0``, with one
        warning per fit. A failure of the very first snapshot (``start``) propagates: the
        run has not trained yet."""
        try:
            with side_effect_guard(network):
                return self._timed(fn, step)
        except Exception as err:  # noqa: BLE001 - degrade, never kill the training run
            if start or isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            if not self._warned_failure:
                self._warned_failure = True
                warnings.warn(
                    f"KernelRegimeMonitor: the measurement at step {step} failed "
                    f"({type(err).__name__}: {err}); training continues, the metrics are NaN "
                    "with health/nonfinite = 1 (see README, Troubleshooting)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            names = self._tracker.metric_names()
            out = {name: math.nan for name in names}
            out["regime/lazy"] = 0.0
            out["health/nonfinite"] = 1.0
            return out

    def _record(
        self,
        trainer: Any,
        step: int,
        metrics: Mapping[str, float],
        final: bool,
        log_step: Optional[int] = None,
        reference: bool = False,
    ) -> None:
        metrics = {k: float(v) for k, v in metrics.items()}
        previous = self._last_metrics
        self._last_step = step
        self._last_metrics = metrics
        self._publish(trainer, step, metrics, previous, final, log_step, reference)
        self._notify(trainer, step, metrics, final)

    def _publish(
        self,
        trainer: Any,
        step: int,
        metrics: dict[str, float],
        previous: Mapping[str, float],
        final: bool,
        log_step: Optional[int],
        reference: bool,
    ) -> None:
        """Where a measurement goes (the framework-specific part of :meth:`_record`): Lightning's
        ``callback_metrics`` on every rank; loggers, TensorBoard extras, texts and the per-layer
        heatmap on rank 0."""
        callback_metrics = trainer.callback_metrics
        for name, value in metrics.items():
            callback_metrics[name] = torch.tensor(value)
        if trainer.is_global_zero:
            log_step = _log_step(trainer) if log_step is None else log_step
            logged = self._logged_values(metrics, reference)
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=log_step)
            self._write_tensorboard(trainer, log_step, list(metrics))
            self._write_texts(trainer, step, log_step, metrics, previous)
            self._update_layers(trainer, step, log_step, metrics, final)

    def _logged_values(self, metrics: Mapping[str, float], reference: bool) -> dict[str, float]:
        """What goes to the loggers: the metrics, their ``drift/`` log10 companions after the
        reference measurement, ``health/*`` only from its first non-zero value on."""
        out: dict[str, float] = {}
        for name, value in metrics.items():
            if name.startswith("health/") and name not in self._health_logged:
                if value == 0:
                    continue
                self._health_logged.add(name)
            out[name] = value
            if value == value:  # not NaN
                self._maxima[name] = max(self._maxima.get(name, value), value)
        if not reference:  # every change is 0 at the reference: no floor value on the axis
            out.update(catalogue.log10_companions(metrics))
        return out

    def _write_tensorboard(self, trainer: Any, step: int, names: list[str]) -> None:
        writers = tb.tensorboard_writers(trainer.loggers)
        for writer in writers:
            if id(writer) not in self._layout_written:
                charted = names + list(catalogue.log10_companions(dict.fromkeys(names, 1.0)))
                tb.write_layout(writer, charted)
                self._layout_written.add(id(writer))
            if tb.thresholds_due(self.num_measurements):
                tb.write_thresholds(writer, self._tracker.lazy_thresholds, step)
            eigenvalues = getattr(self._tracker, "last_eigenvalues", None)
            if self.log_eigenvalues and isinstance(eigenvalues, Tensor) and eigenvalues.numel():
                values = eigenvalues.detach().cpu().to(torch.float64)
                values = values[torch.isfinite(values)]
                if values.numel():
                    writer.add_histogram(tb.HISTOGRAM_TAG, values, global_step=step)
            kernel = getattr(self._tracker, "last_kernel", None)
            if self.log_kernel_image and isinstance(kernel, Tensor):
                writer.add_image(tb.IMAGE_TAG, tb.kernel_image(kernel), step, dataformats="HW")

    def _hparams(self) -> dict[str, Any]:
        return {
            "lazy_monitor/probe": "given" if self._probe is not None else "drawn",
            "lazy_monitor/probe_size": self.probe_size,
            "lazy_monitor/every_n_steps": self.every_n_steps,
            "lazy_monitor/log_spaced_until": self.log_spaced_until,
            "lazy_monitor/kind": self.kind,
            "lazy_monitor/implementation": self.implementation,
            "lazy_monitor/per_layer": self.per_layer,
            "lazy_monitor/seed": self.seed,
            "lazy_monitor/submodule": str(self.submodule),
            "lazy_monitor/max_memory": str(self.max_memory),
            **self._kernel_hparams(),
        }

    def _kernel_hparams(self) -> dict[str, Any]:
        """The kernel the tracker measures (resolved ``kind="auto"``)."""
        cfg = getattr(self._tracker, "kernel_config", None)
        if not cfg:
            return {}
        return {
            "lazy_monitor/kernel_kind": cfg["kind"],
            "lazy_monitor/projection": str(cfg["projection"]),
            "lazy_monitor/projection_seed": int(cfg["projection_seed"]),
        }

    def _write_hparams(self, trainer: Any, pl_module: Any) -> None:
        model: dict[str, Any] = {}
        datamodule = getattr(trainer, "datamodule", None)
        for owner in (pl_module, datamodule):
            values = getattr(owner, "hparams_initial", None)
            if isinstance(values, Mapping):
                model.update(values)
        for writer in tb.tensorboard_writers(trainer.loggers):
            tb.log_hparams(writer, self._hparams(), tb.HPARAMS_METRICS, 0, model_hparams=model)

    def _text(self, trainer: Any, tag: str, text: str, log_step: int) -> None:
        for writer in tb.tensorboard_writers(trainer.loggers):
            if callable(getattr(writer, "add_text", None)):
                writer.add_text(tag, text, global_step=log_step)

    def _write_texts(
        self,
        trainer: Any,
        step: int,
        log_step: int,
        metrics: Mapping[str, float],
        previous: Mapping[str, float],
    ) -> None:
        """Binary verdicts as text events (smoothing would draw a 0/1 series as a slow decay):
        regime transitions and the first non-finite measurement, at most ``MAX_TEXTS``."""
        events = []
        lazy, was = metrics.get("regime/lazy"), previous.get("regime/lazy")
        if lazy is not None and was is not None and lazy != was:
            self._transitions += 1
            if lazy == 1.0:
                events.append(f"step {step}: back in the lazy regime")
            else:
                _, reason = self._tracker.regime_decision(metrics)
                events.append(f"step {step}: left the lazy regime: {reason}")
        for name, value in metrics.items():
            if name.startswith("health/") and value != 0 and previous.get(name, 0.0) == 0:
                info = catalogue.lookup(name)
                what = info.formula if info is not None else name
                events.append(f"step {step}: `{name}` = {value:g} ({what})")
        for event in events:
            if self._texts >= tb.MAX_TEXTS:
                return
            if self._texts == tb.MAX_TEXTS - 1:
                event = f"step {step}: further events omitted (see `{tb.SUMMARY_TAG}`)"
            self._texts += 1
            self._text(trainer, tb.VERDICT_TAG, event, log_step)

    def _update_layers(
        self, trainer: Any, step: int, log_step: int, metrics: Mapping[str, float], final: bool
    ) -> None:
        """Keep the per-layer drift history; draw the heatmap at measurements 2, 4, 8, ... (at
        most ``MAX_TEXTS - 1`` of them) and at the end."""
        if not (self.per_layer and self.log_layer_image):
            return
        prefix, suffix = "ntk_layer/", "/rel_change"
        layers = {
            k[len(prefix) : -len(suffix)]: v
            for k, v in metrics.items()
            if k.startswith(prefix) and k.endswith(suffix)
        }
        if not layers:
            return
        self._layer_history.append((step, layers))
        self._layer_log_step = log_step
        count = len(self._layer_history)
        due = count >= 2 and count & (count - 1) == 0 and self._layer_images < tb.MAX_TEXTS - 1
        if due or final:
            self._draw_layers(trainer)

    def _draw_layers(self, trainer: Any) -> None:
        writers = [w for w in tb.tensorboard_writers(trainer.loggers) if hasattr(w, "add_figure")]
        if not writers or not self._layer_history:
            return
        names = list(self._layer_history[-1][1])
        steps = [s for s, _ in self._layer_history]
        values = [[row.get(n, float("nan")) for n in names] for _, row in self._layer_history]
        for writer in writers:
            tb.write_layer_heatmap(writer, steps, names, values, self._layer_log_step)
        self._layer_images += 1
        self._layer_drawn = len(self._layer_history)

    def _write_summary(self, trainer: Any, step: int) -> None:
        """The markdown run summary (TEXT tab) at train end."""
        metrics = self._last_metrics
        if not metrics or self._tracker is None or not tb.tensorboard_writers(trainer.loggers):
            return  # nowhere to write it (no TensorBoard logger; the HF adapter has no loggers)
        lazy, reason = self._tracker.regime_decision(metrics)
        thresholds = [
            f"{name} {'≥' if catalogue.direction_of(name) == 'min' else '≤'} {value:g}"
            for name, value in self._tracker.lazy_thresholds.items()
        ]
        keys = [n for n in tb.HPARAMS_METRICS if n in metrics]
        keys += [n for n in ("ntk/cond", "ntk/rank", "lin/agreement") if n in metrics]
        text = tb.run_summary(
            step=step,
            lazy=lazy,
            reason=reason,
            thresholds=thresholds,
            final={n: metrics[n] for n in keys},
            maxima=self._maxima,
            transitions=self._transitions,
            measurements=self.num_measurements,
            seconds=self.measure_seconds,
        )
        for writer in tb.tensorboard_writers(trainer.loggers):
            tb.write_thresholds(writer, self._tracker.lazy_thresholds, _log_step(trainer))
        self._text(trainer, tb.SUMMARY_TAG, text, _log_step(trainer))

    def _notify_start(self, trainer: Any) -> None:
        for listener in self._listeners:
            listener._on_monitor_start(trainer, self)

    def _notify(
        self,
        trainer: Any,
        step: int,
        metrics: Mapping[str, float],
        final: bool,
        repeat: bool = False,
    ) -> None:
        for listener in self._listeners:
            listener._on_measurement(trainer, self, step, metrics, final, repeat=repeat)


def check_one_monitor(callbacks: Sequence[Any]) -> None:
    """Refuse two monitors in one Trainer (at ``setup``, before training) with the settings of
    each: their values would go to the same tags, whatever their submodule or kind."""
    check_unique(
        callbacks,
        _KernelRegimeMonitorBase,
        "KernelRegimeMonitor",
        equal_only=False,
        why="one monitor per Trainer: every monitor logs the same tags (ntk/rel_change, "
        "lin/rel_error, ...) to the same loggers and callback_metrics, whatever its submodule "
        "or kind, so a second one overwrites the first one's values",
        fix="remove all but one (per_layer=True logs the drift of parts of the network as "
        "ntk_layer/<layer>/rel_change)",
    )
