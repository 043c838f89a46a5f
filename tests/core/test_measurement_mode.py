"""How a measurement runs transformers as people fine-tune them (issue 18, items 1-2).

Gradient checkpointing (HF ``gradient_checkpointing_enable()``, timm-style unconditional
``torch.utils.checkpoint`` calls with either ``use_reentrant``, train or eval mode), peft LoRA at
its default init, SDPA with a left-padded ``attention_mask``, ``nn.MultiheadAttention`` with a
``key_padding_mask``, ``nn.TransformerEncoder`` with its fast path, ViT: every kernel and ``f_lin``
exact against the float64 brute force of ``tests/_reference.py``, without the per-example loop,
and the model's own settings restored afterwards (:func:`measurement_mode`).
"""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Any

import pytest
import torch
import torch.utils.checkpoint as cp

from lazy_monitor import Linearization
from lazy_monitor.core._functional import measurement_mode, side_effect_guard
from lazy_monitor.core.kernels import empirical_ntk, empirical_ntk_fn
from tests._reference import _call, _to64, reference_jacobian, reference_ntk
from tests._zoo import ZooCase, build, checkpointed

CASES = (
    "llama_lora",
    "checkpoint_reentrant",
    "checkpoint_nonreentrant",
    "mha_padded",
    "encoder_padded",
    "vit",
)


@functools.cache
def _case(name: str) -> ZooCase:
    return build(name)


@functools.cache
def _reference(name: str) -> torch.Tensor:
    case = _case(name)
    return reference_ntk(case.model, case.x, output_fn=case.output_fn)[0]


