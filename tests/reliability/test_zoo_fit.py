"""No hook of the monitor or the gate raises on any model of the real-model zoo (issue 13).

A short Lightning fit per model of ``tests/_zoo.py`` (GPT-2 from a config, TransformerEncoder in
both layouts, MultiheadAttention, LSTM/GRU, PReLU, a custom ``autograd.Function``,
ConvTranspose, every norm, ...) with the monitor measuring every 2 steps and a warn-only gate:
the fit must finish and every measurement be finite. On ``beec677`` the LSTM (float32: no
forward-mode AD for ``mkldnn_rnn_layer``) and TransformerEncoder runs aborted ``fit`` at the
first scheduled measurement.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _rel_fit import lit, trainer
from _zoo import ZOO, build
from torch.utils.data import TensorDataset

from lazy_monitor.callbacks.lightning import KernelDriftGate, KernelRegimeMonitor


class _Record:
    """Listener on the monitor: every measurement it hands to the gate."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, dict[str, float]]] = []

    def on_measurement(self, session, step, metrics, *, final, repeat) -> None:
        if not repeat:  # train end right after a scheduled measurement hands it over again
            self.seen.append((step, dict(metrics)))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_short_fit_on_every_zoo_model(tmp_path, name):
    case = build(name)
    case.model.train()
    x = case.x
    data = TensorDataset(x)
    monitor = KernelRegimeMonitor(
        probe=x,
        every_n_steps=2,
        log_spaced_until=0,
        max_overhead=None,
        output_fn=case.output_fn,
        per_layer=True,
        tensorboard="basic",
    )
    gate = KernelDriftGate({"ntk/rel_change": 0.5, "lin/rel_error": 0.5}, action="warn")
    record = _Record()
    monitor.session.add_listener(record)

    def loss(out: torch.Tensor) -> torch.Tensor:
        return out.float().pow(2).mean()

    module = lit(case.model, data, loss=loss, output_fn=case.output_fn, batch_size=len(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # engine fallbacks and drift warnings are allowed
        t = trainer(tmp_path, [monitor, gate], max_steps=4)
        t.fit(module)
    assert t.global_step == 4
    assert [step for step, _ in record.seen] == [0, 2, 4]
    for step, metrics in record.seen:
        assert metrics["health/nonfinite"] == 0.0, (step, metrics)
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        assert not bad, (step, bad)
