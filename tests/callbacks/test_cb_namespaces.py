"""Both namespaces: the adapters run under their Trainer and load from LightningCLI YAML."""

from __future__ import annotations

import csv
import importlib
import os
import sys

import pytest
import torch
from _cb_helpers import MODULES, NAMESPACES, trainer_kwargs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))


@pytest.mark.parametrize("ns", ["lightning", "pytorch_lightning"])
def test_adapter_is_a_callback_of_its_namespace_and_runs_there(tmp_path, ns):
    pl = NAMESPACES[ns]
    adapters = importlib.import_module(f"lazy_monitor.callbacks.{ns}")
    monitor = adapters.KernelRegimeMonitor(
        probe_size=8, every_n_steps=3, log_spaced_until=0, max_overhead=None
    )
    gate = adapters.KernelDriftGate({"ntk/rel_change": 1e9})
    assert isinstance(monitor, pl.Callback) and isinstance(gate, pl.Callback)
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv", version=0)
    torch.manual_seed(0)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=6, logger=logger, callbacks=[monitor, gate])
    )
    trainer.fit(MODULES[ns]())
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    logged = {int(r["step"]): float(r["ntk/rel_change"]) for r in rows if r["ntk/rel_change"]}
    assert sorted(logged) == [0, 3, 6] and logged[0] == 0.0  # train end = last cadence step
    assert float(trainer.callback_metrics["ntk/rel_change"]) == pytest.approx(logged[6], rel=1e-6)


def test_default_namespace_is_pytorch_lightning():
    import pytorch_lightning as PL

    from lazy_monitor import KernelDriftGate, KernelRegimeMonitor

    assert issubclass(KernelRegimeMonitor, PL.Callback)
    assert issubclass(KernelDriftGate, PL.Callback)


@pytest.mark.parametrize(
    "ns, config",
    [
        ("lightning", "lightning_cli.yaml"),
        ("pytorch_lightning", "lightning_cli_pytorch_lightning.yaml"),
    ],
)
def test_lightning_cli_yaml_instantiates_and_runs_the_callbacks(tmp_path, ns, config):
    import lightning_cli

    adapters = importlib.import_module(f"lazy_monitor.callbacks.{ns}")
    args = [
        "fit",
        "--config",
        os.path.join(ROOT, "examples", config),
        "--trainer.max_steps=4",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--model.width=16",
        "--model.n_train=64",
    ]
    cli = lightning_cli.main(args, namespace=ns)
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, adapters.KernelRegimeMonitor)]
    (gate,) = [c for c in cli.trainer.callbacks if isinstance(c, adapters.KernelDriftGate)]
    assert (monitor.probe_size, monitor.every_n_steps, monitor.log_spaced_until) == (32, 50, 64)
    assert {(t.metric, t.direction, t.value) for t in gate.thresholds} == {
        ("ntk/rel_change", "max", 0.5),
        ("lin/rel_error", "max", 0.5),
    }
    assert gate.patience == 2 and gate.action == "warn"
    assert monitor.kernel.kind == "full" and monitor.tensorboard == "full"
    assert monitor.max_overhead == 0.05  # the default budget: of steps 1, 2 (log-spaced) it
    # keeps what fits; the reference (0) and the end (4) are always measured
    assert cli.trainer.global_step == 4 and 2 <= monitor.num_measurements <= 4
    assert monitor.session.last_step == 4
