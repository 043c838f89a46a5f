"""Repeated kernel calls on the same probe (a tracker's measurements) skip the probe passes
(issue 18, item 7): the output shape, the structured plan and its memory split are remembered
per module (:mod:`lazy_monitor.core.kernels._memo`) and reused only while shapes, module
attributes, the output function and the probe's values are identical; a remembered plan that
no longer matches the model's uses is dropped and the call starts over, exactly."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lazy_monitor.core.kernels import _common, empirical, empirical_ntk
from lazy_monitor.core.kernels.structured import ntk as structured_ntk_mod
from tests._reference import reference_ntk


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()


class _Counts:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.probe = 0
        self.shape = 0
        real_probe, real_shape = structured_ntk_mod._probe_plan, empirical._output_shape

        def probe(*a, **k):  # noqa: ANN002, ANN003, ANN202
            self.probe += 1
            return real_probe(*a, **k)

        def shape(*a, **k):  # noqa: ANN002, ANN003, ANN202
            self.shape += 1
            return real_shape(*a, **k)

        monkeypatch.setattr(structured_ntk_mod, "_probe_plan", probe)
        monkeypatch.setattr(empirical, "_output_shape", shape)


def test_repeated_calls_skip_the_probe_passes_and_stay_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _mlp()
    x = torch.randn(6, 5, dtype=torch.float64)
    counts = _Counts(monkeypatch)
    for _ in range(3):
        k = empirical_ntk(model, x, implementation="structured")
        assert torch.allclose(k, reference_ntk(model, x)[0], rtol=1e-10, atol=1e-12)
        with torch.no_grad():  # a training step: new values, same plan
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    assert (counts.probe, counts.shape) == (1, 1)


@pytest.mark.parametrize("change", ["values", "shape", "attribute", "output_fn"])
def test_anything_the_plan_depends_on_makes_a_new_probe_pass(
    monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    model = _mlp()
    x = torch.randn(6, 5, dtype=torch.float64)
    empirical_ntk(model, x, implementation="structured")
    counts = _Counts(monkeypatch)
    fn = None
    if change == "values":
        x = x.clone()
        x[0, 0] += 1.0  # the probe examples the plan was verified on
    elif change == "shape":
        x = torch.randn(7, 5, dtype=torch.float64)
    elif change == "attribute":
        model[1].some_flag = True  # a plain attribute can switch a module's code path
    else:

        def fn(out: torch.Tensor) -> torch.Tensor:
            return out[:, :2]

    k = empirical_ntk(model, x, implementation="structured", output_fn=fn)
    assert (counts.probe, counts.shape) == (1, 1)
    assert torch.allclose(k, reference_ntk(model, x, output_fn=fn)[0], rtol=1e-10, atol=1e-12)


def test_projection_is_part_of_what_is_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 12)).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    counts = _Counts(monkeypatch)
    a = empirical_ntk(model, x, implementation="structured", projection=4, projection_seed=1)
    b = empirical_ntk(model, x, implementation="structured", projection=4, projection_seed=1)
    assert counts.probe == 1 and torch.equal(a, b)
    c = empirical_ntk(model, x, implementation="structured", projection=4, projection_seed=2)
    d = empirical_ntk(model, x, implementation="structured", projection=3, projection_seed=2)
    assert counts.probe == 3 and c.shape == (6, 6, 4, 4) and d.shape == (6, 6, 3, 3)


class _SignSwitch(nn.Module):
    """Uses ``head.weight`` through ``F.linear`` (structured rule) while ``gate > 0`` and
    through ``.t()`` (no rule: Jacobian fallback) otherwise: a plan made at one sign is wrong
    at the other."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)
        self.gate = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x)) * self.gate
        if self.gate > 0:
            return F.linear(h, self.head.weight, self.head.bias)
        return h @ self.head.weight.t() + self.head.bias


def test_a_remembered_plan_that_no_longer_holds_is_replanned_not_a_fallback() -> None:
    torch.manual_seed(0)
    model = _SignSwitch().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    empirical_ntk(model, x, implementation="structured")
    with torch.no_grad():
        model.gate.fill_(-0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "could not be verified" fallback warning
        k = empirical_ntk(model, x, implementation="structured")
    assert torch.allclose(k, reference_ntk(model, x)[0], rtol=1e-10, atol=1e-12)


def test_memos_do_not_keep_the_model_alive() -> None:
    model = _mlp()
    x = torch.randn(6, 5, dtype=torch.float64)

    def head(out: torch.Tensor, model: nn.Module = model) -> torch.Tensor:
        return out  # closes over the model, as a user's lambda might

    empirical_ntk(model, x, output_fn=head)
    ref = weakref.ref(model)
    del model, head
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("n,rows,pieces", [(32, 10, 1), (51, 10, 1), (52, 10, 7), (32, None, 4)])
def test_small_row_products_are_one_block(n: int, rows: int, pieces: int) -> None:
    """Outer products and bias rows of at most ``SINGLE_BLOCK_ROWS`` GEMM rows are contracted
    as one block (their sub-blocks cost more in calls than the halved pairs save); the pair
    fraction and count report what is contracted."""
    calls: list[tuple[slice, slice]] = []

    def fn(i: slice, j: slice) -> tuple[torch.Tensor]:
        calls.append((i, j))
        return (torch.ones(i.stop - i.start, j.stop - j.start),)

    (k,) = _common.symmetric_blocks(n, "trace", fn, rows)
    assert torch.equal(k, torch.ones(n, n))
    assert len({i.start for i, _ in calls}) == pieces
    assert _common.symmetric_pairs(n, rows) == len(calls)
    if pieces == 1:
        assert _common.symmetric_fraction(n, rows) == 1.0
