"""Hugging Face ``transformers.Trainer`` callbacks: :class:`KernelRegimeCallback` (measure and
log the kernel regime) and :class:`KernelDriftGateCallback` (act on thresholds).

A thin adapter of :class:`lazy_monitor.tracking.session.MonitorSession` (probe, tracker,
schedule and overhead budget, state, gates): this module maps the Trainer's hooks onto it,
gives it ``torch.distributed`` as its collectives (``torchrun``, ``accelerate launch``), writes
its values where the Trainer's TensorBoard integration writes and keeps its state in the
Trainer's checkpoint folders. No Lightning is imported.

Usage::

    from transformers import Trainer
    from lazy_monitor.integrations.transformers import KernelDriftGateCallback, KernelRegimeCallback

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[KernelDriftGateCallback({"ntk/rel_change": 0.2})])
    KernelRegimeCallback(probe_size=8).attach(trainer)
    trainer.train()

Why ``attach``: a ``TrainerCallback``'s hooks receive ``args``, ``state``, ``control`` and the
model, never the Trainer; the monitor needs the Trainer's dataset and collator (to draw the
probe), its optimizer (``opt/lr``) and its TensorBoard run directory.

Why not ``Trainer.log``: it runs every callback's ``on_log``, and the Trainer's own flow control
resets ``should_log`` there, so the Trainer's loss of that step would be dropped. The values go
to ``state.log_history`` and to the Trainer's TensorBoard run directory directly (process zero),
with the same tags and extras as a Lightning run (``ntk/rel_change``, custom-scalars layout,
verdict texts, summary, HParams, heatmap), so ``lazy-monitor report`` and ``check`` read them.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from types import SimpleNamespace
from typing import Any, Callable, Literal, Optional, Union

import torch
from torch import Tensor

from lazy_monitor._extras import raise_missing

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ModuleNotFoundError as exc:
    raise_missing(exc, "lazy_monitor.integrations.transformers")

from lazy_monitor import _warnings
from lazy_monitor._state import check_schema, stamp
from lazy_monitor.callbacks._extras import TensorBoardExtras
from lazy_monitor.callbacks._gate import KernelDriftError, KernelDriftWarning
from lazy_monitor.callbacks._identity import check_unique
from lazy_monitor.thresholds import ThresholdSpec
from lazy_monitor.tracking.collectives import TorchDistributed
from lazy_monitor.tracking.gate import DriftGate
from lazy_monitor.tracking.probe import default_batch_to_probe
from lazy_monitor.tracking.session import (
    DEFAULT_EVERY_N_STEPS,
    DEFAULT_LOG_SPACED_UNTIL,
    DEFAULT_MAX_OVERHEAD,
    MonitorSession,
)

__all__ = [
    "GATE_STATE_FILE",
    "MONITOR_STATE_FILE",
    "KernelDriftError",
    "KernelDriftGateCallback",
    "KernelDriftWarning",
    "KernelRegimeCallback",
    "last_token_logits",
]

#: File written into each ``checkpoint-<step>`` folder (``torch.save``, ``weights_only`` safe).
MONITOR_STATE_FILE = "lazy_monitor_state.pt"
GATE_STATE_FILE = "lazy_monitor_gate.pt"
#: Default probe size for the Trainer: language-model kernels cost far more per example.
DEFAULT_HF_PROBE_SIZE = 8
#: Batch keys that are targets, never model inputs of the probe.
_LABEL_KEYS = ("labels", "label", "label_ids")
#: The ``attention_mask`` of the forward being measured (set by a pre-hook while measuring).
_MASK: contextvars.ContextVar[Optional[Tensor]] = contextvars.ContextVar("mask", default=None)


def last_token_logits(output: Any) -> Tensor:
    """Default ``output_fn``: the logits of a ``transformers`` model output, one row per example.

    ``(N, T, V)`` (language models) -> ``(N, V)``, the next-token logits at the last *real*
    token of each sequence: the last position where the forward's ``attention_mask`` is 1 (so
    right-padded probes read their last token, not a pad), position -1 without a mask;
    ``(N, C)`` (classification heads) unchanged. Accepts a ``ModelOutput`` (``.logits``), a
    tuple (its first element) or a tensor. :class:`KernelRegimeCallback` provides the mask of
    the forward it measures; called elsewhere, the last position is read.
    """
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output if isinstance(output, Tensor) else output[0]
    if logits.dim() != 3:
        return logits
    mask = _MASK.get()
    if mask is None or mask.numel() != logits[..., 0].numel():
        return logits[:, -1]
    mask = mask.reshape(logits.shape[:-1])
    positions = torch.arange(1, logits.shape[-2] + 1, device=logits.device)
    last = ((mask != 0) * positions).argmax(-1, keepdim=True)  # (N, 1): last real position
    pick = (positions - 1 == last).to(logits.dtype)  # (N, T) one-hot, vmap/jvp friendly
    return (pick.unsqueeze(-1) * logits).sum(-2)


@contextlib.contextmanager
def _measuring(model: torch.nn.Module) -> Iterator[None]:
    """Make the forward's ``attention_mask`` visible to :func:`last_token_logits` while
    measuring; restore afterwards. (How attention runs during a measurement is the engine's
    one decision, :func:`lazy_monitor.core._functional.measurement_mode`, entered by every
    measurement: not switched here.)"""

    def keep_mask(_module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        _MASK.set(kwargs.get("attention_mask"))

    hook = model.register_forward_pre_hook(keep_mask, with_kwargs=True)
    token = _MASK.set(None)
    try:
        yield
    finally:
        hook.remove()
        _MASK.reset(token)


def _checkpoint_file(args: TrainingArguments, state: TrainerState, name: str) -> Optional[str]:
    """The state file of the checkpoint being resumed, if any: the one at ``state.global_step``
    under ``output_dir`` or ``args.resume_from_checkpoint`` (the Trainer does not tell)."""
    folders = [os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")]
    if isinstance(args.resume_from_checkpoint, str):
        folders.insert(0, args.resume_from_checkpoint)
    for folder in folders:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def _save_file(args: TrainingArguments, state: TrainerState, name: str, payload: dict) -> None:
    """Write ``payload`` into the checkpoint folder the Trainer just wrote (``on_save``)."""
    folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
    if args.should_save and payload and os.path.isdir(folder):
        torch.save(payload, os.path.join(folder, name))


def _tensorboard_dir(trainer: Any) -> Optional[str]:
    """The run directory of the Trainer's TensorBoard integration (None without one)."""
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == "TensorBoardCallback":
            return getattr(callback, "logging_dir", None)
    return None


