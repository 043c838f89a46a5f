"""Projected kernels: ``projection=k`` (random Gaussian sketch of the outputs) and ``"sum"``
(pseudo-NTK), against the float64 brute force and their defining identities."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lazy_monitor.core.kernels import empirical_ntk, empirical_ntk_fn, projection_matrix
from tests._reference import reference_ntk


def _mlp(o: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, o)).double()


class _Seq(nn.Module):
    """Sequence output ``(N, T, V)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(3, 6)
        self.b = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _projected_reference(full: torch.Tensor, r: torch.Tensor, kind: str) -> torch.Tensor:
    """``Rᵀ K R / k`` from the exact ``(N1, N2, O, O)`` kernel."""
    k = torch.einsum("ai,nmab,bj->nmij", r, full, r) / r.shape[1]
    if kind == "full":
        return k
    d = k.diagonal(dim1=2, dim2=3)
    return d.sum(-1) if kind == "trace" else d


@pytest.mark.parametrize("implementation", ["auto", "structured", "jacobian", "ntvp"])
@pytest.mark.parametrize("kind", ["full", "trace", "diagonal"])
def test_projection_is_the_kernel_of_projected_outputs(implementation: str, kind: str) -> None:
    model, x = _mlp(), torch.randn(3, 4, dtype=torch.float64)
    full, _ = reference_ntk(model, x)
    r = projection_matrix(5, 3, seed=7)
    got = empirical_ntk(
        model, x, kind=kind, implementation=implementation, projection=3, projection_seed=7
    )
    torch.testing.assert_close(got, _projected_reference(full, r, kind), rtol=1e-6, atol=1e-9)


def test_projection_of_sequence_outputs_flattens_t_times_v_and_output_fn_selects() -> None:
    model, x = _Seq().double(), torch.randn(2, 5, 3, dtype=torch.float64)
    full, _ = reference_ntk(model, x)  # O = T·V = 20
    got = empirical_ntk(model, x, kind="trace", projection=4, projection_seed=1)
    ref = _projected_reference(full, projection_matrix(20, 4, 1), "trace")
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
    last = empirical_ntk(model, x, kind="trace", output_fn=lambda out: out[:, -1])
    ref_last, _ = reference_ntk(model, x, kind="trace", output_fn=lambda out: out[:, -1])
    torch.testing.assert_close(last, ref_last, rtol=1e-6, atol=1e-9)


def test_projection_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    model, x = _mlp(), torch.randn(3, 4, dtype=torch.float64)
    rng = torch.get_rng_state()
    a = empirical_ntk(model, x, kind="trace", projection=2, projection_seed=3)
    b = empirical_ntk(model, x, kind="trace", projection=2, projection_seed=3)
    c = empirical_ntk(model, x, kind="trace", projection=2, projection_seed=4)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.equal(rng, torch.get_rng_state())  # R has its own generator
    ntk = empirical_ntk_fn(model, kind="trace", projection=2, projection_seed=3)
    assert torch.equal(ntk(x), a)


def test_projected_trace_is_unbiased_over_seeds() -> None:
    model, x = _mlp(), torch.randn(3, 4, dtype=torch.float64)
    exact = empirical_ntk(model, x, kind="trace")
    seeds = 200
    est = torch.stack([_seeded(model, x, s) for s in range(seeds)])
    mean, sem = est.mean(0), est.std(0) / math.sqrt(seeds)
    assert ((mean - exact).abs() <= 4 * sem + 1e-12).all()
    # and the spread really shrinks like 1/sqrt(seeds): a single seed is off
    assert (est[0] - exact).abs().max() > (mean - exact).abs().max()


def _seeded(model: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    return empirical_ntk(model, x, kind="trace", projection=2, projection_seed=seed)


@pytest.mark.parametrize("implementation", ["auto", "jacobian"])
def test_sum_projection_is_the_pseudo_ntk(implementation: str) -> None:
    model, x = _mlp(), torch.randn(3, 4, dtype=torch.float64)
    got = empirical_ntk(model, x, kind="trace", projection="sum", implementation=implementation)
    ref, _ = reference_ntk(
        model, x, kind="trace", output_fn=lambda out: out.sum(1, keepdim=True) / math.sqrt(5)
    )
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
    full = empirical_ntk(model, x, kind="full", projection="sum")
    assert full.shape == (3, 3, 1, 1)


def test_projection_with_blocks_sums_to_kernel() -> None:
    model, x = _mlp(), torch.randn(3, 4, dtype=torch.float64)
    k, blocks = empirical_ntk(model, x, kind="full", projection=2, return_blocks=True)
    assert k.shape == (3, 3, 2, 2)
    torch.testing.assert_close(sum(blocks.values()), k)
