"""Default (``implementation="auto"``) vs the Jacobian path on transformer-family models.

Every model is built from a tiny config (no download), float32, ``N = 32`` probe examples,
the full kernel ``(N, N, O, O)`` of a small output (classifier logits, or a language model's
last-token logits over a 16-token vocabulary). In one process, per model: one warm-up call of
each implementation, then ``--repeats`` rounds alternating ``auto`` and ``jacobian`` (so both
see the same machine load; ABBA order); the row reports the medians, their ratio, and the plan the
default path used (:func:`lazy_monitor.core.kernels.plan.describe_plan`: which parameters are
factorised, which go to the Jacobian remainder, or the whole call on the Jacobian path).

Usage::

    python benchmarks/bench_transformers.py                 # every model, 5 rounds
    python benchmarks/bench_transformers.py --models vit llama --repeats 3
    python benchmarks/bench_transformers.py --mlp           # MLP 784-1024x3-10, N = 32

``--mlp`` times ``auto`` on the MLP 784-1024-1024-1024-10 at N = 32 (the neural-tangents
comparison of issue 18; neural-tangents itself runs in its own virtualenv:
``benchmarks/bench_neural_tangents.py``), quiet and with a busy-loop neighbour process
(``--busy``: one Python process spinning for the duration, as another job on the same cores
would).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import time
import warnings
from collections.abc import Iterator
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lazy_monitor.core.kernels import empirical_ntk
from lazy_monitor.core.kernels.plan import describe_plan

N = 32
T = 8
VOCAB = 16


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _ids(n: int, t: int = T, vocab: int = VOCAB, seed: int = 1) -> Tensor:
    return torch.randint(1, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _padded(n: int, left: bool) -> dict[str, Tensor]:
    """Token ids and an attention mask with 0-3 padded positions per row."""
    ids = _ids(n)
    mask = torch.ones(n, T, dtype=torch.long)
    for i in range(n):
        k = i % 4
        if k:
            if left:
                mask[i, :k] = 0
            else:
                mask[i, T - k :] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def _last(out: Any) -> Tensor:
    return out.logits[:, -1]


def _logits(out: Any) -> Tensor:
    return out.logits


Case = tuple[nn.Module, Any, Optional[Callable[[Any], Tensor]]]


def _causal_lm(name: str) -> Case:
    _quiet_transformers()
    import transformers as tf

    common = dict(vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0)
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    kv = dict(num_key_value_heads=2)
    configs = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**sizes, **kv, **common)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**sizes, **kv, **common)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**sizes, **kv, **common)),
        "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**sizes, **common)),
        "gpt2": lambda: tf.GPT2LMHeadModel(
            tf.GPT2Config(
                vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, pad_token_id=0
            )
        ),
    }
    torch.manual_seed(0)
    model = configs[name]().eval()
    return model, _padded(N, left=True), _last


def _lora(base: str) -> Case:
    from peft import LoraConfig, get_peft_model

    model, x, out = _causal_lm(base)
    if base == "llama":
        model.gradient_checkpointing_enable()
        targets = ["q_proj", "v_proj"]
    else:
        targets = ["c_attn"]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
    return get_peft_model(model, lora).train(), x, out


def _encoder(name: str) -> Case:
    _quiet_transformers()
    import transformers as tf

    torch.manual_seed(0)
    if name == "bert":
        cfg = tf.BertConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=64,
            num_labels=4,
        )
        model = tf.BertForSequenceClassification(cfg)
    elif name == "distilbert":
        cfg = tf.DistilBertConfig(
            vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128, num_labels=4
        )
        model = tf.DistilBertForSequenceClassification(cfg)
    else:  # t5 encoder
        cfg = tf.T5Config(
            vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4
        )
        enc = tf.T5EncoderModel(cfg)
        return enc.eval(), _padded(N, left=False), lambda out: out.last_hidden_state[:, 0, :4]
    return model.eval(), _padded(N, left=False), _logits


def _vision(name: str) -> Case:
    _quiet_transformers()
    import transformers as tf

    torch.manual_seed(0)
    x = torch.randn(N, 3, 16, 16)
    if name == "vit":
        cfg = tf.ViTConfig(
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            num_labels=4,
        )
        return tf.ViTForImageClassification(cfg).eval(), x, _logits
    cfg = tf.CLIPVisionConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    )
    return tf.CLIPVisionModel(cfg).eval(), x, lambda out: out.pooler_output[:, :4]


def _wav2vec2() -> Case:
    _quiet_transformers()
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=(32, 32),
        conv_stride=(5, 4),
        conv_kernel=(10, 8),
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4,
        num_labels=4,
        classifier_proj_size=16,
    )
    model = tf.Wav2Vec2ForSequenceClassification(cfg).eval()
    return model, torch.randn(N, 400), _logits


class _TorchTransformer(nn.Module):
    """``nn.Transformer`` (encoder-decoder) on embedded tokens, first target position."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.net = nn.Transformer(d, 4, 2, 2, 128, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, 4)

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        return self.head(self.net(self.embed(src), self.embed(tgt))[:, 0])