class KernelRegimeCallback(TrainerCallback):
    r"""Track the empirical NTK during ``Trainer.train`` and log whether training stays lazy.

    The :class:`~lazy_monitor.tracking.session.MonitorSession` for the Hugging Face
    ``Trainer``, with the arguments and metrics of the Lightning ``KernelRegimeMonitor``.

    When: at train begin (step ``state.global_step``; the reference :math:`\theta_0, f_0, K_0`),
    in ``on_step_end`` at the scheduled steps (multiples of ``every_n_steps`` and ``1, 2, 4, ...``
    below ``log_spaced_until``) while the monitor's share of the wall time stays within
    ``max_overhead``, and at train end. ``step`` is ``state.global_step`` (optimizer steps).

    Where: ``trainer.state.log_history`` (every process) and, on process zero, the Trainer's
    TensorBoard run directory (``report_to`` with ``"tensorboard"``; its ``logging_dir``) in an
    event file of its own: the tags of a Lightning run (``ntk/rel_change``, ``drift/...``, no
    ``train/`` prefix) and the ``tensorboard`` tier's extras. ``Trainer.log`` is not called: the
    Trainer's own ``loss``, ``grad_norm`` and ``learning_rate`` logs are left exactly as they
    are. The console gets one line per measurement with the headline values.

    Language models by default: ``output_fn=last_token_logits`` (the next-token logits at the
    last real token of each probe sequence, from its ``attention_mask``), ``(N, V)``;
    ``kernel`` ``kind="auto"`` then picks the full kernel, the trace or a projected trace under
    ``max_memory``. How attention and checkpointing run during a measurement is decided by
    the engine (:func:`lazy_monitor.core._functional.measurement_mode`), restored afterwards.

    Probe: ``probe`` (a dict of tensors is passed as keyword arguments), or ``probe_size``
    (default 8) examples drawn from ``trainer.train_dataset`` with an own generator seeded by
    ``seed``, reduced to the keys the model's ``forward`` accepts (1-D ``labels`` kept as
    targets) and collated with the Trainer's ``data_collator``.

    Distributed (``torchrun``, ``accelerate launch``): every process measures at the same
    steps; with ``split_across_ranks`` each computes its share of the kernel blocks and an
    ``all_reduce`` completes them (``torch.distributed``, any backend).

    Resume: the state goes into each checkpoint folder as ``lazy_monitor_state.pt``;
    ``trainer.train(resume_from_checkpoint=...)`` restores it (other settings: see
    ``KernelRegimeMonitor``; ``reset_reference=True`` starts a new reference). A resumed run
    without that file warns and starts a new reference.

    Args:
        probe, probe_size, every_n_steps, log_spaced_until, max_overhead, submodule,
            batch_to_probe, output_fn, seed, kernel, per_layer, feature_modules,
            lazy_thresholds, tensorboard, split_across_ranks, reset_reference: as for
            ``KernelRegimeMonitor`` (``probe_size`` 8 and ``output_fn=last_token_logits`` by
            default here).

    Raises:
        RuntimeError: at train begin when the callback is not attached to the Trainer that
            runs it.
        ValueError / TypeError: bad values at construction; a probe that cannot be drawn or a
            checkpoint that cannot be resumed at train begin.
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
        output_fn: Optional[Callable[[Any], Tensor]] = last_token_logits,
        seed: int = 0,
        kernel: Any = None,
        per_layer: Union[bool, int] = True,
        feature_modules: Union[Sequence[str], bool, None] = True,
        lazy_thresholds: Optional[Mapping[str, float]] = None,
        tensorboard: Literal["basic", "standard", "full"] = "standard",
        split_across_ranks: bool = True,
        reset_reference: bool = False,
    ) -> None:
        if probe is None and probe_size is None:
            probe_size = DEFAULT_HF_PROBE_SIZE
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
            collectives=TorchDistributed(),
            owner="KernelRegimeCallback",
        )
        self._batch_to_probe = batch_to_probe
        if batch_to_probe is None:
            self.session.batch_to_probe = self.batch_to_probe
        self.extras = TensorBoardExtras(tensorboard)
        self.session.add_listener(self)
        self._trainer: Any = None
        self._writer: Any = None
        self._zero = True
        self._input_keys: Optional[set[str]] = None  # forward's keywords (None: any)

    tracker = property(lambda self: self.session.tracker, doc="KernelTracker (None before).")
    last_metrics = property(lambda self: dict(self.session.last_metrics), doc="Last values.")

    def _identity(self) -> dict[str, Any]:
        """The settings named in messages about duplicate callbacks."""
        s = self.session
        return dict(
            probe="given" if s.probe is not None else "drawn",
            probe_size=s.probe_size,
            seed=s.seed,
            submodule=s.submodule,
            kind=s.kernel.kind,
            per_layer=s.per_layer,
        )

    def attach(self, trainer: Any) -> KernelRegimeCallback:
        """Bind to ``trainer`` and add self to its callbacks; returns self."""
        if not hasattr(trainer, "callback_handler") or not hasattr(trainer, "train_dataset"):
            raise TypeError(
                f"attach needs a transformers.Trainer, got {type(trainer).__name__}; call "
                "KernelRegimeCallback(...).attach(trainer) after creating the Trainer"
            )
        self._trainer = trainer
        if all(cb is not self for cb in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        return self

    def batch_to_probe(self, batch: Any) -> Any:
        """A collated batch -> ``x`` or ``(x, y)``: dict batches give the forward's inputs."""
        if self._batch_to_probe is not None:
            return self._batch_to_probe(batch)
        if not isinstance(batch, Mapping):
            return default_batch_to_probe(batch)
        x = {
            k: v
            for k, v in batch.items()
            if isinstance(v, Tensor)
            and k not in _LABEL_KEYS
            and (self._input_keys is None or k in self._input_keys)
        }
        labels = next((batch[k] for k in _LABEL_KEYS if isinstance(batch.get(k), Tensor)), None)
        # sequence labels (language modelling) do not fit the alignment: keep class labels only
        return (x, labels) if labels is not None and labels.dim() == 1 else x

    # ------------------------------------------------------------------ Trainer hooks
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        trainer = self._check_trainer(kwargs.get("model"))
        model = trainer.model
        self._connect(trainer.callback_handler.callbacks, control)
        if state.global_step > 0 and self.session._restored is None:
            path = _checkpoint_file(args, state, MONITOR_STATE_FILE)
            if path is None:
                warnings.warn(
                    f"KernelRegimeCallback: resuming at step {state.global_step} without "
                    f"{MONITOR_STATE_FILE} in the checkpoint; a new reference K0 starts here",
                    UserWarning,
                    stacklevel=2,
                )
            else:
                self.session.load_state_dict(torch.load(path, weights_only=True))
        network = self.session.network(model)
        self._input_keys = _forward_keywords(network)
        self._zero = bool(state.is_world_process_zero)
        self.extras.reset()
        if self._zero:
            with self.session.busy():
                self._open_writer(trainer, args)
        data = SimpleNamespace(dataset=trainer.train_dataset, collate_fn=self._collate_for(trainer))
        with _measuring(network):
            self.session.start(
                model, int(state.global_step), optimizer=trainer.optimizer, data=data
            )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        session = self.session
        if session.tracker is None or not session.due(int(state.global_step)):
            return
        model = self._trainer.model
        with _measuring(session.network(model)):
            session.measure(model, int(state.global_step), optimizer=self._trainer.optimizer)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        session = self.session
        if self._trainer is None or session.tracker is None:
            return
        model, step = self._trainer.model, int(state.global_step)
        with _measuring(session.network(model)):
            session.finish(model, step, optimizer=self._trainer.optimizer)
        if self._writer is not None:
            with session.busy():
                self.extras.finish([self._writer], session, step, step)
                self._writer.close()
            self._writer = None

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        _save_file(args, state, MONITOR_STATE_FILE, self.session.state_dict())

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
        """Publish one measurement: ``log_history`` (every process), TensorBoard and the
        console line (process zero)."""
        if repeat or self._trainer is None:
            return
        logged = session.loggable(metrics)
        self._trainer.state.log_history.append({**logged, "step": step})
        if not self._zero:
            return
        print(session.headline(step, metrics), flush=True)
        if self._writer is not None:
            for name, value in logged.items():
                self._writer.add_scalar(name, value, step)
            previous = session.previous_metrics
            self.extras.measurement([self._writer], session, step, step, metrics, previous, final)
            self._writer.flush()

    # ------------------------------------------------------------------ internals
    def _check_trainer(self, model: Any) -> Any:
        trainer = self._trainer
        if trainer is None:
            raise RuntimeError(
                "KernelRegimeCallback reads its Trainer's data, optimizer and TensorBoard "
                "directory and was not attached: use KernelRegimeCallback(...).attach(trainer) "
                "instead of Trainer(callbacks=[...])"
            )
        ours = any(cb is self for cb in trainer.callback_handler.callbacks)
        if not ours or (model is not None and model is not trainer.model):
            raise RuntimeError(
                "KernelRegimeCallback is attached to another Trainer than the one running it; "
                "attach one callback per Trainer: KernelRegimeCallback(...).attach(trainer) for "
                "the Trainer you call train() on"
            )
        return trainer

    def _open_writer(self, trainer: Any, args: TrainingArguments) -> None:
        """A writer into the Trainer's TensorBoard run directory and the HParams entry."""
        log_dir = _tensorboard_dir(trainer)
        if log_dir is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=log_dir)
        model_hp = {
            "learning_rate": args.learning_rate,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "max_steps": args.max_steps,
            "weight_decay": args.weight_decay,
            "seed": args.seed,
        }
        self.extras.hparams([self._writer], self.session.hparams(), model_hp)

    def _connect(self, callbacks: list[Any], control: TrainerControl) -> None:
        # at train begin, before the first step; the messages of the Lightning callbacks
        check_unique(
            callbacks,
            KernelRegimeCallback,
            "KernelRegimeCallback",
            equal_only=False,
            why="one monitor per Trainer: every monitor writes the same names (ntk/rel_change, "
            "lin/rel_error, ...), whatever its submodule or kind",
            fix="attach only one (per_layer=True logs the drift of parts of the network as "
            "ntk_layer/<layer>/rel_change)",
        )
        check_unique(
            callbacks,
            KernelDriftGateCallback,
            "KernelDriftGateCallback",
            equal_only=False,
            why=f"every gate keeps its state in the one checkpoint file {GATE_STATE_FILE}, so a "
            "resumed run would give each gate the state of the last one saved",
            fix="one gate with all the thresholds",
        )
        for cb in callbacks:
            if isinstance(cb, KernelDriftGateCallback):
                cb._connect(self.session, control)

    def _collate_for(self, trainer: Any) -> Callable[[list[Any]], Any]:
        keep = self._input_keys
        collator = trainer.data_collator

        def collate(items: list[Any]) -> Any:
            # drop columns the model does not take (text, ids) before the Trainer's collator
            if keep is not None:
                items = [
                    {k: v for k, v in it.items() if k in keep or k in _LABEL_KEYS}
                    if isinstance(it, Mapping)
                    else it
                    for it in items
                ]
            return collator(items)

        return collate


