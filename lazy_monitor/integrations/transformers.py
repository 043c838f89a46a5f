"""Hugging Face ``transformers.Trainer`` callbacks: :class:`KernelRegimeCallback` (measure and
log the kernel regime) and :class:`KernelDriftGateCallback` (act on thresholds).

A thin adapter, like the Lightning one: the settings, validation, probe drawing, tracker, state
and gate decision are the namespace-free mixins of :mod:`lazy_monitor.callbacks._monitor` /
:mod:`lazy_monitor.callbacks._gate` (themselves built on :mod:`lazy_monitor.tracking`); this
module only maps the Trainer's hooks onto them through :class:`_TrainerView`, logs through the
Trainer and keeps the state in the Trainer's checkpoint folders. No Lightning is imported.

Usage::

    from transformers import Trainer
    from lazy_monitor.integrations.transformers import KernelDriftGateCallback, KernelRegimeCallback

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[KernelDriftGateCallback({"ntk/rel_change": 0.2})])
    KernelRegimeCallback(probe_size=8, every_n_steps=100).attach(trainer)
    trainer.train()

Why ``attach``: a ``TrainerCallback``'s hooks receive ``args``, ``state``, ``control`` and the
model, never the Trainer, and the only way into the Trainer's reporting (every ``report_to``
integration, ``state.log_history``) at ``state.global_step`` is ``Trainer.log`` (reporting
callbacks run before user callbacks in ``on_log``, so values added to another log call would be
too late). The monitor therefore holds the Trainer it is attached to.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections.abc import Iterator, Mapping
from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lazy_monitor._extras import raise_missing

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ModuleNotFoundError as exc:
    raise_missing(exc, "lazy_monitor.integrations.transformers")

from lazy_monitor.callbacks._gate import KernelDriftError, KernelDriftWarning, _KernelDriftGateBase
from lazy_monitor.callbacks._identity import check_unique
from lazy_monitor.callbacks._monitor import DEFAULT_EVERY_N_STEPS, _KernelRegimeMonitorBase
from lazy_monitor.tracking.network import resolve_submodule

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


def last_token_logits(output: Any) -> Tensor:
    """Default ``output_fn``: the logits of a ``transformers`` model output, reduced per example.

    ``(N, T, V)`` (language models) -> ``(N, V)``, the next-token logits at the last position;
    ``(N, C)`` (classification heads) unchanged. Accepts a ``ModelOutput`` (``.logits``), a tuple
    (its first element) or a tensor.
    """
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output if isinstance(output, Tensor) else output[0]
    return logits[:, -1] if logits.dim() == 3 else logits


@contextlib.contextmanager
def _eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Measure with eager attention, then restore the model's attention implementation.

    PyTorch's fused SDPA kernels have no forward-mode AD (the linearization's ``jvp``) and no
    ``vmap`` batching rule (the kernel engine); eager attention computes the same function.
    """
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        impl = getattr(config, "_attn_implementation", None)
        if impl is not None and impl != "eager":
            configs[id(config)] = (config, impl)
    try:
        for config, _ in configs.values():
            config._attn_implementation = "eager"
        yield
    finally:
        for config, impl in configs.values():
            config._attn_implementation = impl


class _TrainerView:
    """What the namespace-free mixins read from a Lightning trainer, mapped onto one HF hook call.

    ``global_step`` is ``state.global_step`` (optimizer steps), ``is_global_zero`` is
    ``state.is_world_process_zero``, ``should_stop = True`` sets ``control.should_training_stop``,
    ``strategy.reduce_boolean_decision`` is an ``all_reduce`` under ``torch.distributed``.
    """

    loggers: tuple[Any, ...] = ()  # values go through Trainer.log, not Lightning loggers

    def __init__(
        self,
        trainer: Any,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        train_dataloader: Any = None,
    ) -> None:
        self.trainer, self.args, self.state, self.control = trainer, args, state, control
        self.train_dataloader = train_dataloader
        self.strategy = self

    global_step = property(lambda self: int(self.state.global_step))
    is_global_zero = property(lambda self: bool(self.state.is_world_process_zero))
    world_size = property(lambda self: int(self.args.world_size))

    @property
    def should_stop(self) -> bool:
        return bool(self.control.should_training_stop)

    @should_stop.setter
    def should_stop(self, value: bool) -> None:
        self.control.should_training_stop = bool(value)

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:  # noqa: A002
        """``any`` (``all=False``) or ``all`` of ``decision`` over the processes."""
        import torch.distributed as dist

        if self.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return bool(decision)
        flag = torch.tensor(int(bool(decision)), device=self.args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.SUM)
        total = int(flag.item())
        return total == self.world_size if all else total > 0


def _checkpoint_file(args: TrainingArguments, state: TrainerState, name: str) -> Optional[str]:
    """The state file of the checkpoint being resumed, if any.

    The Trainer does not tell callbacks which checkpoint it resumes; the one at ``state.
    global_step`` under ``output_dir`` (where it writes them) or ``args.resume_from_checkpoint``
    is it.
    """
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


