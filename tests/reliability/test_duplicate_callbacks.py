"""Two monitors or two equal gates in one Trainer: the project's own message, before training
(issue 13, row "two identical monitors give Lightning's 'more than one stateful callback'").

On ``e8468cb`` two equal monitors (or gates) met Lightning's generic ``RuntimeError`` at
``Trainer(...)``, and two monitors on different submodules trained with both writing the same
tags. Checkpoints keep the plain ``state_key`` (a stale equal instance alive in the process
included): see :mod:`lazy_monitor.callbacks._identity`.
"""

from __future__ import annotations

import gc
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from _rel_fit import NAMESPACES, classification_data, lit, mlp, trainer

from lazy_monitor.callbacks import lightning as cb_l
from lazy_monitor.callbacks import pytorch_lightning as cb_pl
from lazy_monitor.callbacks.lightning import KernelDriftGate, KernelRegimeMonitor

CALLBACKS = {"lightning": cb_l, "pytorch_lightning": cb_pl}
MONITOR_KW: dict[str, Any] = dict(
    probe_size=4, every_n_steps=2, log_spaced_until=0, max_overhead=None
)
STALE_KEY_WARNING = "callbacks used to create the checkpoint"


def _refused(tmp_path: Path, callbacks: list, namespace: str = "lightning") -> str:
    """Fit with ``callbacks``; the ValueError's message, after checking nothing was trained."""
    pl = NAMESPACES[namespace]
    t = trainer(tmp_path, callbacks, pl=pl)
    with pytest.raises(ValueError) as err:
        t.fit(lit(mlp(), classification_data(), pl=pl))
    assert t.global_step == 0  # refused at setup, before the first step
    assert all(getattr(cb, "tracker", None) is None for cb in callbacks)  # nothing measured
    return str(err.value)


# ---------------------------------------------------------------- monitors
@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_two_equal_monitors_get_the_projects_message(tmp_path, namespace):
    cb = CALLBACKS[namespace]
    text = _refused(
        tmp_path,
        [cb.KernelRegimeMonitor(**MONITOR_KW), cb.KernelRegimeMonitor(**MONITOR_KW)],
        namespace,
    )
    assert "2 KernelRegimeMonitors with equal probe='drawn', probe_size=4, seed=0" in text
    assert "one monitor per Trainer" in text and "Fix: remove all but one" in text


def test_equal_monitors_of_both_namespaces_in_one_trainer(tmp_path):
    # the same state_key in both namespaces (checkpoints are interchangeable)
    text = _refused(tmp_path, [cb_l.KernelRegimeMonitor(), cb_pl.KernelRegimeMonitor()])
    assert "2 KernelRegimeMonitors with equal" in text


def test_monitors_on_different_submodules_are_refused_too(tmp_path):
    # Different settings pass Lightning's key check, but both monitors log ntk/rel_change & co.
    # to the same loggers: on e8468cb both values landed on the same tag and step.
    a = KernelRegimeMonitor(**MONITOR_KW)
    b = KernelRegimeMonitor(submodule="net", kernel={"kind": "trace"}, **MONITOR_KW)
    text = _refused(tmp_path, [a, b])
    assert "submodule=None" in text and "submodule='net', kind='trace'" in text
    assert "whatever its submodule or kind" in text


def test_a_gate_listed_first_gives_the_same_monitor_message(tmp_path):
    gate = KernelDriftGate({"ntk/rel_change": 0.5})
    text = _refused(
        tmp_path, [gate, KernelRegimeMonitor(**MONITOR_KW), KernelRegimeMonitor(**MONITOR_KW)]
    )
    assert "2 KernelRegimeMonitors with equal" in text


def test_the_same_monitor_object_twice_meets_lightnings_check_first(tmp_path):
    # Documented limitation: one object has one state_key, and Lightning compares the keys in
    # Trainer.__init__, before any hook of ours runs.
    monitor = KernelRegimeMonitor(**MONITOR_KW)
    with pytest.raises(RuntimeError, match="more than one stateful callback"):
        trainer(tmp_path, [monitor, monitor])


# ---------------------------------------------------------------- gates
@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_two_equal_gates_get_the_projects_message(tmp_path, namespace):
    cb = CALLBACKS[namespace]
    gates = [cb.KernelDriftGate({"ntk/rel_change": 0.5}) for _ in range(2)]
    text = _refused(tmp_path, [cb.KernelRegimeMonitor(**MONITOR_KW), *gates], namespace)
    assert "2 KernelDriftGates with equal thresholds=[('ntk/rel_change', 'max', 0.5)]" in text
    assert "Fix: remove one, or make them differ in thresholds or action" in text


def test_gates_differing_only_in_patience_share_a_checkpoint_entry_and_are_refused(tmp_path):
    gates = [KernelDriftGate({"ntk/rel_change": 0.5}, patience=p) for p in (1, 3)]
    text = _refused(tmp_path, [KernelRegimeMonitor(**MONITOR_KW), *gates])
    assert "patience, min_check_from_step and check_finite are not part" in text


def test_gates_with_different_thresholds_or_actions_work_side_by_side(tmp_path):
    warn = KernelDriftGate({"ntk/trace": 1e-9}, action="warn")  # trips at step 0
    stop = KernelDriftGate({"ntk/trace": 1e-9}, action="stop", patience=1000)  # never
    loose = KernelDriftGate({"ntk/rel_change": 10.0}, action="warn")
    t = trainer(tmp_path, [KernelRegimeMonitor(**MONITOR_KW), warn, stop, loose])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(lit(mlp(), classification_data()))
    assert t.global_step == 4
    assert warn.tripped and not stop.tripped and not loose.tripped


