"""Every tracker metric is finite on a healthy model with default settings (issue 18 item 4):
peft LoRA with its default init (lora_B = 0, so lora_A's K₀ block and lora_B's θ₀ are exactly
0, and lora_B's features are constant at θ₀) on a Llama built from a config.
``health/nonfinite`` is kept for real non-finite values."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from lazy_monitor import KernelTracker

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _lora_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    base = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    return peft.get_peft_model(base, lora)


def _nonfinite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not math.isfinite(v)}


def test_lora_default_init_gives_finite_metrics_at_start_and_after_training(caplog):
    model = _lora_llama()
    ids = torch.randint(0, 32, (6, 5), generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.INFO, logger="lazy_monitor"):
        tracker = KernelTracker(model, {"input_ids": ids})
    # lora_B outputs 0 for every example at θ₀: no CKA (undefined), said once
    assert tracker.feature_modules and not any("lora_B" in m for m in tracker.feature_modules)
    notes = [r.getMessage() for r in caplog.records if "features/<layer>/cka" in r.getMessage()]
    assert len(notes) == 1 and "lora_B" in notes[0] and "same features" in notes[0]
    lr = 0.1
    start = tracker.start(lr=lr)
    assert _nonfinite(start) == {} and start["health/nonfinite"] == 0.0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(1, 4):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        out = tracker.measure(step, lr=lr)
        assert _nonfinite(out) == {}, step
        assert out["health/nonfinite"] == 0.0
    # the blocks that were exactly 0 at θ₀ moved, and their changes are finite and positive
    a_layers = [n for n in out if n.startswith("ntk_layer/") and "lora_A" in n]
    b_layers = [n for n in out if n.startswith("params_layer/") and "lora_B" in n]
    assert a_layers and all(0 < out[n] < math.inf for n in a_layers)
    assert b_layers and all(0 < out[n] < math.inf for n in b_layers)
    # per-layer parameter changes are shares of the total: their squares add up to it
    shares = [v for k, v in out.items() if k.startswith("params_layer/")]
    assert sum(v * v for v in shares) == pytest.approx(out["params/rel_change"] ** 2, rel=1e-9)
    # a real non-finite value still raises the flag
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(math.nan)
    assert tracker.measure(4, lr=lr)["health/nonfinite"] == 1.0