class KernelRegimeCallback(_KernelRegimeMonitorBase, TrainerCallback):
    r"""Track the empirical NTK during ``Trainer.train`` and log whether training stays lazy.

    The :class:`~lazy_monitor.callbacks.lightning.KernelRegimeMonitor` for the Hugging Face
    ``Trainer``: same arguments (``every_n_steps``, ``log_spaced_until``, ``submodule``,
    ``kind``, ``per_layer``, ``lazy_thresholds``, ...; every keyword is passed on, so new
    monitor/tracker options apply here too), same metrics, same side-effect-free measurement.

    When: at train begin (``state.global_step``, 0 for a new run: the reference
    :math:`\theta_0, f_0, K_0`), in ``on_step_end`` at the scheduled steps and at the step where
    training is about to stop (``control.should_training_stop``, e.g. ``max_steps``), and at train
    end unless that step was just measured. ``step`` is ``state.global_step`` (optimizer steps).

    Where: ``Trainer.log`` at ``state.global_step``, i.e. every ``report_to`` integration (written
    by process zero only: the integrations check ``state.is_world_process_zero``) and
    ``state.log_history``. The Trainer's TensorBoard integration prefixes ``train/``
    (``train/ntk/rel_change``) and writes under ``output_dir/runs`` (transformers 5).
    ``Trainer.log`` is called on every process, as the Trainer does for its loss, so callbacks
    reacting in ``on_log`` stay in step across processes.

    What, by default, on a language model: ``output_fn=last_token_logits`` takes the next-token
    logits at the last position of each probe sequence, ``(N, V)``; ``kind="auto"`` (as for
    ``KernelRegimeMonitor``) then resolves at train begin, under ``max_memory``, to the full
    kernel, the exact trace over the ``V`` outputs, or a projected trace (``projection=16``) --
    ``KernelTracker.kernel_config`` says which, and the choice is kept across a resume. Pass
    ``output_fn`` (e.g. ``lambda out: out.logits`` for all positions, ``O = T·V``) to measure
    something else. Measurements run with eager attention (the model's
    ``config._attn_implementation`` is switched for the measurement and restored): PyTorch's
    fused SDPA kernels have no forward-mode AD rule, and eager attention computes the same
    function without the engine's slower fallbacks.

    Probe: ``probe`` (a dict of tensors is passed as keyword arguments, e.g.
    ``{"input_ids": ..., "attention_mask": ...}``), or ``probe_size`` examples drawn from
    ``trainer.train_dataset`` with an own generator seeded by ``seed`` (global RNGs untouched),
    reduced to the keys the model's ``forward`` accepts (labels dropped; 1-D ``labels`` are
    kept as targets) and collated with the Trainer's ``data_collator``.

    Evaluated on the unwrapped model (``submodule`` of it if given), in eval semantics, float32
    outside autocast, with weights, buffers, ``.grad`` and RNG states untouched: training is
    bit-identical with and without the callback.

    Resume: in ``on_save`` the monitor's state (θ₀, ``f₀``, ``K₀``, probe, last step; CPU
    tensors, ``weights_only`` safe) goes into the checkpoint folder as ``lazy_monitor_state.pt``;
    ``trainer.train(resume_from_checkpoint=...)`` finds it (the checkpoint at the resumed
    ``global_step`` under ``output_dir``, or ``args.resume_from_checkpoint``) and keeps θ₀. A
    resumed run without that file warns and starts a new reference.

    Args:
        probe, probe_size, every_n_steps: as for ``KernelRegimeMonitor``; ``probe_size``
            defaults to 8 here.
        kind, implementation, output_fn: engine settings (``output_fn`` default above; ``kind``
            and ``implementation`` default to ``"auto"`` as for ``KernelRegimeMonitor``).
        **monitor_kwargs: every other ``KernelRegimeMonitor`` argument.

    Raises:
        RuntimeError: at train begin when the callback was not attached to its Trainer.
        ValueError / TypeError: as ``KernelRegimeMonitor`` (bad values at construction, a probe
            that cannot be drawn at train begin).
    """

    def __init__(
        self,
        probe: Optional[Any] = None,
        probe_size: Optional[int] = None,
        every_n_steps: int = DEFAULT_EVERY_N_STEPS,
        *,
        kind: str = "auto",
        implementation: str = "auto",
        output_fn: Optional[Callable[[Any], Tensor]] = last_token_logits,
        **monitor_kwargs: Any,
    ) -> None:
        if probe is None and probe_size is None:
            probe_size = DEFAULT_HF_PROBE_SIZE
        super().__init__(
            probe=probe,
            probe_size=probe_size,
            every_n_steps=every_n_steps,
            kind=kind,  # type: ignore[arg-type]
            implementation=implementation,
            output_fn=output_fn,
            **monitor_kwargs,
        )
        self._trainer: Any = None
        self._input_keys: Optional[set[str]] = None  # forward's keywords (None: any)

    def attach(self, trainer: Any) -> KernelRegimeCallback:
        """Bind to ``trainer`` (whose ``log`` carries the metrics) and add self to its callbacks."""
        if not callable(getattr(trainer, "log", None)) or not hasattr(trainer, "callback_handler"):
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
        if self._batch_to_probe is not None or not isinstance(batch, Mapping):
            return super().batch_to_probe(batch)
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
        trainer = self._trainer
        if trainer is None:
            raise RuntimeError(
                "KernelRegimeCallback logs through its Trainer and was not attached: use "
                "KernelRegimeCallback(...).attach(trainer) instead of Trainer(callbacks=[...])"
            )
        model = kwargs.get("model") or trainer.model
        network = resolve_submodule(model, self.submodule, "KernelRegimeCallback")
        self._connect(trainer.callback_handler.callbacks)
        if state.global_step > 0 and self._restored is None:
            path = _checkpoint_file(args, state, MONITOR_STATE_FILE)
            if path is None:
                warnings.warn(
                    f"KernelRegimeCallback: resuming at step {state.global_step} without "
                    f"{MONITOR_STATE_FILE} in the checkpoint; a new reference K0 starts here",
                    UserWarning,
                    stacklevel=2,
                )
            else:
                self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self._input_keys = _forward_keywords(network)
        loader = None
        if self._probe is None:
            loader = SimpleNamespace(
                dataset=trainer.train_dataset, collate_fn=self._collate_for(trainer)
            )
        with _eager_attention(network):
            self.on_train_start(_TrainerView(trainer, args, state, control, loader), model)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._tracker is None:
            return
        step = int(state.global_step)
        # measure at the last step too, while the reporting integrations are still open
        due = self._schedule.is_due(step, self._last_step) or control.should_training_stop
        if due and step != self._last_step:
            model = kwargs.get("model") or self._trainer.model
            with _eager_attention(model):
                self._measure(_TrainerView(self._trainer, args, state, control), model, step, False)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._trainer is not None:
            model = kwargs.get("model") or self._trainer.model
            with _eager_attention(model):
                view = _TrainerView(self._trainer, args, state, control)
                _KernelRegimeMonitorBase.on_train_end(self, view, model)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        _save_file(args, state, MONITOR_STATE_FILE, self.state_dict() if self._tracker else {})

    # ------------------------------------------------------------------ internals
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
        # At state.global_step, to every report_to integration: the same values the Lightning
        # monitor logs (drift/ log10 companions after the reference, health/* once non-zero).
        trainer.trainer.log(self._logged_values(metrics, reference))

    def _connect(self, callbacks: list[Any]) -> None:
        # at train begin, before the first step; the messages of the Lightning callbacks
        check_unique(
            callbacks,
            KernelRegimeCallback,
            "KernelRegimeCallback",
            equal_only=False,
            why="one monitor per Trainer: every monitor logs the same names (ntk/rel_change, "
            "lin/rel_error, ...) through Trainer.log, whatever its submodule or kind",
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
        self._listeners = []
        for cb in callbacks:
            if isinstance(cb, KernelDriftGateCallback):
                cb._connected = True
                self._add_listener(cb)

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


class KernelDriftGateCallback(_KernelDriftGateBase, TrainerCallback):
    """Stop, fail or flag a ``Trainer`` run whose kernel metrics cross thresholds.

    The :class:`~lazy_monitor.callbacks.lightning.KernelDriftGate` for the Hugging Face
    ``Trainer``, same arguments and decision (thresholds, globs, patience, minimums at the end):

    * ``"warn"``: one :class:`KernelDriftWarning` (a tripped gate stays tripped: it warns once);
    * ``"stop"``: warning + ``control.should_training_stop = True`` (the Trainer stops after the
      current step; the monitor's measurement at that step is logged);
    * ``"raise"``: :class:`KernelDriftError` from ``trainer.train()``.

    Needs exactly one :class:`KernelRegimeCallback` attached to the same Trainer (order does not
    matter) and is the only gate there: its state is one file per checkpoint (a second gate is
    refused at train begin; put all thresholds into one gate). The decision is reduced across processes (one tripping trips all). Its state
    (tripped, reason, counts) goes into each checkpoint folder as ``lazy_monitor_gate.pt`` and is
    restored on resume; a restored tripped gate acts again at train begin.

    Args:
        thresholds, patience, action, min_check_from_step, check_finite: as ``KernelDriftGate``.

    Raises:
        ValueError: bad arguments (construction); no monitor attached or a threshold on a metric
            the monitor does not log (train begin).
        KernelDriftError: ``action="raise"`` when a threshold trips.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connected = False

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._gate.reset()
        path = _checkpoint_file(args, state, GATE_STATE_FILE) if state.global_step > 0 else None
        if path is not None:
            self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.on_train_start(_TrainerView(None, args, state, control), kwargs.get("model"))

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
        _save_file(args, state, GATE_STATE_FILE, self.state_dict())
