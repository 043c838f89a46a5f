"""``implementation="auto"`` prices its fallbacks (issue 18, item 3): structured blocks, a
Jacobian remainder and the Jacobian path are compared as whole plans, the remainder's passes
included, and the cheapest runs; :func:`describe_plan` reports the plan per parameter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lazy_monitor.core.kernels import empirical_ntk
from lazy_monitor.core.kernels.cost import PassModel, choose_path
from lazy_monitor.core.kernels.plan import describe_plan
from tests._reference import reference_ntk
from tests._zoo import build

MODEL = PassModel(n=32, o=10, fp=1e6, calls=50, pairs=0.6, sym_blocks=10)


def test_remainder_passes_are_priced() -> None:
    """A structured plan that saves a little in contractions but needs a Jacobian remainder
    pays that remainder's passes on top of its own: the Jacobian path wins."""
    numel, macs = 10_000, 10_000.0
    jac_contraction = MODEL.pairs * MODEL.n**2 * MODEL.o**2 * numel
    structured = {"w": (0.9 * jac_contraction, numel, macs)}
    path, moved, costs = choose_path(MODEL, structured, {"cls": (8, 8.0)})
    assert path == "jacobian" and not moved
    assert costs["structured"] > costs["jacobian"]
    # without the remainder and with a clear saving, the structured plan wins
    structured = {"w": (0.05 * jac_contraction, numel, macs)}
    assert choose_path(MODEL, structured, {})[0] == "structured"


def test_expensive_parameters_join_a_paid_remainder() -> None:
    """Once a remainder's passes are paid, a parameter whose Jacobian rows are cheaper than
    its structured contraction joins it; cheap structured ones stay."""
    big, small = 1_000_000, 100
    pairwise = MODEL.pairs * MODEL.n**2 * MODEL.o**2
    structured = {
        "cheap": (0.01 * pairwise * big, big, float(big)),
        "dear": (100.0 * pairwise * small, small, float(small)),
    }
    path, moved, costs = choose_path(MODEL, structured, {"pos": (64, 64.0)})
    assert path == "mixed" and moved == {"dear"}
    assert costs["mixed"] == min(costs.values())


def test_auto_picks_jacobian_path_for_tiny_transformer_and_stays_exact() -> None:
    case = build("vit")
    plan = describe_plan(case.model, case.x, output_fn=case.output_fn)
    assert plan["path"] == "jacobian"
    assert set(plan["parameters"].values()) == {"jacobian"}
    assert plan["costs"]["jacobian"] == min(plan["costs"].values())
    k = empirical_ntk(case.model, case.x, output_fn=case.output_fn)
    ref, _ = reference_ntk(case.model, case.x, output_fn=case.output_fn)
    assert float((k - ref).abs().max() / ref.abs().max()) <= 1e-6


def test_auto_factorises_a_wide_mlp() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)).double()
    x = torch.randn(16, 256, dtype=torch.float64)
    plan = describe_plan(model, x)
    assert plan["path"] == "structured"
    assert plan["parameters"]["0.weight"] in ("outer", "gram", "per_example", "stored")
    assert plan["parameters"]["0.bias"] == "folded"
    assert list(plan["parameters"]) == [k for k, _ in model.named_parameters()]


@pytest.mark.parametrize("name", ["gpt2", "class_token"])
def test_mixed_and_remainder_plans_stay_exact(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the cost model decides, every plan gives the same kernel: force each."""
    import lazy_monitor.core.kernels.structured.planning as st

    case = build(name)
    ref, _ = reference_ntk(case.model, case.x, output_fn=case.output_fn)
    real = st.choose_path
    for forced in ("structured", "mixed", "jacobian"):

        def fake(model, structured, remainder, forced=forced):  # noqa: ANN001
            _, moved, costs = real(model, structured, remainder)
            if forced == "mixed":  # move every other structured parameter
                moved = set(list(structured)[::2])
            return forced, moved, costs

        monkeypatch.setattr(st, "choose_path", fake)
        k = empirical_ntk(case.model, case.x, output_fn=case.output_fn)
        assert float((k.double() - ref).abs().max() / ref.abs().max()) <= 1e-6, forced


def test_jacobian_decision_is_reused_without_a_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """A repeated auto call with the same shapes skips the probe pass once the Jacobian path
    was chosen (the decision reads shapes only); new shapes probe again."""
    import lazy_monitor.core.kernels.structured.ntk as st

    case = build("vit")
    first = empirical_ntk(case.model, case.x, output_fn=case.output_fn)
    probes: list[int] = []
    real = st._probe_plan

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        probes.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(st, "_probe_plan", spy)
    again = empirical_ntk(case.model, case.x, output_fn=case.output_fn)
    assert probes == [] and torch.equal(first, again)
    empirical_ntk(case.model, case.x[:2], output_fn=case.output_fn)
    assert probes == [1]
