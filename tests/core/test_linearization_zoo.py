"""Linearization on models forward-mode AD cannot run as-is (fused attention, mkldnn LSTM,
the TransformerEncoder fast path, custom autograd.Function) against an explicit reference
``f0 + J δ`` with ``J`` from the float64 brute force."""

from __future__ import annotations

import copy

import pytest
import torch

from lazy_monitor import Linearization, LinearizedModel
from tests._reference import reference_jacobian
from tests._zoo import build


def _perturb(model: torch.nn.Module, scale: float = 1e-2) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _reference_f_lin(case, model0, model1) -> torch.Tensor:  # noqa: ANN001
    jac = reference_jacobian(model0, case.x, output_fn=case.output_fn)
    p0, p1 = dict(model0.named_parameters()), dict(model1.named_parameters())
    with torch.no_grad():
        m = copy.deepcopy(model0).double().eval()
        x = case.x if not case.x.is_floating_point() else case.x.double()
        f0 = m(x)
        f0 = (case.output_fn(f0) if case.output_fn else f0).reshape(x.shape[0], -1)
    lin = f0.clone()
    for name, j in jac.items():
        delta = (p1[name].detach().double() - p0[name].detach().double()).reshape(-1)
        lin += j @ delta
    return lin


@pytest.mark.parametrize(
    "name", ["gpt2", "lstm_f32", "lstm_f64", "encoder_batch_first", "custom_function"]
)
def test_f_lin_matches_explicit_reference(name: str) -> None:
    case = build(name)
    model = case.model
    model.train()  # the linearization evaluates in eval semantics and restores the flag
    lin = Linearization(model, output_fn=case.output_fn)
    model0 = copy.deepcopy(model)
    _perturb(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    f0, f_lin = lin.f0_and_f_lin(case.x)
    ref = _reference_f_lin(case, model0, model)
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 1e-9
    torch.testing.assert_close(f_lin.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(lin.f_lin(case.x), f_lin, rtol=0, atol=0)
    # side-effect free: weights, buffers, flags, RNG untouched
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(rng, torch.get_rng_state())


def test_linearized_model_trains_through_reverse_mode_route() -> None:
    """LinearizedModel on the float32 CPU LSTM (no forward-mode rule): output and gradient
    w.r.t. θ equal f0 + J δ and Σ J from the reference."""
    case = build("lstm_f32")
    model0 = copy.deepcopy(case.model)
    lm = LinearizedModel(case.model)
    model = lm.model  # the private copy that is trained
    _perturb(model)
    out = lm(case.x)
    ref = _reference_f_lin(case, model0, model)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    jac = reference_jacobian(model0, case.x)
    for name, p in model.named_parameters():
        torch.testing.assert_close(
            p.grad.double().reshape(-1), jac[name].sum((0, 1)), rtol=1e-4, atol=1e-4
        )