def _forward_keywords(network: torch.nn.Module) -> Optional[set[str]]:
    """Names ``network.forward`` accepts; None when it takes ``**kwargs`` (anything goes)."""
    params = inspect.signature(network.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


class KernelDriftGateCallback(TrainerCallback):
    """Stop, fail or flag a ``Trainer`` run whose kernel metrics cross thresholds.

    The decision of the Lightning ``KernelDriftGate`` (thresholds or globs, patience, minimums
    at the end; :class:`~lazy_monitor.tracking.gate.DriftGate`), reduced across processes (one
    tripping trips all):

    * ``"warn"``: one :class:`KernelDriftWarning` (a tripped gate stays tripped);
    * ``"stop"``: warning + ``control.should_training_stop = True`` (the Trainer stops after
      the current step);
    * ``"raise"``: :class:`KernelDriftError` from ``trainer.train()``.

    Needs exactly one :class:`KernelRegimeCallback` attached to the same Trainer and is the only
    gate there (its state is one file per checkpoint, ``lazy_monitor_gate.pt``, restored on
    resume; a restored tripped gate acts again at train begin).

    Args:
        thresholds: ``{metric or glob: bound}`` (a number: the catalogue's lazy direction;
            ``{"max": b}`` / ``{"min": b}`` explicit).
        patience: consecutive violating measurements that trip.
        action: ``"warn"``, ``"stop"`` or ``"raise"``.
        min_check_from_step: also check minimums from this step on (None: at train end only).
        check_finite: NaN/inf values violate every threshold.

    Raises:
        ValueError: bad arguments (construction); no monitor attached or a threshold on a metric
            the monitor does not log (train begin).
        KernelDriftError: ``action="raise"`` when a threshold trips.
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
        self._gate = DriftGate(thresholds, patience, action, min_check_from_step, check_finite)
        self._control: Optional[TrainerControl] = None
        self._connected = False
        self._zero = True

    tripped = property(lambda self: self._gate.tripped, doc="Whether a threshold tripped.")
    reason = property(lambda self: self._gate.reason, doc="Why it tripped (None if not).")
    trip_step = property(lambda self: self._gate.trip_step, doc="Step of the trip.")
    action = property(lambda self: self._gate.action, doc="'warn', 'stop' or 'raise'.")

    def _identity(self) -> dict[str, Any]:
        spec = [(t.metric, t.direction, t.value) for t in self._gate.thresholds]
        return {"thresholds": spec, "action": self.action}

    def _connect(self, session: MonitorSession, control: TrainerControl) -> None:
        self._control, self._connected = control, True
        session.add_listener(self)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._gate.reset()
        self._control, self._zero = control, bool(state.is_world_process_zero)
        path = _checkpoint_file(args, state, GATE_STATE_FILE) if state.global_step > 0 else None
        if path is not None:
            state_dict = torch.load(path, weights_only=True)
            check_schema(state_dict, "KernelDriftGate")
            self._gate.load_state_dict(state_dict)
            if self.tripped:
                self._act(f"restored tripped state: {self.reason}", final=False)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not self._connected:
            raise ValueError(
                "KernelDriftGateCallback needs a KernelRegimeCallback attached to the same "
                "Trainer: KernelRegimeCallback(...).attach(trainer)"
            )

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        _save_file(args, state, GATE_STATE_FILE, stamp(self._gate.state_dict()))

    # ------------------------------------------------------------------ session listener
    def on_start(self, session: MonitorSession) -> None:
        self._gate.require(session.metric_names(), owner="KernelDriftGateCallback")

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
            self._act(reason, final=final)

    def _act(self, reason: str, final: bool) -> None:
        message = f"KernelDriftGate tripped (action={self.action!r}): {reason}"
        if self.action == "raise":
            raise KernelDriftError(message)
        if self.action == "stop" and not final and self._control is not None:
            self._control.should_training_stop = True
            message += "; stopping training"
        if self._zero:
            _warnings.warn(message, KernelDriftWarning)
