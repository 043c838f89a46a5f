"""Parameters broadcast over the examples get structured per-example rows, and batch-shared
inputs of supported ops are expanded to the batch (structured/broadcast.py): HF RMSNorm
weights (``weight * x``), learned position embeddings (``x + P`` and ``wpe(position_ids)``
with ``position_ids (1, T)``), a class token (``cls.expand(N, ...)``), timm LayerScale
(``x * gamma``). Each positive test asserts that the parameters named are *not* sent to the
Jacobian fallback (they were before) and that the kernel -- full, per-parameter blocks,
rectangular, under a small ``max_memory`` (layer groups, example blocks), float32 -- matches
the float64 brute force. The negative tests are models where the rule must not apply."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import pytest
import torch
from torch import Tensor, nn

import lazy_monitor.core.kernels.structured.ntk as structured_ntk_mod
from lazy_monitor.core.kernels import empirical_ntk
from lazy_monitor.core.kernels.plan import describe_plan
from tests._reference import contract, reference_jacobian, reference_ntk  # noqa: F401
from tests._spies import record_fallbacks
from tests._zoo import _left_padded

Case = tuple[nn.Module, Any, Any, Optional[Callable[[Any], Tensor]]]  # model, x1, x2, output_fn


def _quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _last(out: Any) -> Tensor:
    return out.logits[:, -1]


def _logits(out: Any) -> Tensor:
    return out.logits


def _right_padded(n: int, t: int, vocab: int, seed: int) -> dict[str, Tensor]:
    ids = torch.randint(1, vocab, (n, t), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(n, t, dtype=torch.long)
    for i in range(n):
        mask[i, t - i % 3 :] = 0 if i % 3 else 1
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def _llama() -> Case:
    _quiet()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg).double().eval()
    x2 = _left_padded(3, 6, 16)
    x2["input_ids"] = x2["input_ids"].flip(1)  # other tokens, same left padding
    x2["input_ids"] = x2["input_ids"].masked_fill(x2["attention_mask"] == 0, 0)
    return model, _left_padded(5, 6, 16), x2, _last


def _gpt2() -> Case:
    _quiet()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=16, n_positions=16, n_embd=32, n_layer=2, n_head=2, pad_token_id=0)
    model = GPT2LMHeadModel(cfg).double().eval()
    return model, _left_padded(5, 6, 16), _left_padded(3, 6, 16, pad=0), _last


def _vit() -> Case:
    _quiet()
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=2,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    model = ViTForImageClassification(cfg).double().eval()
    gen = torch.Generator().manual_seed(3)
    x1 = torch.randn(5, 2, 8, 8, generator=gen, dtype=torch.float64)
    return model, x1, torch.randn(3, 2, 8, 8, generator=gen, dtype=torch.float64), _logits


def _bert() -> Case:
    _quiet()
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=3,
    )
    model = BertForSequenceClassification(cfg).double().eval()
    return model, _right_padded(5, 6, 16, 1), _right_padded(3, 6, 16, 2), _logits


class _LayerScaleBlock(nn.Module):
    """timm-style block: ``x + ls(mlp(norm(x)))`` with LayerScale ``x * gamma`` (or
    ``gamma * x``, the parameter as first operand, with the residual added in place)."""

    def __init__(self, d: int, first: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.gamma = nn.Parameter(0.5 + torch.rand(d))
        self.first = first

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc2(torch.tanh(self.fc1(self.norm(x))))
        if self.first:  # the use's output modified in place: the pass is redone with a copy
            return (self.gamma * y).add_(x)
        return x + y * self.gamma


class _LayerScaleNet(nn.Module):
    """Patch embedding, a learned ``(1, T, d)`` position embedding added, two LayerScale
    blocks, a scalar temperature (0-dim parameter), ``torch.add(.., alpha=)``, ``P - x`` and
    torch's ``nn.RMSNorm``."""

    def __init__(self, d: int = 8, t: int = 5) -> None:
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.pos = nn.Parameter(torch.randn(1, t, d))
        self.blocks = nn.Sequential(_LayerScaleBlock(d, False), _LayerScaleBlock(d, True))
        self.shift = nn.Parameter(torch.randn(d))
        self.offset = nn.Parameter(torch.randn(1, 1, d))
        self.temperature = nn.Parameter(torch.tensor(1.3))
        self.final = nn.RMSNorm(d)  # F.rms_norm: a normalisation scale
        self.head = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.embed(x) + self.pos)
        h = torch.add(h, self.shift, alpha=0.5)
        h = self.offset - torch.tanh(h)
        return self.head(self.final(h).mean(1)) * self.temperature