class _MhaPadded(nn.Module):
    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.embed = nn.Linear(16, d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.head = nn.Linear(d, 4)

    def forward(self, x: Tensor, key_padding_mask: Tensor) -> Tensor:
        h = self.embed(x)
        h = h + self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return self.head(h.mean(1))


class _EncoderPadded(nn.Module):
    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.embed = nn.Linear(16, d)
        layer = nn.TransformerEncoderLayer(d, 4, 128, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(d, 4)

    def forward(self, x: Tensor, src_key_padding_mask: Tensor) -> Tensor:
        return self.head(self.enc(self.embed(x), src_key_padding_mask=src_key_padding_mask)[:, 0])


class _Checkpointed(nn.Module):
    """timm-style blocks, each through ``torch.utils.checkpoint`` unconditionally."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.stem = nn.Linear(16, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
            for _ in range(2)
        )
        self.head = nn.Linear(d, 4)

    def forward(self, x: Tensor) -> Tensor:
        from torch.utils.checkpoint import checkpoint

        h = self.stem(x)
        for block in self.blocks:
            h = h + checkpoint(block, h, use_reentrant=False)
        return self.head(h.mean(1))


def _key_padding(n: int) -> Tensor:
    mask = torch.zeros(n, T, dtype=torch.bool)
    for i in range(n):
        if i % 4:
            mask[i, T - i % 4 :] = True
    return mask


def _torch_model(name: str) -> Case:
    torch.manual_seed(0)
    x = torch.randn(N, T, 16)
    if name == "nn_transformer":
        return _TorchTransformer().eval(), (_ids(N), _ids(N, seed=2)), None
    if name == "mha_padded":
        return _MhaPadded().eval(), (x, _key_padding(N)), None
    if name == "encoder_padded":
        return _EncoderPadded().eval(), (x, _key_padding(N)), None
    return _Checkpointed().train(), x, None


MODELS: dict[str, Callable[[], Case]] = {
    "gpt2": lambda: _causal_lm("gpt2"),
    "llama": lambda: _causal_lm("llama"),
    "mistral": lambda: _causal_lm("mistral"),
    "qwen2": lambda: _causal_lm("qwen2"),
    "gpt_neox": lambda: _causal_lm("gpt_neox"),
    "bert": lambda: _encoder("bert"),
    "distilbert": lambda: _encoder("distilbert"),
    "t5_encoder": lambda: _encoder("t5"),
    "vit": lambda: _vision("vit"),
    "clip_vision": lambda: _vision("clip"),
    "wav2vec2": _wav2vec2,
    "lora_gpt2": lambda: _lora("gpt2"),
    "lora_llama_ckpt": lambda: _lora("llama"),
    "nn_transformer": lambda: _torch_model("nn_transformer"),
    "mha_padded": lambda: _torch_model("mha_padded"),
    "encoder_padded": lambda: _torch_model("encoder_padded"),
    "timm_checkpoint": lambda: _torch_model("checkpoint"),
}


def _time(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _summary(plan: dict[str, Any]) -> str:
    if plan["path"] == "jacobian":
        return f"jacobian path ({plan['reason']})"
    strategies: dict[str, int] = {}
    for s in plan["parameters"].values():
        strategies[s] = strategies.get(s, 0) + 1
    listing = ", ".join(f"{k} {v}" for k, v in sorted(strategies.items()))
    fallback = [k for k, s in plan["parameters"].items() if s == "jacobian"]
    tail = f"; remainder: {', '.join(fallback[:4])}{', ...' if len(fallback) > 4 else ''}"
    return f"structured ({listing}){tail if fallback else ''}"


def bench_model(name: str, repeats: int) -> dict[str, Any]:
    model, x, output_fn = MODELS[name]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = {
            impl: (
                lambda impl=impl: empirical_ntk(model, x, implementation=impl, output_fn=output_fn)
            )
            for impl in ("auto", "jacobian")
        }
        k_auto, k_jac = runs["auto"](), runs["jacobian"]()  # warm-up (and a check)
        err = float((k_auto - k_jac).abs().max() / k_jac.abs().max())
        times: dict[str, list[float]] = {"auto": [], "jacobian": []}
        for i in range(repeats):  # ABBA order: neither implementation always runs first
            for impl in ("auto", "jacobian") if i % 2 == 0 else ("jacobian", "auto"):
                times[impl].append(_time(runs[impl]))
    loop = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    plan = describe_plan(model, x, output_fn=output_fn)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "o": int(k_jac.shape[-1]),
        "auto": med["auto"],
        "jacobian": med["jacobian"],
        "ratio": med["auto"] / med["jacobian"],
        "err": err,
        "plan": _summary(plan),
        "warnings": loop,
    }


def _mlp() -> nn.Module:
    """MLP 784-1024-1024-1024-10 (benchmarks/bench_kernels.py's ``mlp``)."""
    from bench_kernels import mlp

    torch.manual_seed(0)
    return mlp()


def _spin(stop: Any) -> None:
    while not stop.is_set():
        pass


@contextlib.contextmanager
def busy_neighbour() -> Iterator[None]:
    """One process spinning on a core for the duration (another job on the machine)."""
    stop = multiprocessing.Event()
    proc = multiprocessing.Process(target=_spin, args=(stop,), daemon=True)
    proc.start()
    time.sleep(0.5)
    try:
        yield
    finally:
        stop.set()
        proc.join(5)


def bench_mlp(repeats: int) -> dict[str, float]:
    """Medians of ``auto`` with the measurement's thread choice (``measured``) and with
    torch's thread count forced (``all_threads``: the previous behaviour), alternating, without
    and with a busy-loop neighbour."""
    from lazy_monitor.core import _functional

    model, x = _mlp(), torch.randn(N, 784, generator=torch.Generator().manual_seed(0))
    chooser = _functional.measurement_threads

    def run(choose: bool) -> float:
        _functional.measurement_threads = chooser if choose else contextlib.nullcontext
        try:
            return _time(lambda: empirical_ntk(model, x))
        finally:
            _functional.measurement_threads = chooser

    run(True), run(False)  # warm-up
    out: dict[str, float] = {}
    for label, ctx in (("quiet", contextlib.nullcontext), ("busy", busy_neighbour)):
        times: dict[bool, list[float]] = {True: [], False: []}
        with ctx():
            for _ in range(repeats):
                for choose in (True, False):
                    times[choose].append(run(choose))
        out[f"{label}_measured"] = statistics.median(times[True])
        out[f"{label}_all_threads"] = statistics.median(times[False])
    return out


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mlp", action="store_true", help="only the MLP N = 32 timing")
    args = parser.parse_args(argv)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f}, N = {N}"
    )
    if args.mlp:
        r = bench_mlp(args.repeats)
        print(f"MLP 784-1024x3-10, N = {N}, auto (neural-tangents anchor: 0.014 s quiet)")
        for label in ("quiet", "busy"):
            print(
                f"  {label}: measurement threads {r[label + '_measured']:.4f} s, "
                f"all {torch.get_num_threads()} threads {r[label + '_all_threads']:.4f} s"
            )
        return
    print("| model | trainable params | O | default (s) | jacobian (s) | ratio | plan |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        r = bench_model(name, args.repeats)
        note = f" ⚠ {len(r['warnings'])} warnings" if r["warnings"] else ""
        print(
            f"| {r['model']} | {r['params']} | {r['o']} | {r['auto']:.3f} | "
            f"{r['jacobian']:.3f} | {r['ratio']:.2f} | {r['plan']}{note} |",
            flush=True,
        )
        assert r["err"] < 1e-3, f"{name}: auto and jacobian differ by {r['err']:.1e}"
        for w in r["warnings"]:
            print(f"    warning: {w}")


if __name__ == "__main__":
    main()
