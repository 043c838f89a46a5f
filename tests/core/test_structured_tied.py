"""The tied rule (structured/tied.py): a weight with uses of different kinds -- a tied input
embedding and LM head, a weight used as ``F.linear(x, W)`` and as ``x @ W`` -- factorised
instead of sent to the Jacobian fallback, against the float64 brute force."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lazy_monitor.core.kernels.structured.ntk as ntk_mod
import lazy_monitor.core.kernels.structured.tied as tied_mod
from lazy_monitor.core.kernels import empirical_ntk, projection_matrix
from tests._reference import contract, reference_jacobian, reference_ntk
from tests._zoo import _left_padded

KINDS = ["full", "trace", "diagonal"]


class _TiedLM(nn.Module):
    """Hand-written tied LM: embedding, a mixing layer, head ``F.linear(h, emb.weight)`` on
    the last position."""

    def __init__(self, vocab: int = 11, dim: int = 6, padding_idx: Optional[int] = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.mix = nn.Linear(dim, dim)

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.emb(ids))).mean(1)
        return F.linear(h, self.emb.weight)


class _AllPositions(_TiedLM):
    """The head on every position (``T > 1`` positions for the LM-head use), flattened."""

    def forward(self, ids: Tensor) -> Tensor:
        return F.linear(torch.tanh(self.mix(self.emb(ids))), self.emb.weight).flatten(1)


class _TransposedHead(_TiedLM):
    """A hand-written head ``h @ emb.weight.T`` (an alias of the weight, transposed)."""

    def forward(self, ids: Tensor) -> Tensor:
        return torch.tanh(self.mix(self.emb(ids))).mean(1) @ self.emb.weight.T


class _LinearAndMatmul(nn.Module):
    """One square weight used as ``F.linear(x, W)`` and as ``h @ W`` (transposed role), or
    ``h @ W.t()`` / ``h @ W.transpose(0, 1)`` (two Linear uses, no tied rule needed)."""

    def __init__(self, mode: str = "matmul", d: int = 5) -> None:
        super().__init__()
        self.mode = mode
        self.w = nn.Parameter(torch.randn(d, d) / math.sqrt(d))
        self.head = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(F.linear(x, self.w))
        w = {"matmul": self.w, "t": self.w.t(), "transpose": self.w.transpose(0, 1)}[self.mode]
        return self.head(torch.tanh(h @ w))


class _Sketch:
    """A fixed linear map of the outputs ``(N, O) -> (N, k)`` (few outputs of a wide head)."""

    def __init__(self, o: int, k: int) -> None:
        self.r = torch.randn(o, k, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def __call__(self, out: Tensor) -> Tensor:
        return out @ self.r.to(out.dtype)


def _gpt2() -> tuple[nn.Module, Any, Callable]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=24, n_positions=16, n_embd=32, n_layer=2, n_head=4, pad_token_id=0)
    model = GPT2LMHeadModel(cfg).double().eval()
    return model, _left_padded(4, 5, 24), lambda out: out.logits[:, -1]


def _llama() -> tuple[nn.Module, Any, Callable]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=20,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).double().eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model, _left_padded(4, 5, 20), lambda out: out.logits[:, -1]


def _ids(n: int, t: int, vocab: int, seed: int) -> Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


# name -> (model, x1, x2, output_fn, tied parameter)
CASES: dict[str, Callable[[], tuple[nn.Module, Any, Any, Optional[Callable], str]]] = {
    "gpt2": lambda: (*_gpt2()[:2], _left_padded(3, 5, 24), _gpt2()[2], "transformer.wte.weight"),
    "llama": lambda: (
        *_llama()[:2],
        _left_padded(3, 5, 20),
        _llama()[2],
        "model.embed_tokens.weight",
    ),
    "hand_written": lambda: (
        _TiedLM().double(),
        _ids(5, 3, 11, 1),
        _ids(3, 3, 11, 2),
        None,
        "emb.weight",
    ),
    "padding_idx": lambda: (
        _TiedLM(padding_idx=0).double(),
        _ids(5, 4, 11, 1),
        _ids(3, 4, 11, 2),
        None,
        "emb.weight",
    ),
    # V > 2·N·T: the rows of the occurring ids, and the Linear strategy on the other rows
    # (Gram over the head's two positions; outer product for a head on one position)
    "restricted_gram": lambda: (
        _AllPositions(vocab=64, dim=32).double(),
        _ids(4, 2, 64, 1),
        _ids(3, 2, 64, 2),
        _Sketch(128, 4),
        "emb.weight",
    ),
    "restricted_outer": lambda: (
        _TiedLM(vocab=60, dim=8).double(),
        _ids(4, 2, 60, 1),
        _ids(3, 2, 60, 2),
        None,
        "emb.weight",
    ),
    "transposed_head": lambda: (
        _TransposedHead().double(),
        _ids(5, 3, 11, 1),
        _ids(3, 3, 11, 2),
        None,
        "emb.weight",
    ),
    "linear_and_matmul": lambda: (
        _LinearAndMatmul().double(),
        torch.randn(5, 5, dtype=torch.float64),
        torch.randn(3, 5, dtype=torch.float64),
        None,
        "w",
    ),
}


def _spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Record the structured engine's plans, example block sizes and Jacobian fallback."""
    seen: dict[str, list] = {"plans": [], "fallback": [], "blocks": []}
    make_plan, jacobian, block_sizes = (
        ntk_mod._make_plan,
        ntk_mod.jacobian_ntk,
        ntk_mod._block_sizes,
    )

    def plan_spy(*args: Any, **kwargs: Any) -> Any:
        plan = make_plan(*args, **kwargs)
        seen["plans"].append(plan)
        return plan

    def jacobian_spy(fm: Any, params: Any, names: Any, *args: Any, **kwargs: Any) -> Any:
        seen["fallback"].extend(names)
        return jacobian(fm, params, names, *args, **kwargs)

    def blocks_spy(*args: Any) -> tuple[int, int]:
        seen["blocks"].append(block_sizes(*args))
        return seen["blocks"][-1]

    monkeypatch.setattr(ntk_mod, "_block_sizes", blocks_spy)
    monkeypatch.setattr(ntk_mod, "_make_plan", plan_spy)
    monkeypatch.setattr(ntk_mod, "jacobian_ntk", jacobian_spy)
    return seen