def _layerscale() -> Case:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4)
    x1 = torch.randn(6, 5, 4, generator=gen, dtype=torch.float64)
    return _LayerScaleNet().double(), x1, torch.randn(4, 5, 4, dtype=torch.float64), None


def _layers(prefix: str, count: int, names: tuple[str, ...]) -> list[str]:
    return [f"{prefix}.{i}.{k}" for i in range(count) for k in names]


# name -> (builder, parameters that must be structured, max_memory budgets that split the
# factor passes into several layer groups: the first also ends them at cut points)
CASES: dict[str, tuple[Callable[[], Case], list[str], tuple[int, ...]]] = {
    "llama": (
        _llama,
        _layers("model.layers", 2, ("input_layernorm.weight", "post_attention_layernorm.weight"))
        + ["model.norm.weight"],
        (2**20, 2**18),
    ),
    # wte is tied to the LM head (not covered here): assert on wpe and the LayerNorms only
    "gpt2": (
        _gpt2,
        ["transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"]
        + _layers("transformer.h", 2, ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias")),
        (2**20, 2**18),
    ),
    "vit": (
        _vit,
        [
            "vit.embeddings.cls_token",
            "vit.embeddings.position_embeddings",
            "vit.embeddings.patch_embeddings.projection.weight",  # reads weight.dtype
        ],
        (2**18, 2**15),
    ),
    "bert": (
        _bert,
        [
            "bert.embeddings.position_embeddings.weight",
            "bert.embeddings.token_type_embeddings.weight",
        ],
        (2**18, 2**15),
    ),
    "layerscale": (
        _layerscale,
        [
            "pos",
            "blocks.0.gamma",
            "blocks.1.gamma",
            "shift",
            "offset",
            "temperature",
            "final.weight",
        ],
        (2**14, 2**12),
    ),
}


def _record_work(monkeypatch: pytest.MonkeyPatch) -> list[list]:
    """The layer groups (:func:`_work_plan`) of every structured call."""
    seen: list[list] = []
    real = structured_ntk_mod._work_plan

    def spy(*args: Any, **kwargs: Any) -> list:
        work = real(*args, **kwargs)
        seen.append(work)
        return work

    monkeypatch.setattr(structured_ntk_mod, "_work_plan", spy)
    return seen


def _assert_close(actual: Tensor, expected: Tensor, rel: float = 1e-6) -> None:
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    err = (actual.double() - expected).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} vs kernel scale {scale:.3g}"


