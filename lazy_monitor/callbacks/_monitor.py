"""``KernelRegimeMonitor``: the Lightning adapter of the monitor core (namespace-free mixin).

The monitor itself -- probe, tracker, schedule and overhead budget, safe measurement, state,
listeners -- is :class:`lazy_monitor.tracking.session.MonitorSession`; this module maps
Lightning's hooks onto it, gives it the strategy's collectives (:class:`StrategyCollectives`)
and publishes its measurements (loggers, ``callback_metrics``, TensorBoard extras). The class
here derives from no ``Callback``: :mod:`lazy_monitor.callbacks.lightning` and
:mod:`lazy_monitor.callbacks.pytorch_lightning` combine it with the ``Callback`` of their
namespace (one implementation, one ``state_key``). Nothing here imports Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, Literal, Optional, Union

import torch
from torch import Tensor

from lazy_monitor.callbacks import _tensorboard as tb
from lazy_monitor.callbacks._extras import TensorBoardExtras
from lazy_monitor.callbacks._identity import _Identified, check_unique
from lazy_monitor.tracking.collectives import Collectives
from lazy_monitor.tracking.distributed import check_strategy
from lazy_monitor.tracking.probe import default_batch_to_probe
from lazy_monitor.tracking.session import (
    DEFAULT_EVERY_N_STEPS,
    DEFAULT_LOG_SPACED_UNTIL,
    DEFAULT_MAX_OVERHEAD,
    DEFAULT_PROBE_SIZE,
    MonitorSession,
)

__all__ = [
    "DEFAULT_EVERY_N_STEPS",
    "DEFAULT_PROBE_SIZE",
    "StrategyCollectives",
    "_KernelRegimeMonitorBase",
    "check_one_monitor",
]


class StrategyCollectives(Collectives):
    """:class:`~lazy_monitor.tracking.collectives.Collectives` on a Lightning trainer's strategy
    (whatever launches the processes: DDP, spawn, FSDP2 under ``ModelParallelStrategy``)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    @property
    def rank(self) -> int:
        return int(getattr(self.trainer, "global_rank", 0))

    @property
    def world_size(self) -> int:
        return int(getattr(self.trainer, "world_size", 1) or 1)

    def reduce_sum(self, tensor: Tensor, group: Optional[Any] = None) -> Tensor:
        if self.world_size <= 1 and group is None:
            return tensor
        return self.trainer.strategy.reduce(tensor, group=group, reduce_op="sum")

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if self.world_size <= 1:
            return obj
        return self.trainer.strategy.broadcast(obj, src=src)

    def any(self, flag: bool, device: Optional[torch.device] = None) -> bool:
        if self.world_size <= 1:
            return bool(flag)
        return bool(self.trainer.strategy.reduce_boolean_decision(bool(flag), all=False))


def _log_step(trainer: Any) -> int:
    # What `self.log` and LearningRateMonitor put on the x-axis (number of batches that stepped).
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


