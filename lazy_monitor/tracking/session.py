"""``MonitorSession``: the kernel-regime monitor without a training framework.

One object holds everything a monitor does during training, whatever runs the loop:

* the probe (given, or drawn from the training data at start with an own seeded generator),
* the :class:`~lazy_monitor.tracking.tracker.KernelTracker` built on it (split across processes
  through a :class:`~lazy_monitor.tracking.collectives.Collectives`),
* when to measure (:class:`~lazy_monitor.tracking.schedule.MeasurementSchedule`) within an
  overhead budget (:class:`~lazy_monitor.tracking.schedule.OverheadBudget`) that counts all of
  the monitor's time -- measurements and whatever its listeners do with them (TensorBoard extras,
  heatmaps) -- and is logged as ``monitor/seconds`` / ``monitor/overhead``,
* measurements that never end a training run (a failure after start gives NaN metrics),
* its state (save / load, with the settings it was measured with: a resume with other settings
  restores the saved reference and says so, or raises naming the way out),
* listeners (the adapter that logs, drift gates) called after every measurement.

The Lightning callback (:mod:`lazy_monitor.callbacks`) and the Hugging Face callback
(:mod:`lazy_monitor.integrations.transformers`) are thin adapters: they map their framework's
hooks to :meth:`start`, :meth:`step` and :meth:`finish` and publish the metrics. A plain loop
calls those three itself::

    session = MonitorSession((x_probe, y_probe), every_n_steps=100)
    session.start(model, optimizer=opt)                 # step 0: the reference K0
    for step in range(1, 1001):
        train_one_step(model, opt)
        if (metrics := session.step(model, step, optimizer=opt)) is not None:
            print(step, metrics["ntk/rel_change"])
    session.finish(model, 1000, optimizer=opt)
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Optional, Protocol, Union

from torch import Tensor, nn

from lazy_monitor._state import check_schema, stamp
from lazy_monitor._validation import (
    check_bool,
    check_callable,
    check_int,
    check_mapping,
    message,
)
from lazy_monitor.core._functional import map_batch, side_effect_guard
from lazy_monitor.core.stability import current_lr
from lazy_monitor.tracking import _publish
from lazy_monitor.tracking._publish import HEADLINE_METRICS
from lazy_monitor.tracking._resume import (
    check_feature_modules,
    check_per_layer,
    continues,
    resume_settings,
)
from lazy_monitor.tracking._setup import build, draw
from lazy_monitor.tracking.collectives import Collectives, default_collectives
from lazy_monitor.tracking.kernel_config import KernelConfig
from lazy_monitor.tracking.network import resolve_submodule
from lazy_monitor.tracking.probe import (
    Probe,
    default_batch_to_probe,
    split_probe,
    validate_probe,
)
from lazy_monitor.tracking.probe import (
    probe_size as _probe_size,
)
from lazy_monitor.tracking.schedule import MeasurementSchedule, OverheadBudget
from lazy_monitor.tracking.tracker import KernelTracker

__all__ = [
    "DEFAULT_EVERY_N_STEPS",
    "DEFAULT_LOG_SPACED_UNTIL",
    "DEFAULT_MAX_OVERHEAD",
    "DEFAULT_PROBE_SIZE",
    "HEADLINE_METRICS",
    "Listener",
    "MonitorSession",
]

_log = logging.getLogger("lazy_monitor")

#: Regular cadence in optimizer steps: long runs get a point every 500 steps.
DEFAULT_EVERY_N_STEPS = 500
#: Also measure at steps 1, 2, 4, ..., 256 (kernels move fastest early, Fort et al. 2020): a
#: 200-step run still gets a curve and the step where it left the lazy regime.
DEFAULT_LOG_SPACED_UNTIL = 512
#: The monitor's share of the wall time (benchmarks/bench_cadence.py: see its table).
DEFAULT_MAX_OVERHEAD = 0.05
#: Probe examples when neither ``probe`` nor ``probe_size`` is given.
DEFAULT_PROBE_SIZE = 32
#: The monitor's own cost, logged with every measurement.
MONITOR_METRICS = ("monitor/seconds", "monitor/overhead")


class Listener(Protocol):
    """What :meth:`MonitorSession.add_listener` accepts (both methods optional)."""

    def on_start(self, session: MonitorSession) -> None: ...

    def on_measurement(
        self,
        session: MonitorSession,
        step: int,
        metrics: Mapping[str, float],
        *,
        final: bool,
        repeat: bool,
    ) -> None: ...


class MonitorSession:
    r"""Measure the kernel regime of a network during training, framework-free.

    At :meth:`start` it fixes the probe and snapshots :math:`\theta_0`, :math:`f_0` and
    :math:`K_0` (the reference; every change is 0 there); at each scheduled step
    (:meth:`step`) and at the end (:meth:`finish`) it measures :math:`K_t`, the parameter change
    and the linearization and returns the metrics (``ntk/rel_change``, ``lin/rel_error``, ...;
    :meth:`metric_names`), plus ``monitor/seconds`` (the monitor's seconds since the previous
    value: this measurement and the listeners' work on the previous one) and
    ``monitor/overhead`` (all of the monitor's seconds over the wall seconds since start).

    Args:
        probe: ``x`` (a tensor, a dict of tensors passed as keywords, a tuple of positional
            tensors) or ``(x, y)``; ``y`` (class indices ``(N,)`` or targets ``(N, O)``)
            enables ``ntk/alignment`` and ``lin/agreement``. None: ``probe_size`` examples are
            drawn from ``data`` at :meth:`start`.
        probe_size: examples to draw (default 32); exclusive with ``probe``.
        every_n_steps: measure at every multiple of this step.
        log_spaced_until: also at steps ``1, 2, 4, ...`` below this one (0: never).
        max_overhead: the monitor's share of the wall time since start (``(0, 1]``); scheduled
            steps that would exceed it are skipped (the reference and the final measurement
            are always taken). None: no budget (the accounting is still logged).
        submodule: dotted path of the network to measure inside the model given to
            :meth:`start` (DDP / ``torch.compile`` wrappers are unwrapped).
        batch_to_probe: collated training batch -> ``x`` or ``(x, y)`` (for drawn probes);
            default: a tensor is ``x``, a sequence gives ``(batch[0], batch[1])``.
        output_fn: network output -> tensor ``(N, O)`` or ``(N, ...)``.
        seed: seed of the probe draw.
        kernel: a :class:`~lazy_monitor.tracking.kernel_config.KernelConfig` or a dict of its
            keys (kind, engine implementation, projection and its seed, memory limit, chunking,
            ``topk``, where the snapshots live); None: ``kind="auto"`` under 1 GiB.
        per_layer: per-layer drift (``ntk_layer/<group>/rel_change``): True (at most 16 layer
            groups), a number of groups, or False.
        feature_modules: modules whose probe features are tracked (``features/<m>/cka``): True
            (those owning parameters), a list of names, or False/None.
        lazy_thresholds: thresholds of ``regime/lazy`` (the tracker's defaults if None).
        split_across_ranks: with several processes, each computes the kernel blocks of its
            share of the parameters and a sum over processes completes them.
        reset_reference: a resumed state is dropped and a new reference starts at the resumed
            step (otherwise a state with other settings restores the saved reference with the
            saved settings, or raises when it cannot: another submodule or probe).
        collectives: the processes of a distributed run (default: ``torch.distributed`` when
            initialised, else one process).
        owner: the class name used in messages (the adapters pass theirs).

    Raises:
        TypeError / ValueError: at construction, for every bad value (named, with the fix).
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
        split_across_ranks: bool = True,
        reset_reference: bool = False,
        collectives: Optional[Collectives] = None,
        owner: str = "MonitorSession",
    ) -> None:
        self.owner = owner
        if probe is not None and probe_size is not None:
            raise ValueError(
                f"pass either probe=... or probe_size={probe_size}, not both (probe_size draws a "
                "probe from the training data)"
            )
        self.probe: Optional[Probe] = None
        if probe is not None:
            self.probe = split_probe(probe, f"{owner}(probe=...)")
            validate_probe(self.probe, f"{owner}(probe=...)")
            self.probe_size = _probe_size(self.probe)
        else:
            size = DEFAULT_PROBE_SIZE if probe_size is None else probe_size
            self.probe_size = check_int("probe_size", size, minimum=1, fix="e.g. probe_size=32")
        self.schedule = MeasurementSchedule(every_n_steps, log_spaced_until)
        self.budget = OverheadBudget(max_overhead)
        if submodule is not None and (not isinstance(submodule, str) or not submodule.strip(".")):
            raise ValueError(
                f"submodule must be a dotted attribute path such as 'net' or None, got {submodule!r}"
            )
        self.submodule = submodule
        check_callable("batch_to_probe", batch_to_probe, fix="batch -> x or (x, y)")
        if batch_to_probe is not None and probe is not None:
            raise ValueError(
                "batch_to_probe only applies to a probe drawn from the training data; with an "
                "explicit probe=... pass the already converted (x, y)"
            )
        self.batch_to_probe = batch_to_probe or default_batch_to_probe
        self.output_fn = check_callable("output_fn", output_fn, fix="output -> Tensor")
        self.seed = check_int("seed", seed, minimum=0, fix="use a non-negative integer seed")
        self.kernel = KernelConfig.coerce(kernel)
        self.per_layer, self.layer_groups = check_per_layer(per_layer)
        self.feature_modules = check_feature_modules(feature_modules)
        check_mapping(
            "lazy_thresholds", lazy_thresholds, optional=True, fix="e.g. {'ntk/rel_change': 0.1}"
        )
        self.lazy_thresholds = None if lazy_thresholds is None else dict(lazy_thresholds)
        self.split_across_ranks = check_bool("split_across_ranks", split_across_ranks)
        self.reset_reference = check_bool("reset_reference", reset_reference)
        if collectives is not None and not isinstance(collectives, Collectives):
            raise TypeError(
                message("collectives", "a Collectives or None", collectives, "e.g. None")
            )
        self._collectives = collectives

        self.tracker: Optional[KernelTracker] = None
        #: The probe the tracker measures on (CPU; ``y`` None when unusable targets were dropped).
        self.current_probe: Optional[Probe] = None
        self.last_step: Optional[int] = None
        self.last_metrics: dict[str, float] = {}
        #: The measurement before the last one (empty before two), for transitions.
        self.previous_metrics: dict[str, float] = {}
        #: Whether the last measurement is the reference (every change 0 there).
        self.is_reference = False
        #: Largest finite value of each metric in this run (for summaries).
        self.maxima: dict[str, float] = {}
        #: Seconds the monitor spent in this process (measurements and listeners) and the count.
        self.seconds = 0.0
        self.num_measurements = 0
        self._restored: Optional[dict[str, Any]] = None
        self._listeners: list[Any] = []
        self._unlogged = 0.0
        self._health_logged: set[str] = set()
        self._warned_failure = False
        # settings of a restored reference that differ from this session's (kept when saved)
        self._measured_settings: dict[str, Any] = {}

    # ------------------------------------------------------------------ properties
    @property
    def collectives(self) -> Collectives:
        """The processes (fixed at the first use: ``torch.distributed`` is initialised late)."""
        if self._collectives is None:
            self._collectives = default_collectives()
        return self._collectives

    @collectives.setter
    def collectives(self, value: Collectives) -> None:
        self._collectives = value

    @property
    def every_n_steps(self) -> int:
        return self.schedule.every_n_steps

    @property
    def log_spaced_until(self) -> int:
        return self.schedule.log_spaced_until

    @property
    def max_overhead(self) -> Optional[float]:
        return self.budget.max_overhead

    @property
    def started(self) -> bool:
        """Whether a tracker holds a reference (after :meth:`start`)."""
        return self.tracker is not None and self.tracker.started

    def metric_names(self) -> list[str]:
        """The metric names of this run (empty before :meth:`start`)."""
        if self.tracker is None:
            return []
        return list(self.tracker.metric_names()) + list(MONITOR_METRICS)

    def settings(self) -> dict[str, Any]:
        """The settings the reference is measured with (saved in the state; compared on resume)."""
        return {
            "probe": "given" if self.probe is not None else "drawn",
            "probe_size": self.probe_size,
            "seed": self.seed,
            "submodule": self.submodule,
            "kind": self.kernel.kind,
            "projection": self.kernel.projection,
            "projection_seed": self.kernel.projection_seed,
            "per_layer": self.per_layer,
            "layer_groups": self.layer_groups,
        }

    def hparams(self) -> dict[str, Any]:
        """The settings as ``lazy_monitor/*`` HParams (strings for non-numbers), plus the
        measured kernel once resolved."""
        return _publish.hparams(self)

    def add_listener(self, listener: Any) -> None:
        """Call ``listener.on_start(session)`` after :meth:`start` and ``listener.
        on_measurement(session, step, metrics, final=..., repeat=...)`` after every
        measurement (in the order added; their time counts as the monitor's)."""
        if all(existing is not listener for existing in self._listeners):
            self._listeners.append(listener)

    def remove_listener(self, listener: Any) -> None:
        self._listeners = [x for x in self._listeners if x is not listener]

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Count the block as the monitor's time (``monitor/seconds``, the budget)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - t0
            self.budget.charge(spent)
            self.seconds += spent
            self._unlogged += spent

    # ------------------------------------------------------------------ lifecycle
    def network(self, model: nn.Module) -> nn.Module:
        """The measured network inside ``model`` (``submodule``, wrappers unwrapped)."""
        return resolve_submodule(model, self.submodule, self.owner)

    def start(
        self,
        model: nn.Module,
        step: int = 0,
        *,
        optimizer: Any = None,
        data: Any = None,
    ) -> Optional[dict[str, float]]:
        """Start (or resume) at ``step``: the reference measurement, returned.

        ``data`` is where a drawn probe comes from: a data loader (its ``dataset`` and
        ``collate_fn``), a collection of loaders (the first) or a dataset. After
        :meth:`load_state_dict` the saved reference is restored instead (returns None), and a
        second ``start`` on the same network at a later step continues (returns None).

        Raises:
            ValueError / TypeError: a probe that cannot be drawn or does not fit the network; a
                saved state that cannot be restored with these settings (names the way out).
        """
        pending = self._unlogged  # the adapter's work before start (opening its writers)
        self.budget = OverheadBudget(self.budget.max_overhead)
        restored, self._restored = self._restored, None
        if restored is not None and self.reset_reference:
            warnings.warn(
                f"{self.owner}(reset_reference=True): the saved reference (step 0 of the "
                f"resumed run, last measured step {restored.get('last_step')}) is dropped; a new "
                f"reference K0 starts at step {step}",
                UserWarning,
                stacklevel=3,
            )
            restored = None
        if restored is not None and restored.get("budget"):
            self.budget.load_state_dict(restored["budget"])
        self.budget.start_clock(already=pending)
        self.budget.charge(pending)
        self._warned_failure = False
        self._health_logged, self.maxima, self._unlogged = set(), {}, pending
        network = self.network(model)
        if restored is not None:
            with self.busy():
                self._restore(network, restored, step)
            self._notify_start()
            return None
        if continues(self.tracker, self.last_step, network, step):
            self._notify_start()
            return None
        with self.busy():
            probe = self.probe if self.probe is not None else draw(self, data)
            self._measured_settings = {}
            self.tracker, self.current_probe = build(
                self, network, probe, self.kernel, self.per_layer
            )
        self.last_step, self.last_metrics, self.previous_metrics = None, {}, {}
        self._notify_start()
        return self._run(network, step, optimizer, final=False, start=True)

    def due(self, step: int) -> bool:
        """Whether to measure at ``step``: a scheduled step not measured yet that fits the
        budget (decided on process 0; every process gets the same answer)."""
        if self.tracker is None:
            return False
        budget = self.budget
        if not budget.candidate(self.schedule, step, self.last_step):
            return False  # clock-free: the same on every process
        fits = budget.allows()
        if budget.max_overhead is not None and self.collectives.world_size > 1:
            fits = bool(self.collectives.broadcast(fits, src=0))
        if not fits:
            budget.skip(step)
        return fits

    def step(
        self, model: nn.Module, step: int, *, optimizer: Any = None
    ) -> Optional[dict[str, float]]:
        """Measure at ``step`` if :meth:`due`; the metrics, or None."""
        if not self.due(step):
            return None
        return self.measure(model, step, optimizer=optimizer)

    def measure(
        self, model: nn.Module, step: int, *, optimizer: Any = None, final: bool = False
    ) -> dict[str, float]:
        """Measure at ``step`` now (unscheduled); listeners are called."""
        if self.tracker is None:
            raise RuntimeError(f"{self.owner}: call start(model) before measuring")
        return self._run(self.network(model), step, optimizer, final=final)

    def finish(
        self, model: nn.Module, step: int, *, optimizer: Any = None
    ) -> Optional[dict[str, float]]:
        """The final measurement at ``step`` (listeners get ``final=True``); when ``step`` was
        just measured, its metrics are passed again with ``repeat=True``. None before start."""
        if self.tracker is None:
            return None
        if step != self.last_step:
            return self._run(self.network(model), step, optimizer, final=True)
        with self.busy():
            self._notify(step, self.last_metrics, final=True, repeat=True)
        return dict(self.last_metrics)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """θ₀, ``f₀``, ``K₀`` (the tracker's state), the probe, the last step and metrics, the
        budget's accounting and the settings: CPU tensors and plain Python values."""
        if self.tracker is None or self.current_probe is None:
            return dict(self._restored) if self._restored is not None else {}
        x, y = self.current_probe
        return stamp(
            {
                "tracker": self.tracker.state_dict(),
                "probe_x": map_batch(x, lambda t: t.detach().cpu().clone()),
                "probe_y": None if y is None else y.detach().cpu().clone(),
                "last_step": self.last_step,
                "last_metrics": {k: float(v) for k, v in self.last_metrics.items()},
                "budget": self.budget.state_dict(),
                "settings": self._saved_settings(),
            }
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Keep ``state`` for the next :meth:`start`, which restores it."""
        check_schema(state, self.owner, required=("tracker", "probe_x", "last_step"))
        self._restored = dict(state)

    def _saved_settings(self) -> dict[str, Any]:
        # what the tracker measures: a run restored with the saved settings keeps them
        return {**self.settings(), **self._measured_settings}

    # ------------------------------------------------------------------ internals
    def _restore(self, network: nn.Module, state: Mapping[str, Any], step: int) -> None:
        """Rebuild the tracker of a saved state: with this session's settings when they are the
        saved ones, else with the saved settings (and one warning naming them)."""
        probe, kernel, per_layer, measured = resume_settings(
            state, self.settings(), self.probe, self.kernel, self.per_layer, self.owner, step
        )
        self.tracker, self.current_probe = build(self, network, probe, kernel, per_layer)
        self.tracker.load_state_dict(state["tracker"])
        self._measured_settings = measured
        self.last_step = state["last_step"]
        self.last_metrics = dict(state.get("last_metrics", {}))

    def _run(
        self,
        network: nn.Module,
        step: int,
        optimizer: Any,
        *,
        final: bool,
        start: bool = False,
    ) -> dict[str, float]:
        assert self.tracker is not None
        lr = _lr(optimizer)
        fn = self.tracker.start if start else self.tracker.measure
        t0 = time.perf_counter()
        metrics = _safely(self, network, lambda s: fn(s, lr=lr), step, start)
        spent = time.perf_counter() - t0
        self.budget.charge(spent)
        self.seconds += spent
        self.num_measurements += 1
        cost = (spent + self._unlogged, self.budget.overhead())
        if self.collectives.world_size > 1:
            # rank 0's clock, like every other metric: the ranks publish and gate alike
            cost = tuple(self.collectives.broadcast(cost, src=0))
        metrics["monitor/seconds"], metrics["monitor/overhead"] = cost
        self._unlogged = 0.0
        if start and self.collectives.rank == 0:
            cfg = self.tracker.kernel_config or {}
            _log.info(
                "%s measures kind=%r, projection=%r (requested kind=%r)%s",
                self.owner,
                cfg.get("kind"),
                cfg.get("projection"),
                self.kernel.kind,
                f": {cfg['reason']}" if cfg.get("reason") else "",
            )
        self.previous_metrics, self.last_metrics = self.last_metrics, metrics
        self.last_step, self.is_reference = step, start
        for name, value in metrics.items():
            if value == value and math.isfinite(value):
                self.maxima[name] = max(self.maxima.get(name, value), value)
        with self.busy():
            self._notify(step, metrics, final=final, repeat=False)
        self.budget.last_seconds = spent + self._unlogged
        return dict(metrics)

    def _notify_start(self) -> None:
        with self.busy():
            for listener in list(self._listeners):
                hook = getattr(listener, "on_start", None)
                if hook is not None:
                    hook(self)

    def _notify(
        self, step: int, metrics: Mapping[str, float], *, final: bool, repeat: bool
    ) -> None:
        for listener in list(self._listeners):
            hook = getattr(listener, "on_measurement", None)
            if hook is not None:
                hook(self, step, metrics, final=final, repeat=repeat)

    # ------------------------------------------------------------------ for adapters
    def loggable(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """What goes to the loggers: the metrics, their ``drift/`` log10 companions after the
        reference, ``health/*`` only from its first non-zero value on."""
        return _publish.loggable(metrics, self._health_logged, self.is_reference)

    def headline(self, step: int, metrics: Mapping[str, float]) -> str:
        """One console line: the :data:`HEADLINE_METRICS` at ``step``."""
        return _publish.headline(step, metrics)

    def check_gate(
        self, gate: Any, step: int, metrics: Mapping[str, float], *, final: bool, repeat: bool
    ) -> Optional[str]:
        """Check a :class:`~lazy_monitor.tracking.gate.DriftGate` on this measurement on every
        process; when any process trips, trip the gate everywhere with the reason of the lowest
        such rank and return it (None: no trip, or already tripped)."""
        return _publish.check_gate(self, gate, step, metrics, final=final, repeat=repeat)


def _safely(
    session: MonitorSession,
    network: nn.Module,
    fn: Callable[[int], dict[str, float]],
    step: int,
    start: bool,
) -> dict[str, float]:
    """``fn(step)`` under the side-effect guard. Everything a measurement needs was
    exercised when the tracker was built; a later failure nobody could foresee (an op
    without an autograd rule on this device, out of memory, ...) must not end a training
    run: the metrics are NaN with ``health/nonfinite = 1`` and ``regime/lazy = 0``, with one
    warning per run. A failure of the reference measurement propagates."""
    assert session.tracker is not None
    try:
        with side_effect_guard(network):
            return {k: float(v) for k, v in fn(step).items()}
    except Exception as err:  # noqa: BLE001 - degrade, never kill the training run
        if start:
            raise
        if not session._warned_failure:
            session._warned_failure = True
            warnings.warn(
                f"{session.owner}: the measurement at step {step} failed "
                f"({type(err).__name__}: {err}); training continues, the metrics are NaN "
                "with health/nonfinite = 1 (see docs/troubleshooting.md)",
                RuntimeWarning,
                stacklevel=2,
            )
        out = {name: math.nan for name in session.tracker.metric_names()}
        out["regime/lazy"] = 0.0
        out["health/nonfinite"] = 1.0
        return out


def _lr(optimizer: Any) -> Optional[float]:
    """The current learning rate (first param group of the first optimizer); None without one."""
    if optimizer is None:
        return None
    try:
        return current_lr(optimizer)
    except (AttributeError, TypeError, ValueError):
        return None