@pytest.mark.parametrize("name", list(CASES))
def test_rows_are_structured_and_exact(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    build, structured, budgets = CASES[name]
    model, x1, x2, output_fn = build()
    fallbacks = record_fallbacks(monkeypatch)
    work = _record_work(monkeypatch)
    k, blocks = empirical_ntk(
        model, x1, implementation="structured", output_fn=output_fn, return_blocks=True
    )
    assert not set(structured) & set(fallbacks), sorted(set(structured) & set(fallbacks))
    ref, ref_blocks = reference_ntk(model, x1, output_fn=output_fn)
    _assert_close(k, ref)
    assert set(blocks) == set(ref_blocks)
    for key in structured:
        _assert_close(blocks[key], ref_blocks[key])
    # rectangular, per-parameter blocks
    k12, blocks12 = empirical_ntk(
        model, x1, x2, implementation="structured", output_fn=output_fn, return_blocks=True
    )
    ref12, ref_blocks12 = reference_ntk(model, x1, x2, output_fn=output_fn)
    _assert_close(k12, ref12)
    for key in structured:
        _assert_close(blocks12[key], ref_blocks12[key])
    # factor passes split into layer groups by a small budget (with cuts, without), trace kind
    for budget in budgets:
        work.clear()
        for kind in ("full", "trace") if budget == budgets[0] else ("full",):
            kb = empirical_ntk(
                model, x1, implementation="structured", output_fn=output_fn, max_memory=budget,
                kind=kind,
            )  # fmt: skip
            _assert_close(kb, ref if kind == "full" else torch.einsum("nmaa->nm", ref))
        # several layer groups (the split is planned once per budget: a repeated call on the
        # same probe reuses it)
        assert work and len(work[0]) > 1
    kc = empirical_ntk(
        model, x1, x2, implementation="structured", output_fn=output_fn, chunk_size=2
    )
    _assert_close(kc, ref12)
    assert not set(structured) & set(fallbacks)
    # the default path (auto) is exact too, whatever it chose
    _assert_close(empirical_ntk(model, x1, output_fn=output_fn), ref)


@pytest.mark.parametrize("name", list(CASES))
def test_rows_in_float32(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    build, structured, _ = CASES[name]
    model, x1, _, output_fn = build()
    ref, _ = reference_ntk(model, x1, output_fn=output_fn)
    fallbacks = record_fallbacks(monkeypatch)
    model = model.float()
    if isinstance(x1, Tensor):
        x1 = x1.float()
    k = empirical_ntk(model, x1, implementation="structured", output_fn=output_fn)
    assert k.dtype == torch.float32
    assert not set(structured) & set(fallbacks)
    _assert_close(k, ref, rel=1e-4)


def test_llama_default_path_has_no_remainder() -> None:
    """With the RMSNorm weights factorised, auto's plan for HF Llama has no parameter that
    must go to the Jacobian remainder (N = 32, O = 16: the causal-LM benchmark's size)."""
    model, _, _, output_fn = _llama()
    x = _left_padded(32, 6, 16)
    plan = describe_plan(model, x, output_fn=output_fn)
    norms = CASES["llama"][1]
    assert plan["path"] != "jacobian"
    assert all(plan["parameters"][k] == "rows" for k in norms), plan["parameters"]


# --------------------------------------------------------------------------------------------
# Where the rule must not apply: the parameter goes to the Jacobian fallback, still exact.
# --------------------------------------------------------------------------------------------
class _BatchSum(nn.Module):
    """``P (1, d)`` broadcast along dim 0, and an output that sums over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.p = nn.Parameter(torch.randn(1, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.head(torch.tanh(self.lin(x) + self.p))
        return y + y.sum(0, keepdim=True)


def test_parameter_broadcast_into_a_batch_sum_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Examples are not independent: every use fails the batch-mapping check and the kernel is
    the Jacobian path's, that of each example on its own (the engine's per-example contract)."""
    torch.manual_seed(0)
    model = _BatchSum().double()
    x = torch.randn(4, 4, dtype=torch.float64)
    fallbacks = record_fallbacks(monkeypatch)
    k = empirical_ntk(model, x, implementation="structured")
    assert "p" in fallbacks
    rows = [reference_jacobian(model, x[i : i + 1]) for i in range(len(x))]
    jac = {name: torch.cat([r[name] for r in rows]) for name in rows[0]}
    _assert_close(k, sum(contract(j, j, "full") for j in jac.values()))


class _Shared(nn.Module):
    """``P`` used on a tensor shared by the batch, in several ways (``mode``):

    * ``"times_shared"``: ``basis * P`` with ``basis (1, T, d)`` a buffer -- no per-example rows;
    * ``"inplace"``: ``h.mul_(P)`` -- an in-place use, no rule;
    * ``"shape"``: position embeddings of ``position_ids (1, T)`` divided by their own
      ``.shape[0]`` -- the expanded output would change it (bitwise check of the probe);
    * ``"index"``: ``pe[0]`` of those embeddings -- the expanded output gives the same values,
      but every example would read row 0 (two-sided batch-mapping check);
    * ``"view"``: ``pe.view(T, d)`` -- fails on the expanded output (the probe forward raises);
    * ``"mean0"``: ``pe.mean(0)`` -- bitwise the same for two examples, but read by every
      example (and not bitwise for every batch size): no expansion at all;
    * ``"cls_index"``: ``cls.expand(N, 1, d)[0]`` -- every example reads row 0 of the expand.
    """

    def __init__(self, mode: str, d: int = 6, t: int = 4) -> None:
        super().__init__()
        self.mode = mode
        self.tok = nn.Embedding(7, d)
        self.pos = nn.Embedding(t, d)
        self.p = nn.Parameter(torch.randn(d))
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.register_buffer("basis", torch.randn(1, t, d))
        self.head = nn.Linear(d, 3)

    def forward(self, ids: Tensor) -> Tensor:
        n, t = ids.shape
        h = self.tok(ids)
        pe = self.pos(torch.arange(t, device=ids.device)[None])
        if self.mode == "times_shared":
            h = h + self.basis * self.p
        elif self.mode == "inplace":
            h = h + 1.0  # a fresh tensor whose backward does not need its value
            h.mul_(self.p)
        elif self.mode == "shape":
            h = h + pe / pe.shape[0]
        elif self.mode == "index":
            h = h + pe[0]
        elif self.mode == "view":
            h = h + pe.view(t, -1)
        elif self.mode == "mean0":
            h = h + pe.mean(0)
        else:
            h = h + self.cls.expand(n, 1, -1)[0]
        return self.head(torch.tanh(h + pe).mean(1))


@pytest.mark.parametrize(
    "mode, falls_back",
    [
        ("times_shared", "p"),
        ("inplace", "p"),
        ("shape", "pos.weight"),
        ("index", "pos.weight"),
        ("view", "pos.weight"),
        ("mean0", "pos.weight"),
        ("cls_index", "cls"),
    ],
)
def test_uses_without_per_example_rows_fall_back(
    monkeypatch: pytest.MonkeyPatch, mode: str, falls_back: str
) -> None:
    torch.manual_seed(0)
    model = _Shared(mode).double()
    x = torch.randint(0, 7, (5, 4), generator=torch.Generator().manual_seed(2))
    x2 = torch.randint(0, 7, (3, 4), generator=torch.Generator().manual_seed(3))
    fallbacks = record_fallbacks(monkeypatch)
    k, blocks = empirical_ntk(model, x, implementation="structured", return_blocks=True)
    ref, ref_blocks = reference_ntk(model, x)
    assert falls_back in fallbacks
    _assert_close(k, ref)
    for name, block in ref_blocks.items():
        if block.abs().max() > 0:
            _assert_close(blocks[name], block)
    _assert_close(
        empirical_ntk(model, x, x2, implementation="structured"), reference_ntk(model, x, x2)[0]
    )
    _assert_close(empirical_ntk(model, x, output_fn=None), ref)  # auto


@pytest.mark.parametrize(
    "mode, kept",
    [("times_shared", True), ("shape", False), ("index", False), ("view", False), ("mean0", False)],
)
def test_expansion_is_kept_only_where_verified(mode: str, kept: bool) -> None:
    """The probe pass keeps the expansion of batch-shared inputs only if the forward runs, the
    output is bitwise that of a plain forward and every expanded use is read per example."""
    from lazy_monitor.core._functional import FunctionalModel
    from lazy_monitor.core.kernels.structured.capture import _forward

    torch.manual_seed(0)
    model = _Shared(mode).double().eval()
    x = torch.randint(0, 7, (2, 4), generator=torch.Generator().manual_seed(2))
    wrt = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    _, cap = _forward(FunctionalModel(model, None, torch.float64), {}, wrt, x)
    assert cap.expanded is kept


class _TransposedOperand(nn.Module):
    """``h * W.t() + h * W``: an elementwise use of a transpose of ``W`` (whose entries are in
    Wᵀ's order) besides a direct one: the rows of the two must not be summed."""

    def __init__(self, d: int = 5) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d))
        self.lin = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin(x))
        return self.head((h * self.w.t() + h * self.w).mean(1))


def test_elementwise_use_of_a_transposed_parameter_falls_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model = _TransposedOperand().double()
    x = torch.randn(4, 5, 5, dtype=torch.float64)
    fallbacks = record_fallbacks(monkeypatch)
    k = empirical_ntk(model, x, implementation="structured")
    assert "w" in fallbacks
    _assert_close(k, reference_ntk(model, x)[0])
