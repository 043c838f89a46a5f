"""Cut points between layer groups (``structured._cut_points``, ``_cut_work``, ``_CutPass``).

When the factors of all layers do not fit the budget, the structured engine processes layer
groups one after the other, last group first. Where the input ``h`` of a layer separates
everything before it from the output (a ResNet block input, a transformer layer's residual
stream), a later group caches ``∂out/∂h`` and an earlier group's backward starts at ``h``
instead of differentiating the later layers again. A wrong cut would give a wrong kernel
silently, so every test compares with the brute force and checks that the path it is about ran.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import pytest
import torch
from torch import nn

from lazy_monitor.core._functional import FunctionalModel, slice_batch
from lazy_monitor.core.kernels import empirical_ntk
from lazy_monitor.core.kernels import structured as st
from lazy_monitor.core.kernels.structured import ntk as st_ntk
from lazy_monitor.core.kernels.structured import passes as st_passes
from tests import _zoo
from tests._reference import reference_ntk


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        y += self.shortcut(x)  # in place, as torchvision's BasicBlock
        return torch.relu(y)


class _ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.blocks = nn.Sequential(_Block(4, 4, 1), _Block(4, 6, 2), _Block(6, 6, 1))
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))
        return self.fc(h.mean((2, 3)))


class _DenseSkip(nn.Module):
    """conv1 -> h1 -> conv2 -> ... -> conv5 -> head, with h1 also fed to the head (a skip past
    the later layers): h1 itself is a cut, the inputs of conv3..conv5 are not, the head's
    input (the concatenation) is again."""

    def __init__(self, bypass_unless_two: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(4))
        self.fc = nn.Linear(8, 3)
        self.bypass_unless_two = bypass_unless_two

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = torch.tanh(self.conv1(x))
        h = h1
        for conv in self.convs:
            h = torch.tanh(conv(h))
        skip = h1.mean((2, 3))
        if self.bypass_unless_two and x.shape[0] <= 2:
            # the skip only in batches larger than the engine's 2-example probe (and its
            # one-example checks): the cuts the probe finds after h1 do not hold in the
            # factor passes
            skip = torch.zeros_like(skip)
        return self.fc(torch.cat([h.mean((2, 3)), skip], 1))


def _probe(
    model: nn.Module, x: Any, output_fn: Optional[Callable[[Any], torch.Tensor]] = None
) -> tuple[torch.Tensor, Any, list[str]]:
    fm = FunctionalModel(model, output_fn, torch.float64)
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    out, cap = st._forward(fm, {}, params, slice_batch(x, slice(0, 2)), list(params))
    st._verify_batch_mapping(out, cap)
    order: list[str] = []
    for use in cap.uses:
        for k in (use.weight, use.bias):
            if k is not None and k not in order:
                order.append(k)
    return out, cap, order


def test_cut_points_are_the_block_inputs_of_a_resnet() -> None:
    torch.manual_seed(0)
    model = _ResNet().double().eval()
    out, cap, order = _probe(model, torch.randn(4, 3, 8, 8, dtype=torch.float64))
    points = st._cut_points(out, cap, order)
    # a block's input reaches its output through conv1 and the shortcut: the block input is
    # a cut, nothing inside a block is (the identity/shortcut bypasses conv1 and conv2)
    assert set(points) == {
        "stem.1.weight",  # the stem conv's output, input of its BatchNorm
        "blocks.0.conv1.weight",
        "blocks.1.conv1.weight",
        "blocks.2.conv1.weight",
        "fc.weight",
    }
    assert points["blocks.2.conv1.weight"] == ((6, 4, 4), torch.float64)  # the cut, per example


def test_a_skip_past_later_layers_is_not_crossed_by_a_cut() -> None:
    torch.manual_seed(0)
    model = _DenseSkip().double().eval()
    out, cap, order = _probe(model, torch.randn(3, 2, 5, 5, dtype=torch.float64))
    points = st._cut_points(out, cap, order)
    assert "convs.0.weight" in points  # h1: every consumer of it leads into its edge
    for k in ("convs.1.weight", "convs.2.weight", "convs.3.weight"):
        assert k not in points  # h1 skips past them
    assert "fc.weight" in points  # ... into the concatenation, which carries everything


def _budget_with_cuts(
    model: nn.Module,
    x: Any,
    o: int,
    end: Optional[str] = None,
    output_fn: Optional[Callable[[Any], torch.Tensor]] = None,
) -> int:
    """The largest budget (factors of all rows do not fit) under which layer groups start
    their backward at a cut (at the cut before ``end``, if given): the test's path must run,
    whatever the exact byte counts."""
    n = x.shape[0]
    out, cap, _ = _probe(model, x, output_fn)
    params = {k: v.detach() for k, v in model.named_parameters()}
    plan = st._make_plan(params, cap, n, o, False)
    total = n * sum(st._name_bytes(cap, plan, params, o).values())
    for budget in range(total - 1, total // 16, -max(1, total // 256)):
        work = _work_with_budget(params, cap, plan, n, o, out, budget)
        specs = [spec for _, _, spec in work if spec is not None]
        if len(work) > 1 and any(s.stores for s in specs):
            if end is None or any(s.end == end for s in specs):
                return budget
    raise AssertionError("no budget engages the cut points")


def _work_with_budget(
    params: Any, cap: Any, plan: Any, n: int, o: int, out: torch.Tensor, budget: int
) -> list:
    from lazy_monitor.core.kernels import _common

    token = _common._FACTOR_BUDGET.set(budget)
    try:
        return st._work_plan(params, cap, plan, n, None, o, False, None, out)
    finally:
        _common._FACTOR_BUDGET.reset(token)


def _spy_roots(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, bool]]:
    """Record, per factor pass, its cut (None: none) and whether its backward started there;
    passes keep all rows."""
    monkeypatch.setattr(st_ntk, "_activation_bytes_per_example", lambda cap, plan, o: 1)
    roots: list[tuple[Any, bool]] = []
    cut_roles = st_passes._cut_roles

    def spy(*args: Any) -> Any:
        result = cut_roles(*args)
        roots.append((args[0].end, result[0] is not None))
        return result

    monkeypatch.setattr(st_passes, "_cut_roles", spy)
    return roots


@pytest.mark.parametrize("kind", ["full", "trace", "diagonal"])
def test_groups_starting_at_cuts_give_the_exact_kernel(
    monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    torch.manual_seed(0)
    model = _ResNet().double().eval()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    budget = _budget_with_cuts(model, x, 3)
    roots = _spy_roots(monkeypatch)
    k = empirical_ntk(model, x, kind=kind, implementation="structured", max_memory=budget)
    ref, _ = reference_ntk(model, x, kind=kind)
    torch.testing.assert_close(k, ref, rtol=1e-6, atol=1e-9)
    assert any(used for _, used in roots), "no factor pass started its backward at a cut"


def test_per_layer_blocks_with_cuts_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    model = _ResNet().double().eval()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    budget = _budget_with_cuts(model, x, 3)
    roots = _spy_roots(monkeypatch)
    k, blocks = empirical_ntk(
        model, x, implementation="structured", max_memory=budget, return_blocks=True
    )
    ref, ref_blocks = reference_ntk(model, x)
    torch.testing.assert_close(k, ref, rtol=1e-6, atol=1e-9)
    assert set(blocks) == set(ref_blocks)
    for name, block in blocks.items():
        torch.testing.assert_close(block, ref_blocks[name], rtol=1e-6, atol=1e-9)
    assert any(used for _, used in roots)


def test_a_cut_that_fails_in_a_factor_pass_falls_back_to_the_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the probe (2 examples) sees no skip, so the input of convs.2 is a cut point; in the
    # passes over all 6 examples it is not (h1 skips past it): each pass must notice on its
    # own graph and start that backward at the output
    torch.manual_seed(0)
    model = _DenseSkip(bypass_unless_two=True).double().eval()
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    out, cap, order = _probe(model, x)
    assert "convs.2.weight" in st._cut_points(out, cap, order)
    budget = _budget_with_cuts(model, x, 3, end="convs.2.weight")
    roots = _spy_roots(monkeypatch)
    k = empirical_ntk(model, x, implementation="structured", max_memory=budget)
    ref, _ = reference_ntk(model, x)
    torch.testing.assert_close(k, ref, rtol=1e-6, atol=1e-9)
    ends = [used for end, used in roots if end == "convs.2.weight"]
    assert ends and not any(ends)


def test_cut_caches_and_groups_stay_within_the_budget() -> None:
    torch.manual_seed(0)
    model = _ResNet().double().eval()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    n, o = 6, 3
    budget = _budget_with_cuts(model, x, o)
    out, cap, order = _probe(model, x)
    params = {k: v.detach() for k, v in model.named_parameters()}
    plan = st._make_plan(params, cap, n, o, False)
    work = _work_with_budget(params, cap, plan, n, o, out, budget)
    points = st._cut_points(out, cap, order)
    cache = {k: n * o * 8 * torch.Size(s).numel() for k, (s, _) in points.items()}
    for i, (_, size, spec) in enumerate(work):
        alive = [cache[k] for k in spec.stores]
        if spec.end is not None:
            alive.append(cache[spec.end])
        assert n * size + sum(alive) <= budget, (i, n * size, alive, budget)
    # last group first: every cut a group starts from was stored by a group processed before
    stored: set[str] = set()
    for _, _, spec in work:
        assert spec.end is None or spec.end in stored
        stored.update(spec.stores)


_ZOO_CASES = {
    # transformers: the residual stream between layers is a cut (HF GPT-2: the tied wte and the
    # batch-shared wpe go to the fallback, which does not take part in the groups)
    "hf_gpt2_3_layers": lambda: _zoo.gpt2(n_layer=3, n=5),
    "encoder_3_layers": lambda: _zoo.encoder(True, layers=3),
    # models the cuts were not written for, each under the largest budget at which cuts engage
    **{k: (lambda k=k: _zoo.build(k)) for k in ("prelu", "class_token", "norm_layernorm")},
    "encoder_1_layer": lambda: _zoo.build("encoder_batch_first"),
}


@pytest.mark.parametrize("name", list(_ZOO_CASES))
def test_zoo_models_with_cuts_engaged_are_exact(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    case = _ZOO_CASES[name]()
    with torch.no_grad():
        y = case.model(case.x)
        o = (case.output_fn(y) if case.output_fn is not None else y).shape[1]
    budget = _budget_with_cuts(case.model, case.x, o, output_fn=case.output_fn)
    roots = _spy_roots(monkeypatch)
    k = empirical_ntk(
        case.model, case.x, output_fn=case.output_fn, implementation="structured", max_memory=budget
    )
    ref, _ = reference_ntk(case.model, case.x, output_fn=case.output_fn)
    torch.testing.assert_close(k, ref, rtol=1e-6, atol=1e-9)
    assert any(used for _, used in roots)
