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
TAG = "ntk/rel_change"  # the monitor's own tags, like a Lightning run (no "train/" prefix)


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
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def _collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        k: torch.stack([it[k] for it in items]) for k in ("input_ids", "attention_mask", "labels")
    }


def _trainer(
    tmp: Path,
    max_steps: int,
    callbacks: list[Any],
    save_steps: int = 0,
    logging_steps: int = 1,
) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        report_to=["tensorboard"],
        use_cpu=True,
        logging_steps=logging_steps,
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
    # exact schedules: no log-spaced steps, no budget unless a test asks
    kwargs = {"log_spaced_until": 0, "max_overhead": None, **kwargs}
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


def _tags(tmp: Path) -> dict[str, Any]:
    """Every tag kind of every event file under the Trainer's TensorBoard run directory."""
    tags: dict[str, set[str]] = {}
    for run_dir in sorted({p.parent for p in (tmp / "runs").rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0}).Reload()
        for kind, names in acc.Tags().items():
            if isinstance(names, list):
                tags.setdefault(kind, set()).update(names)
        tags.setdefault("hparams", set()).update(acc.PluginTagToContent("hparams"))
    return tags


def test_metrics_land_in_the_trainers_tensorboard_at_global_steps(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, max_steps=5, callbacks=[])
    monitor = _monitor(every_n_steps=2).attach(trainer)
    trainer.train()
    x, y = monitor.session.current_probe  # drawn: the forward's inputs, sequence labels dropped
    assert set(x) == {"input_ids", "attention_mask"} and y is None
    assert x["input_ids"].shape == (4, SEQ)
    scalars = _scalars(tmp_path)
    assert sorted(scalars) == [0, 2, 4, 5]  # start, schedule, last step
    assert scalars[0] == 0.0 and all(scalars[s] > 0 for s in (2, 4, 5))
    assert _logged(trainer) == pytest.approx(scalars)  # same values in state.log_history
    tags = _tags(tmp_path)
    assert "train/loss" in tags["scalars"]  # the Trainer's own, next to ours
    assert {"monitor/seconds", "monitor/overhead", "drift/log10_ntk_rel_change"} <= tags["scalars"]
    # opt/lr from the Trainer's optimizer (linear decay: 5e-3 * (1 - 2/5) after step 2)
    assert _logged(trainer, "opt/lr")[2] == pytest.approx(5e-3 * 3 / 5)


def test_tensorboard_extras_of_a_lightning_run_and_a_headline_console(tmp_path, capsys) -> None:
    trainer = _trainer(tmp_path, max_steps=4, callbacks=[])
    KernelRegimeCallback(
        probe_size=4, every_n_steps=2, log_spaced_until=0, max_overhead=None, tensorboard="full"
    ).attach(trainer)
    trainer.train()
    tags = _tags(tmp_path)
    assert "custom_scalars__config__" in tags["tensors"]  # the layout
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= tags["hparams"]
    assert {"lazy_monitor/1_verdict/text_summary"} <= tags["tensors"]
    assert "ntk/eigenvalues" in tags["histograms"] and "images/ntk_kernel" in tags["images"]
    assert "images/layer_drift" in tags["images"]  # per-layer heatmap (per_layer default)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "[lazy_monitor]" in ln]
    assert len(lines) == 3 and all(len(ln) < 200 for ln in lines)  # headline values only
    assert "ntk/rel_change=" in lines[-1] and "features/" not in lines[-1]


@pytest.mark.parametrize("logging_steps, every", [(2, 2), (1, 3), (3, 2)])
def test_the_trainers_own_logs_are_untouched(tmp_path: Path, logging_steps: int, every: int):
    def logs(trainer: Trainer) -> list[tuple[int, str, float]]:
        keys = ("loss", "grad_norm", "learning_rate")
        return [(e["step"], k, e[k]) for e in trainer.state.log_history for k in keys if k in e]

    plain = _trainer(tmp_path / "plain", 6, [], logging_steps=logging_steps)
    plain.train()
    watched = _trainer(tmp_path / "watched", 6, [], logging_steps=logging_steps)
    _monitor(every_n_steps=every).attach(watched)
    watched.train()
    expected = logs(plain)
    assert [s for s, k, _ in expected if k == "loss"] == list(
        range(logging_steps, 7, logging_steps)
    )
    assert logs(watched) == expected
    assert _scalars(tmp_path / "watched", "train/loss") == _scalars(
        tmp_path / "plain", "train/loss"
    )


