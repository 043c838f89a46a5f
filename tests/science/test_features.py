"""Specification of lazy_monitor.core.features: linear CKA and side-effect-free feature capture."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lazy_monitor.core.features import (
    capture_features,
    centered_gram,
    default_feature_modules,
    feature_cka,
    feature_hooks,
    gram_cka,
    linear_cka,
)
from lazy_monitor.demo.models import mlp


def _features(n: int = 20, d: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _feature_form(x: torch.Tensor, y: torch.Tensor) -> float:
    # Kornblith et al. 2019, linear CKA in feature space: ‖YcᵀXc‖²_F / (‖XcᵀXc‖_F ‖YcᵀYc‖_F).
    xc, yc = x - x.mean(0), y - y.mean(0)
    num = torch.linalg.matrix_norm(yc.T @ xc) ** 2
    return float(num / (torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)))


def test_cka_of_identical_features_is_one():
    x = _features()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_equals_feature_space_formula():
    x, y = _features(d=7, seed=0), _features(d=4, seed=1)
    assert linear_cka(x, y) == pytest.approx(_feature_form(x, y), rel=1e-10)


def test_cka_from_stored_reference_gram_equals_cka_from_features():
    x, y = _features(d=9, seed=0), _features(d=2, seed=1)
    g = centered_gram(x)
    assert g.shape == (20, 20)
    torch.testing.assert_close(g.sum(0), torch.zeros(20, dtype=torch.float64), atol=1e-10, rtol=0)
    assert gram_cka(g, centered_gram(y)) == pytest.approx(linear_cka(x, y), rel=1e-12)


def test_cka_invariant_to_orthogonal_transform_scaling_and_translation():
    x, y = _features(seed=0), _features(d=5, seed=1)
    q, _ = torch.linalg.qr(_features(n=7, d=7, seed=2))
    base = linear_cka(x, y)
    assert linear_cka(x @ q, y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(3.7 * x, 0.01 * y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(x + 5.0, y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(x, x @ q * 2.0) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_not_invariant_to_anisotropic_scaling():
    x = _features()
    scale = torch.linspace(0.1, 10.0, x.shape[1], dtype=torch.float64)
    assert linear_cka(x, x * scale) < 0.99


def test_cka_is_symmetric_and_in_unit_interval_for_unrelated_features():
    x, y = _features(seed=0), _features(d=3, seed=5)
    value = linear_cka(x, y)
    assert 0.0 <= value < 0.9
    assert linear_cka(y, x) == pytest.approx(value, rel=1e-12)


def test_cka_is_nan_for_nonfinite_features_and_finite_for_constant_ones():
    x = _features()
    bad = x.clone()
    bad[3, 2] = math.inf
    assert math.isnan(linear_cka(bad, x))
    # constant features (same for every example): zero centred Gram, exactly (the shift by the
    # first example makes the centring exact even where the mean of equal values rounds off)
    const = torch.full((20, 4), 0.1, dtype=torch.float64)
    assert torch.count_nonzero(centered_gram(const)) == 0
    assert linear_cka(x, const) == 0.0 and linear_cka(const, x) == 0.0  # nothing in common
    assert linear_cka(const, torch.zeros(20, 3)) == 1.0  # both constant: the same (empty) one


def test_cka_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same N"):
        linear_cka(_features(n=5), _features(n=6))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        linear_cka(torch.zeros(5), torch.zeros(5))
    with pytest.raises(ValueError, match="at least 2"):
        linear_cka(torch.zeros(1, 3), torch.zeros(1, 3))


def test_default_modules_are_the_parameter_owning_modules():
    assert default_feature_modules(mlp(2, 8, 3, depth=2, seed=0)) == ["fc1", "fc2", "readout"]
    wrapped = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    assert default_feature_modules(wrapped) == ["0", "2.0"]


def test_default_modules_skip_frozen_and_root_parameters():
    model = mlp(2, 8, 1, depth=2, seed=0)
    model.fc1.requires_grad_(False)
    assert default_feature_modules(model) == ["fc2", "readout"]


def test_capture_returns_flattened_layer_outputs():
    model = mlp(2, 8, 3, depth=1, seed=0)
    x = torch.randn(10, 2)
    feats = capture_features(model, x)
    assert list(feats) == ["fc1", "readout"]
    assert feats["fc1"].shape == (10, 8) and feats["readout"].shape == (10, 3)
    torch.testing.assert_close(feats["fc1"], model.fc1(x), rtol=0, atol=0)
    torch.testing.assert_close(feats["readout"], model(x), rtol=0, atol=0)


def test_capture_computes_in_float64_when_the_model_is_float64():
    model = mlp(2, 8, 1, depth=1, seed=0).double()
    x = torch.randn(4, 2)  # float32 probe: cast like the tracker's forward
    feats = capture_features(model, x)
    assert feats["fc1"].dtype == torch.float64
    torch.testing.assert_close(feats["fc1"], model.fc1(x.double()), rtol=0, atol=0)
    float32_model = mlp(2, 8, 1, depth=1, seed=0)
    float32_model.fc1.requires_grad_(False)  # frozen parameters are cast too
    feats = capture_features(float32_model, x.double())
    assert feats["readout"].dtype == torch.float64


def test_capture_flattens_conv_features_per_example():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    feats = capture_features(model, torch.randn(5, 1, 6, 6), modules=["0", "1"])
    assert feats["0"].shape == (5, 48) and feats["1"].shape == (5, 48)


def test_cka_is_one_for_unchanged_weights():
    model = mlp(2, 16, 2, depth=2, seed=0)
    x = torch.randn(12, 2)
    cka = feature_cka(capture_features(model, x), capture_features(model, x))
    assert cka == {k: pytest.approx(1.0, abs=1e-12) for k in ("fc1", "fc2", "readout")}


def test_cka_drops_below_one_after_feature_changing_update_only_where_weights_moved():
    model = mlp(2, 16, 1, depth=2, seed=0)
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(3))
    y = torch.sign(x[:, :1] * x[:, 1:])  # XOR-like target: features must change to fit it
    before = capture_features(model, x)
    opt = torch.optim.SGD(model.fc2.parameters(), lr=5.0)  # only the second layer learns
    for _ in range(30):
        opt.zero_grad()
        (0.5 * ((model(x) - y) ** 2).mean()).backward()
        opt.step()
    cka = feature_cka(before, capture_features(model, x))
    assert cka["fc1"] == pytest.approx(1.0, abs=1e-12)  # untouched layer: exactly unchanged
    assert cka["fc2"] < 0.99
    assert cka["readout"] < 1.0


def test_capture_with_params_override_gives_reference_features():
    model = mlp(2, 8, 1, depth=1, seed=0)
    x = torch.randn(6, 2)
    theta0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    before = capture_features(model, x)
    with torch.no_grad():
        model.fc1.weight.add_(1.0)
    assert not torch.equal(capture_features(model, x)["fc1"], before["fc1"])
    again = capture_features(model, x, params=theta0)
    torch.testing.assert_close(again["fc1"], before["fc1"], rtol=0, atol=0)


def test_capture_leaves_model_bit_identical():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2)
    )
    model.train()
    model[4].eval()  # a submodule in another mode must keep it
    x = torch.randn(7, 3)
    model(x).sum().backward()  # populate .grad
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    feats = capture_features(model, x)
    assert set(feats) == {"0", "1", "4"}
    for k, v in model.state_dict().items():  # BatchNorm running stats and counter too
        assert torch.equal(v, state[k]), k
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(not m._forward_hooks for m in model.modules())
    assert all(not f.requires_grad for f in feats.values())


def test_capture_uses_eval_semantics():
    model = nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.9), nn.Linear(6, 1)).train()
    x = torch.randn(8, 3)
    a = capture_features(model, x, modules=["1"])["1"]
    torch.testing.assert_close(a, model[0](x), rtol=0, atol=0)  # dropout off


def test_capture_errors_name_the_module():
    model = mlp(2, 4, 1, depth=1, seed=0)
    with pytest.raises(ValueError, match="nope"):
        capture_features(model, torch.randn(3, 2), modules=["nope"])

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(self.lin(x))

    twice = Twice()
    with pytest.raises(ValueError, match="more than once"):
        capture_features(twice, torch.randn(3, 2))
    assert all(not m._forward_hooks for m in twice.modules())  # removed also on error


def test_feature_cka_requires_matching_layers():
    x = _features()
    with pytest.raises(ValueError, match="lack the layers"):
        feature_cka({"a": x}, {"b": x})


# ------------------------------------------------------------------ the default selection


class _Tail(nn.Module):
    """fc -> tanh -> readout, then parameter-free work on the output (a log-softmax)."""

    def __init__(self, frozen_head: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 6)
        self.readout = nn.Linear(6, 4)
        self.head = nn.Linear(4, 4) if frozen_head else None
        if self.head is not None:
            self.head.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.readout(torch.tanh(self.fc(x)))
        out = self.head(out) if self.head is not None else out
        return out.log_softmax(-1)


def _select(model: nn.Module, x, modules, strict: bool = False):
    reasons: dict[str, str] = {}
    with torch.no_grad(), feature_hooks(model, modules, 5, strict=strict, select=reasons) as f:
        model(x)
    return list(f), reasons


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_selection_leaves_out_the_output_layer_through_parameter_free_tails(scale):
    model = mlp(3, 8, 2, depth=2, output_scale=scale, seed=0)  # ..., readout(, scale)
    x = torch.randn(5, 3)
    kept, reasons = _select(model, x, default_feature_modules(model))
    assert kept == ["fc1", "fc2"] and reasons == {"readout": "output"}
    # named explicitly (strict), the output layer is tracked
    assert _select(model, x, ["fc1", "readout"], strict=True) == (["fc1", "readout"], {})
    kept, reasons = _select(_Tail(), x, ["fc", "readout"])  # functional log-softmax tail
    assert kept == ["fc"] and reasons == {"readout": "output"}


def test_selection_keeps_a_layer_followed_by_a_parametrised_module_or_of_another_size():
    x = torch.randn(5, 3)
    # a frozen head (not tracked) computes the output: readout is hidden
    assert _select(_Tail(frozen_head=True), x, ["fc", "readout"]) == (["fc", "readout"], {})
    # the last tracked module has 6 values per example, the output 4: not the output layer
    assert _select(_Tail(), x, ["fc"]) == (["fc"], {})


class _Branch(nn.Module):
    """A constant branch (like LoRA's lora_B = 0, or one token-type embedding) added in."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.head = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)
        with torch.no_grad():
            self.c.weight.zero_()
            self.c.bias.fill_(0.3)  # the same output for every example

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.a(x)) + self.c(x))


def test_selection_omits_constant_features_also_when_named():
    model, x = _Branch(), torch.randn(5, 3)
    assert _select(model, x, ["a", "c", "head"]) == (["a"], {"c": "constant", "head": "output"})
    assert _select(model, x, ["c", "head"], strict=True) == (["head"], {"c": "constant"})


def test_selection_on_gpt2_with_tied_head_tracks_the_final_norm():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 11, (5, 4))
    names = default_feature_modules(model)
    assert "lm_head" not in names  # tied to wte: its weight is named under wte
    reasons: dict[str, str] = {}
    with torch.no_grad(), feature_hooks(model, names, 5, strict=False, select=reasons) as f:
        model(input_ids=ids)
    assert "transformer.ln_f" in f and "output" not in reasons.values()