class _KernelRegimeMonitorBase(_Identified):
    r"""Track the empirical NTK during ``fit`` and log whether training stays lazy.

    At train start it fixes a probe batch and snapshots :math:`\theta_0`, :math:`f_0` and
    :math:`K_0 = J(\theta_0) J(\theta_0)^\top` on it; at every measurement it evaluates
    :math:`K_t`, the parameter change and the linearization
    :math:`f_{lin}(x) = f(x;\theta_0) + J(\theta_0)(\theta_t-\theta_0)` (Lee et al. 2019) and logs
    the metrics (``ntk/rel_change`` :math:`=\|K_t-K_0\|_F/\|K_0\|_F`, ``lin/rel_error``,
    ``params/rel_change``, ``regime/lazy``, ... see docs/metrics.md). The work is
    :class:`~lazy_monitor.tracking.session.MonitorSession`'s; this callback maps Lightning's
    hooks onto it.

    When (``step`` = ``trainer.global_step``, optimizer steps): at train start (the reference,
    every change 0), right after the optimizer step that reaches a multiple of ``every_n_steps``
    or one of the steps ``1, 2, 4, ...`` below ``log_spaced_until`` (in ``on_train_batch_end``,
    so epoch-end callbacks and checkpoints see it) while the monitor's time stays within
    ``max_overhead`` of the wall time, and at train end (unless that step was just measured).
    The defaults (500, 512, 5 %) give a 200-step run its log-spaced curve when a measurement is
    cheap next to the steps, and keep the monitor's share of any run at most 5 %
    (``benchmarks/bench_cadence.py``).

    Where: every logger in ``trainer.loggers`` (rank 0) at the x-axis of ``self.log`` (the
    value after ``k`` optimizer steps at ``x = k``) and ``trainer.callback_metrics`` (every
    rank; ``EarlyStopping(monitor="ntk/rel_change")`` works). ``monitor/seconds`` and
    ``monitor/overhead`` (all of the monitor's time, TensorBoard extras included) come with
    every measurement. With a TensorBoard logger also the extras of the ``tensorboard`` tier.

    Learning rate: ``opt/lr`` and ``ntk/lr_eig_max = lr · λmax(K)/N`` from the first param
    group of ``trainer.optimizers[0]`` (after any scheduler step).

    Side-effect free: measured on the unwrapped network (DDP ``.module``, ``torch.compile``
    ``_orig_mod``) in eval semantics, float32 outside autocast; weights, buffers, ``.grad``,
    train/eval flags and RNG states untouched: training is bit-identical with and without it.
    A measurement that fails after train start logs NaN with ``health/nonfinite = 1`` (one
    warning); training continues.

    Resume: the probe, θ₀, ``f₀``, ``K₀``, the last step, the budget's accounting and the
    settings are in :meth:`state_dict` (``weights_only``-safe). A checkpoint measured with other
    settings restores the saved reference with the saved ``probe_size``/``seed``/``kernel``/
    ``per_layer`` and warns naming each; another ``submodule`` or explicit ``probe`` raises at
    train start; ``reset_reference=True`` starts a new reference at the resumed step. A
    continued ``fit`` (same trainer and network, ``max_steps`` raised) keeps the reference.

    Distributed: every rank measures at the same steps (the probe comes from the dataset, not
    the rank's shard); with ``split_across_ranks`` each rank computes its share of the kernel
    blocks and the strategy's ``reduce`` completes them; FSDP2 (``ModelParallelStrategy``) is
    measured shard by shard; ``FSDPStrategy`` (FSDP1) and DeepSpeed are refused at ``setup``.

    Args:
        probe: ``x``, ``{"kw": x}`` or ``(x, y)``; targets ``y`` enable ``ntk/alignment`` and
            ``lin/agreement``. None: ``probe_size`` examples drawn from the train dataloader's
            dataset at the first train start (own generator seeded by ``seed``).
        probe_size: examples drawn (default 32); exclusive with ``probe``. Costs grow like N².
        every_n_steps: measure at every multiple of this many optimizer steps.
        log_spaced_until: also at steps ``1, 2, 4, ...`` below this one (0: never).
        max_overhead: the monitor's share of the wall time since train start (default 0.05);
            scheduled steps that would exceed it are skipped. None: no budget.
        submodule: dotted path of the network inside the LightningModule (e.g. ``"net"``).
        batch_to_probe: collated training batch -> ``x`` or ``(x, y)`` (drawn probes); may
            also be overridden as a method. Return ``x`` alone to measure without targets.
        output_fn: network output -> tensor (e.g. ``lambda out: out.logits``).
        seed: seed of the probe draw.
        kernel: a ``KernelConfig`` or a dict of its keys (``kind``, ``implementation``,
            ``projection``, ``projection_seed``, ``max_memory``, ``chunk_size``, ``topk``,
            ``snapshot_device``); None: ``kind="auto"`` resolved at train start under 1 GiB.
        per_layer: ``ntk_layer/<group>/rel_change`` and ``params_layer/...``: True (at most 16
            layer groups), a number of groups, or False.
        feature_modules: modules whose probe features are tracked (``features/<m>/cka``):
            True (those owning parameters), a list of names, or False/None.
        lazy_thresholds: thresholds of ``regime/lazy`` (the tracker's defaults if None).
        tensorboard: extras for a TensorBoard logger: ``"basic"`` (custom-scalars layout,
            verdict texts, run summary), ``"standard"`` (+ HParams at fit start, eigenvalue
            histogram, per-layer heatmap), ``"full"`` (+ the kernel as an image).
        split_across_ranks: split the kernel work across the ranks (False: each rank computes
            the whole kernel).
        reset_reference: on resume, drop the saved reference and start a new one.

    Raises:
        ValueError / TypeError: at construction for every invalid value (named, with the fix);
            at setup for an unknown ``submodule``, a second monitor or an unsupported strategy;
            at train start for a probe that cannot be drawn or does not fit, or a checkpoint
            that cannot be resumed with these settings.

    Example::

        from lightning.pytorch import Trainer
        from lazy_monitor.callbacks.lightning import KernelRegimeMonitor

        trainer = Trainer(max_steps=2000, callbacks=[KernelRegimeMonitor(probe_size=32)])
    """

    def __init__(
        self,
        probe: Any = None,
        *,
        probe_size: Optional[int] = None,
        every_n_steps: int = DEFAULT_EVERY_N_STEPS,
        log_spaced_until: int = DEFAULT_LOG_SPACED_UNTIL,
        max_overhead: Optional[float] = DEFAULT_MAX_OVERHEAD,
        submodule: Optional[str] = None,
        batch_to_probe: Optional[Callable[[Any], Any]] = None,
        output_fn: Optional[Callable[[Any], Tensor]] = None,
        seed: int = 0,
        kernel: Any = None,
        per_layer: Union[bool, int] = True,
        feature_modules: Union[Sequence[str], bool, None] = True,
        lazy_thresholds: Optional[Mapping[str, float]] = None,
        tensorboard: Literal["basic", "standard", "full"] = "standard",
        split_across_ranks: bool = True,
        reset_reference: bool = False,
    ) -> None:
        self._batch_to_probe = batch_to_probe
        self.session = MonitorSession(
            probe,
            probe_size=probe_size,
            every_n_steps=every_n_steps,
            log_spaced_until=log_spaced_until,
            max_overhead=max_overhead,
            submodule=submodule,
            batch_to_probe=batch_to_probe,
            output_fn=output_fn,
            seed=seed,
            kernel=kernel,
            per_layer=per_layer,
            feature_modules=feature_modules,
            lazy_thresholds=lazy_thresholds,
            split_across_ranks=split_across_ranks,
            reset_reference=reset_reference,
            owner="KernelRegimeMonitor",
        )
        if batch_to_probe is None:
            # a subclass may override the method: the session calls it through self
            self.session.batch_to_probe = self.batch_to_probe
        self.extras = TensorBoardExtras(tensorboard)
        self.session.add_listener(self)
        self._trainer: Any = None
        self._log_offset = 0
        self._batch_start_step: Optional[int] = None

    # ------------------------------------------------------------------ settings and results
    probe_size = property(lambda self: self.session.probe_size, doc="Probe examples N.")
    every_n_steps = property(lambda self: self.session.every_n_steps, doc="Cadence.")
    log_spaced_until = property(lambda self: self.session.log_spaced_until)
    max_overhead = property(lambda self: self.session.max_overhead, doc="Budget share.")
    submodule = property(lambda self: self.session.submodule, doc="Measured submodule.")
    seed = property(lambda self: self.session.seed, doc="Seed of the probe draw.")
    kernel = property(lambda self: self.session.kernel, doc="The KernelConfig.")
    per_layer = property(lambda self: self.session.per_layer, doc="Per-layer drift on.")
    tensorboard = property(lambda self: self.extras.tier, doc="TensorBoard extras tier.")
    tracker = property(lambda self: self.session.tracker, doc="KernelTracker (None before).")
    last_metrics = property(lambda self: dict(self.session.last_metrics), doc="Last values.")
    num_measurements = property(lambda self: self.session.num_measurements)
    measure_seconds = property(lambda self: self.session.seconds, doc="Monitor seconds.")

    def metric_names(self) -> list[str]:
        """Metric names of the current fit, empty before train start."""
        return self.session.metric_names()

    def batch_to_probe(self, batch: Any) -> Any:
        """Map a collated training batch to ``x`` or ``(x, y)`` (override or pass the argument)."""
        if self._batch_to_probe is not None:
            return self._batch_to_probe(batch)
        return default_batch_to_probe(batch)

    def _identity(self) -> dict[str, Any]:
        """The settings in ``state_key`` (see :mod:`lazy_monitor.callbacks._identity`)."""
        s = self.session
        return dict(
            probe="given" if s.probe is not None else "drawn",
            probe_size=s.probe_size,
            seed=s.seed,
            submodule=s.submodule,
            kind=s.kernel.kind,
            per_layer=s.per_layer,
        )

    def _base_state_key(self) -> str:
        # "auto" shares the key of "full" (the first default): checkpoints keep loading
        identity = self._identity()
        if identity["kind"] == "auto":
            identity["kind"] = "full"
        return self._generate_state_key(**identity)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_one_monitor(getattr(trainer, "callbacks", ()))  # ours, not Lightning's message
        self._claim()
        self.session.network(pl_module)  # fail before training on a wrong submodule
        check_strategy(trainer.strategy)
        self.session.collectives = StrategyCollectives(trainer)
        self._trainer = trainer

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # Before Lightning's own hparams write (the first one in an event file is shown). Under
        # fast_dev_run the loggers write no file: nothing to write into.
        if trainer.is_global_zero and not getattr(trainer, "fast_dev_run", 0):
            with self.session.busy():
                model: dict[str, Any] = {}
                for owner in (pl_module, getattr(trainer, "datamodule", None)):
                    values = getattr(owner, "hparams_initial", None)
                    if isinstance(values, Mapping):
                        model.update(values)
                writers = tb.tensorboard_writers(trainer.loggers)
                self.extras.hparams(writers, self.session.hparams(), model)

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        # The checkpoint entry is keyed by the settings (state_key): a checkpoint written with
        # other settings is under another key, which Lightning would skip. Find it, so the
        # session restores it with the saved settings or says why it cannot.
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return  # Lightning loads it through load_state_dict
        mine = [v for k, v in states.items() if str(k).startswith("KernelRegimeMonitor")]
        if len(mine) == 1 and isinstance(mine[0], Mapping) and mine[0]:
            self.load_state_dict(dict(mine[0]))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._trainer = trainer
        self.extras.reset()
        self.session.collectives = StrategyCollectives(trainer)
        self.session.start(
            pl_module,
            int(trainer.global_step),
            optimizer=_optimizers(trainer),
            data=trainer.train_dataloader,
        )

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch_start_step = int(trainer.global_step)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # After the optimizer step, before epoch-end callbacks (EarlyStopping, ModelCheckpoint)
        # read callback_metrics and before a checkpoint is written: both see this measurement.
        step = int(trainer.global_step)
        if step == self._batch_start_step:
            return  # no optimizer step in this batch (gradient accumulation)
        # `_batches_that_stepped` is incremented right after this hook: log at the value it is
        # about to take, the x-axis `self.log` uses for the loss at these weights.
        self._log_offset = 1
        try:
            self.session.step(pl_module, step, optimizer=_optimizers(trainer))
        finally:
            self._log_offset = 0

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.session.tracker is None:
            return
        step = int(trainer.global_step)
        self.session.finish(pl_module, step, optimizer=_optimizers(trainer))
        if trainer.is_global_zero:
            with self.session.busy():
                writers = tb.tensorboard_writers(trainer.loggers)
                self.extras.finish(writers, self.session, step, _log_step(trainer))

    def state_dict(self) -> dict[str, Any]:
        return self.session.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.session.load_state_dict(state_dict)

    # ------------------------------------------------------------------ session listener
    def on_measurement(
        self,
        session: MonitorSession,
        step: int,
        metrics: Mapping[str, float],
        *,
        final: bool,
        repeat: bool,
    ) -> None:
        """Publish one measurement: ``callback_metrics`` on every rank; loggers and TensorBoard
        extras on rank 0."""
        trainer = self._trainer
        if repeat or trainer is None:
            return
        for name, value in metrics.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        if trainer.is_global_zero:
            log_step = _log_step(trainer) + self._log_offset
            if session.is_reference:
                # at a resumed step the counter restored from a batch-end checkpoint lags by one
                log_step = int(trainer.global_step)
            logged = session.loggable(metrics)
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=log_step)
            writers = tb.tensorboard_writers(trainer.loggers)
            previous = session.previous_metrics
            self.extras.measurement(writers, session, step, log_step, metrics, previous, final)


def _optimizers(trainer: Any) -> Any:
    try:
        return trainer.optimizers or None
    except (AttributeError, RuntimeError):
        return None


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
