"""Issue 9 in Lightning: kernel split across DDP ranks, the overhead budget, sharded strategies."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import lightning.pytorch as L
import pytest
import torch
from _cb_helpers import LitLightning, RecordingLogger, make_data, trainer_kwargs

from lazy_monitor import KernelTracker
from lazy_monitor.callbacks.lightning import KernelRegimeMonitor

STEPS = 4


class _RankRecorder(L.Callback):
    """After the monitor's final measurement: each rank's metrics and whether it split."""

    def __init__(self, out_dir: str, monitor: KernelRegimeMonitor) -> None:
        self.out_dir, self.monitor = out_dir, monitor

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        tracker = self.monitor.tracker
        record = {
            "metrics": self.monitor.last_metrics,
            "step": trainer.global_step,
            "world": None if tracker.sharding is None else tracker.sharding.world_size,
        }
        with open(os.path.join(self.out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)
        if rank == 0:
            torch.save(pl_module.state_dict(), os.path.join(self.out_dir, "final.pt"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_split_across_two_ddp_ranks_equals_a_single_process_run(tmp_path):
    torch.manual_seed(0)
    module = LitLightning(n=32, batch_size=4, width=12)
    init = {k: v.double().clone() for k, v in module.state_dict().items()}
    probe_x, probe_y = make_data(6, seed=3).tensors
    monitor = KernelRegimeMonitor(
        probe=(probe_x.double(), probe_y),
        every_n_steps=1000,
        split_across_ranks=True,
        log_spaced_until=0,
        max_overhead=None,
    )
    trainer = L.Trainer(
        **trainer_kwargs(
            tmp_path,
            strategy="ddp_spawn",
            devices=2,
            max_steps=STEPS,
            precision="64-true",
            callbacks=[monitor, _RankRecorder(str(tmp_path), monitor)],
            deterministic=False,
        )
    )
    trainer.fit(module)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [STEPS] * 2
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # identical on every rank
    split = ranks[0]["metrics"]
    assert split["params/rel_change"] > 0 and "ntk_layer/net.0/rel_change" in split

    # single process, same θ₀, same final weights, same probe
    single = LitLightning(n=32, batch_size=4, width=12).double()
    single.load_state_dict(init)
    tracker = KernelTracker(single, probe_x.double(), targets=probe_y)
    tracker.start(lr=single.hparams.lr)
    single.load_state_dict(torch.load(tmp_path / "final.pt"))
    expected = tracker.measure(STEPS, lr=single.hparams.lr)  # the monitor passes the SGD lr
    assert list(split) == list(expected) + ["monitor/seconds", "monitor/overhead"]
    for name, value in expected.items():
        got = split[name]
        assert (math.isnan(got) and math.isnan(value)) or abs(got - value) <= 1e-6 * max(
            abs(value), 1e-12
        ), (name, got, value)


def _fit_with_budget(tmp_path, max_overhead: float, steps: int = 12):
    logger = RecordingLogger()
    monitor = KernelRegimeMonitor(
        probe_size=8, every_n_steps=2, max_overhead=max_overhead, log_spaced_until=0
    )
    torch.manual_seed(0)
    trainer = L.Trainer(
        **trainer_kwargs(tmp_path, max_steps=steps, logger=logger, callbacks=[monitor])
    )
    trainer.fit(LitLightning(n=64, batch_size=8))
    return monitor, logger


def test_a_tight_budget_keeps_only_the_start_and_the_final_measurement(tmp_path):
    monitor, logger = _fit_with_budget(tmp_path, 1e-9)
    assert sorted(logger.series("ntk/rel_change")) == [0, 12]
    seconds = logger.series("monitor/seconds")
    overhead = logger.series("monitor/overhead")
    assert sorted(seconds) == [0, 12] and all(v > 0 for v in seconds.values())
    assert 0 < overhead[12] <= 1 and overhead[0] > 0
    state = monitor.state_dict()["budget"]
    assert state["measured_seconds"] == pytest.approx(monitor.measure_seconds)
    assert state["elapsed_seconds"] >= state["measured_seconds"]


def test_a_loose_budget_follows_the_schedule_and_without_one_the_cost_is_still_logged(tmp_path):
    _, loose = _fit_with_budget(tmp_path / "loose", 1.0)
    assert sorted(loose.series("ntk/rel_change")) == [0, 2, 4, 6, 8, 10, 12]
    assert sorted(loose.series("monitor/overhead")) == [0, 2, 4, 6, 8, 10, 12]
    logger = RecordingLogger()
    monitor = KernelRegimeMonitor(
        probe_size=8, every_n_steps=6, log_spaced_until=0, max_overhead=None
    )
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=6, logger=logger, callbacks=[monitor]))
    trainer.fit(LitLightning(n=64, batch_size=8))
    # monitor/* always: the share of the wall time that the monitor took, budget or not
    seconds, overhead = logger.series("monitor/seconds"), logger.series("monitor/overhead")
    assert sorted(seconds) == sorted(logger.series("ntk/rel_change")) == [0, 6]
    assert all(v > 0 for v in seconds.values()) and 0 < overhead[6] <= 1


@pytest.mark.parametrize("bad,err", [(0.0, ValueError), (2.0, ValueError), ("3%", TypeError)])
def test_max_overhead_and_split_are_validated_at_construction(bad, err):
    with pytest.raises(err, match="max_overhead"):
        KernelRegimeMonitor(max_overhead=bad, log_spaced_until=0)
    with pytest.raises(TypeError, match="split_across_ranks"):
        KernelRegimeMonitor(split_across_ranks="yes", log_spaced_until=0, max_overhead=None)


@pytest.mark.parametrize("name", ["FSDPStrategy"])
def test_setup_rejects_strategies_that_shard_parameters(name):
    from lightning.pytorch import strategies

    strategy = getattr(strategies, name)()
    monitor = KernelRegimeMonitor(probe_size=4, log_spaced_until=0, max_overhead=None)
    trainer = SimpleNamespace(strategy=strategy)
    with pytest.raises(
        ValueError, match=rf"does not support {name}.*ModelParallelStrategy with fully_shard"
    ):
        monitor.setup(trainer, LitLightning(), "fit")
