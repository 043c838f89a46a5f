"""``KernelDriftGate``: stop, fail or flag a run whose kernel metrics cross thresholds, with its
error and warning (namespace-free mixin; see :mod:`lazy_monitor.callbacks._monitor`).

The decision (thresholds, patience, counts, tripped state) is the framework-free
:class:`lazy_monitor.tracking.gate.DriftGate`; this class wires it to the trainer: it reduces the
decision across ranks (one rank tripping trips all) and acts on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Optional

from lazy_monitor import _warnings
from lazy_monitor._state import check_schema, stamp
from lazy_monitor.callbacks._identity import _Identified, check_unique
from lazy_monitor.callbacks._monitor import _KernelRegimeMonitorBase, check_one_monitor
from lazy_monitor.thresholds import ThresholdSpec
from lazy_monitor.tracking.gate import DriftGate
from lazy_monitor.tracking.session import MonitorSession

__all__ = ["KernelDriftError", "KernelDriftWarning", "_KernelDriftGateBase"]


class KernelDriftError(RuntimeError):
    """Raised by :class:`KernelDriftGate` with ``action="raise"`` when a threshold trips."""


class KernelDriftWarning(UserWarning):
    """Emitted by :class:`KernelDriftGate` when a threshold trips (every action warns)."""


class _KernelDriftGateBase(_Identified):
    """Stop, fail or flag a run whose kernel metrics cross thresholds.

    Reads the measurements of the :class:`KernelRegimeMonitor` in the same ``Trainer`` (exactly
    one is required; the order of the two in ``callbacks`` does not matter) and checks each
    threshold after every measurement:

    * ``{"max": b}``: a maximum not to exceed, violated when ``value > b``;
    * ``{"min": b}``: a minimum to reach, violated when ``value < b``;
    * a number: the bound on the metric's lazy side from :mod:`lazy_monitor.catalogue` -- a
      maximum for most metrics, a minimum for ``lin/agreement`` and ``ntk/eig_overlap``.

    Names may be globs (``"ntk_layer/*/rel_change"``), applied to every matching metric. Every change is exactly 0
      at step 0, so minimums are checked only at the final measurement (train end), or also at
      every measurement from ``min_check_from_step`` on. A minimum missed at train end trips
      immediately, whatever ``patience``. (The one policy of
      :func:`lazy_monitor.thresholds.checks_minimum`, shared with ``lazy-monitor check``.)

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
            or several monitors or a gate with equal thresholds and action in the trainer (at
            setup), a threshold on a metric the monitor does not log (at train start).
        KernelDriftError: with ``action="raise"`` when a threshold trips.

    Example::

        from lazy_monitor.callbacks.lightning import KernelDriftGate, KernelRegimeMonitor

        gate = KernelDriftGate({"ntk/rel_change": 0.2}, patience=2, action="stop")
        trainer = Trainer(callbacks=[KernelRegimeMonitor(), gate])
    """

    def __init__(
        self,
        thresholds: Mapping[str, ThresholdSpec],
        *,
        patience: int = 1,
        action: Literal["warn", "stop", "raise"] = "stop",
        min_check_from_step: Optional[int] = None,
        check_finite: bool = True,
    ) -> None:
        # the decision logic and its state are framework-free (lazy_monitor.tracking.gate)
        self._gate = DriftGate(thresholds, patience, action, min_check_from_step, check_finite)
        self._trainer: Any = None
        self._from_checkpoint = False

    # settings and state live once, in the DriftGate
    thresholds = property(lambda self: self._gate.thresholds, doc="The parsed thresholds.")
    patience = property(lambda self: self._gate.patience, doc="Violations that trip.")
    action = property(lambda self: self._gate.action, doc="'warn', 'stop' or 'raise'.")
    min_check_from_step = property(lambda self: self._gate.min_check_from_step)
    check_finite = property(lambda self: self._gate.check_finite)
    tripped = property(lambda self: self._gate.tripped, doc="Whether a threshold tripped.")
    reason = property(lambda self: self._gate.reason, doc="Why it tripped (None if not).")
    trip_step = property(lambda self: self._gate.trip_step, doc="Step of the trip.")

    def _identity(self) -> dict[str, Any]:
        """The settings in ``state_key`` (see :mod:`lazy_monitor.callbacks._identity`)."""
        spec = [(t.metric, t.direction, t.value) for t in self.thresholds]
        return {"thresholds": spec, "action": self.action}

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        # the project's messages, not Lightning's "more than one stateful callback"
        check_one_monitor(trainer.callbacks)
        check_unique(
            trainer.callbacks,
            _KernelDriftGateBase,
            "KernelDriftGate",
            equal_only=True,
            why="they would act twice on every trip and share one checkpoint entry",
            fix="remove one, or make them differ in thresholds or action (patience, "
            "min_check_from_step and check_finite are not part of a gate's checkpoint key)",
        )
        self._claim()
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, _KernelRegimeMonitorBase)]
        if not monitors:
            raise ValueError(
                "KernelDriftGate needs exactly one KernelRegimeMonitor in Trainer(callbacks=...), "
                "found 0; add KernelRegimeMonitor(...) next to the gate"
            )
        monitors[0].session.add_listener(self)
        self._trainer = trainer
        # A new fit starts untripped; Lightning restores a checkpoint's gate state after setup.
        self._gate.reset()
        self._from_checkpoint = False

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # Only a trip restored from a checkpoint is re-asserted: with callbacks=[monitor, gate]
        # the monitor's step-0 measurement runs first and may already have tripped (and warned).
        restored, self._from_checkpoint = getattr(self, "_from_checkpoint", False), False
        if self.tripped and restored:
            self._act(trainer, f"restored tripped state: {self.reason}", final=False)

    def state_dict(self) -> dict[str, Any]:
        return stamp(self._gate.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_schema(state_dict, "KernelDriftGate")
        self._gate.load_state_dict(state_dict)
        self._from_checkpoint = self._gate.tripped

    # ------------------------------------------------------------------ session listener
    def on_start(self, session: MonitorSession) -> None:
        self._gate.require(session.metric_names(), owner="KernelDriftGate")

    def on_measurement(
        self,
        session: MonitorSession,
        step: int,
        metrics: Mapping[str, float],
        *,
        final: bool,
        repeat: bool,
    ) -> None:
        reason = session.check_gate(self._gate, step, metrics, final=final, repeat=repeat)
        if reason is not None:
            self._act(self._trainer, reason, final=final)

    def _act(self, trainer: Any, reason: str, final: bool) -> None:
        message = f"KernelDriftGate tripped (action={self.action!r}): {reason}"
        if self.action == "raise":
            raise KernelDriftError(message)
        if self.action == "stop" and not final:
            trainer.should_stop = True
            message += "; stopping training"
        if trainer.is_global_zero:
            # at the user's trainer.fit line, not at this hook inside Lightning's loop
            _warnings.warn(message, KernelDriftWarning)
