"""Fast paths of the structured engine must never change the answer: the cached verdict of
the batch-mapping check is reused only for an identical traced structure and probe, and is
recomputed whenever anything it depends on differs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lazy_monitor.core.kernels import empirical_ntk
from lazy_monitor.core.kernels.structured import capture as structured_capture
from tests._reference import reference_ntk
from tests._spies import record_fallbacks


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
    real = structured_capture._verify_batch_mapping

    def spy(out, cap):  # noqa: ANN001, ANN202
        calls.append(1)
        return real(out, cap)

    monkeypatch.setattr(structured_capture, "_verify_batch_mapping", spy)
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
    seen = record_fallbacks(monkeypatch)
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


class _FlatRows(nn.Module):
    """Weights used as right matmul operands on rows flattened to ``(N·T, d)`` (HF ``Conv1D``
    style), in a layout chosen by ``mode``:

    * ``"addmm"``: ``torch.addmm(b, x.view(-1, d), W)`` -- rows contiguous per example;
    * ``"addmm_kw"``: the same with keyword arguments (``input=`` is the bias);
    * ``"matmul"``: ``x @ W + b`` on ``(N, T, d)`` (the ``+ b`` is an elementwise use: ``b``
      gets the rows of :mod:`~lazy_monitor.core.kernels.structured.broadcast`) and
      ``torch.mm`` on ``(N·T, d)``;
    * ``"seq_rows"``: ``(T·N, d)`` rows (position-major): dim 0 is not contiguous per example;
    * ``"scaled"``: ``addmm`` with ``beta=0.5`` (no structured rule).
    """

    def __init__(self, mode: str, d: int = 4, h: int = 5) -> None:
        super().__init__()
        self.mode = mode
        self.w1 = nn.Parameter(torch.randn(d, h) / d**0.5)
        self.b1 = nn.Parameter(torch.randn(h))
        self.w2 = nn.Parameter(torch.randn(h, h) / h**0.5)
        self.head = nn.Linear(h, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        if self.mode == "seq_rows":
            rows = x.transpose(0, 1).reshape(-1, d)
            y = torch.addmm(self.b1, rows, self.w1).view(t, n, -1).transpose(0, 1)
        elif self.mode == "scaled":
            y = torch.addmm(self.b1, x.reshape(-1, d), self.w1, beta=0.5).view(n, t, -1)
        elif self.mode == "addmm_kw":
            rows = x.reshape(-1, d)
            y = torch.addmm(input=self.b1, mat1=rows, mat2=self.w1).view(n, t, -1)
        elif self.mode == "matmul":
            y = x @ self.w1 + self.b1
        else:
            y = torch.addmm(self.b1, x.reshape(-1, d), self.w1).view(n, t, -1)
        h = torch.tanh(y)
        z = torch.tanh(torch.mm(h.reshape(n * t, -1), self.w2)).view(n, t, -1)
        return self.head(z.mean(1))


def _fallbacks(monkeypatch: pytest.MonkeyPatch, model: nn.Module, x, **kwargs) -> list[str]:  # noqa: ANN001
    seen = record_fallbacks(monkeypatch)
    for kind in ("full", "trace", "diagonal"):
        k = empirical_ntk(model, x, implementation="structured", kind=kind, **kwargs)
        ref, _ = reference_ntk(model, x, kind=kind, output_fn=kwargs.get("output_fn"))
        torch.testing.assert_close(k, ref, rtol=1e-6, atol=1e-9)
    return sorted(set(seen))


@pytest.mark.parametrize("mode", ["addmm", "addmm_kw", "matmul"])
def test_right_matmul_operand_on_flattened_rows_is_factorised(
    monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    torch.manual_seed(0)
    model = _FlatRows(mode).double()
    x = torch.randn(4, 3, 4, dtype=torch.float64)
    assert _fallbacks(monkeypatch, model, x) == []
    assert _fallbacks(monkeypatch, model, x, chunk_size=3) == []  # example blocks


@pytest.mark.parametrize("mode", ["seq_rows", "scaled"])
def test_unverifiable_matmul_uses_fall_back(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    torch.manual_seed(0)
    model = _FlatRows(mode).double()
    x = torch.randn(4, 3, 4, dtype=torch.float64)
    names = _fallbacks(monkeypatch, model, x)
    assert "w1" in names and "b1" in names
    assert "w2" not in names and "head.weight" not in names


def test_gpt2_conv1d_weights_are_factorised(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF GPT-2's ``Conv1D`` (``addmm`` on ``(N·T, d)`` rows) takes the structured rule, the
    tied token embedding / LM head the tied rule, the position embedding on batch-shared
    ``position_ids`` is expanded to the batch: nothing falls back."""
    from tests._zoo import build

    case = build("gpt2")
    names = _fallbacks(monkeypatch, case.model, case.x, output_fn=case.output_fn)
    assert names == []


def test_cache_does_not_keep_the_model_alive() -> None:
    import gc
    import weakref

    model = _Mixer().double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    empirical_ntk(model, x, output_fn=lambda out, m=model: out)  # closes over the model
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
