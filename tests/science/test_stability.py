"""Specification of lazy_monitor.core.stability: lr_eig_max, current_lr, CatapultDetector."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lazy_monitor import KernelTracker, empirical_ntk
from lazy_monitor.core.stability import CatapultDetector, current_lr, lr_eig_max


def _linear_model(d: int = 3) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(d, 1).double()


def test_lr_eig_max_matches_hand_computation_on_linear_model():
    # f(x) = w·x + b: J = [x, 1], so K = X Xᵀ + 1 1ᵀ exactly (no autograd in the reference).
    x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [3.0, 1.0, 0.0], [1.0, 1.0, 1.0]]).double()
    model = _linear_model()
    k_hand = x @ x.T + torch.ones(4, 4, dtype=torch.float64)
    lam_hand = float(torch.linalg.eigvalsh(k_hand).max())
    metrics = KernelTracker(model, x, per_layer=False).start()
    assert metrics["ntk/eig_max"] == pytest.approx(lam_hand, rel=1e-10)
    assert lr_eig_max(0.05, metrics["ntk/eig_max"], 4) == pytest.approx(
        0.05 * lam_hand / 4, rel=1e-10
    )


def test_lr_eig_max_matches_empirical_ntk_on_tiny_mlp():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(6, 2, dtype=torch.float64)
    k = empirical_ntk(model, x)  # (6, 6, 2, 2)
    matrix = k.permute(0, 2, 1, 3).reshape(12, 12)
    lam = float(torch.linalg.eigvalsh(matrix).max())
    tracked = KernelTracker(model, x, per_layer=False).start()["ntk/eig_max"]
    assert tracked == pytest.approx(lam, rel=1e-9)
    assert lr_eig_max(0.3, tracked, 6) == pytest.approx(0.3 * lam / 6, rel=1e-9)


@pytest.mark.parametrize("ratio, converges", [(1.9, True), (2.1, False)])
def test_threshold_two_is_the_gd_edge_for_half_mean_squared_error(ratio, converges):
    # For a linear model K is constant, so GD on ½·mean (f − y)² converges iff lr·λmax/N < 2.
    x = torch.tensor([[1.0, 0.5], [0.2, -1.0], [-0.7, 0.3], [0.4, 0.9], [1.5, -0.2]]).double()
    y = torch.tensor([[1.0], [-1.0], [0.5], [0.0], [2.0]]).double()
    model = _linear_model(2)
    lam = KernelTracker(model, x, per_layer=False).start()["ntk/eig_max"]
    lr = ratio * x.shape[0] / lam
    assert lr_eig_max(lr, lam, x.shape[0]) == pytest.approx(ratio)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).mean()
        losses.append(loss.item())
        loss.backward()
        opt.step()
    assert (losses[-1] < 1.0) == converges
    assert (losses[-1] > 1e6) == (not converges)


@pytest.mark.parametrize(
    "args, error",
    [((-1.0, 1.0, 4), ValueError), ((math.inf, 1.0, 4), ValueError), ((0.1, 1.0, 0), ValueError),
     ((0.1, 1.0, 2.0), TypeError), ((True, 1.0, 4), TypeError), ((0.1, "x", 4), TypeError)],
)  # fmt: skip
def test_lr_eig_max_rejects_bad_arguments(args, error):
    with pytest.raises(error):
        lr_eig_max(*args)


def test_lr_eig_max_propagates_nonfinite_eigenvalue():
    assert math.isnan(lr_eig_max(0.1, math.nan, 4))


def test_current_lr_reads_first_group_and_follows_scheduler():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.5}, {"params": [b], "lr": 7.0}])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    assert current_lr(opt) == 0.5
    opt.step()
    sched.step()
    assert current_lr(opt) == pytest.approx(0.05)
    assert current_lr([opt]) == pytest.approx(0.05)


def test_current_lr_accepts_tensor_lr_and_adam():
    p = nn.Parameter(torch.zeros(2))
    assert current_lr(torch.optim.Adam([p], lr=torch.tensor(0.003))) == pytest.approx(0.003)


def test_current_lr_reads_lightning_optimizer_wrapper():
    pl_optimizer = pytest.importorskip("pytorch_lightning.core.optimizer")
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.25)
    wrapped = pl_optimizer.LightningOptimizer(opt)
    assert current_lr(wrapped) == 0.25


def test_current_lr_errors_name_the_fix():
    with pytest.raises(TypeError, match="param_groups"):
        current_lr(object())
    with pytest.raises(ValueError, match="empty"):
        current_lr([])


def test_detector_silent_below_threshold_even_if_eig_falls():
    det = CatapultDetector()
    assert [det.update(1.5, e) for e in (10.0, 5.0, 1.0)] == [0.0, 0.0, 0.0]
    assert not det.armed and not det.fired


def test_detector_arms_above_threshold_and_fires_on_fall_beyond_tolerance():
    det = CatapultDetector(rel_drop=0.1)
    assert det.update(3.0, 10.0) == 0.0  # arms, peak 10
    assert det.armed
    assert det.update(2.9, 9.5) == 0.0  # 5 % fall: within tolerance
    assert det.update(2.0, 8.9) == 1.0  # 11 % below the peak: fired
    assert det.decision()[0]


def test_detector_measures_fall_from_running_peak():
    det = CatapultDetector(rel_drop=0.1)
    det.update(2.5, 10.0)
    det.update(5.0, 20.0)  # λmax first grows (peak 20)
    assert det.update(4.0, 18.5) == 0.0  # 7.5 % below the peak
    assert det.update(3.4, 17.0) == 1.0  # 15 % below the peak (still above the arming value)


def test_detector_latches_once_fired():
    det = CatapultDetector()
    det.update(3.0, 10.0)
    det.update(1.0, 5.0)
    assert det.update(1.0, 50.0) == 1.0
    assert det.update(math.nan, math.nan) == 1.0


def test_detector_ignores_nonfinite_measurements():
    det = CatapultDetector()
    assert det.update(math.nan, 10.0) == 0.0
    assert det.update(math.inf, math.inf) == 0.0
    assert not det.armed


def test_detector_state_dict_roundtrip_is_plain_json_and_resumes_identically():
    seq = [(3.0, 10.0), (3.1, 10.5), (2.5, 9.8), (1.0, 8.0), (1.0, 7.0)]
    ref = CatapultDetector()
    expected = [ref.update(*m) for m in seq]
    det = CatapultDetector()
    for m in seq[:2]:
        det.update(*m)
    state = json.loads(json.dumps(det.state_dict()))
    resumed = CatapultDetector()
    resumed.load_state_dict(state)
    assert [resumed.update(*m) for m in seq[2:]] == expected[2:]


def test_detector_rejects_state_of_other_settings_and_bad_arguments():
    with pytest.raises(ValueError, match="rel_drop"):
        CatapultDetector(rel_drop=0.2).load_state_dict(CatapultDetector().state_dict())
    with pytest.raises(ValueError, match="not a CatapultDetector"):
        CatapultDetector().load_state_dict({"format": 1})
    with pytest.raises(ValueError):
        CatapultDetector(threshold=0.0)
    with pytest.raises(ValueError):
        CatapultDetector(rel_drop=1.0)
