"""empirical_ntk against a brute-force float64 reference, for every implementation and kind."""

from __future__ import annotations

import collections
import functools

import pytest
import torch
import torch.nn.functional as F
from _reference import contract, reference_jacobian, reference_ntk
from torch import nn

from lazy_monitor.core.kernels import NtkImplementation, empirical_ntk

# The conv1d case pads "same" with an even kernel on purpose (asymmetric padding).
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")

IMPLEMENTATIONS = ["jacobian", "ntvp", "structured", "auto"]
KINDS = ["full", "trace", "diagonal"]


# --------------------------------------------------------------------------------------------
# Tiny models covering every code path: structured rules, fallbacks, input/output structures.
# --------------------------------------------------------------------------------------------
class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.a(u) + self.b(v)))


class _DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 3))

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.body(x), "hidden": x.sum()}


class _TiedLM(nn.Module):
    """Embedding -> LayerNorm -> Linear -> head tied to the embedding; output (N, T, V)."""

    def __init__(self, vocab: int = 7, dim: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.norm(self.emb(idx)))))


class _Embedder(nn.Module):
    """Untied embedding used at several positions, with a padding index."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 3, padding_idx=1)
        self.out = nn.Linear(3, 2)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.sin(self.emb(idx))).flatten(1)


class _Reuse(nn.Module):
    """One Linear applied twice, an in-place ReLU on a Linear output, a functional weight use
    and a weight used through a matmul (no structured rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(3, 4) / 2)
        self.m = nn.Parameter(torch.randn(4, 4) / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu_(self.shared(x))
        h = torch.tanh(self.shared(h)) @ self.m
        return F.linear(h, self.w)


class _SequenceConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.c2 = nn.Conv1d(4, 4, 2, dilation=3, groups=2, padding="same", bias=False)
        self.c3 = nn.Conv1d(4, 2, 3, padding=1, padding_mode="circular")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.c1(x)))
        return self.c3(torch.tanh(self.c2(h))).mean(-1)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2),
        nn.ReLU(),
        nn.Conv2d(6, 4, (2, 3), stride=(1, 2), padding=(0, 1), bias=False),
        nn.Flatten(),
        nn.Linear(4 * 3 * 2, 3),
    )


def _bn_dropout() -> nn.Module:
    m = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        nn.BatchNorm1d(5),
        nn.Tanh(),
        nn.Linear(5, 2),
    )
    with torch.no_grad():  # non-trivial running statistics
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m.train()  # evaluated in eval semantics regardless


def _multi_dim_output() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4))  # (N, 3, 5) -> (N, 3, 4)


def _frozen() -> nn.Module:
    m = _mlp()
    m[0].weight.requires_grad_(False)
    m[2].bias.requires_grad_(False)
    return m


Case = collections.namedtuple("Case", "make inputs inputs2 output_fn")


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


CASES = {
    "mlp": Case(_mlp, lambda: _randn(4, 6), None, None),
    "cnn": Case(_cnn, lambda: _randn(3, 2, 7, 7), None, None),
    "conv1d": Case(_SequenceConv, lambda: _randn(3, 2, 9), None, None),
    "batchnorm_dropout": Case(_bn_dropout, lambda: _randn(3, 2, 4, 4), None, None),
    "tied_lm": Case(_TiedLM, lambda: torch.tensor([[1, 2, 0], [3, 3, 6], [0, 5, 2]]), None, None),
    "embedding": Case(_Embedder, lambda: torch.tensor([[1, 2, 2], [0, 1, 5]]), None, None),
    "reuse": Case(_Reuse, lambda: _randn(3, 4), None, None),
    "multi_dim_output": Case(_multi_dim_output, lambda: _randn(3, 3, 5), None, None),
    "frozen": Case(_frozen, lambda: _randn(4, 6), None, None),
    "cross": Case(_mlp, lambda: _randn(4, 6), lambda: _randn(3, 6), None),
    "cross_cnn": Case(_cnn, lambda: _randn(2, 2, 7, 7), lambda: _randn(3, 2, 7, 7), None),
    "tuple_input": Case(_TwoInputs, lambda: (_randn(3, 3), _randn(3, 2)), None, None),
    "dict_input": Case(
        _TwoInputs,
        lambda: {"u": _randn(3, 3), "v": _randn(3, 2)},
        lambda: {"u": _randn(2, 3), "v": _randn(2, 2)},
        None,
    ),
    "output_fn": Case(_DictOutput, lambda: _randn(3, 4), None, lambda out: out["logits"]),
}


