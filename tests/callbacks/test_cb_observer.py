"""The monitor observes without touching: training is bit-identical with and without it."""

from __future__ import annotations

import lightning.pytorch as L
import torch
from _cb_helpers import LitLightning, trainer_kwargs

from lazy_monitor.callbacks.lightning import KernelDriftGate, KernelRegimeMonitor


def _train(tmp_path, callbacks):
    L.seed_everything(123, workers=True)
    model = LitLightning(norm=True, dropout=0.3, width=16, n=48, batch_size=8, shuffle=True)
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=14, callbacks=callbacks))
    trainer.fit(model)
    return model, torch.get_rng_state()


def test_final_weights_buffers_and_rng_are_bit_identical_with_the_monitor(tmp_path):
    plain, rng_plain = _train(tmp_path / "a", [])
    monitor = KernelRegimeMonitor(
        probe_size=8, every_n_steps=3, log_spaced_until=4, max_overhead=None
    )
    gate = KernelDriftGate({"ntk/rel_change": 1e9}, action="raise")
    watched, rng_watched = _train(tmp_path / "b", [monitor, gate])
    assert monitor.num_measurements >= 6  # start, 1, 2, 3, 6, 9, 12, end
    # with the stability and feature metrics on (hooks in the tracker's forward, lr read)
    last = monitor.last_metrics
    cka = [k for k in last if k.startswith("features/")]
    assert len(cka) >= 2 and all(0.0 < last[k] <= 1.0 for k in cka), last  # hidden layers
    assert last["opt/lr"] == 0.1 and last["ntk/lr_eig_max"] > 0
    plain_state, watched_state = plain.state_dict(), watched.state_dict()
    assert plain_state.keys() == watched_state.keys()
    for name, value in plain_state.items():  # includes BatchNorm running stats
        assert torch.equal(value, watched_state[name]), name
    assert torch.equal(rng_plain, rng_watched)
    assert watched.training  # train/eval flags restored
    assert all(p.grad is not None for p in watched.parameters())
