"""The structured implementation: every contraction strategy is exact, and supported layers
really take the structured path (no silent fallback to the Jacobian contraction)."""

from __future__ import annotations

import pytest
import torch
from _reference import reference_ntk
from test_kernels import _assert_matches, _case
from torch import nn

import lazy_monitor.core.kernels.structured.ntk as structured_ntk_mod
import lazy_monitor.core.kernels.structured.passes as structured_passes
import lazy_monitor.core.kernels.structured.planning as structured_planning
from lazy_monitor.core.kernels import empirical_ntk
from lazy_monitor.core.kernels._common import symmetric_blocks, symmetric_fraction
from lazy_monitor.core.kernels.cost import choose_strategy, strategy_costs

# The conv1d case pads "same" with an even kernel on purpose (asymmetric padding).
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")

STRATEGY_CASES = ["cnn", "conv1d", "cross_cnn", "embedding", "reuse"]


def _forcing(strategy: str):
    def forced(n, o, t, d_in, d_out, groups=1, dense_input=True, builds=1.0, pairs=1.0):  # noqa: ANN001, ANN202
        if strategy == "outer" and t != 1:
            return "gram"
        if strategy in ("per_example", "stored") and not dense_input:
            return "gram"
        return strategy

    return forced


@pytest.mark.parametrize("case", STRATEGY_CASES)
@pytest.mark.parametrize("kind", ["full", "trace", "diagonal"])
@pytest.mark.parametrize("strategy", ["outer", "gram", "per_example", "stored"])
def test_every_strategy_matches_reference(
    monkeypatch: pytest.MonkeyPatch, case: str, kind: str, strategy: str
) -> None:
    model, x1, x2, output_fn, refs = _case(case)
    monkeypatch.setattr(structured_planning, "choose_strategy", _forcing(strategy))
    for blocks in (False, True) if kind == "full" else (False,):  # folded vs per-name biases
        out = empirical_ntk(
            model,
            x1,
            x2,
            kind=kind,
            implementation="structured",
            output_fn=output_fn,
            return_blocks=blocks,
        )
        _assert_matches(out[0] if blocks else out, refs[kind][0])


@pytest.mark.parametrize("strategy", ["gram", "per_example", "stored"])
def test_strategies_with_example_blocks_match_reference(
    monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    monkeypatch.setattr(structured_planning, "choose_strategy", _forcing(strategy))
    for case in ("cnn", "cross_cnn"):
        model, x1, x2, _, refs = _case(case)
        _assert_matches(
            empirical_ntk(model, x1, x2, implementation="structured", chunk_size=1),
            refs["full"][0],
        )


@pytest.mark.parametrize("batched_backward", [True, False])
@pytest.mark.parametrize("case", ["mlp", "cnn", "batchnorm_dropout", "embedding", "reuse"])
def test_batched_and_per_output_backward_give_the_reference_kernel(
    monkeypatch: pytest.MonkeyPatch, case: str, batched_backward: bool
) -> None:
    # Small problems take one batched backward over the O cotangents, large ones O plain
    # passes (memory bound); both must give the reference kernel.
    monkeypatch.setattr(
        structured_passes, "_BATCHED_BACKWARD_BYTES", 2**40 if batched_backward else 0
    )
    model, x1, x2, output_fn, refs = _case(case)
    for kind in ("full", "trace", "diagonal"):
        out = empirical_ntk(
            model, x1, x2, kind=kind, implementation="structured", output_fn=output_fn
        )
        _assert_matches(out, refs[kind][0])


@pytest.mark.parametrize(
    "case", ["mlp", "cnn", "conv1d", "batchnorm_dropout", "embedding", "multi_dim_output"]
)
def test_supported_layers_never_use_the_jacobian_fallback(
    monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    def fail(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("structured path fell back to the Jacobian contraction")

    monkeypatch.setattr(structured_ntk_mod, "jacobian_ntk", fail)
    model, x1, x2, output_fn, refs = _case(case)
    kernel = empirical_ntk(model, x1, x2, implementation="structured", output_fn=output_fn)
    _assert_matches(kernel, refs["full"][0])


def test_unsupported_uses_fall_back_for_exactly_those_parameters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[list[str]] = []
    original = structured_ntk_mod.jacobian_ntk

    def spy(fm, params, names, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(list(names))
        return original(fm, params, names, *args, **kwargs)

    monkeypatch.setattr(structured_ntk_mod, "jacobian_ntk", spy)
    # `m` is used as the right operand of a matmul (`h @ m`): a Linear with a transposed
    # weight, factorised like one (tests/core/test_speed_paths.py covers the unverifiable forms).
    model, x1, _, _, refs = _case("reuse")
    _assert_matches(empirical_ntk(model, x1, implementation="structured"), refs["full"][0])
    assert seen == []
    # an embedding weight tied to a Linear head takes the tied rule (test_structured_tied.py)
    model, x1, _, _, refs = _case("tied_lm")
    _assert_matches(empirical_ntk(model, x1, implementation="structured"), refs["full"][0])
    assert seen == []
    # a weight also used by an op without a rule (its norm scales the output): that weight only
    torch.manual_seed(0)
    model = _NormScaled().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    _assert_matches(
        empirical_ntk(model, x, implementation="structured"), reference_ntk(model, x)[0]
    )
    assert seen == [["lin.weight"]]


class _NormScaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(x))) * self.lin.weight.norm()


@pytest.mark.parametrize("implementation", ["jacobian", "ntvp", "structured", "auto"])
def test_batch_statistics_normalisation_is_rejected(implementation: str) -> None:
    """BatchNorm without running statistics couples the examples of a batch even in eval."""
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)
    )
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d\) has no running statistics"):
        empirical_ntk(model, torch.randn(4, 3), implementation=implementation)