@functools.cache
def _case(name: str):
    """(model, x1, x2, output_fn, reference {kind: (kernel, blocks)}), built once per case."""
    torch.manual_seed(sum(map(ord, name)))
    c = CASES[name]
    model = c.make().double()
    x1 = c.inputs()
    x2 = None if c.inputs2 is None else c.inputs2()
    j1 = reference_jacobian(model, x1, output_fn=c.output_fn)
    j2 = j1 if x2 is None else reference_jacobian(model, x2, output_fn=c.output_fn)
    refs = {}
    for k in KINDS:
        blocks = {name: contract(j1[name], j2[name], k) for name in j1}
        refs[k] = (sum(blocks.values()), blocks)
    return model, x1, x2, c.output_fn, refs


def _assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == torch.float64
    scale = expected.abs().max().item()
    assert scale > 0
    err = (actual - expected).abs().max().item()
    assert err <= 1e-6 * scale, f"max abs error {err:.3g} vs kernel scale {scale:.3g}"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_matches_reference(case: str, kind: str, implementation: str) -> None:
    model, x1, x2, output_fn, refs = _case(case)
    expected, expected_blocks = refs[kind]
    with_blocks = kind == "full"  # per-parameter blocks checked once per case (they cost more)
    out = empirical_ntk(
        model,
        x1,
        x2,
        kind=kind,
        implementation=implementation,
        output_fn=output_fn,
        return_blocks=with_blocks,
    )
    kernel, blocks = out if with_blocks else (out, {})
    _assert_matches(kernel, expected)
    if with_blocks:
        assert list(blocks) == list(expected_blocks)
    for name, block in blocks.items():
        err = (block - expected_blocks[name]).abs().max().item()
        assert err <= 1e-6 * expected.abs().max().item(), f"block {name}: error {err:.3g}"


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_small_chunks_give_the_same_kernel(implementation: str) -> None:
    model, x1, _, _, refs = _case("cnn")
    kernel = empirical_ntk(model, x1, implementation=implementation, chunk_size=1)
    _assert_matches(kernel, refs["full"][0])
    model, x1, x2, _, refs = _case("cross")
    kernel = empirical_ntk(model, x1, x2, implementation=implementation, chunk_size=2)
    _assert_matches(kernel, refs["full"][0])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_blocks_sum_to_kernel_and_are_keyed_by_parameter_name(implementation: str) -> None:
    model, x1, _, _, _ = _case("tied_lm")
    kernel, blocks = empirical_ntk(model, x1, implementation=implementation, return_blocks=True)
    # Tied head.weight appears once, under its first name; frozen params never appear.
    assert list(blocks) == [n for n, p in model.named_parameters() if p.requires_grad]
    assert "head.weight" not in blocks
    torch.testing.assert_close(sum(blocks.values()), kernel, rtol=1e-12, atol=1e-12)
    model, x1, _, _, _ = _case("frozen")
    _, blocks = empirical_ntk(model, x1, implementation=implementation, return_blocks=True)
    assert list(blocks) == ["0.bias", "2.weight", "4.weight", "4.bias"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_explicit_params_select_and_substitute(implementation: str) -> None:
    model, x1, _, _, _ = _case("mlp")
    new_w = torch.randn_like(model[2].weight)
    kernel, blocks = empirical_ntk(
        model, x1, implementation=implementation, params={"2.weight": new_w}, return_blocks=True
    )
    assert list(blocks) == ["2.weight"]
    changed = _mlp().double()
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed[2].weight.copy_(new_w)
    expected, _ = reference_ntk(changed, x1, names=["2.weight"])
    _assert_matches(kernel, expected)


def test_float32_inputs_give_float32_kernel_close_to_float64() -> None:
    model, x1, _, _, refs = _case("cnn")
    m32 = _cnn()
    m32.load_state_dict(model.state_dict())
    m32 = m32.float()
    for impl in IMPLEMENTATIONS:
        k = empirical_ntk(m32, x1.float(), implementation=impl)
        assert k.dtype == torch.float32
        expected = refs["full"][0]
        assert ((k.double() - expected).norm() / expected.norm()).item() < 1e-5


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_half_precision_model_is_computed_in_float32(implementation: str) -> None:
    model, x1, _, _, refs = _case("frozen")
    half = _frozen()
    half.load_state_dict(model.state_dict())
    half = half.half()
    k = empirical_ntk(half, x1.half(), implementation=implementation)
    assert k.dtype == torch.float32
    expected, _ = reference_ntk(half, x1.half())  # float64 of the float16 weights
    assert ((k.double() - expected).norm() / expected.norm()).item() < 1e-5


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_works_inside_no_grad_and_inference_mode(implementation: str, context: str) -> None:
    model, x1, _, _, refs = _case("batchnorm_dropout")
    ctx = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with ctx:
        x = x1.clone()  # an inference tensor under inference_mode
        kernel = empirical_ntk(model, x, implementation=implementation)
    _assert_matches(kernel, refs["full"][0])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_module_is_left_untouched(implementation: str) -> None:
    model, x1, _, _, _ = _case("batchnorm_dropout")
    model.train()
    model[1].eval()  # mixed flags must come back exactly
    for i, p in enumerate(model.parameters()):
        p.grad = None if i % 2 else torch.full_like(p, 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    empirical_ntk(model, x1, implementation=implementation)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == flags
    after = model.state_dict()
    assert list(after) == list(state)
    for k, v in state.items():
        assert torch.equal(after[k], v), k
    for g, p in zip(grads, model.parameters()):
        assert (g is None and p.grad is None) or torch.equal(g, p.grad)
    model.train()


def test_implementation_accepts_enum_and_strings() -> None:
    model, x1, _, _, refs = _case("mlp")
    for impl in [NtkImplementation.STRUCTURED, "JACOBIAN", "ntvp"]:
        _assert_matches(empirical_ntk(model, x1, implementation=impl), refs["full"][0])


# --------------------------------------------------------------------------------------------
# Validation: clear errors at the call, naming the bad value.
# --------------------------------------------------------------------------------------------
def test_empty_batch_is_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        empirical_ntk(_mlp(), torch.zeros(0, 6))


def test_mismatched_tuple_batch_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="mismatched batch sizes"):
        empirical_ntk(_TwoInputs(), (torch.randn(3, 3), torch.randn(2, 2)))


def test_integer_input_where_float_needed_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"dtype torch\.int64.*floating"):
        empirical_ntk(_mlp(), torch.ones(2, 6, dtype=torch.long))


def test_output_without_batch_dim_is_rejected() -> None:
    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).mean(0)

    with pytest.raises(ValueError, match="no batch dimension"):
        empirical_ntk(Pooled(), torch.randn(4, 3))


def test_non_tensor_output_without_output_fn_is_rejected() -> None:
    with pytest.raises(TypeError, match="output_fn"):
        empirical_ntk(_DictOutput(), torch.randn(2, 4))


def test_model_without_trainable_parameter_is_rejected() -> None:
    m = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        empirical_ntk(m, torch.randn(2, 6))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "diag"}, "`kind` must be one of"),
        ({"implementation": "fast"}, "`implementation` must be one of"),
        ({"chunk_size": 0}, "`chunk_size` must be a positive int"),
    ],
)
def test_unknown_options_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        empirical_ntk(_mlp(), torch.randn(2, 6), **kwargs)


def test_mismatched_output_sizes_of_x1_and_x2_are_rejected() -> None:
    m = _multi_dim_output()
    with pytest.raises(ValueError, match="outputs per example"):
        empirical_ntk(m, torch.randn(2, 3, 5), torch.randn(2, 4, 5))
