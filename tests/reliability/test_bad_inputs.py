"""Bad inputs are refused at construction (or train start) with a message naming the user's
value and the fix -- never accepted and then failing mid-training (issue 13).

Each test names the row of issue 13's table it reproduces; every one failed on ``beec677``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _rel_fit import classification_data, lit, mlp, trainer
from torch import nn
from torch.utils.data import TensorDataset

from lazy_monitor import KernelTracker, empirical_ntk
from lazy_monitor.callbacks.lightning import KernelDriftGate, KernelRegimeMonitor
from lazy_monitor.tracking import measurement as tracker_module


# ---------------------------------------------------------------- non-finite probe / weights
def test_nonfinite_probe_is_refused_at_construction():
    # Row "NaN/inf in the probe": was `ValueError: atol must be >= 0, got nan` at start().
    probe = torch.randn(4, 6)
    probe[1, 2] = float("inf")
    with pytest.raises(ValueError, match="probe contains NaN or inf"):
        KernelTracker(mlp(), probe)


def test_nan_weight_at_start_gives_nan_metrics_and_the_health_flag():
    # Row "a NaN weight at start()": NaN metrics + health/nonfinite = 1, no raise.
    model = mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    tracker = KernelTracker(model, torch.randn(4, 6), targets=torch.tensor([0, 1, 2, 0]))
    out = tracker.start()
    assert out["health/nonfinite"] == 1.0
    assert out["regime/lazy"] == 0.0
    assert math.isnan(out["ntk/rel_change"]) and math.isnan(out["lin/rel_error"])
    assert tracker.measure(1)["health/nonfinite"] == 1.0


# ---------------------------------------------------------------- shapes and several inputs
def test_shape_error_names_the_probe_shape_and_the_models_expectation():
    # Row "wrong feature width": was the raw "(1x7 and 10x32)" of an internal one-example slice.
    with pytest.raises(RuntimeError) as info:
        KernelTracker(
            nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 2)), torch.randn(8, 7)
        )
    text = str(info.value)
    assert "(8, 7)" in text and "in_features" in text and "10" in text
    assert "1x7" not in text


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(2, 4), nn.Linear(4, 2)

    def forward(self, xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.a(xa) + self.b(xb)))


def _two_input_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(16, 3, generator=g),
        torch.randn(16, 2, generator=g),
        torch.randint(0, 2, (16,), generator=g),
    )


def test_two_input_probe_pair_is_refused_with_the_unambiguous_form(tmp_path):
    # Row "forward(xa, xb) with probe=(xa, xb)": xb was silently taken as targets, then
    # "forward() missing 1 required positional argument" at train start with no hint.
    xa, xb = torch.randn(4, 3), torch.randn(4, 2)
    monitor = KernelRegimeMonitor(probe=(xa, xb), every_n_steps=2)
    with pytest.raises(TypeError, match=r"probe=\(\(a, b\), y\)"):
        trainer(tmp_path, [monitor]).fit(lit(_TwoInputs(), _two_input_data()))


def test_two_input_probe_nested_form_works(tmp_path):
    xa, xb = torch.randn(4, 3), torch.randn(4, 2)
    monitor = KernelRegimeMonitor(probe=((xa, xb), torch.tensor([0, 1, 0, 1])), every_n_steps=2)
    trainer(tmp_path, [monitor]).fit(lit(_TwoInputs(), _two_input_data()))
    assert monitor.tracker.probe_size == 4
    assert "ntk/alignment" in monitor.metric_names()
    assert math.isfinite(float(monitor.last_metrics["ntk/rel_change"]))


def test_drawn_three_field_batches_get_the_batch_to_probe_hint(tmp_path):
    # Row "drawn (a, b, y) batches: same".
    monitor = KernelRegimeMonitor(probe_size=4, every_n_steps=2)
    with pytest.raises(
        TypeError, match=r"batch_to_probe=lambda batch: \(\(batch\[0\], batch\[1\]\)"
    ):
        trainer(tmp_path, [monitor]).fit(lit(_TwoInputs(), _two_input_data()))


def test_drawn_three_field_batches_with_batch_to_probe_work(tmp_path):
    monitor = KernelRegimeMonitor(
        probe_size=4, every_n_steps=2, batch_to_probe=lambda b: ((b[0], b[1]), b[2])
    )
    trainer(tmp_path, [monitor]).fit(lit(_TwoInputs(), _two_input_data()))
    assert monitor.last_metrics["health/nonfinite"] == 0.0


def test_tracker_takes_a_tuple_of_inputs_positionally():
    model = _TwoInputs()
    tracker = KernelTracker(model, (torch.randn(4, 3), torch.randn(4, 2)))
    assert tracker.start()["health/nonfinite"] == 0.0


# ---------------------------------------------------------------- models the engine must take
def test_gru_through_the_tracker():
    # Row "nn.GRU through KernelTracker": was a raw vmap error at construction.
    class Gru(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    model = Gru()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the engine's vmap -> loop notice
        tracker = KernelTracker(model, torch.randn(4, 5, 3))
        out = tracker.start()
        with torch.no_grad():
            model.head.weight.mul_(1.5)
        after = tracker.measure(1)
    assert out["health/nonfinite"] == 0.0 and after["ntk/rel_change"] > 0


def test_building_the_tracker_computes_no_kernel_of_the_full_output_size(monkeypatch):
    # Row "ResNet-18, 1000-class head, 224², probe 32": the construction-time trial kernel was
    # a full (1, 1, O, O) kernel with O = 1000 (75 s, 9.8 GiB). The dry run must cost O = 1.
    shapes = []
    real = tracker_module.empirical_ntk

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        shapes.append(tuple((out[0] if isinstance(out, tuple) else out).shape))
        return out

    monkeypatch.setattr(tracker_module, "empirical_ntk", spy)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 1000),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the spectrum-size warning (N·O = 4000)
        KernelTracker(model, torch.randn(4, 3, 16, 16))
    assert shapes == [(1, 1)], shapes


# ---------------------------------------------------------------- constructors validate
def test_gate_rejects_a_negative_bound_at_construction():
    # Row "KernelDriftGate({'ntk/rel_change': -0.1})": accepted, then tripped at step 0.
    with pytest.raises(ValueError, match="never negative"):
        KernelDriftGate({"ntk/rel_change": -0.1})
    with pytest.raises(ValueError, match="at most 1"):
        KernelDriftGate({"ntk/eig_overlap": 1.5})


def test_gate_glob_is_applied_not_rejected_at_train_start(tmp_path):
    # Row "KernelDriftGate({'ntk_layer/*/rel_change': 0.5})": accepted, rejected at train start.
    monitor = KernelRegimeMonitor(probe_size=4, every_n_steps=2)
    gate = KernelDriftGate({"ntk_layer/*/rel_change": 1e-12}, action="warn")
    with pytest.warns(UserWarning, match=r"ntk_layer/.*/rel_change = "):
        trainer(tmp_path, [monitor, gate]).fit(lit(mlp(), classification_data()))
    assert gate.tripped


def test_empirical_ntk_rejects_a_non_callable_output_fn():
    # Row "empirical_ntk(output_fn=5)": was `'int' object is not callable` from inside.
    with pytest.raises(TypeError, match="output_fn must be callable"):
        empirical_ntk(nn.Linear(2, 2), torch.randn(3, 2), output_fn=5)