def test_cost_model_prefers_per_example_for_many_positions_and_gram_for_few() -> None:
    # Early conv: 1024 positions, small weight -> per-example gradients.
    assert choose_strategy(128, 10, 1024, 28, 64) == "per_example"
    # Late conv: 16 positions, 4608 x 512 weight -> Gram over positions.
    assert choose_strategy(128, 10, 16, 4608, 512) == "gram"
    # Plain Linear: one position -> outer product.
    assert choose_strategy(128, 10, 1, 1025, 1024) == "outer"
    # Embeddings never materialise vocabulary-sized per-example gradients.
    assert choose_strategy(8, 10, 4, 1, 16, dense_input=False) in ("gram", "outer")
    costs = strategy_costs(128, 10, 16, 4608, 512)
    assert costs["gram"] < costs["per_example"]
    # Rebuilding per-example gradients for every column block (blocked examples) is charged
    # to per_example only, and can tip a layer towards Gram.
    once, rebuilt = (
        strategy_costs(64, 10, 64, 1153, 256),
        strategy_costs(64, 10, 64, 1153, 256, builds=8.0),
    )
    assert rebuilt["gram"] == once["gram"] and rebuilt["per_example"] > once["per_example"]
    assert choose_strategy(32, 10, 64, 577, 128) == "per_example"
    assert choose_strategy(32, 10, 64, 577, 128, builds=32.0) == "gram"
    # A symmetric kernel contracts ~half the example pairs but builds every example's
    # gradients once: at small N that tips a late conv towards Gram (measured: CNN conv 3 at
    # N = 32 Gram 0.54 s vs per-example 0.9 s; at N = 128 per-example ahead).
    conv3 = (10, 64, 1154, 256)
    assert choose_strategy(32, *conv3, pairs=symmetric_fraction(32)) == "gram"
    assert choose_strategy(128, *conv3, pairs=symmetric_fraction(128)) == "per_example"
    halved = strategy_costs(32, *conv3, pairs=0.5)
    full = strategy_costs(32, *conv3)
    assert halved["gram"] == 0.5 * full["gram"]
    assert full["per_example"] > halved["per_example"] > 0.5 * full["per_example"]


def test_symmetric_fraction_counts_the_blocks_symmetric_blocks_computes() -> None:
    for n in (1, 5, 8, 9, 17, 32, 100, 128):
        calls: list[tuple[slice, slice]] = []

        def fn(i: slice, j: slice, calls: list = calls) -> tuple[torch.Tensor]:
            calls.append((i, j))
            return (torch.zeros(i.stop - i.start, j.stop - j.start),)

        symmetric_blocks(n, "trace", fn)
        pairs = sum((i.stop - i.start) * (j.stop - j.start) for i, j in calls)
        pieces = len({i.start for i, _ in calls})
        assert len(calls) == pieces * (pieces + 1) // 2
        if n % pieces == 0:  # equal pieces: the fraction of the n² pairs is exact
            assert pairs / n**2 == pytest.approx(symmetric_fraction(n))


def test_data_dependent_parameter_use_is_detected_not_silently_wrong() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x[0, 0] > 0:  # the plan is made on the first example
                return self.lin(x)
            return x @ self.lin.weight.t().contiguous() + self.lin.bias  # a copy: no rule

    x = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 2.0, 0.5]])
    with pytest.raises(RuntimeError, match="data-dependent control flow"):
        empirical_ntk(Branchy(), x, implementation="structured", chunk_size=1)
