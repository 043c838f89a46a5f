"""Specification of Linearization (f0, f_lin via one jvp at θ₀) and LinearizedModel."""

from __future__ import annotations

import copy
import importlib.util
import io
import math
import pathlib

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from lazy_monitor import Linearization, LinearizedModel
from lazy_monitor.demo.models import mlp

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "linearized_vs_real.py"


def _perturb(model: nn.Module, scale: float, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm())


class _FixedFeatures(nn.Module):
    """tanh(frozen random layer) -> trainable linear readout: linear in its trainable params."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Linear(4, 16)
        self.features.requires_grad_(False)
        self.readout = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(torch.tanh(self.features(x)))


class _Tied(nn.Module):
    """Two linear maps sharing one weight: f(x) = x Wᵀ + (2x) Wᵀ + b, linear in (W, b)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(2 * x)


class _Stateful(nn.Module):
    """BatchNorm + Dropout: train and eval differ, train mode mutates buffers and uses the RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.relu(self.bn(self.fc(x)))))


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- Linearization
@pytest.mark.parametrize("factory", [lambda: nn.Linear(4, 3), _FixedFeatures, _Tied])
def test_f_lin_is_exact_for_a_model_linear_in_its_parameters(factory):
    torch.manual_seed(0)
    model = factory()
    x = torch.randn(10, 4)
    lin = Linearization(model)
    _perturb(model, 0.5)
    assert _rel(lin.f_lin(x), model(x).detach()) <= 1e-6


def test_tied_parameter_is_linearized_once_under_its_first_name():
    lin = Linearization(_Tied())
    assert lin.names == ("a.weight", "a.bias")


def test_f_lin_error_is_second_order_in_the_parameter_displacement():
    model = mlp(5, 24, 3, depth=2, activation="tanh", seed=0).double()
    x = torch.randn(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    lin = Linearization(model)
    gen = torch.Generator().manual_seed(3)
    direction = {
        n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in lin.params0.items()
    }

    def error(t: float) -> float:
        theta = {n: lin.params0[n] + t * d for n, d in direction.items()}
        f = functional_call(model, theta, (x,))
        return float((f - lin.f_lin(x, theta)).norm())

    for t in (0.2, 0.1, 0.05):
        assert error(t) / error(t / 2) == pytest.approx(4.0, rel=0.2)


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


class _TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.fc = nn.Linear(6, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.embed(tokens)).mean(1))


@pytest.mark.parametrize(
    ("factory", "make_x"),
    [
        (_ConvNet, lambda g: torch.randn(4, 2, 5, 5, generator=g, dtype=torch.float64)),
        (_TokenModel, lambda g: torch.randint(0, 11, (5, 7), generator=g)),
    ],
)
def test_conv_and_integer_input_models_are_first_order_accurate(factory, make_x):
    torch.manual_seed(0)
    model = factory().double()
    if isinstance(model, _ConvNet):  # non-trivial running statistics
        model(torch.randn(8, 2, 5, 5, dtype=torch.float64) * 2 + 1)
    x = make_x(torch.Generator().manual_seed(1))
    lin = Linearization(model)
    torch.testing.assert_close(lin.f0(x), copy.deepcopy(model).eval()(x).detach())
    gen = torch.Generator().manual_seed(3)
    direction = {
        n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in lin.params0.items()
    }
    reference = copy.deepcopy(model).eval()

    def error(t: float) -> float:
        theta = {n: lin.params0[n] + t * d for n, d in direction.items()}
        f = functional_call(reference, {**theta, **lin.buffers0}, (x,))
        return float((f - lin.f_lin(x, theta)).norm())

    assert error(0.1) / error(0.05) == pytest.approx(4.0, rel=0.2)


def test_f0_is_the_model_at_the_snapshot_and_ignores_later_training():
    torch.manual_seed(0)
    model = mlp(4, 16, 2, seed=0)
    x = torch.randn(8, 4)
    at_init = copy.deepcopy(model)
    lin = Linearization(model)
    torch.testing.assert_close(lin.f0(x), at_init(x).detach(), rtol=0, atol=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    assert _rel(model(x).detach(), at_init(x).detach()) > 1e-2  # training did move f
    torch.testing.assert_close(lin.f0(x), at_init(x).detach(), rtol=0, atol=0)
    for name, p in at_init.named_parameters():
        torch.testing.assert_close(lin.params0[name], p.detach(), rtol=0, atol=0)


def test_f0_and_f_lin_match_the_separate_calls_and_zero_displacement_gives_f0():
    model = mlp(4, 16, 2, seed=0)
    x = torch.randn(8, 4)
    lin = Linearization(model)
    f0, fl = lin.f0_and_f_lin(x)
    torch.testing.assert_close(fl, f0)  # θ = θ₀
    _perturb(model, 0.1)
    f0, fl = lin.f0_and_f_lin(x)
    torch.testing.assert_close(f0, lin.f0(x))
    torch.testing.assert_close(fl, lin.f_lin(x))
    assert not torch.allclose(f0, fl)


def test_f_lin_matches_brute_force_jacobian_in_float64():
    model = mlp(3, 8, 2, depth=1, activation="tanh", seed=0).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    lin = Linearization(model)
    p0 = lin.params0
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(p0)
    _perturb(model, 0.3)
    delta = lin.delta()
    jd = sum((jac[n].reshape(10, -1) @ delta[n].reshape(-1)) for n in p0).reshape(5, 2)
    torch.testing.assert_close(lin.f_lin(x), functional_call(model, p0, (x,)) + jd)


def test_delta_and_delta_norm():
    model = mlp(4, 8, 2, seed=0)
    lin = Linearization(model)
    assert lin.delta_norm() == 0.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _perturb(model, 0.1)
    delta = lin.delta()
    for n, p in model.named_parameters():
        torch.testing.assert_close(delta[n], p.detach() - before[n])
    expected = math.sqrt(sum(float(d.double().pow(2).sum()) for d in delta.values()))
    assert lin.delta_norm() == pytest.approx(expected, rel=1e-12)


def test_explicit_params_replace_the_model_values_by_name():
    model = mlp(4, 8, 2, seed=0)
    x = torch.randn(6, 4)
    lin = Linearization(model)
    moved = copy.deepcopy(model)
    _perturb(moved, 0.2)
    theta = {n: p.detach() for n, p in moved.named_parameters()}
    reference = Linearization(copy.deepcopy(model))
    reference.model.load_state_dict(moved.state_dict())
    torch.testing.assert_close(lin.f_lin(x, theta), reference.f_lin(x))
    # a partial mapping takes the model's current value (= θ₀ here) for the other names
    partial = {"readout.weight": theta["readout.weight"]}
    assert lin.delta(partial)["fc1.weight"].abs().max() == 0
    assert lin.delta(partial)["readout.weight"].abs().max() > 0


def test_explicit_params0_defines_the_linearized_set_and_other_params_are_constants():
    torch.manual_seed(0)
    model = mlp(4, 8, 2, seed=0)
    x = torch.randn(6, 4)
    p0 = {"readout.weight": model.readout.weight.detach().clone()}
    lin = Linearization(model, p0)
    assert lin.names == ("readout.weight",)
    _perturb(model, 0.3)
    # readout.weight enters linearly; every other parameter is held at its snapshot value
    model_at_snapshot = copy.deepcopy(model)
    for name, p in model_at_snapshot.named_parameters():
        if name != "readout.weight":
            p.data.copy_(lin._constants0[name])
    torch.testing.assert_close(lin.f_lin(x), model_at_snapshot(x).detach())
    with pytest.raises(ValueError, match="not linearized"):
        lin.f_lin(x, {"fc1.weight": model.fc1.weight.detach()})


def test_evaluation_is_side_effect_free_and_uses_eval_semantics():
    torch.manual_seed(0)
    model = _Stateful()
    model.train()
    model(torch.randn(16, 4)).sum().backward()  # populate BN stats and .grad
    x = torch.randn(8, 4)
    lin = Linearization(model)
    at_snapshot = copy.deepcopy(model).eval()
    _perturb(model, 0.1)
    state = _full_state(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    with torch.no_grad():
        f0, fl = lin.f0_and_f_lin(x)
        lin.f0(x)
        lin.f_lin(x)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0)
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng)
    # eval semantics: deterministic (no dropout), BN with running statistics
    torch.testing.assert_close(f0, at_snapshot(x).detach())
    torch.testing.assert_close(lin.f_lin(x), fl, rtol=0, atol=0)


def test_buffers_are_part_of_the_snapshot():
    torch.manual_seed(0)
    model = _Stateful()
    model.train()
    model(torch.randn(16, 4))
    x = torch.randn(8, 4)
    at_snapshot = copy.deepcopy(model).eval()
    lin = Linearization(model)
    model(torch.randn(16, 4) * 5 + 3)  # train-mode forward changes the running statistics
    torch.testing.assert_close(lin.f0(x), at_snapshot(x).detach(), rtol=0, atol=0)
    assert lin.buffers0.keys() == dict(model.named_buffers()).keys()


def test_results_are_detached_even_when_called_with_grad_enabled():
    model = mlp(4, 8, 2, seed=0)
    lin = Linearization(model)
    f0, fl = lin.f0_and_f_lin(torch.randn(3, 4, requires_grad=True))
    assert not f0.requires_grad and not fl.requires_grad


def test_works_under_inference_mode():
    model = mlp(4, 8, 2, seed=0)
    lin = Linearization(model)
    _perturb(model, 0.1)
    x = torch.randn(3, 4)
    expected = lin.f_lin(x)
    with torch.inference_mode():
        torch.testing.assert_close(lin.f_lin(torch.randn(3, 4).copy_(x)), expected)


def test_output_is_flattened_to_n_by_o_and_raw_shape_is_available():
    class Grid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 6)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.fc(x).reshape(-1, 2, 3)}

    model = Grid()
    x = torch.randn(5, 4)
    lin = Linearization(model, output_fn=lambda out: out["logits"])
    assert lin.f_lin(x).shape == (5, 6)
    assert lin.f0(x, flatten=False).shape == (5, 2, 3)
    f0, fl = lin.f0_and_f_lin(x, flatten=False)
    assert f0.shape == fl.shape == (5, 2, 3)
    torch.testing.assert_close(lin.f0(x, flatten=False), model(x)["logits"].detach())
    with pytest.raises(TypeError, match="output_fn"):
        Linearization(model).f_lin(x)


def test_tuple_and_dict_inputs():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(5, 2)

        def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self.a(u) * torch.tanh(self.b(v))

    model = TwoInputs()
    u, v = torch.randn(4, 3), torch.randn(4, 5)
    lin = Linearization(model)
    torch.testing.assert_close(lin.f0((u, v)), model(u, v).detach())
    torch.testing.assert_close(lin.f0({"u": u, "v": v}), model(u, v).detach())
    with pytest.raises(ValueError, match="batch sizes"):
        lin.f_lin((u, v[:3]))


def test_float64_inputs_promote_the_computation():
    model = mlp(4, 8, 2, seed=0)
    lin = Linearization(model)
    x = torch.randn(3, 4, dtype=torch.float64)
    out = lin.f_lin(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, copy.deepcopy(model).double()(x).detach())


def test_cpu_snapshot_gives_the_same_results():
    model = mlp(4, 8, 2, seed=0)
    x = torch.randn(5, 4)
    lin, lin_cpu = Linearization(model), Linearization(model, device="cpu")
    assert lin_cpu.device == torch.device("cpu")
    assert all(t.device.type == "cpu" for t in lin_cpu.params0.values())
    _perturb(model, 0.1)
    torch.testing.assert_close(lin_cpu.f_lin(x), lin.f_lin(x), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_snapshot_of_a_cuda_model_is_moved_only_for_the_computation():
    model = mlp(4, 8, 2, seed=0).cuda()
    x = torch.randn(5, 4, device="cuda")
    lin = Linearization(model, device="cpu")
    assert all(t.device.type == "cpu" for t in lin.params0.values())
    _perturb(model, 0.1)
    out = lin.f_lin(x)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out, Linearization(model.cpu(), lin.params0).f_lin(x.cpu()).cuda())


def test_state_dict_round_trip_is_weights_only_safe():
    model = mlp(4, 8, 2, seed=0)
    x = torch.randn(5, 4)
    lin = Linearization(model)
    _perturb(model, 0.2)
    expected = lin.f0_and_f_lin(x)
    buffer = io.BytesIO()
    torch.save(lin.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = Linearization(model)  # snapshot at the moved parameters: different θ₀
    assert not torch.allclose(fresh.f0(x), expected[0])
    fresh.load_state_dict(state)
    for got, want in zip(fresh.f0_and_f_lin(x), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_load_state_dict_rejects_a_different_architecture():
    state = Linearization(mlp(4, 8, 2, seed=0)).state_dict()
    with pytest.raises(ValueError, match="shape"):
        Linearization(mlp(4, 16, 2, seed=0)).load_state_dict(state)
    with pytest.raises(ValueError, match="linearized parameters"):
        Linearization(mlp(4, 8, 2, depth=1, seed=0)).load_state_dict(state)
    with pytest.raises(ValueError, match="not a Linearization state_dict"):
        Linearization(mlp(4, 8, 2, seed=0)).load_state_dict({"params0": {}})


def test_constructor_validation():
    model = mlp(4, 8, 2, seed=0)
    with pytest.raises(TypeError, match="nn.Module"):
        Linearization(lambda x: x)
    with pytest.raises(TypeError, match="output_fn"):
        Linearization(model, output_fn="logits")
    with pytest.raises(ValueError, match="device"):
        Linearization(model, device="gpu0")
    with pytest.raises(ValueError, match="not parameters"):
        Linearization(model, {"fc9.weight": torch.zeros(8, 4)})
    with pytest.raises(ValueError, match="shape"):
        Linearization(model, {"fc1.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="requires_grad"):
        Linearization(nn.Linear(2, 2).requires_grad_(False))


# ---------------------------------------------------------------------------- LinearizedModel
def _jacobian(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``(N·O, P)`` brute-force Jacobian, columns in ``params`` order."""
    jac = jacrev(lambda p: functional_call(model, p, (x,)).reshape(-1))(params)
    return torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in params], dim=1)


