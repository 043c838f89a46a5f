"""The pure cost estimator and the kind="auto" resolution used by the tracker."""

from __future__ import annotations

import torch
from torch import nn

from lazy_monitor.core.kernels import empirical_ntk, estimate_ntk_cost, resolve_kernel_config


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


class _Lm(nn.Module):
    def __init__(self, v: int = 3000) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(v, 8)
        self.head = nn.Linear(8, v)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids).mean(1)))


def test_estimate_counts_and_bytes_follow_the_documented_model() -> None:
    model, x = _mlp(), torch.randn(5, 4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    est = estimate_ntk_cost(model, x, kind="full", per_layer=True)
    assert (est["n"], est["o"], est["o_raw"], est["p"], est["blocks"]) == (5, 3, 3, 67, 4)
    assert est["kernel_bytes"] == 5 * 5 * 3 * 3 * 4 * (1 + 4)
    assert est["eig_bytes"] == 3 * 15**2 * 8  # float64 eigh
    assert est["bytes"] == est["kernel_bytes"] + est["factor_bytes"] + est["eig_bytes"]
    assert est["forward_flops"] >= 2 * 67 and est["seconds"] > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    proj = estimate_ntk_cost(model, x, kind="trace", projection=2)
    assert proj["o"] == 2 and proj["kernel_bytes"] == 25 * 4
    assert estimate_ntk_cost(model, x, kind="trace", projection="sum")["o"] == 1


def test_resolve_keeps_full_when_it_fits() -> None:
    cfg = resolve_kernel_config(_mlp(), torch.randn(5, 4))
    assert (cfg["kind"], cfg["projection"], cfg["reason"]) == ("full", None, "")


def test_resolve_downgrades_large_outputs_and_the_choice_runs() -> None:
    model, x = _Lm(), torch.randint(0, 3000, (4, 3))
    cfg = resolve_kernel_config(model, x, max_memory=64 * 2**20, max_seconds=None)
    assert cfg["kind"] == "trace" and cfg["projection"] is None  # trace fits 64 MiB
    # Factors are blocked to the budget, so memory alone never forces a projection; time does
    # (O backward passes for the exact trace against k for the projection).
    trace = estimate_ntk_cost(model, x, kind="trace")["seconds"]
    proj = estimate_ntk_cost(model, x, kind="trace", projection=4)["seconds"]
    assert proj < trace / 100
    cfg = resolve_kernel_config(model, x, max_seconds=10 * proj, projection_k=4)
    assert (cfg["kind"], cfg["projection"]) == ("trace", 4)
    assert "projection=4" in cfg["reason"] and cfg["estimate"]["o"] == 4
    k = empirical_ntk(model, x, kind=cfg["kind"], projection=cfg["projection"])
    assert k.shape == (4, 4) and torch.isfinite(k).all()
