"""Specification of lazy_monitor.demo.models (NTK/standard MLPs) and lazy_monitor.demo.datasets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lazy_monitor.demo import datasets
from lazy_monitor.demo.models import NTKLinear, OutputScale, mlp


# ---------------------------------------------------------------------------- models
def test_mlp_shapes_and_layer_names():
    net = mlp(5, 16, 3, depth=3, seed=0)
    assert net(torch.randn(7, 5)).shape == (7, 3)
    names = [name for name, _ in net.named_children()]
    assert names == ["fc1", "act1", "fc2", "act2", "fc3", "act3", "readout"]
    assert all(isinstance(getattr(net, f"fc{i}"), NTKLinear) for i in (1, 2, 3))
    assert net.fc2.weight.shape == (16, 16) and net.readout.weight.shape == (3, 16)


def test_ntk_linear_forward_is_scaled_affine_map():
    layer = NTKLinear(6, 4, sigma_w=1.5, sigma_b=0.3, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 6)
    expected = x @ (1.5 / math.sqrt(6) * layer.weight).T + 0.3 * layer.bias
    torch.testing.assert_close(layer(x), expected)


def test_ntk_linear_weights_are_standard_normal():
    layer = NTKLinear(500, 400, generator=torch.Generator().manual_seed(0))
    weight = layer.weight.detach()
    assert abs(float(weight.mean())) < 0.01
    assert float(weight.std()) == pytest.approx(1.0, abs=0.01)


def test_ntk_and_standard_parameterisations_are_the_same_function_at_init():
    x = torch.randn(9, 5)
    ntk = mlp(5, 32, 2, seed=3, parameterization="ntk")
    std = mlp(5, 32, 2, seed=3, parameterization="standard")
    assert isinstance(std.fc1, nn.Linear)
    torch.testing.assert_close(ntk(x), std(x), rtol=1e-5, atol=1e-5)


def test_ntk_parameterisation_scales_weight_gradients_by_sigma_over_sqrt_fan_in():
    x = torch.randn(9, 5)
    ntk = mlp(5, 32, 2, seed=3, parameterization="ntk")
    std = mlp(5, 32, 2, seed=3, parameterization="standard")
    for net in (ntk, std):
        net(x).sum().backward()
    # dL/dW_ntk = (σ_w/√fan_in) · dL/dW_std for the same function
    sigma = math.sqrt(2.0)
    torch.testing.assert_close(
        ntk.fc2.weight.grad, sigma / math.sqrt(32) * std.fc2.weight.grad, rtol=1e-4, atol=1e-6
    )


def test_ntk_output_variance_at_init_is_width_independent():
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    variances = []
    for width in (64, 1024):
        outs = torch.cat([mlp(10, width, 1, seed=s)(x).detach() for s in range(20)])
        variances.append(float(outs.var()))
    assert variances[0] == pytest.approx(variances[1], rel=0.5)
    assert 0.1 < variances[1] < 10


def test_mlp_seed_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b = mlp(4, 8, 2, seed=7), mlp(4, 8, 2, seed=7, parameterization="standard")
    assert torch.equal(torch.get_rng_state(), state)
    c = mlp(4, 8, 2, seed=7)
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(mlp(4, 8, 2, seed=8).fc1.weight, a.fc1.weight)
    assert b is not None


def test_mlp_without_seed_uses_the_global_rng():
    torch.manual_seed(11)
    a = mlp(4, 8, 2)
    torch.manual_seed(11)
    b = mlp(4, 8, 2)
    assert torch.equal(a.fc1.weight, b.fc1.weight)


def test_output_scale_multiplies_the_output():
    x = torch.randn(5, 4)
    base, scaled = mlp(4, 8, 2, seed=1), mlp(4, 8, 2, seed=1, output_scale=3.0)
    assert isinstance(scaled.scale, OutputScale)
    torch.testing.assert_close(scaled(x), 3.0 * base(x))


@pytest.mark.parametrize("activation", ["tanh", "gelu", "sigmoid", "softplus", "identity", nn.SiLU])
def test_activations(activation):
    net = mlp(3, 8, 1, activation=activation, seed=0)
    assert net(torch.randn(2, 3)).shape == (2, 1)


def test_default_sigma_w_depends_on_activation_and_is_overridable():
    assert mlp(3, 8, 1, seed=0).fc1.sigma_w == pytest.approx(math.sqrt(2))
    assert mlp(3, 8, 1, activation="tanh", seed=0).fc1.sigma_w == 1.0
    assert mlp(3, 8, 1, sigma_w=0.5, sigma_b=0.0, seed=0).readout.sigma_w == 0.5
    assert mlp(3, 8, 1, bias=False, seed=0).fc1.bias is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"width": 0}, ValueError, "width"),
        ({"width": 8.0}, TypeError, "width"),
        ({"depth": 0}, ValueError, "depth"),
        ({"in_features": True}, TypeError, "in_features"),
        ({"parameterization": "mup"}, ValueError, "parameterization"),
        ({"activation": "swish"}, ValueError, "activation"),
        ({"activation": 3}, TypeError, "activation"),
        ({"activation": lambda: 3}, TypeError, "activation"),
        ({"output_scale": 0.0}, ValueError, "output_scale"),
        ({"output_scale": float("inf")}, ValueError, "output_scale"),
        ({"sigma_w": -1.0}, ValueError, "sigma_w"),
        ({"sigma_b": float("nan")}, ValueError, "sigma_b"),
        ({"seed": "0"}, TypeError, "seed"),
        ({"bias": 1}, TypeError, "bias"),
    ],
)
def test_mlp_validation(kwargs, error, match):
    args = {"in_features": 4, "width": 8, "out_features": 2, **kwargs}
    with pytest.raises(error, match=match):
        mlp(**args)


# ---------------------------------------------------------------------------- datasets
def test_gaussian_mixture_shapes_dtypes_and_balance():
    x, y = datasets.gaussian_mixture(103, 6, 4, seed=0)
    assert x.shape == (103, 6) and x.dtype == torch.float32
    assert y.shape == (103,) and y.dtype == torch.int64
    counts = torch.bincount(y, minlength=4)
    assert counts.max() - counts.min() <= 1


def test_gaussian_mixture_means_are_separation_apart():
    x, y = datasets.gaussian_mixture(40, 8, 4, seed=0, separation=2.5, noise=0.0)
    means = torch.stack([x[y == k].mean(0) for k in range(4)]).double()
    distances = torch.cdist(means, means)[~torch.eye(4, dtype=torch.bool)]
    torch.testing.assert_close(distances, torch.full_like(distances, 2.5), rtol=1e-5, atol=1e-5)


def test_gaussian_mixture_task_seed_fixes_means_and_seed_fixes_samples():
    x0, y0 = datasets.gaussian_mixture(50, 5, 3, seed=0, noise=0.0)
    x1, y1 = datasets.gaussian_mixture(50, 5, 3, seed=1, noise=0.0)
    assert not torch.equal(y0, y1)
    for k in range(3):  # same task: identical class means across sample seeds
        torch.testing.assert_close(x0[y0 == k][0], x1[y1 == k][0])
    x2, _ = datasets.gaussian_mixture(50, 5, 3, seed=0, task_seed=1, noise=0.0)
    assert not torch.equal(x0, x2)
    xa, ya = datasets.gaussian_mixture(50, 5, 3, seed=4)
    xb, yb = datasets.gaussian_mixture(50, 5, 3, seed=4)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_teacher_regression_shapes_scale_and_determinism():
    x, y = datasets.teacher_regression(2000, 10, 3, seed=0)
    assert x.shape == (2000, 10) and y.shape == (2000, 3)
    assert x.dtype == y.dtype == torch.float32
    assert y.std(0).sub(1).abs().max() < 0.15  # unit-variance targets
    x2, y2 = datasets.teacher_regression(2000, 10, 3, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_teacher_regression_task_seed_changes_teacher_not_inputs_and_noise_is_additive():
    x0, y0 = datasets.teacher_regression(500, 4, seed=2, task_seed=0)
    x1, y1 = datasets.teacher_regression(500, 4, seed=2, task_seed=1)
    assert torch.equal(x0, x1) and not torch.allclose(y0, y1)
    xn, yn = datasets.teacher_regression(500, 4, seed=2, task_seed=0, noise=0.5)
    assert torch.equal(x0, xn)
    assert float((yn - y0).std()) == pytest.approx(0.5, rel=0.15)


def test_teacher_is_a_smooth_function_of_the_inputs():
    # same teacher, two sample seeds: a 1-nearest-neighbour predictor across the two sets is
    # far better than chance only if both sets come from the same function
    x0, y0 = datasets.teacher_regression(2000, 2, seed=0)
    x1, y1 = datasets.teacher_regression(200, 2, seed=1)
    nearest = torch.cdist(x1, x0).argmin(1)
    assert float((y0[nearest] - y1).pow(2).mean()) < 0.1 * float(y1.var())
    _, y_other = datasets.teacher_regression(2000, 2, seed=0, task_seed=9)
    assert float((y_other[nearest] - y1).pow(2).mean()) > 0.3 * float(y1.var())


def test_two_spirals():
    x, y = datasets.two_spirals(101, seed=0, noise=0.0)
    assert x.shape == (101, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == {0, 1}
    assert float(x.norm(dim=1).max()) <= 1.0 + 1e-6
    x_b, y_b = datasets.two_spirals(101, seed=0, noise=0.0)
    assert torch.equal(x, x_b) and torch.equal(y, y_b)
    # on the spiral φ = 2π·turns·r, class 1 rotated by π
    r = x.norm(dim=1)
    phi = torch.atan2(x[:, 1], x[:, 0])
    expected = 2 * math.pi * 1.5 * r + math.pi * y
    diff = torch.remainder(phi - expected + math.pi, 2 * math.pi) - math.pi
    assert float(diff.abs().max()) < 1e-4


def test_datasets_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    datasets.gaussian_mixture(20, 3, 2)
    datasets.teacher_regression(20, 3)
    datasets.two_spirals(20)
    loader = datasets.make_loader(torch.randn(20, 3), torch.arange(20), 4, seed=0)
    state_after_randn = torch.get_rng_state()
    list(loader)
    assert torch.equal(torch.get_rng_state(), state_after_randn)
    torch.set_rng_state(state)
    datasets.gaussian_mixture(20, 3, 2)
    assert torch.equal(torch.get_rng_state(), state)


def test_make_loader_order_depends_only_on_seed():
    x, y = torch.arange(30.0).unsqueeze(1), torch.arange(30)

    def order(seed: int) -> list[int]:
        return [int(v) for _, yb in datasets.make_loader(x, y, 7, seed=seed) for v in yb]

    torch.manual_seed(0)
    first = order(3)
    torch.manual_seed(1)
    assert order(3) == first
    assert order(4) != first
    assert sorted(first) == list(range(30))
    fixed = datasets.make_loader(x, y, 7, shuffle=False, drop_last=True)
    assert [len(b[1]) for b in fixed] == [7, 7, 7, 7]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: datasets.gaussian_mixture(0, 3, 2), ValueError, "n"),
        (lambda: datasets.gaussian_mixture(10, 3, 1), ValueError, "classes"),
        (lambda: datasets.gaussian_mixture(10, 3.5, 2), TypeError, "dim"),
        (lambda: datasets.gaussian_mixture(10, 3, 2, noise=-1.0), ValueError, "noise"),
        (lambda: datasets.gaussian_mixture(10, 3, 2, separation=float("nan")), ValueError, "sep"),
        (lambda: datasets.gaussian_mixture(10, 3, 2, seed=-1), ValueError, "seed"),
        (lambda: datasets.teacher_regression(10, 3, 0), ValueError, "out"),
        (lambda: datasets.teacher_regression(10, 3, task_seed=1.0), TypeError, "task_seed"),
        (lambda: datasets.two_spirals(1), ValueError, "n"),
        (lambda: datasets.two_spirals(10, turns=0), ValueError, "turns"),
        (lambda: datasets.make_loader(torch.ones(3, 1), torch.ones(4), 2), ValueError, "examples"),
        (lambda: datasets.make_loader(torch.ones(3, 1), torch.ones(3), 0), ValueError, "batch"),
        (lambda: datasets.make_loader([1, 2], torch.ones(2), 1), TypeError, "x must"),
    ],
)
def test_dataset_validation(call, error, match):
    with pytest.raises(error, match=match):
        call()
