"""KernelTracker: changing trainable sets, batch-coupled models, data-dependent control flow."""

import math
import warnings

import pytest
import torch
from torch import nn

from lazy_monitor import KernelTracker, empirical_ntk
from lazy_monitor.core.kernels.structured import planning as st_planning
from lazy_monitor.demo.models import mlp
from lazy_monitor.tracking import KernelConfig


def _data(n=8, dim=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.arange(n) % classes


def _train(model, x, y, steps, lr=0.5):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _set_trainable(module, flag):
    for p in module.parameters():
        p.requires_grad_(flag)


# ------------------------------------------------------------------ trainable set changes


def test_layer_frozen_at_start_and_unfrozen_later_keeps_the_start_set():
    x, y = _data()
    model = mlp(5, 32, 3, depth=2, seed=0)
    _set_trainable(model.fc1, False)  # e.g. BackboneFinetuning freezes in on_fit_start
    tracker = KernelTracker(model, x, targets=y)
    names0 = tracker.metric_names()
    assert list(tracker.start()) == names0
    assert tracker.layers == ["fc2", "readout"]
    _set_trainable(model.fc1, True)  # ... and unfreezes later
    _train(model, x, y, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = tracker.measure(3)
    assert list(out) == names0
    assert out["health/nonfinite"] == 0.0 and out["ntk/rel_change"] > 0
    tracked = {n: p.detach() for n, p in model.named_parameters() if not n.startswith("fc1.")}
    ref = empirical_ntk(model, x, params=tracked, implementation="jacobian")
    torch.testing.assert_close(tracker.last_kernel, ref, rtol=1e-4, atol=1e-5)


def test_layer_trainable_at_start_and_frozen_later_stays_in_the_kernel():
    x, y = _data()
    model = mlp(5, 32, 3, depth=2, seed=0)
    tracker = KernelTracker(model, x, targets=y)
    tracker.start()
    _train(model, x, y, 2)
    _set_trainable(model.fc1, False)  # progressive freezing in a plain loop
    _train(model, x, y, 2)
    out = tracker.measure(4)
    assert out["health/nonfinite"] == 0.0
    assert "ntk_layer/fc1/rel_change" in out and out["ntk_layer/fc1/rel_change"] > 0
    ref = empirical_ntk(
        model,
        x,
        params={n: p.detach() for n, p in model.named_parameters()},
        implementation="jacobian",
    )
    torch.testing.assert_close(tracker.last_kernel, ref, rtol=1e-4, atol=1e-5)
    # f_lin and the parameter metrics are over the same set: fc1 moved before freezing
    assert out["params_layer/fc1/rel_change"] > 0
    # the state round trip keeps the start set even if the new tracker is built while frozen
    fresh = KernelTracker(model, x, targets=y)
    assert "ntk_layer/fc1/rel_change" not in fresh.metric_names()
    fresh.load_state_dict(tracker.state_dict())
    assert fresh.metric_names() == tracker.metric_names()
    _train(model, x, y, 1)
    assert fresh.measure(5) == pytest.approx(tracker.measure(5), nan_ok=True)


def test_removed_or_reshaped_parameter_gives_nan_metrics_and_one_warning():
    x, y = _data()
    model = mlp(5, 32, 3, depth=2, seed=0)
    tracker = KernelTracker(model, x, targets=y)
    tracker.start()
    model.readout = nn.Linear(32, 3, bias=False)  # readout.bias disappears
    with pytest.warns(RuntimeWarning, match="no longer parameters"):
        out = tracker.measure(1)
    assert list(out) == tracker.metric_names()
    assert out["health/nonfinite"] == 1.0 and out["regime/lazy"] == 0.0
    assert math.isnan(out["ntk/rel_change"]) and math.isnan(out["lin/rel_error"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # warned once only
        assert tracker.measure(2)["health/nonfinite"] == 1.0

    model2 = mlp(5, 32, 3, depth=2, seed=0)
    tracker2 = KernelTracker(model2, x, targets=y)
    tracker2.start()
    model2.fc2 = nn.Linear(32, 16)
    model2.readout = nn.Linear(16, 3)
    with pytest.warns(RuntimeWarning, match="changed shape"):
        out = tracker2.measure(1)
    assert out["health/nonfinite"] == 1.0


# ------------------------------------------------------------------ batch coupling


class _CentredMLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(5, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x - x.mean(0))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_coupled_model_is_rejected_at_start_without_side_effects(dtype):
    x, _ = _data()
    model = _CentredMLP().to(dtype)
    model.train()
    x = x.to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    tracker = KernelTracker(model, x)
    with pytest.raises(ValueError, match="depends on the other examples"):
        tracker.start()
    assert not tracker.started and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_independent_examples_pass_the_batch_coupling_check(dtype):
    x, y = _data()
    model = mlp(5, 32, 3, depth=2, seed=0).to(dtype)
    KernelTracker(model, x.to(dtype), targets=y).start()


def test_batch_coupling_check_is_skipped_for_a_single_example():
    x, _ = _data(n=1)
    KernelTracker(_CentredMLP(), x, kernel=KernelConfig(kind="trace")).start()


# ------------------------------------------------------------------ data-dependent control flow


class _Branchy(nn.Module):
    """Value-dependent control flow (same per-example function on both branches): with
    chunk_size=1 the structured plan made on the first example does not hold for the others."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(5, 16)
        self.b = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if x[0, 0] > 0:
            return self.b(h)
        # a copy of Wᵀ has no rule (``h @ W.t()`` alone is a Linear use, like the other branch)
        return h @ self.b.weight.t().contiguous() + self.b.bias


def _branchy_data():
    x, y = _data()
    x[0, 0], x[1, 0] = 1.0, -1.0  # the first two examples take different branches
    return x, y


def test_data_dependent_control_flow_falls_back_inside_the_engine(monkeypatch):
    # The fallback to the Jacobian contraction is the engine's (one decision per call); the
    # tracker keeps implementation="auto" and measures the exact kernel at every call. (auto
    # would price this tiny model onto the Jacobian path before any structured pass: priced
    # onto the structured path here, so the plan's failure and the fallback are exercised.)
    monkeypatch.setattr(st_planning, "choose_path", lambda *a: ("structured", set(), {}))
    x, y = _branchy_data()
    model = _Branchy()
    tracker = KernelTracker(model, x, targets=y, kernel=KernelConfig(chunk_size=1))
    with pytest.warns(RuntimeWarning, match="Jacobian contraction"):
        out = tracker.start()
    assert tracker.kernel_config["implementation"] == "auto"
    assert out["health/nonfinite"] == 0.0
    ref = empirical_ntk(model, x, kind=tracker.kernel_config["kind"], implementation="jacobian")
    torch.testing.assert_close(tracker.kernel0, ref)
    _train(model, x, y, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = tracker.measure(2)
    assert out["health/nonfinite"] == 0.0 and out["ntk/rel_change"] > 0
    ref = empirical_ntk(model, x, kind=tracker.kernel_config["kind"], implementation="jacobian")
    torch.testing.assert_close(tracker.last_kernel, ref)


def test_explicit_structured_implementation_still_raises_on_control_flow():
    x, _ = _branchy_data()
    tracker = KernelTracker(
        _Branchy(), x, kernel=KernelConfig(implementation="structured", chunk_size=1)
    )
    with pytest.raises(RuntimeError, match="implementation='jacobian'"):
        tracker.start()