def test_linearized_model_starts_equal_to_the_model_and_keeps_its_output_shape():
    model = mlp(4, 8, 3, seed=0)
    x = torch.randn(6, 4)
    lm = LinearizedModel(model)
    torch.testing.assert_close(lm(x), model(x))
    assert lm(x).shape == model(x).shape == (6, 3)


def test_linearized_model_forward_and_gradient_match_an_explicit_linear_model():
    model = mlp(3, 6, 2, depth=1, activation="tanh", seed=0).double()
    x = torch.randn(7, 3, dtype=torch.float64)
    y = torch.randn(7, 2, dtype=torch.float64)
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    jac = _jacobian(model, p0, x)  # (14, P)
    f0 = model(x).detach().reshape(-1)
    lm = LinearizedModel(model)
    _perturb(lm, 0.3)
    delta = torch.cat([(p.detach() - p0[n]).reshape(-1) for n, p in lm.model.named_parameters()])
    out = lm(x)
    torch.testing.assert_close(out.reshape(-1), f0 + jac @ delta)
    loss = 0.5 * (out - y).pow(2).sum()
    loss.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in lm.model.parameters()])
    torch.testing.assert_close(grad, jac.T @ (f0 + jac @ delta - y.reshape(-1)))


def test_linearized_model_gradient_descent_follows_the_closed_form():
    """GD on ½‖f_lin(X) − Y‖² with step η: r_{t+1} = (I − η K₀) r_t, K₀ = J Jᵀ (Lee et al. 2019)."""
    model = mlp(3, 16, 1, depth=1, seed=0).double()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(10, 1, generator=gen, dtype=torch.float64)
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    jac = _jacobian(model, p0, x)
    kernel = jac @ jac.T
    lr = 0.5 / float(torch.linalg.eigvalsh(kernel)[-1])
    lm = LinearizedModel(model)
    opt = torch.optim.SGD(lm.parameters(), lr=lr)
    steps = 25
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (lm(x) - y).pow(2).sum()).backward()
        opt.step()
    r0 = (model(x) - y).detach().reshape(-1)
    step = torch.eye(10, dtype=torch.float64) - lr * kernel
    expected = y.reshape(-1) + torch.linalg.matrix_power(step, steps) @ r0
    torch.testing.assert_close(lm(x).detach().reshape(-1), expected)
    # and the parameters moved by θ_t − θ₀ = −η Jᵀ Σ_s r_s
    residuals = sum(torch.linalg.matrix_power(step, s) @ r0 for s in range(steps))
    delta = torch.cat([(p.detach() - p0[n]).reshape(-1) for n, p in lm.model.named_parameters()])
    torch.testing.assert_close(delta, -lr * jac.T @ residuals)
    assert float((lm(x).detach() - y).pow(2).sum()) < 0.5 * float(r0.pow(2).sum())


