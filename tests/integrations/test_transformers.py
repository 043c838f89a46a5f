"""The Hugging Face Trainer callbacks on a tiny GPT-2 (built from a config, generated tokens, CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from lazy_monitor.integrations.transformers import (  # noqa: E402
    MONITOR_STATE_FILE,
    KernelDriftError,
    KernelDriftGateCallback,
    KernelDriftWarning,
    KernelRegimeCallback,
)

VOCAB, SEQ = 16, 8
TAG = "train/ntk/rel_change"  # the Trainer's TensorBoard integration prefixes "train/"


class Tokens(torch.utils.data.Dataset):
    """Generated token sequences as dicts, like a tokenized HF dataset (plus a text column)."""

    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = self.ids[i]
        mask = torch.ones_like(ids)
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone(), "text": "unused"}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: several intra-op threads only spin-wait on a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def _collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        k: torch.stack([it[k] for it in items]) for k in ("input_ids", "attention_mask", "labels")
    }


def _trainer(tmp: Path, max_steps: int, callbacks: list[Any], save_steps: int = 0) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        report_to=["tensorboard"],
        use_cpu=True,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        seed=0,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    return Trainer(
        model=_model(),
        args=args,
        train_dataset=Tokens(),
        data_collator=_collate,
        callbacks=callbacks,
    )


def _monitor(**kwargs: Any) -> KernelRegimeCallback:
    return KernelRegimeCallback(probe_size=4, per_layer=False, **kwargs)


def _logged(trainer: Trainer, name: str = "ntk/rel_change") -> dict[int, float]:
    return {e["step"]: e[name] for e in trainer.state.log_history if name in e}


def _scalars(tmp: Path, tag: str = TAG) -> dict[int, float]:
    acc = EventAccumulator(str(tmp / "runs"), size_guidance={"scalars": 0})
    values: dict[int, float] = {}
    for run_dir in sorted({p.parent for p in (tmp / "runs").rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def test_metrics_land_in_the_trainers_tensorboard_at_global_steps(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, max_steps=5, callbacks=[])
    monitor = _monitor(every_n_steps=2).attach(trainer)
    trainer.train()
    x, y = monitor._current_probe  # drawn: the forward's inputs only, sequence labels dropped
    assert set(x) == {"input_ids", "attention_mask"} and y is None
    assert x["input_ids"].shape == (4, SEQ)
    scalars = _scalars(tmp_path)
    assert sorted(scalars) == [0, 2, 4, 5]  # start, schedule, last step
    assert scalars[0] == 0.0 and all(scalars[s] > 0 for s in (2, 4, 5))
    assert _logged(trainer) == pytest.approx(scalars)  # same values in state.log_history
    assert (
        "train/loss"
        in EventAccumulator(str(next((tmp_path / "runs").iterdir()))).Reload().Tags()["scalars"]
    )


def test_unattached_callback_says_how_to_attach(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, max_steps=1, callbacks=[_monitor()])
    with pytest.raises(RuntimeError, match=r"attach\(trainer\)"):
        trainer.train()


def test_training_is_bit_identical_with_and_without_the_callback(tmp_path: Path) -> None:
    plain = _trainer(tmp_path / "plain", max_steps=4, callbacks=[])
    plain.train()
    watched = _trainer(tmp_path / "watched", max_steps=4, callbacks=[])
    _monitor(every_n_steps=2).attach(watched)
    watched.train()
    for (name, a), (_, b) in zip(
        plain.model.state_dict().items(), watched.model.state_dict().items()
    ):
        assert torch.equal(a, b), name


def test_gate_stops_the_run_at_the_tripping_step(tmp_path: Path) -> None:
    gate = KernelDriftGateCallback({"ntk/rel_change": 1e-9}, action="stop")
    trainer = _trainer(tmp_path, max_steps=20, callbacks=[gate])
    _monitor(every_n_steps=3).attach(trainer)
    with pytest.warns(UserWarning, match="stopping training"):
        trainer.train()
    assert trainer.state.global_step == 3 and gate.tripped and gate.trip_step == 3
    assert sorted(_scalars(tmp_path)) == [0, 3]


def test_gate_raise_raises(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, max_steps=20, callbacks=[])
    _monitor(every_n_steps=2).attach(trainer)
    trainer.add_callback(KernelDriftGateCallback({"ntk/rel_change": 1e-9}, action="raise"))
    with pytest.raises(KernelDriftError, match="ntk/rel_change"):
        trainer.train()


def test_gate_on_a_metric_the_monitor_does_not_log_fails_at_train_begin(tmp_path: Path) -> None:
    trainer = _trainer(
        tmp_path, max_steps=2, callbacks=[KernelDriftGateCallback({"ntk/alignment": 0.5})]
    )
    _monitor().attach(trainer)
    with pytest.raises(ValueError, match="ntk/alignment"):
        trainer.train()


def test_resume_from_a_trainer_checkpoint_keeps_theta0(tmp_path: Path) -> None:
    full = _trainer(tmp_path / "full", max_steps=6, callbacks=[])
    _monitor(every_n_steps=2).attach(full)
    full.train()
    expected = _logged(full)
    assert sorted(expected) == [0, 2, 4, 6]

    first = _trainer(tmp_path / "run", max_steps=6, callbacks=[], save_steps=3)
    _monitor(every_n_steps=2).attach(first)
    first.train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / MONITOR_STATE_FILE).is_file()

    resumed = _trainer(tmp_path / "run", max_steps=6, callbacks=[])
    _monitor(every_n_steps=2).attach(resumed)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    after = {s: v for s, v in _logged(resumed).items() if s > 3}
    assert sorted(after) == [4, 6]  # no new reference at the resumed step
    for step, value in after.items():
        assert value == pytest.approx(expected[step], rel=1e-6, abs=1e-9)


def test_gate_warn_warns_once_and_training_continues(tmp_path: Path) -> None:
    gate = KernelDriftGateCallback({"ntk/rel_change": 1e-9}, action="warn")
    trainer = _trainer(tmp_path, max_steps=3, callbacks=[gate])
    _monitor(every_n_steps=1).attach(trainer)
    with pytest.warns(KernelDriftWarning) as caught:
        trainer.train()
    assert trainer.state.global_step == 3 and gate.trip_step == 1
    assert len([w for w in caught if issubclass(w.category, KernelDriftWarning)]) == 1
