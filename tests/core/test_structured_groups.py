"""Structured engine under a factor budget too small for all factors of all examples.

The parameters are then processed in consecutive groups whose factors for every example fit
(``structured._work_plan``); a parameter too large on its own falls back to example blocks;
forward/backward passes are split by activation memory (``_factors_in_passes``); ``stored``
weights build their per-example gradients one output at a time. Every path must give the
brute-force kernel, and each test checks that the path it is about actually ran.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lazy_monitor.core.kernels import empirical_ntk
from lazy_monitor.core.kernels import structured as st
from lazy_monitor.core.kernels.structured import ntk as st_ntk
from lazy_monitor.core.kernels.structured import passes as st_passes
from tests._reference import reference_ntk


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 12, 3, stride=2, padding=1),
            nn.GroupNorm(3, 12),
            nn.Tanh(),
            nn.Conv2d(12, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 5),
        )
        .double()
        .eval()
    )


def _spy(
    monkeypatch: pytest.MonkeyPatch, passes_by_activations: bool = False
) -> dict[str, list[Any]]:
    """Record the work plans and the rows of every forward/backward pass (tiny budgets would
    also split the passes by activation memory: off unless asked for)."""
    if not passes_by_activations:
        monkeypatch.setattr(st_ntk, "_activation_bytes_per_example", lambda cap, plan, o: 1)
    seen: dict[str, list[Any]] = {"work": [], "passes": []}
    work_plan, factors = st_ntk._work_plan, st_passes._factors

    def spy_work(*args: Any, **kwargs: Any) -> Any:
        out = work_plan(*args, **kwargs)
        seen["work"].append(out)
        return out

    def spy_factors(fm: Any, params: Any, plan: Any, x: torch.Tensor, cuts: Any = None) -> Any:
        seen["passes"].append(x.shape[0])
        return factors(fm, params, plan, x, cuts)

    monkeypatch.setattr(st_ntk, "_work_plan", spy_work)
    monkeypatch.setattr(st_passes, "_factors", spy_factors)
    return seen


def _bytes(model: nn.Module, x: torch.Tensor, o: int) -> dict[str, int]:
    """Per-example factor bytes of each planned parameter, as the engine computes them."""
    from lazy_monitor.core._functional import FunctionalModel

    params = {k: v.detach() for k, v in model.named_parameters()}
    fm = FunctionalModel(model, None, torch.float64)
    _, cap = st._forward(fm, {}, {k: v.requires_grad_() for k, v in params.items()}, x[:2])
    plan = st._make_plan(params, cap, x.shape[0], o, keep_blocks=False)
    return st._name_bytes(cap, plan, params, o)


@pytest.mark.parametrize("kind", ["full", "trace", "diagonal"])
def test_groups_of_layers_give_the_exact_kernel(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    model = _cnn()
    x = torch.randn(12, 3, 8, 8, dtype=torch.float64)
    sizes = _bytes(model, x, 5)
    # room for all rows of the largest parameter, not for all parameters together
    budget = 12 * max(sizes.values()) + 64
    assert 12 * sum(sizes.values()) > budget
    seen = _spy(monkeypatch)
    k = empirical_ntk(model, x, kind=kind, implementation="structured", max_memory=budget)
    ref, _ = reference_ntk(model, x, kind=kind)
    torch.testing.assert_close(k, ref, rtol=1e-6, atol=1e-9)
    (work,) = seen["work"]
    assert len(work) > 1  # grouped, not one piece
    covered = [n for part, *_ in work for n in (*part.weights, *part.biases)]
    assert sorted(covered) == sorted(sizes)  # every parameter exactly once
    # every group takes all 12 examples in one block (no per-pair rebuilds)
    assert all(rows == 12 for rows in seen["passes"])


def test_groups_with_per_layer_blocks_and_cross_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _cnn()
    x1 = torch.randn(10, 3, 8, 8, dtype=torch.float64)
    x2 = torch.randn(7, 3, 8, 8, dtype=torch.float64)
    budget = 10 * max(_bytes(model, x1, 5).values()) * 2
    seen = _spy(monkeypatch)
    k, blocks = empirical_ntk(
        model, x1, x2, implementation="structured", max_memory=budget, return_blocks=True
    )
    ref, ref_blocks = reference_ntk(model, x1, x2)
    torch.testing.assert_close(k, ref, rtol=1e-6, atol=1e-9)
    assert set(blocks) == set(ref_blocks)
    for name, block in blocks.items():
        torch.testing.assert_close(block, ref_blocks[name], rtol=1e-6, atol=1e-9)
    assert len(seen["work"][0]) > 1


def test_a_parameter_too_large_alone_falls_back_to_example_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _cnn()
    x = torch.randn(12, 3, 8, 8, dtype=torch.float64)
    sizes = _bytes(model, x, 5)
    big = max(sizes.values())
    budget = 6 * big  # the largest parameter fits 6 examples at a time, not 12
    seen = _spy(monkeypatch)
    k = empirical_ntk(model, x, implementation="structured", max_memory=budget)
    ref, _ = reference_ntk(model, x)
    torch.testing.assert_close(k, ref, rtol=1e-6, atol=1e-9)
    assert any(rows < 12 for rows in seen["passes"])  # example blocks for the large one
    assert any(rows == 12 for rows in seen["passes"])  # groups for the others


def test_forward_backward_passes_split_by_activation_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _cnn()
    x = torch.randn(12, 3, 8, 8, dtype=torch.float64)
    # half the 4 GiB budget holds the activations of 2 examples; factors fit in one piece
    monkeypatch.setattr(st_ntk, "_activation_bytes_per_example", lambda cap, plan, o: 2**30)
    seen = _spy(monkeypatch, passes_by_activations=True)
    k = empirical_ntk(model, x, implementation="structured", max_memory=4 * 2**30)
    ref, _ = reference_ntk(model, x)
    torch.testing.assert_close(k, ref, rtol=1e-6, atol=1e-9)
    assert len(seen["work"][0]) == 1
    assert seen["passes"] == [2] * 6


def test_stored_weights_give_the_exact_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    # early conv with many positions and a small weight: per-example gradients are smaller
    # than their factors, so the plan stores them
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16 * 16, 4)
    ).double()
    x = torch.randn(5, 2, 16, 16, dtype=torch.float64)
    plans: list[Any] = []
    make_plan = st_ntk._make_plan

    def spy(*args: Any, **kwargs: Any) -> Any:
        plans.append(make_plan(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(st_ntk, "_make_plan", spy)
    k = empirical_ntk(model, x, kind="full", implementation="structured")
    assert plans[0].weights["0.weight"] == "stored"
    ref, _ = reference_ntk(model, x)
    torch.testing.assert_close(k, ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "name",
    [
        "gpt2",
        "encoder_batch_first",
        "class_token",
        "depthwise_conv",
        "norm_groupnorm",
        "shared_index_embedding",
    ],
)
def test_zoo_models_under_a_tiny_budget_are_exact(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # architectures the grouping was not written for: HF GPT-2 from a config (tied and
    # batch-shared weights in the fallback), attention, an expanded class token, a depthwise
    # conv, GroupNorm, an embedding indexed by a batch-shared table
    from tests._zoo import build

    case = build(name)
    seen = _spy(monkeypatch)
    k = empirical_ntk(
        case.model, case.x, output_fn=case.output_fn, implementation="structured", max_memory=1024
    )
    ref, _ = reference_ntk(case.model, case.x, output_fn=case.output_fn)
    torch.testing.assert_close(k, ref, rtol=1e-6, atol=1e-9)
    assert len(seen["work"][0]) > 1