def test_linearized_model_of_a_parameter_linear_tied_model_is_the_model():
    model = _Tied()
    lm = LinearizedModel(model)
    assert lm.names == ("a.weight", "a.bias")
    _perturb(lm, 0.5)
    reference = copy.deepcopy(model)
    reference.load_state_dict(lm.model.state_dict())
    x = torch.randn(6, 4)
    torch.testing.assert_close(lm(x), reference(x))
    lm(x).sum().backward()
    reference(x).sum().backward()
    torch.testing.assert_close(lm.model.a.weight.grad, reference.a.weight.grad)


def test_linearized_model_shares_nothing_with_the_original():
    model = mlp(4, 8, 2, seed=0)
    state = _full_state(model)
    lm = LinearizedModel(model)
    assert not {id(p) for p in lm.parameters()} & {id(p) for p in model.parameters()}
    opt = torch.optim.SGD(lm.parameters(), lr=0.1)
    lm(torch.randn(5, 4)).sum().backward()
    opt.step()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())


def test_linearized_model_uses_eval_semantics_and_frozen_buffers():
    torch.manual_seed(0)
    model = _Stateful()
    model.train()
    model(torch.randn(16, 4))
    x = torch.randn(8, 4)
    lm = LinearizedModel(model)
    lm.train()
    buffers = {n: b.clone() for n, b in lm.named_buffers()}
    out = lm(x)
    torch.testing.assert_close(out, copy.deepcopy(model).eval()(x))
    torch.testing.assert_close(lm(x), out, rtol=0, atol=0)  # no dropout noise
    for n, b in lm.named_buffers():
        torch.testing.assert_close(b, buffers[n], rtol=0, atol=0)
    assert all(m.training for m in lm.modules())  # flags restored after the forward