def _close(got: Tensor, ref: Tensor) -> None:
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9 * float(ref.abs().max()))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("symmetric", [True, False])
def test_tied_weight_is_factorised_and_exact(
    monkeypatch: pytest.MonkeyPatch, name: str, symmetric: bool
) -> None:
    model, x1, x2, output_fn, tied = CASES[name]()
    x2 = None if symmetric else x2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        j1 = reference_jacobian(model, x1, output_fn=output_fn)
        j2 = j1 if x2 is None else reference_jacobian(model, x2, output_fn=output_fn)
    refs = {}
    for kind in KINDS:
        ref_blocks = {key: contract(j1[key], j2[key], kind) for key in j1}
        refs[kind] = (sum(ref_blocks.values()), ref_blocks)
    seen = _spy(monkeypatch)
    # a budget below the factors of one layer for all examples: example blocks of 1-2 rows
    # and layer groups (the HF models at 64 KiB; smaller only multiplies the passes)
    hf = name in ("gpt2", "llama")
    small = 2**16 if hf else 256
    for kind in KINDS:
        # (the HF models' blocked runs take seconds each: kind="full" only)
        for max_memory in (None, small) if kind == "full" or not hf else (None,):
            k, blocks = empirical_ntk(
                model,
                x1,
                x2,
                kind=kind,
                implementation="structured",
                output_fn=output_fn,
                return_blocks=True,
                max_memory=max_memory,
            )
            ref, ref_blocks = refs[kind]
            _close(k, ref)
            _close(blocks[tied], ref_blocks[tied])
            for key, block in ref_blocks.items():
                _close(blocks[key], block)
    assert seen["plans"] and all(p.weights[tied].startswith("tied") for p in seen["plans"])
    assert tied not in seen["fallback"]
    assert min(rows for rows, _ in seen["blocks"]) < len(next(iter(j1.values())))


