"""Fallback decisions of the engine: verified batch mapping of structured uses, the per-example
loop where vmap cannot run, auto on data-dependent control flow, ntvp without forward AD, and
the single validation point of the configuration."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lazy_monitor.core.kernels.structured.planning as st_planning
from lazy_monitor.core.kernels import (
    ForwardADUnsupportedError,
    NtkConfig,
    StructuredPlanError,
    empirical_ntk,
    empirical_ntk_fn,
)
from tests._reference import reference_ntk
from tests._spies import record_fallbacks
from tests._zoo import build


def _fallback_names(monkeypatch: pytest.MonkeyPatch, case) -> list[str]:  # noqa: ANN001
    seen = record_fallbacks(monkeypatch)
    k = empirical_ntk(case.model, case.x, implementation="structured", output_fn=case.output_fn)
    ref, _ = reference_ntk(case.model, case.x, output_fn=case.output_fn)
    torch.testing.assert_close(k, ref, rtol=1e-6, atol=1e-9)
    return sorted(seen)


def test_batch_shared_index_is_expanded_to_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Position ids ``(1, T)`` shared by the batch: the embedding's output is expanded to the
    batch (structured/broadcast.py), nothing falls back."""
    assert _fallback_names(monkeypatch, build("shared_index_embedding")) == []


def test_expanded_class_token_gets_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _fallback_names(monkeypatch, build("class_token")) == []


def test_gpt2_position_embedding_is_factorised(monkeypatch: pytest.MonkeyPatch) -> None:
    names = _fallback_names(monkeypatch, build("gpt2"))
    assert "transformer.wpe.weight" not in names
    assert "transformer.ln_f.weight" not in names  # LayerNorm on batched (N, T, d): structured


def test_sequence_first_layout_with_seq_len_equal_to_batch_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """(T, N, d) with T == N: dim 0 has the batch's size but is not the batch; the gradient
    check of the batch mapping must send those parameters to the fallback."""
    case = build("mha")
    case.x = torch.randn(3, 3, 8, dtype=torch.float64)  # T == N == 3
    names = _fallback_names(monkeypatch, case)
    assert "body.attn.in_proj_weight" in names and "body.attn.out_proj.weight" in names
    assert "head.weight" not in names


def test_vmap_failure_falls_back_to_loop_with_one_warning() -> None:
    case = build("lstm_f64")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        k = empirical_ntk(case.model, case.x, implementation="jacobian", chunk_size=1)
    notes = [w for w in caught if "per-example loop" in str(w.message)]
    assert len(notes) == 1 and "vmap" in str(notes[0].message)
    ref, _ = reference_ntk(case.model, case.x)
    torch.testing.assert_close(k, ref, rtol=1e-6, atol=1e-9)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x[0, 0] > 0:  # value-dependent: blocks of one example take different branches
            return self.lin(x)
        # a copy of Wᵀ has no rule (``x @ W.t()`` alone is a Linear use, like the other branch)
        return x @ self.lin.weight.t().contiguous() + self.lin.bias


class _Switch(nn.Module):
    """Examples with a negative first feature get a constant output: no gradient at all."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x[0, 0] > 0:
            return torch.tanh(self.lin(x))
        return torch.zeros(x.shape[0], 2, dtype=x.dtype)


def test_per_example_loop_gives_zero_rows_for_outputs_without_parameters() -> None:
    """The loop (vmap cannot run the value-dependent ``if``) differentiates one example at a
    time: an example whose output does not depend on the parameters has zero rows (it used to
    raise "element 0 of tensors does not require grad")."""
    model = _Switch().double()
    x = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 2.0, 0.5], [0.3, 1.0, 1.0]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the loop's own note
        k = empirical_ntk(model, x, implementation="jacobian")
    ref = torch.zeros_like(k)
    keep = [0, 2]
    ref_kept, _ = reference_ntk(model, x[keep])
    ref[torch.tensor(keep)[:, None], torch.tensor(keep)] = ref_kept
    torch.testing.assert_close(k, ref, rtol=1e-6, atol=1e-9)
    assert k[1].abs().max() == 0 and k[:, 1].abs().max() == 0


def test_auto_decides_internally_on_data_dependent_control_flow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _Branchy().double()
    x = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 2.0, 0.5], [0.3, 1.0, 1.0]], dtype=torch.float64)
    with pytest.raises(StructuredPlanError, match="implementation='jacobian'"):
        empirical_ntk(model, x, implementation="structured", chunk_size=1)
    ref, _ = reference_ntk(model, x)
    # the cost model would pick the Jacobian path for this tiny model before any plan could
    # break: make auto take the structured plan, which then does not hold on example 1
    monkeypatch.setattr(st_planning, "choose_path", lambda *a: ("structured", set(), {}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # one warning per (model, reason), not per call
            k = empirical_ntk(model, x, implementation="auto", chunk_size=1)
    messages = [str(w.message) for w in caught]
    assert sum("Jacobian contraction" in m for m in messages) == 1
    assert not any("'auto'" in m for m in messages)  # no advice to use what is in use
    # vmap cannot run the value-dependent `if` either: the per-example loop, one note that
    # names the module, the cause and the fix
    loop = [m for m in messages if "per-example loop" in m]
    assert len(loop) == 1 and "_Branchy" in loop[0] and "control flow" in loop[0]
    assert "fix:" in loop[0]
    torch.testing.assert_close(k, ref, rtol=1e-6, atol=1e-9)


def test_ntvp_without_forward_ad_names_the_fix() -> None:
    case = build("lstm_f32")
    with pytest.raises(ForwardADUnsupportedError, match="implementation='auto' or 'jacobian'"):
        empirical_ntk(case.model, case.x, implementation="ntvp")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"kind": 3}, TypeError, "`kind` must be a string"),
        ({"kind": "diag"}, ValueError, "`kind` must be one of"),
        ({"implementation": 1}, TypeError, "`implementation` must be a string"),
        ({"implementation": "fast"}, ValueError, "`implementation` must be one of"),
        (
            {"projection": "mean"},
            ValueError,
            "`projection` must be None, a positive int k or 'sum'",
        ),
        ({"projection": 0}, ValueError, "`projection` must be a positive int"),
        ({"projection": 2.5}, TypeError, "`projection` must be a positive int"),
        ({"projection_seed": "a"}, TypeError, "`projection_seed` must be an int"),
        ({"chunk_size": 0}, ValueError, "`chunk_size` must be a positive int"),
        ({"chunk_size": 1.0}, TypeError, "`chunk_size` must be a positive int"),
        ({"max_memory": -1}, ValueError, "`max_memory` must be a positive int"),
    ],
)
def test_config_is_validated_once_with_one_wording(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        NtkConfig(**kwargs)
    with pytest.raises(error, match=match):
        empirical_ntk_fn(nn.Linear(2, 2), **kwargs)
    with pytest.raises(error, match=match):
        empirical_ntk(nn.Linear(2, 2), torch.randn(2, 2), **kwargs)


def test_max_memory_bounds_blocks_without_changing_the_kernel() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    ref, _ = reference_ntk(model, x)
    for impl in ("auto", "jacobian"):
        k = empirical_ntk(model, x, implementation=impl, max_memory=2048)
        torch.testing.assert_close(k, ref, rtol=1e-6, atol=1e-9)
