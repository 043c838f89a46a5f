"""KernelTracker's stability (opt/lr, ntk/lr_eig_max, regime/catapult) and feature CKA metrics."""

from __future__ import annotations

import io
import logging
import math
import warnings

import pytest
import torch
from torch import nn

from lazy_monitor import KernelTracker
from lazy_monitor.core.features import capture_features, linear_cka
from lazy_monitor.tracking import KernelConfig


def _x() -> torch.Tensor:
    return torch.tensor(
        [[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [3.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64
    )


def _mlp(out: int = 2, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 7), nn.Tanh(), nn.Linear(7, out)).double()


def _sgd(model: nn.Module, x: torch.Tensor, steps: int = 5, lr: float = 0.5) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    y = torch.sin(3 * x.sum(1, keepdim=True)).expand(-1, model[-1].out_features)
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


# ------------------------------------------------------------------ stability


def test_lr_eig_max_is_lr_times_hand_lambda_max_over_n():
    # f(x) = w·x + b: J = [x, 1], so K = X Xᵀ + 1 1ᵀ exactly (no autograd in the reference).
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    x = _x()
    lam = float(torch.linalg.eigvalsh(x @ x.T + 1.0).max())
    tracker = KernelTracker(model, x, per_layer=False)
    start = tracker.start(lr=0.05)
    assert start["opt/lr"] == 0.05
    assert start["ntk/lr_eig_max"] == pytest.approx(0.05 * lam / 4, rel=1e-12)
    with torch.no_grad():
        model.weight.add_(1.0)  # a linear model's kernel does not depend on its weights
    out = tracker.measure(1, lr=0.2)
    assert out["opt/lr"] == 0.2
    assert out["ntk/lr_eig_max"] == pytest.approx(0.2 * lam / 4, rel=1e-12)
    assert out["regime/catapult"] == 0.0


@pytest.mark.parametrize("kind", ["trace", "diagonal"])
def test_lr_eig_max_is_nan_where_lambda_max_is_not_the_full_kernels(kind):
    x = _x()
    full = KernelTracker(_mlp(2), x).start(lr=0.1)
    multi = KernelTracker(_mlp(2), x, kernel=KernelConfig(kind=kind)).start(lr=0.1)
    assert math.isfinite(full["ntk/lr_eig_max"]) and math.isnan(multi["ntk/lr_eig_max"])
    assert multi["opt/lr"] == 0.1 and multi["regime/catapult"] == 0.0
    # one output: the trace/diagonal kernel is the full kernel, so the number is defined
    one = KernelTracker(_mlp(1), x, kernel=KernelConfig(kind=kind)).start(lr=0.1)
    ref = KernelTracker(_mlp(1), x).start(lr=0.1)
    assert one["ntk/lr_eig_max"] == pytest.approx(ref["ntk/lr_eig_max"], rel=1e-12)


def test_without_lr_the_stability_metrics_are_nan_and_bad_lr_is_rejected():
    tracker = KernelTracker(_mlp(), _x())
    out = tracker.start()
    assert math.isnan(out["opt/lr"]) and math.isnan(out["ntk/lr_eig_max"])
    assert out["regime/catapult"] == 0.0
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got -0.1"):
        tracker.measure(1, lr=-0.1)
    with pytest.raises(TypeError, match="lr must be a finite number"):
        tracker.measure(1, lr="0.1")


def test_catapult_fires_after_the_edge_and_a_drop_of_lambda_max_and_survives_a_round_trip():
    model, x = _mlp(), _x()
    tracker = KernelTracker(model, x)
    eig0 = tracker.start()["ntk/eig_max"]
    lr = 3.0 * 4 / eig0  # lr·λmax/N = 3 at θ₀: above the edge 2, the detector arms
    tracker.start(lr=lr)  # a fresh start feeds the step-0 measurement
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)  # both layers shrink: λmax falls far below 90 % of its peak
    out = tracker.measure(1, lr=lr)
    assert out["ntk/eig_max"] < 0.9 * eig0 and out["regime/catapult"] == 1.0
    buf = io.BytesIO()
    torch.save(tracker.state_dict(), buf)
    buf.seek(0)
    restored = KernelTracker(model, x)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.measure(2, lr=lr)["regime/catapult"] == 1.0  # latched across the resume
    # below the edge the same drop is ordinary kernel movement, not a catapult
    calm = KernelTracker(_mlp(), x)
    calm.start(lr=lr / 3)
    with torch.no_grad():
        for p in calm.model.parameters():
            p.mul_(0.5)
    assert calm.measure(1, lr=lr / 3)["regime/catapult"] == 0.0


# ------------------------------------------------------------------ features


def test_feature_cka_is_one_at_start_and_for_unchanged_weights_and_drops_when_features_move():
    model, x = _mlp(), _x()
    assert KernelTracker(model, x).feature_modules == ["0"]  # default: hidden layers only
    tracker = KernelTracker(model, x, feature_modules=["0", "2"])  # the output layer by name
    assert tracker.feature_modules == ["0", "2"]
    start = tracker.start()
    assert start["features/0/cka"] == 1.0 and start["features/2/cka"] == 1.0
    same = tracker.measure(1)
    assert same["features/0/cka"] == 1.0 and same["features/2/cka"] == 1.0
    feats0 = capture_features(model, x, ["0", "2"])
    _sgd(model, x, steps=20, lr=2.0)
    moved = tracker.measure(2)
    feats = capture_features(model, x, ["0", "2"])
    for m in ("0", "2"):
        assert moved[f"features/{m}/cka"] < 1.0 - 1e-6
        # the same number as the CKA of the recorded features (Kornblith et al. 2019)
        assert moved[f"features/{m}/cka"] == pytest.approx(
            linear_cka(feats0[m], feats[m]), rel=1e-12
        )


def test_feature_cka_ignores_a_change_that_only_rotates_and_scales_features():
    model, x = _mlp(), _x()
    tracker = KernelTracker(model, x, feature_modules=["0"])
    tracker.start()
    q, _ = torch.linalg.qr(torch.randn(7, 7, dtype=torch.float64))
    with torch.no_grad():  # h -> 3 Q h for the first layer's output (weights and bias)
        model[0].weight.copy_(3 * q @ model[0].weight)
        model[0].bias.copy_(3 * q @ model[0].bias)
    out = tracker.measure(1)
    assert out["features/0/cka"] == pytest.approx(1.0, abs=1e-12)
    assert out["ntk/rel_change"] > 0.1  # ... while the kernel did move


def test_feature_state_round_trips_and_a_different_choice_is_rejected():
    model, x = _mlp(), _x()
    tracker = KernelTracker(model, x)
    tracker.start()
    state = tracker.state_dict()
    assert set(state["feature_grams0"]) == {"0"}
    assert state["feature_grams0"]["0"].shape == (4, 4)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    _sgd(model, x)
    restored = KernelTracker(model, x)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    got, expected = restored.measure(3, lr=0.1), tracker.measure(3, lr=0.1)
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert got["features/0/cka"] < 1.0
    other = KernelTracker(model, x, feature_modules=["2"])
    with pytest.raises(ValueError, match="feature_modules"):
        other.load_state_dict(state)


def test_feature_modules_choice_off_and_errors():
    x = _x()
    off = KernelTracker(_mlp(), x, feature_modules=False)
    assert not any(n.startswith("features/") for n in off.metric_names())
    assert KernelTracker(_mlp(), x, feature_modules=None).feature_modules == []
    picked = KernelTracker(_mlp(), x, feature_modules=["1"])  # the Tanh: no parameters needed
    assert [n for n in picked.metric_names() if n.startswith("features/")] == ["features/1/cka"]
    with pytest.raises(ValueError, match=r"feature modules \['nope'\] are not submodules"):
        KernelTracker(_mlp(), x, feature_modules=["nope"])
    with pytest.raises(TypeError, match="feature_modules must be True, False/None or a list"):
        KernelTracker(_mlp(), x, feature_modules="0")
    with pytest.raises(ValueError, match="distinct module names"):
        KernelTracker(_mlp(), x, feature_modules=["0", "0"])


class _Shared(nn.Module):
    """The same layer applied twice: its features are not one per forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(3, 3).double()
        self.head = nn.Linear(3, 1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def test_untrackable_default_modules_are_skipped_with_a_warning_explicit_ones_raise():
    x = _x()
    with pytest.warns(UserWarning, match=r"does not track the features of \['inner'\]"):
        tracker = KernelTracker(_Shared(), x)
    assert tracker.feature_modules == []  # 'head' is the output layer: tracked only by name
    assert KernelTracker(_Shared(), x, feature_modules=["head"]).feature_modules == ["head"]
    with pytest.raises(ValueError, match="called more than once"):
        KernelTracker(_Shared(), x, feature_modules=["inner"])


class _PositionEmbedded(nn.Module):
    """A position embedding: its output is one tensor shared by the whole batch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pos = nn.Embedding(4, 3).double()
        self.body = nn.Linear(3, 3).double()
        self.head = nn.Linear(3, 1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 4, 3)
        h = x + self.pos(torch.arange(4))  # (4, 3), broadcast over the batch
        return self.head(torch.tanh(self.body(h)).mean(1))


def test_batch_shared_default_modules_are_left_out_with_an_info_line_not_a_warning(caplog):
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all
        with caplog.at_level(logging.INFO, logger="lazy_monitor"):
            tracker = KernelTracker(_PositionEmbedded(), x)
    assert tracker.feature_modules == ["body"]
    assert "['pos'] output(s) one tensor shared by the whole batch" in caplog.text