def _rel_err(k: torch.Tensor, ref: torch.Tensor) -> float:
    return float((k.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("implementation", ["auto", "jacobian", "structured"])
@pytest.mark.parametrize("name", CASES)
def test_exact_without_per_example_loop(name: str, implementation: str) -> None:
    """Exact, and no RuntimeWarning: neither the vmap -> loop fallback nor auto's switch."""
    case = _case(name)
    flags = [m.training for m in case.model.modules()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        warnings.simplefilter("ignore", FutureWarning)  # transformers' checkpointing renames
        k = empirical_ntk(
            case.model, case.x, implementation=implementation, output_fn=case.output_fn
        )
    assert _rel_err(k, _reference(name)) <= 1e-6
    assert [m.training for m in case.model.modules()] == flags


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_unconditional_checkpoint_train_and_eval(use_reentrant: bool, training: bool) -> None:
    case = checkpointed(use_reentrant)
    case.model.train(training)
    ref = reference_ntk(case.model, case.x)[0]
    ntk = empirical_ntk_fn(case.model, kind="full")
    for implementation in ("auto", "jacobian", "ntvp"):
        k = empirical_ntk(case.model, case.x, implementation=implementation)
        assert _rel_err(k, ref) <= 1e-6, implementation
    assert _rel_err(ntk(case.x), ref) <= 1e-6
    assert case.model.training is training
    # the model still trains with its own checkpointing afterwards
    assert cp.CheckpointFunction.__name__ == "CheckpointFunction"
    case.model(case.x.requires_grad_()).sum().backward()
    assert all(p.grad is not None for p in case.model.parameters())


def _perturb(model: torch.nn.Module) -> None:
    """Move every trainable parameter (LoRA's zero ``lora_B`` included)."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _reference_f_lin(case: ZooCase, model0: torch.nn.Module, model1: torch.nn.Module) -> Any:
    """``f0 + J(θ0) (θ1 - θ0)`` with ``f0`` and ``J`` from the float64 brute force."""
    jac = reference_jacobian(model0, case.x, output_fn=case.output_fn)
    p0, p1 = dict(model0.named_parameters()), dict(model1.named_parameters())
    m = copy.deepcopy(model0).double().eval()
    with torch.no_grad():
        out = _call(m, _to64(case.x))
        f0 = (case.output_fn(out) if case.output_fn else out).reshape(
            len(jac and next(iter(jac.values()))), -1
        )
    lin = f0.clone()
    for name, j in jac.items():
        delta = (p1[name].detach().double() - p0[name].detach().double()).reshape(-1)
        lin += j @ delta
    return f0, lin


@pytest.mark.parametrize("name", CASES)
def test_f_lin_matches_reference(name: str) -> None:
    case = build(name)  # a private copy: its parameters are moved
    model = case.model
    lin = Linearization(model, output_fn=case.output_fn)
    model0 = copy.deepcopy(model)
    _perturb(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        f0, f_lin = lin.f0_and_f_lin(case.x)
        ref_f0, ref_lin = _reference_f_lin(case, model0, model)
    torch.testing.assert_close(f0.double(), ref_f0, rtol=1e-9, atol=1e-9)
    scale = float((ref_lin - ref_f0).abs().max())
    assert scale > 0
    assert float((f_lin.double() - ref_lin).abs().max()) <= 1e-6 * scale + 1e-12


def _settings(model: torch.nn.Module) -> dict[str, Any]:
    embed = model.get_input_embeddings()
    return {
        "attn": [m.config._attn_implementation for m in model.modules() if hasattr(m, "config")],
        "hooks": (embed._forward_hooks, list(embed._forward_hooks.items())),
        "fastpath": torch.backends.mha.get_fastpath_enabled(),
        "checkpoint": (cp.CheckpointFunction, cp._checkpoint_without_reentrant_generator),
        "training": [m.training for m in model.modules()],
        "gc": [getattr(m, "gradient_checkpointing", None) for m in model.modules()],
    }


def test_measurement_mode_switches_and_restores() -> None:
    model = build("llama_lora").model
    before = _settings(model)
    assert set(before["attn"]) == {"sdpa"}
    assert before["hooks"][1], "gradient_checkpointing_enable() installs the input-grad hook"
    with measurement_mode(model):
        inside = _settings(model)
        with measurement_mode(model):  # nested: the inner exit must not restore early
            pass
        assert _settings(model)["checkpoint"] == inside["checkpoint"]
        assert "sdpa" not in inside["attn"]
        assert inside["hooks"][1] == []
        assert inside["fastpath"] is False
        assert inside["checkpoint"][0] is not before["checkpoint"][0]
    after = _settings(model)
    assert after["attn"] == before["attn"]
    assert after["hooks"][0] is before["hooks"][0]  # same dict: the hook's handle still works
    assert after["hooks"][1] == before["hooks"][1]
    assert after["fastpath"] is before["fastpath"]
    assert after["checkpoint"] == before["checkpoint"]
    assert after["gc"] == before["gc"]
    # also after an error inside a measurement
    with pytest.raises(RuntimeError, match="boom"), side_effect_guard(model):
        raise RuntimeError("boom")
    assert _settings(model)["attn"] == before["attn"]
    assert _settings(model)["training"] == before["training"]
    assert _settings(model)["checkpoint"] == before["checkpoint"]
    hooks = model.get_input_embeddings()._forward_hooks
    n = len(hooks)
    model.base_model.model.disable_input_require_grads()  # the restored handle removes it
    assert len(hooks) == n - 1


def test_model_output_without_logits_asks_for_output_fn() -> None:
    """CLIP vision returns a ModelOutput without ``logits``: the error names output_fn and the
    output's tensors, and the tracker does not blame the probe's shape."""
    import transformers

    from lazy_monitor import KernelTracker

    transformers.logging.set_verbosity_error()
    cfg = transformers.CLIPVisionConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
    )
    model = transformers.CLIPVisionModel(cfg)
    x = torch.randn(3, 3, 8, 8)
    with pytest.raises(TypeError, match=r"output_fn=lambda out: out\.pooler_output") as err:
        empirical_ntk(model, x)
    assert "last_hidden_state (" in str(err.value)
    with pytest.raises(TypeError, match="output_fn") as err:
        KernelTracker(model, x)
    assert "probe" not in str(err.value) and "in_channels" not in str(err.value)
    k = empirical_ntk(model, x, output_fn=lambda out: out.pooler_output)
    assert k.shape == (3, 3, 8, 8)