def test_restricted_rows_strategy_is_planned_when_the_vocabulary_is_large(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = _spy(monkeypatch)
    expected = {"restricted_gram": "tied+gram", "restricted_outer": "tied+outer"}
    expected["hand_written"] = "tied"  # V = 11 <= 2·N·T: every row
    for name, strategy in expected.items():
        model, x1, _, output_fn, tied = CASES[name]()
        empirical_ntk(model, x1, implementation="structured", output_fn=output_fn)
        assert seen["plans"][-1].weights[tied] == strategy


def test_projected_large_vocabulary_builds_rows_of_occurring_tokens_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """V = 512 with ``projection=8``: the per-example gradient rows built are those of the
    token ids in the probe (at most N·T = 12), never the vocabulary's 512."""
    torch.manual_seed(0)
    model = _AllPositions(vocab=512, dim=32).double()
    x = _ids(4, 3, 512, 3)
    built: list[int] = []
    restricted = tied_mod._restricted_rows

    def spy(f: Any, idx: Tensor) -> Tensor:
        built.append(idx.numel())
        return restricted(f, idx)

    monkeypatch.setattr(tied_mod, "_restricted_rows", spy)
    seen = _spy(monkeypatch)
    for kind in KINDS:
        got = empirical_ntk(
            model, x, kind=kind, implementation="structured", projection=8, projection_seed=3
        )
        r = projection_matrix(model(x).shape[1], 8, seed=3)

        def projected(out: Tensor, r: Tensor = r) -> Tensor:
            return out @ r / math.sqrt(8)

        ref, _ = reference_ntk(model, x, kind=kind, output_fn=projected)
        _close(got, ref)
    assert seen["plans"][0].weights["emb.weight"].startswith("tied+")
    assert "emb.weight" not in seen["fallback"]
    assert built and max(built) <= x.unique().numel() < 512


def test_auto_prices_the_tied_rule_and_is_exact() -> None:
    """``auto`` (the default) on GPT-2 stays exact whichever plan the cost model takes."""
    from lazy_monitor.core.kernels.plan import describe_plan

    model, x1, _, output_fn, tied = CASES["gpt2"]()
    plan = describe_plan(model, x1, output_fn=output_fn)
    assert plan["parameters"][tied] in ("jacobian", "tied", "tied+gram", "tied+outer")
    ref, _ = reference_ntk(model, x1, output_fn=output_fn)
    _close(empirical_ntk(model, x1, output_fn=output_fn), ref)


@pytest.mark.parametrize("mode", ["t", "transpose"])
def test_linear_and_matmul_with_transposed_alias_is_one_linear_rule(
    monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """``F.linear(x, W)`` and ``h @ W.t()``: both Linear uses of ``W``, one plain rule."""
    torch.manual_seed(0)
    model = _LinearAndMatmul(mode).double()
    x1, x2 = torch.randn(5, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    seen = _spy(monkeypatch)
    for x in (None, x2):
        for kind in KINDS:
            k, blocks = empirical_ntk(
                model, x1, x, kind=kind, implementation="structured", return_blocks=True
            )
            ref, ref_blocks = reference_ntk(model, x1, x, kind=kind)
            _close(k, ref)
            _close(blocks["w"], ref_blocks["w"])
    assert seen["fallback"] == []
    assert seen["plans"][0].weights["w"] in ("outer", "gram", "per_example", "stored")


class _RegisteredTie(nn.Module):
    """A tie registered like HF's ``tie_weights`` (``head.weight = emb.weight``)."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.emb(ids)))).flatten(1)


def test_gpt2_sized_tied_vocabulary_is_not_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """V = 50257, d = 256, ``projection=8``: the memory pre-check no longer counts the tied
    weight as Jacobian rows (1.15 GiB for one example, refused on the previous engine) and
    the kernel builds the rows of the probe's tokens only (measured: 1.2 s, 0.57 GB peak RSS,
    against 18 s and 2 GB for the Jacobian remainder of an unregistered tie)."""
    torch.manual_seed(0)
    model = _RegisteredTie(50257, 256)
    x = _ids(4, 4, 50257, 4)
    built: list[int] = []
    restricted = tied_mod._restricted_rows

    def spy(f: Any, idx: Tensor) -> Tensor:
        built.append(idx.numel())
        return restricted(f, idx)

    monkeypatch.setattr(tied_mod, "_restricted_rows", spy)
    seen = _spy(monkeypatch)
    k = empirical_ntk(model, x, implementation="structured", projection=8)
    assert bool(torch.isfinite(k).all())
    assert seen["plans"][0].weights["emb.weight"].startswith("tied+")
    assert "emb.weight" not in seen["fallback"]
    assert built and max(built) <= 16
