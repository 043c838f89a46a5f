"""Namespace-free logic of the Lightning callbacks.

The classes here are mixins: they implement the hooks but derive from no ``Callback``. The
adapters in :mod:`lazy_monitor.callbacks.lightning` and :mod:`lazy_monitor.callbacks.pytorch_lightning`
combine them with the ``Callback`` of their namespace, so LightningCLI's subclass checks pass in
each namespace while both share one implementation and one ``state_key`` (checkpoints move freely
between them). Nothing here imports ``lightning`` or ``pytorch_lightning``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Literal, Optional

import torch
from torch import Tensor, nn

from lazy_monitor.callbacks import _tensorboard as tb
from lazy_monitor.callbacks._gate import (
    GATE_ACTIONS,
    KernelDriftError,
    Threshold,
    ThresholdSpec,
    check_measurement,
    parse_thresholds,
)
from lazy_monitor.callbacks._probe import (
    Probe,
    default_batch_to_probe,
    draw_probe,
    split_probe,
    validate_probe,
)
from lazy_monitor.callbacks._schedule import MeasurementSchedule
from lazy_monitor.core._functional import map_batch, side_effect_guard
from lazy_monitor.core.kernels import NtkImplementation

__all__ = [
    "DEFAULT_EVERY_N_STEPS",
    "DEFAULT_PROBE_SIZE",
    "KernelDriftWarning",
    "_KernelDriftGateBase",
    "_KernelRegimeMonitorBase",
]

#: Default cadence. One measurement with the default probe (32 examples, full kernel) costs about
#: as much as 5-15 training steps of an MLP-1024 / small CNN at batch 128 on a CPU, so 500 steps
#: keep the monitor's share of the fit time at ~1-3 % (benchmarks/bench_overhead.py).
DEFAULT_EVERY_N_STEPS = 500
#: Default probe size when neither ``probe`` nor ``probe_size`` is given.
DEFAULT_PROBE_SIZE = 32
_STATE_VERSION = 1


class KernelDriftWarning(UserWarning):
    """Emitted by :class:`KernelDriftGate` when a threshold trips (every action warns)."""


def _check_int(name: str, value: Any, minimum: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}; {fix}")
    return value


def _unwrap(module: nn.Module) -> nn.Module:
    """Strip ``torch.compile`` (``_orig_mod``) and DDP / DataParallel (``.module``) wrappers."""
    while True:
        inner = getattr(module, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            module = inner
            continue
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
            continue
        return module


def _resolve_submodule(root: nn.Module, path: Optional[str]) -> nn.Module:
    """``root`` or its (dotted) submodule, unwrapping wrappers at every level."""
    module = _unwrap(root)
    if not path:
        return module
    walked = []
    for part in path.split("."):
        child = module._modules.get(part) if isinstance(module, nn.Module) else None
        if child is None:
            names = list(module._modules)[:12]
            at = ".".join(walked) or type(root).__name__
            raise ValueError(
                f"KernelRegimeMonitor(submodule={path!r}): {at} has no submodule {part!r} "
                f"(its children: {names}); pass the attribute path of the network to monitor"
            )
        module = _unwrap(child)
        walked.append(part)
    return module


def _global_step(trainer: Any) -> int:
    return int(trainer.global_step)


def _log_step(trainer: Any) -> int:
    # What `self.log` and LearningRateMonitor put on the x-axis (number of batches that stepped).
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


class _KernelRegimeMonitorBase:
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
    custom-scalars layout (categories "kernel drift", "linearization", "spectrum",
    "parameters"), a histogram of the kernel's eigenvalues per measurement (``ntk/eigenvalues``),
    optionally the kernel as an image (``ntk/kernel``), and at train end an HParams entry with the
    monitor's settings and its metrics.

    Side-effect free: measurements run on the unwrapped network (DDP ``.module``,
    ``torch.compile`` ``_orig_mod``) in eval semantics, float32 outside autocast, with gradients
    enabled even inside ``inference_mode``; weights, buffers (BatchNorm statistics), ``.grad``,
    train/eval flags and all RNG states are left untouched, so training is bit-identical with
    and without the monitor.

    Resume: the probe, :math:`\theta_0`, :math:`f_0`, :math:`K_0`, the previous kernel and the last
    measured step are in :meth:`state_dict` (CPU tensors and plain Python, loadable with
    ``weights_only=True``). The reference is captured in ``on_train_start`` only when nothing was
    restored; a ``fit`` without a checkpoint (or from a checkpoint without monitor state) starts
    a new reference at its own start. A resumed run logs the same values as an uninterrupted one
    whenever Lightning itself resumes the same training trajectory (it does for a
    ``ModelCheckpoint(every_n_train_steps=...)`` checkpoint at an epoch boundary; mid-epoch
    positions without a stateful dataloader replay different batches, changing the training).

    Under DDP every rank measures (the probe is drawn from the dataset, not the rank's shard, so it
    is the same everywhere) and only rank 0 logs.

    Args:
        probe: the probe batch: inputs ``x`` (a tensor, or a dict of tensors passed as keyword
            arguments) or a pair ``(x, y)``; targets ``y`` enable ``ntk/alignment`` and
            ``lin/agreement``. Mutually exclusive with ``probe_size``.
        probe_size: draw this many examples from the train dataloader's dataset at the first
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
        kind: kernel kind: ``"full"`` ``(N, N, O, O)``, ``"trace"`` ``(N, N)`` (sum over
            outputs; O² times cheaper), ``"diagonal"`` ``(N, N, O)``.
        implementation: kernel implementation passed to the tracker (``"auto"`` picks by cost).
        per_layer: also log ``ntk_layer/<layer>/rel_change`` and ``params_layer/<layer>/rel_change``.
        output_fn: maps the network output to a tensor (e.g. ``lambda out: out.logits``).
        lazy_thresholds: thresholds of ``regime/lazy`` passed to the tracker (its defaults if None).
        topk: number of leading eigenvectors for ``ntk/eig_overlap`` (tracker default if None).
        chunk_size: probe chunk size for the kernel engine (tracker default if None).
        snapshot_device: where the tracker keeps θ₀, K₀ and computes metrics (e.g. ``"cpu"`` to
            save accelerator memory; None: the model's device).
        log_eigenvalues: TensorBoard histogram ``ntk/eigenvalues`` at every measurement.
        log_kernel_image: TensorBoard image ``ntk/kernel`` (grey: 0.5 = 0) at every measurement.
        log_hparams: TensorBoard HParams entry (monitor settings + its metrics) at train end.

    Raises:
        ValueError: at construction for invalid values (each message names the value and the
            fix); at setup for an unknown ``submodule``; at train start for a probe that cannot be
            drawn (e.g. ``probe_size`` larger than the dataset) or targets of an explicit
            ``probe=(x, y)`` that do not fit the model's outputs.
        TypeError: at construction for a probe that is neither ``x`` nor ``(x, y)``; at train start
            for training batches that ``batch_to_probe`` cannot split.

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
        kind: Literal["full", "trace", "diagonal"] = "full",
        implementation: str = "auto",
        per_layer: bool = True,
        output_fn: Optional[Callable[[Any], Tensor]] = None,
        lazy_thresholds: Optional[dict[str, float]] = None,
        topk: Optional[int] = None,
        chunk_size: Optional[int] = None,
        snapshot_device: Optional[str] = None,
        log_eigenvalues: bool = True,
        log_kernel_image: bool = False,
        log_hparams: bool = True,
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
            self.probe_size = _probe_len(self._probe)
        else:
            size = DEFAULT_PROBE_SIZE if probe_size is None else probe_size
            self.probe_size = _check_int("probe_size", size, 1, "e.g. probe_size=32")
        self.every_n_steps = _check_int(
            "every_n_steps", every_n_steps, 1, f"e.g. every_n_steps={DEFAULT_EVERY_N_STEPS}"
        )
        self.log_spaced_until = _check_int(
            "log_spaced_until", log_spaced_until, 0, "0 disables, e.g. 128 adds steps 1, 2, ..., 64"
        )
        if submodule is not None and (not isinstance(submodule, str) or not submodule.strip(".")):
            raise ValueError(
                f"submodule must be a dotted attribute path such as 'net' or None, got {submodule!r}"
            )
        if batch_to_probe is not None and not callable(batch_to_probe):
            raise TypeError(
                f"batch_to_probe must be callable batch -> x or (x, y), got {batch_to_probe!r}"
            )
        if batch_to_probe is not None and probe is not None:
            raise ValueError(
                "batch_to_probe only applies to a probe drawn from the training data; with an "
                "explicit probe=... pass the already converted (x, y)"
            )
        if kind not in ("full", "trace", "diagonal"):
            raise ValueError(f"kind must be 'full', 'trace' or 'diagonal', got {kind!r}")
        if not isinstance(implementation, str):
            raise TypeError(
                f"implementation must be a string such as 'auto', got {implementation!r}"
            )
        NtkImplementation.parse(implementation)  # raises naming the allowed values
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable output -> Tensor, got {output_fn!r}")
        if lazy_thresholds is not None and not isinstance(lazy_thresholds, Mapping):
            raise TypeError(
                "lazy_thresholds must be a mapping metric -> bound such as "
                f"{{'ntk/rel_change': 0.1}}, got {lazy_thresholds!r}"
            )
        self.seed = _check_int("seed", seed, 0, "use a non-negative integer seed")
        if topk is not None:
            _check_int("topk", topk, 1, "or None for the tracker default")
        if chunk_size is not None:
            _check_int("chunk_size", chunk_size, 1, "or None for no chunking")
        self.use_targets = bool(use_targets)
        self.submodule = submodule
        self._batch_to_probe = batch_to_probe
        self.kind = kind
        self.implementation = implementation
        self.per_layer = bool(per_layer)
        self.output_fn = output_fn
        self.lazy_thresholds = None if lazy_thresholds is None else dict(lazy_thresholds)
        self.topk = topk
        self.chunk_size = chunk_size
        self.snapshot_device = snapshot_device
        self.log_eigenvalues = bool(log_eigenvalues)
        self.log_kernel_image = bool(log_kernel_image)
        self.log_hparams = bool(log_hparams)
        self._schedule = MeasurementSchedule(self.every_n_steps, self.log_spaced_until)

        self._tracker: Any = None
        self._restored: Optional[dict[str, Any]] = None
        self._current_probe: Optional[Probe] = None
        self._last_step: Optional[int] = None
        self._last_metrics: dict[str, float] = {}
        self._batch_start_step: Optional[int] = None
        self._listeners: list[Any] = []
        self._layout_written: set[int] = set()
        #: Wall-clock seconds spent measuring in this process (for overhead reports).
        self.measure_seconds = 0.0
        self.num_measurements = 0

    # ------------------------------------------------------------------ public helpers
    @property
    def tracker(self) -> Any:
        """The :class:`KernelTracker` of the current fit (None before train start)."""
        return self._tracker

    @property
    def state_key(self) -> str:
        return self._generate_state_key(  # type: ignore[attr-defined]
            probe="given" if self._probe is not None else "drawn",
            probe_size=self.probe_size,
            seed=self.seed,
            submodule=self.submodule,
            kind=self.kind,
            per_layer=self.per_layer,
        )

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
        # fail before training on a wrong submodule path
        _resolve_submodule(pl_module, self.submodule)
        self._layout_written = set()  # one custom-scalar layout per writer and fit

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        network = _resolve_submodule(pl_module, self.submodule)
        device = _device_of(network)
        restored, self._restored = self._restored, None
        self._last_metrics = {}
        if restored is not None:
            probe = (restored["probe_x"], restored["probe_y"])
            self._tracker = self._build_tracker(network, probe, device)
            self._tracker.load_state_dict(restored["tracker"])
            self._last_step = restored["last_step"]
            self._last_metrics = dict(restored.get("last_metrics", {}))
            self._notify_start(trainer)
            return
        if self._probe is not None:
            probe = self._probe
        else:
            probe = draw_probe(
                trainer.train_dataloader, self.probe_size, self.seed, self.batch_to_probe
            )
        self._tracker = self._build_tracker(network, probe, device)
        self._last_step = None
        self._notify_start(trainer)
        with side_effect_guard(network):
            metrics = self._timed(self._tracker.start, _global_step(trainer))
        self._record(trainer, _global_step(trainer), metrics, final=False)

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
        if step == self._batch_start_step or not self._schedule.is_due(step, self._last_step):
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
        if self.log_hparams and trainer.is_global_zero:
            self._write_hparams(trainer)

    def state_dict(self) -> dict[str, Any]:
        if self._tracker is None:
            return dict(self._restored) if self._restored is not None else {}
        x, y = self._current_probe  # type: ignore[misc]
        return {
            "version": _STATE_VERSION,
            "tracker": self._tracker.state_dict(),
            "probe_x": map_batch(x, lambda t: t.detach().cpu().clone()),
            "probe_y": None if y is None else y.detach().cpu().clone(),
            "last_step": self._last_step,
            "last_metrics": {k: float(v) for k, v in self._last_metrics.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = [k for k in ("tracker", "probe_x", "last_step") if k not in state_dict]
        if missing:
            raise ValueError(
                f"KernelRegimeMonitor state is missing {missing}; the checkpoint was not written "
                "by this version of lazy_monitor"
            )
        if state_dict.get("version", 0) > _STATE_VERSION:
            raise ValueError(
                f"KernelRegimeMonitor state version {state_dict['version']} is newer than this "
                f"lazy_monitor supports ({_STATE_VERSION}); upgrade lazy_monitor"
            )
        self._restored = dict(state_dict)

    # ------------------------------------------------------------------ internals
    def _build_tracker(self, network: nn.Module, probe: Probe, device: torch.device) -> Any:
        from lazy_monitor.tracking import KernelTracker

        x, y = probe
        if not self.use_targets:
            y = None
        elif y is not None and self._probe is None and not y.is_floating_point() and y.numel():
            if bool((y == y.reshape(-1)[0]).all()):
                warnings.warn(
                    f"the {_probe_len(probe)} drawn probe examples all have class "
                    f"{int(y.reshape(-1)[0])}: ntk/alignment and lin/agreement are undefined "
                    "and not logged; raise probe_size or pass probe=(x, y) with several classes",
                    UserWarning,
                    stacklevel=2,
                )
                y = None
        x_dev = map_batch(x, lambda t: t.detach().to(device))
        optional = {
            "lazy_thresholds": self.lazy_thresholds,
            "output_fn": self.output_fn,
            "topk": self.topk,
            "chunk_size": self.chunk_size,
            "snapshot_device": self.snapshot_device,
        }

        def build(targets: Optional[Tensor]) -> Any:
            return KernelTracker(
                network,
                x_dev,
                targets=None if targets is None else targets.detach().to(device),
                kind=self.kind,
                implementation=self.implementation,
                per_layer=self.per_layer,
                **{k: v for k, v in optional.items() if v is not None},
            )

        try:
            tracker = build(y)
        except (TypeError, ValueError) as err:
            # Targets of a drawn probe come from the training batches (batch[1] by default) and
            # need not fit the alignment (e.g. sequence labels, multi-hot or differently sized
            # regression targets). Drop them if the tracker then builds; an error it still
            # raises without targets is not about the targets and propagates.
            if y is None or self._probe is not None:
                raise
            tracker = build(None)
            warnings.warn(
                f"the targets of the drawn probe cannot be used ({err}); ntk/alignment and "
                "lin/agreement are not logged. Pass batch_to_probe returning (x, y) with class "
                "indices of shape (N,) or float targets of shape (N, O), or use_targets=False to "
                "measure without targets",
                UserWarning,
                stacklevel=2,
            )
            y = None
        self._current_probe = (
            map_batch(x, lambda t: t.detach().cpu()),
            None if y is None else y.detach().cpu(),
        )
        return tracker

    def _timed(self, fn: Callable[..., dict[str, float]], *args: Any) -> dict[str, float]:
        start = time.perf_counter()
        out = fn(*args)
        self.measure_seconds += time.perf_counter() - start
        self.num_measurements += 1
        return out

    def _measure(
        self, trainer: Any, pl_module: Any, step: int, final: bool, log_step: Optional[int] = None
    ) -> None:
        network = _resolve_submodule(pl_module, self.submodule)
        with side_effect_guard(network):
            metrics = self._timed(self._tracker.measure, step)
        self._record(trainer, step, metrics, final=final, log_step=log_step)

    def _record(
        self,
        trainer: Any,
        step: int,
        metrics: Mapping[str, float],
        final: bool,
        log_step: Optional[int] = None,
    ) -> None:
        metrics = {k: float(v) for k, v in metrics.items()}
        self._last_step = step
        self._last_metrics = metrics
        callback_metrics = trainer.callback_metrics
        for name, value in metrics.items():
            callback_metrics[name] = torch.tensor(value)
        if trainer.is_global_zero:
            log_step = _log_step(trainer) if log_step is None else log_step
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=log_step)
            self._write_tensorboard(trainer, log_step, list(metrics))
        self._notify(trainer, step, metrics, final)

    def _write_tensorboard(self, trainer: Any, step: int, names: list[str]) -> None:
        writers = tb.tensorboard_writers(trainer.loggers)
        for writer in writers:
            if id(writer) not in self._layout_written:
                writer.add_custom_scalars(tb.custom_layout(names))
                self._layout_written.add(id(writer))
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
        }

    def _write_hparams(self, trainer: Any) -> None:
        names = [n for n in self._last_metrics if "_layer/" not in n]
        for logger in trainer.loggers:
            writers = tb.tensorboard_writers([logger])
            if not writers:
                continue
            existing = getattr(logger, "hparams", None)
            existing = existing if isinstance(existing, Mapping) else None
            tb.log_hparams(writers[0], self._hparams(), names, _log_step(trainer), existing)

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


def _probe_len(probe: Probe) -> int:
    from lazy_monitor.core._functional import batch_size

    return batch_size(probe[0])


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


class _KernelDriftGateBase:
    """Stop, fail or flag a run whose kernel metrics cross thresholds.

    Reads the measurements of the :class:`KernelRegimeMonitor` in the same ``Trainer`` (exactly
    one is required; the order of the two in ``callbacks`` does not matter) and checks each
    threshold after every measurement:

    * a number, or ``{"max": b}``: a maximum not to exceed, violated when ``value > b``;
    * ``{"min": b}``: a minimum to reach, violated when ``value < b``. Every change is exactly 0
      at step 0, so minimums are checked only at the final measurement (train end), or also at
      every measurement from ``min_check_from_step`` on. A minimum missed at train end trips
      immediately, whatever ``patience``.

    A threshold trips after ``patience`` consecutive violating measurements. Non-finite values
    violate every threshold when ``check_finite``. The decision is reduced across ranks
    (``strategy.reduce_boolean_decision``: one rank tripping trips all), and every rank then acts
    with the same message naming metric, value, threshold and step:

    * ``"warn"``: a :class:`KernelDriftWarning`; training continues.
    * ``"stop"``: warning + ``trainer.should_stop = True`` (the current batch completes; Lightning
      honours ``min_steps``/``min_epochs`` first).
    * ``"raise"``: :class:`KernelDriftError` on every rank.

    A tripped gate stays tripped: the state (tripped, reason, consecutive counts) is in
    :meth:`state_dict`, and after resuming from a checkpoint written after the trip the action is
    re-asserted at train start (``stop`` stops again, ``raise`` raises again). A ``fit`` that
    restores no gate state (no checkpoint) starts untripped with zero counts.

    When training ends right after a scheduled measurement, that measurement is also the final
    one: it counts once towards ``patience``, and at train end only the minimums are checked again.

    Args:
        thresholds: metric name -> bound, e.g. ``{"ntk/rel_change": 0.2, "lin/rel_error": 0.1,
            "ntk/alignment": {"min": 0.3}}``. Names as logged by the monitor; a name the monitor
            does not produce in this run is an error at train start.
        patience: number of consecutive violating measurements that trip a threshold (``>= 1``).
        action: ``"warn"``, ``"stop"`` or ``"raise"``.
        min_check_from_step: also check minimums at measurements with ``step >=`` this value
            (optimizer steps); None: only at train end.
        check_finite: treat NaN/inf metric values as violations.

    Raises:
        ValueError: invalid thresholds/patience/action/min_check_from_step (at construction), no
            or several monitors in the trainer (at setup), a threshold on a metric the monitor does
            not log (at train start).
        KernelDriftError: with ``action="raise"`` when a threshold trips.

    Example::

        from lazy_monitor.callbacks.lightning import KernelDriftGate, KernelRegimeMonitor

        gate = KernelDriftGate({"ntk/rel_change": 0.2}, patience=2, action="stop")
        trainer = Trainer(callbacks=[KernelRegimeMonitor(), gate])
    """

    def __init__(
        self,
        thresholds: dict[str, ThresholdSpec],
        patience: int = 1,
        action: Literal["warn", "stop", "raise"] = "stop",
        min_check_from_step: Optional[int] = None,
        check_finite: bool = True,
    ) -> None:
        self.thresholds: tuple[Threshold, ...] = parse_thresholds(thresholds)
        self.patience = _check_int("patience", patience, 1, "patience counts measurements")
        if action not in GATE_ACTIONS:
            raise ValueError(f"action must be one of {list(GATE_ACTIONS)}, got {action!r}")
        self.action = action
        if min_check_from_step is not None:
            _check_int(
                "min_check_from_step",
                min_check_from_step,
                1,
                "(every change is 0 at step 0) or None to check at train end",
            )
        self.min_check_from_step = min_check_from_step
        self.check_finite = bool(check_finite)
        self.tripped = False
        self.reason: Optional[str] = None
        self.trip_step: Optional[int] = None
        self._counts: dict[str, int] = {}

    @property
    def state_key(self) -> str:
        spec = [(t.metric, t.direction, t.bound) for t in self.thresholds]
        return self._generate_state_key(thresholds=spec, action=self.action)  # type: ignore[attr-defined]

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, _KernelRegimeMonitorBase)]
        if len(monitors) != 1:
            fix = (
                "add KernelRegimeMonitor(...) next to the gate"
                if not monitors
                else ("keep one monitor per Trainer")
            )
            raise ValueError(
                "KernelDriftGate needs exactly one KernelRegimeMonitor in Trainer(callbacks=...), "
                f"found {len(monitors)}; {fix}"
            )
        monitors[0]._add_listener(self)
        # A new fit starts untripped; Lightning restores a checkpoint's gate state after setup.
        self.tripped, self.reason, self.trip_step = False, None, None
        self._counts = {}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.tripped:
            self._act(trainer, f"restored tripped state: {self.reason}", final=False)

    def state_dict(self) -> dict[str, Any]:
        return {
            "tripped": self.tripped,
            "reason": self.reason,
            "trip_step": self.trip_step,
            "counts": dict(self._counts),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tripped = bool(state_dict.get("tripped", False))
        self.reason = state_dict.get("reason")
        self.trip_step = state_dict.get("trip_step")
        self._counts = {str(k): int(v) for k, v in state_dict.get("counts", {}).items()}

    # ------------------------------------------------------------------ monitor callbacks
    def _on_monitor_start(self, trainer: Any, monitor: _KernelRegimeMonitorBase) -> None:
        available = set(monitor.metric_names())
        missing = sorted({t.metric for t in self.thresholds} - available)
        if missing:
            hint = ""
            if any(m in ("ntk/alignment", "lin/agreement") for m in missing):
                hint = " (ntk/alignment needs targets: a probe (x, y); lin/agreement a classifier)"
            raise ValueError(
                f"KernelDriftGate thresholds on {missing}, which the monitor does not log in this "
                f"run{hint}; it logs: {sorted(available)}"
            )

    def _on_measurement(
        self,
        trainer: Any,
        monitor: _KernelRegimeMonitorBase,
        step: int,
        metrics: Mapping[str, float],
        final: bool,
        repeat: bool = False,
    ) -> None:
        if self.tripped:
            return
        check_minimums = self.min_check_from_step is not None and step >= self.min_check_from_step
        local = check_measurement(
            self.thresholds,
            metrics,
            step,
            self._counts,
            patience=self.patience,
            check_minimums=check_minimums,
            final=final,
            check_finite=self.check_finite,
            repeat=repeat,
        )
        # every rank measures at the same steps, so every rank reaches this collective
        decision = trainer.strategy.reduce_boolean_decision(local is not None, all=False)
        if not decision:
            return
        reason = _first_reason(trainer, local)
        self.tripped, self.reason, self.trip_step = True, reason, step
        self._act(trainer, reason, final=final)

    def _act(self, trainer: Any, reason: str, final: bool) -> None:
        message = f"KernelDriftGate tripped (action={self.action!r}): {reason}"
        if self.action == "raise":
            raise KernelDriftError(message)
        if self.action == "stop" and not final:
            trainer.should_stop = True
            message += "; stopping training"
        if trainer.is_global_zero:
            warnings.warn(message, KernelDriftWarning, stacklevel=2)


def _first_reason(trainer: Any, local: Optional[str]) -> str:
    """The trip reason of the lowest rank that has one (all ranks then report the same)."""
    if getattr(trainer, "world_size", 1) > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            gathered: list[Optional[str]] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
            for reason in gathered:
                if reason:
                    return reason
    return local or "a threshold tripped on another rank"
