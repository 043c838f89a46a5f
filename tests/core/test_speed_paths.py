"""Fast paths of the structured engine must never change the answer: the cached verdict of
the batch-mapping check is reused only for an identical traced structure and probe, and is
recomputed whenever anything it depends on differs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lazy_monitor.core.kernels import empirical_ntk
from lazy_monitor.core.kernels import structured as structured_mod
from tests._reference import reference_ntk


class _Mixer(nn.Module):
    """Linear -> tanh -> Linear over positions, then mean over positions. With
    ``seq_first=True`` the hidden layer runs on the transposed ``(T, N, d)`` layout (as
    sequence-first modules do), so with ``T == N`` the parameter uses have the same shapes in
    both layouts but only the batch-first one may be factorised over dim 0."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.inner = nn.Linear(d, d)
        self.head = nn.Linear(d, 2)
        self.seq_first = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.seq_first:
            h = torch.tanh(self.inner(x.transpose(0, 1))).transpose(0, 1)
            return self.head(h.mean(1))
        return self.head(torch.tanh(self.inner(x)).mean(1))


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = structured_mod._verify_batch_mapping

    def spy(out, cap):  # noqa: ANN001, ANN202
        calls.append(1)
        return real(out, cap)

    monkeypatch.setattr(structured_mod, "_verify_batch_mapping", spy)
    return calls


def _check(model: nn.Module, x: torch.Tensor) -> None:
    k = empirical_ntk(model, x, implementation="structured")
    ref, _ = reference_ntk(model, x)
    torch.testing.assert_close(k, ref, rtol=1e-6, atol=1e-9)


def test_repeated_calls_reuse_the_verdict_and_stay_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting(monkeypatch)
    torch.manual_seed(0)
    model = _Mixer().double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    _check(model, x)
    assert len(calls) == 1
    with torch.no_grad():  # a training step: new values, same structure
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    _check(model, x)
    assert len(calls) == 1


def test_verdict_recomputed_when_probe_or_layout_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting(monkeypatch)
    torch.manual_seed(0)
    model = _Mixer().double()
    # T == 2 == the probe's two examples: both layouts trace identically on the probe pass.
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    _check(model, x)
    assert len(calls) == 1
    _check(model, x + 1.0)  # other probe values
    assert len(calls) == 2
    _check(model, x[:, :1])  # other shapes
    assert len(calls) == 3
    model.seq_first = True  # same uses and shapes, dim 0 of `inner` no longer the batch
    _check(model, x)
    assert len(calls) == 4
    seen: list[str] = []
    real = structured_mod.jacobian_ntk

    def spy(fm, params, names, *args, **kwargs):  # noqa: ANN001, ANN202
        seen.extend(names)
        return real(fm, params, names, *args, **kwargs)

    monkeypatch.setattr(structured_mod, "jacobian_ntk", spy)
    _check(model, x)  # cached verdict for the seq-first layout: still falls back
    assert len(calls) == 4
    assert "inner.weight" in seen


def test_other_model_instance_does_not_share_the_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting(monkeypatch)
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    _check(_Mixer().double(), x)
    _check(_Mixer().double(), x)
    assert len(calls) == 2
