"""KernelRegimeMonitor under Lightning's ModelParallelStrategy with FSDP2 (issue 9, item 2).

Two gloo processes are started by the test (``torch.multiprocessing``, with ``LOCAL_RANK`` set,
so Lightning treats them as externally launched instead of re-running pytest); each builds the
Trainer with ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` and a
module that applies ``fully_shard`` in ``configure_model``. The monitor's metrics on every rank
must equal a single-process :class:`KernelTracker` on the same weights (gathered by the test,
never by the monitor) and probe. ``FSDPStrategy`` (FSDP1) stays refused: Lightning refuses it
on CPU itself, and the monitor refuses it at ``setup``.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import socket
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or sys.platform == "win32",
    reason="needs torch.distributed with gloo",
)

STEPS = 3
LR = 0.2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 3)
    )


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (16,), generator=g
    )


def _lit_class():
    import lightning.pytorch as L

    class Sharded(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net().double()

        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for i in (0, 2, 4):
                fully_shard(self.net[i], mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

        def train_dataloader(self):
            x, y = _data()
            ds = torch.utils.data.TensorDataset(x, y)
            return torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)

    return Sharded


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
        RANK=str(rank),
    )
    torch.set_num_threads(1)
    import lightning.pytorch as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lazy_monitor.callbacks.lightning import KernelRegimeMonitor
    from lazy_monitor.tracking.sharded import ShardedMeasurement

    x, y = _data()
    monitor = KernelRegimeMonitor(
        probe=(x[:5], y[:5]),
        every_n_steps=1000,
        kernel={"kind": "full"},
        split_across_ranks=False,
        log_spaced_until=0,
        max_overhead=None,
    )

    class Record(L.Callback):
        def on_train_end(self, trainer, pl_module):
            tracker = monitor.tracker
            local = max(p.to_local().numel() for p in pl_module.parameters())
            full = {k: v.full_tensor().clone() for k, v in pl_module.state_dict().items()}
            record = {
                "metrics": monitor.last_metrics,
                "sharded": isinstance(tracker.measurement, ShardedMeasurement),
                "world": tracker.sharding.world_size,
                "largest_local": local,
                "step": trainer.global_step,
            }
            with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
                json.dump(record, f)
            if trainer.global_rank == 0:
                torch.save(full, os.path.join(out_dir, "final.pt"))

    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=STEPS,
        callbacks=[monitor, Record()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
    )
    trainer.fit(_lit_class()())


def test_model_parallel_fsdp2_metrics_equal_a_single_process_run(tmp_path):
    import torch.multiprocessing as mp

    from lazy_monitor import KernelConfig, KernelTracker
    from lazy_monitor.tracking.layers import DEFAULT_LAYER_GROUPS

    # forkserver: the heavy imports happen once in the server, not in each process
    multiprocessing.set_forkserver_preload(
        ["lightning.pytorch", "lazy_monitor.callbacks.lightning"]
    )
    mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="forkserver"
    )
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert [r["sharded"] for r in ranks] == [True, True]
    assert [r["world"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [STEPS] * 2
    assert ranks[0]["largest_local"] == 50  # the 10x10 weight: half of it per rank
    got = ranks[0]["metrics"]
    assert got.keys() == ranks[1]["metrics"].keys()
    assert all(
        a == b or (math.isnan(a) and math.isnan(b))
        for a, b in zip(got.values(), ranks[1]["metrics"].values())
    )

    x, y = _data()
    single = _lit_class()()  # unsharded: configure_model is Lightning's to call
    tracker = KernelTracker(
        single,
        x[:5],
        targets=y[:5],
        kernel=KernelConfig(kind="full"),
        layer_groups=DEFAULT_LAYER_GROUPS,
    )
    tracker.start(lr=LR)
    single.load_state_dict(torch.load(tmp_path / "final.pt"))
    want = tracker.measure(STEPS, lr=LR)
    assert got["params/rel_change"] > 0 and got["ntk/rel_change"] > 0
    for name, value in want.items():
        v = got[name]
        assert (math.isnan(v) and math.isnan(value)) or abs(v - value) <= 1e-6 * max(
            abs(value), 1e-12
        ), (name, v, value)


def test_fsdp1_strategy_is_refused_by_lightning_on_cpu_and_by_the_monitor_at_setup():
    import lightning.pytorch as L
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from lazy_monitor.callbacks.lightning import KernelRegimeMonitor

    with pytest.raises(ValueError, match="The strategy `fsdp` requires a GPU accelerator"):
        L.Trainer(accelerator="cpu", devices=2, strategy="fsdp")
    monitor = KernelRegimeMonitor(probe_size=4, log_spaced_until=0, max_overhead=None)
    lit = _lit_class()()
    with pytest.raises(ValueError, match=r"does not support FSDPStrategy.*ModelParallelStrategy"):
        monitor.setup(SimpleNamespace(strategy=FSDPStrategy()), lit, "fit")
    monitor.setup(SimpleNamespace(strategy=ModelParallelStrategy()), lit, "fit")  # accepted