def test_a_budget_is_enforced_under_the_trainer(tmp_path: Path) -> None:
    import time

    class SlowSteps(transformers.TrainerCallback):
        # a step of a real model: 0.1 s (the tiny GPT-2's own step is ~100x cheaper than a
        # measurement, which no budget below 100 % can fit)
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            time.sleep(0.1)

    budget, steps = 0.3, 60
    trainer = _trainer(tmp_path, max_steps=steps, callbacks=[SlowSteps()])
    monitor = _monitor(every_n_steps=1, max_overhead=budget).attach(trainer)
    trainer.train()
    overhead = _logged(trainer, "monitor/overhead")
    assert 3 <= len(overhead) < steps + 1  # the budget skipped scheduled steps
    # every scheduled measurement kept the monitor's share (all its seconds: measurements,
    # TensorBoard, the probe draw) within the budget; only the reference (step 0) and the
    # final one are taken whatever they cost
    scheduled = {s: v for s, v in overhead.items() if 0 < s < steps}
    assert scheduled and max(scheduled.values()) <= budget * 1.1, overhead
    accounted = monitor.session.budget.measured_seconds
    assert accounted == pytest.approx(monitor.session.seconds, rel=1e-9)


def test_unattached_callback_says_how_to_attach(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, max_steps=1, callbacks=[_monitor()])
    with pytest.raises(RuntimeError, match=r"attach\(trainer\)"):
        trainer.train()


def test_a_callback_run_by_another_trainer_names_the_fix(tmp_path: Path) -> None:
    monitor = _monitor()
    monitor.attach(_trainer(tmp_path / "a", max_steps=1, callbacks=[]))
    other = _trainer(tmp_path / "b", max_steps=1, callbacks=[monitor])
    with pytest.raises(RuntimeError, match=r"another Trainer.*attach\(trainer\)"):
        other.train()


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


def test_default_output_fn_reads_the_last_real_token_of_padded_probes() -> None:
    from lazy_monitor.core.kernels import empirical_ntk
    from lazy_monitor.integrations.transformers import _measuring, last_token_logits
    from tests._reference import reference_ntk

    model = _model().eval()
    ids = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # right padding: last real token at 4
    mask[1, :2] = 0  # left padding: last real token at SEQ - 1
    mask[2, 3:] = 0
    probe = {"input_ids": ids, "attention_mask": mask}
    last = torch.tensor([4, SEQ - 1, 2])

    def at_last_real(out: Any) -> torch.Tensor:
        return out.logits[torch.arange(3), last]

    with torch.no_grad(), _measuring(model):
        picked = last_token_logits(model(**probe))
    torch.testing.assert_close(picked, at_last_real(model(**probe)))
    with _measuring(model):
        kernel = empirical_ntk(model, probe, output_fn=last_token_logits, kind="trace")
    expected, _ = reference_ntk(model, probe, output_fn=at_last_real, kind="trace")
    torch.testing.assert_close(kernel.double(), expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(picked, model(**probe).logits[:, -1])  # position -1 differs


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


def test_explicit_signatures() -> None:
    import inspect

    for cls in (KernelRegimeCallback, KernelDriftGateCallback):
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        assert all(p.kind is not p.VAR_KEYWORD and p.kind is not p.VAR_POSITIONAL for p in params)
        assert all(p.kind is p.KEYWORD_ONLY for p in params[1:])
    assert len(inspect.signature(KernelRegimeCallback.__init__).parameters) - 1 <= 16