# ---------------------------------------------------------------- checkpoint keys
# (a seed of its own per test: no instance of another test, collected or not, shares the key)
def test_state_key_of_an_instance_not_set_up_yields_to_a_newer_equal_one():
    older = KernelRegimeMonitor(**MONITOR_KW, seed=101)
    plain = older.state_key
    newer = KernelRegimeMonitor(**MONITOR_KW, seed=101)
    assert newer.state_key == plain and older.state_key == plain + "#2"
    assert KernelRegimeMonitor(**MONITOR_KW, seed=102).state_key != plain  # no effect
    del newer
    gc.collect()
    assert older.state_key == plain  # the registry holds no instance alive


def _fit_with_checkpoints(tmp_path: Path, callbacks: list, pl: Any, **kw: Any) -> Any:
    ckpt = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=4
    )
    t = trainer(tmp_path, [*callbacks, ckpt], pl=pl, enable_checkpointing=True, **kw)
    return t


def _keys(path: Path) -> set[str]:
    return set(torch.load(path, weights_only=True)["callbacks"])


def test_an_older_equal_monitor_not_set_up_still_writes_the_plain_key(tmp_path):
    monitor = KernelRegimeMonitor(**MONITOR_KW, seed=103)
    spare = KernelRegimeMonitor(**MONITOR_KW, seed=103)  # newer, never used, alive
    assert monitor.state_key.endswith("#2")  # lets Lightning's check through ...
    t = _fit_with_checkpoints(tmp_path, [monitor], NAMESPACES["lightning"])
    t.fit(lit(mlp(), classification_data()))
    keys = _keys(tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    plain = monitor._base_state_key()  # the key of e8468cb
    assert plain in keys and monitor.state_key == plain  # ... not into the file
    assert spare.state_key == plain + "#2"  # a set-up equal monitor is alive


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_resume_while_a_stale_equal_monitor_and_gate_are_alive(tmp_path, namespace):
    # A notebook: the first trainer and its callbacks are still referenced when equal new ones
    # resume the first run's checkpoint.
    pl, cb = NAMESPACES[namespace], CALLBACKS[namespace]
    data = classification_data()
    old_monitor = cb.KernelRegimeMonitor(**MONITOR_KW)
    old_gate = cb.KernelDriftGate({"ntk/trace": 1e-9}, action="warn")  # trips at step 0
    first = _fit_with_checkpoints(tmp_path / "a", [old_monitor, old_gate], pl)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first.fit(lit(mlp(), data, pl=pl))
    ckpt = tmp_path / "a" / "ckpt" / "epoch=0-step=4.ckpt"
    keys = _keys(ckpt)
    assert {old_monitor.state_key, old_gate.state_key} <= keys
    assert not any("#" in k for k in keys)

    monitor = cb.KernelRegimeMonitor(**MONITOR_KW)
    gate = cb.KernelDriftGate({"ntk/trace": 1e-9}, action="warn")
    second = _fit_with_checkpoints(tmp_path / "b", [monitor, gate], pl, max_steps=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second.fit(lit(mlp(), data, pl=pl), ckpt_path=str(ckpt))
    messages = [str(w.message) for w in caught]
    assert not any(STALE_KEY_WARNING in m for m in messages), messages
    assert any("restored tripped state" in m for m in messages)  # the gate's state came back
    assert gate.tripped and gate.trip_step == 0
    # the monitor's reference came back: steps 6 and 8 measured, no new reference at step 4
    assert monitor.tracker.started and monitor.num_measurements == 2
    assert _keys(tmp_path / "b" / "ckpt" / "epoch=1-step=8.ckpt") == keys
    assert old_monitor.state_key == monitor.state_key  # both set up: the plain key


# ---------------------------------------------------------------- Hugging Face Trainer
def _hf_trainer(tmp_path: Path, callbacks: list) -> Any:
    transformers = pytest.importorskip("transformers")

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = mlp()

        def forward(self, x: torch.Tensor, labels: Any = None) -> Any:
            logits = self.body(x)
            if labels is None:  # the monitor's probe
                return logits
            return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

    data = classification_data()
    rows = [{"x": x, "labels": y} for x, y in zip(*data.tensors)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    return transformers.Trainer(model=Net(), args=args, train_dataset=rows, callbacks=callbacks)


def test_hf_two_monitors_get_the_same_message(tmp_path):
    from lazy_monitor.integrations.transformers import KernelRegimeCallback

    t = _hf_trainer(tmp_path, [])
    for _ in range(2):
        KernelRegimeCallback(probe_size=4, output_fn=None).attach(t)
    with pytest.raises(ValueError, match="2 KernelRegimeCallbacks with equal probe='drawn'"):
        t.train()
    assert t.state.global_step == 0


@pytest.mark.parametrize("same_object", [False, True])
def test_hf_two_gates_are_refused_they_share_one_state_file(tmp_path, same_object):
    # Both gates wrote lazy_monitor_gate.pt: a resumed run gave each the last one's state.
    from lazy_monitor.integrations.transformers import (
        KernelDriftGateCallback,
        KernelRegimeCallback,
    )

    first = KernelDriftGateCallback({"ntk/rel_change": 0.5})
    second = first if same_object else KernelDriftGateCallback({"ntk/trace": 1.0}, action="warn")
    t = _hf_trainer(tmp_path, [first, second])
    KernelRegimeCallback(probe_size=4, output_fn=None).attach(t)
    held = (
        "the same KernelDriftGateCallback object 2 times"
        if same_object
        else "2 KernelDriftGateCallbacks"
    )
    with pytest.raises(ValueError, match=held) as err:
        t.train()
    assert "lazy_monitor_gate.pt" in str(err.value) and "one gate with all the thresholds" in str(
        err.value
    )
    assert t.state.global_step == 0