def test_linearized_model_frozen_parameters_stay_constants():
    model = _FixedFeatures()
    lm = LinearizedModel(model)
    assert lm.names == ("readout.weight", "readout.bias")
    lm.model.features.weight.requires_grad_(True)  # unfreezing later must not make it nonlinear
    lm(torch.randn(3, 4)).sum().backward()
    assert lm.model.features.weight.grad is None


def test_linearized_model_respects_no_grad_and_inference_mode():
    lm = LinearizedModel(mlp(4, 8, 2, seed=0))
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert not lm(x).requires_grad
    with torch.inference_mode():
        torch.testing.assert_close(lm(x), lm(x.clone()))


def test_linearized_model_state_dict_round_trip():
    model = mlp(4, 8, 2, seed=0)
    x = torch.randn(5, 4)
    lm = LinearizedModel(model)
    _perturb(lm, 0.2)
    fresh = LinearizedModel(mlp(4, 8, 2, seed=1))
    fresh.load_state_dict(lm.state_dict())
    torch.testing.assert_close(fresh(x), lm(x), rtol=0, atol=0)
    assert any(k.startswith("theta0.") for k in lm.state_dict())


def test_linearized_model_validation():
    with pytest.raises(TypeError, match="nn.Module"):
        LinearizedModel("net")
    with pytest.raises(TypeError, match="output_fn"):
        LinearizedModel(nn.Linear(2, 2), output_fn=3)

    class Dict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"y": self.fc(x)}

    with pytest.raises(TypeError, match="output_fn"):
        LinearizedModel(Dict())(torch.randn(3, 2))
    lm = LinearizedModel(Dict(), output_fn=lambda out: out["y"])
    assert lm(torch.randn(3, 2)).shape == (3, 2)


# ---------------------------------------------------------------------------- example
def _load_example():
    spec = importlib.util.spec_from_file_location("linearized_vs_real", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_runs_and_wide_nets_track_their_linearization_better(capsys):
    example = _load_example()
    assert example.main(["--width", "8", "--steps", "2", "--n-train", "8", "--n-test", "8"]) == 0
    assert "rmse" in capsys.readouterr().out
    kwargs = dict(steps=60, dim=4, n_train=16, n_test=32, log_every=60)
    narrow = example.run(8, **kwargs)[-1]
    wide = example.run(512, **kwargs)[-1]
    assert wide["loss"] < 0.5 * example.run(512, **{**kwargs, "steps": 0})[0]["loss"]
    assert wide["rmse"] < 0.5 * narrow["rmse"]
