"""A zoo of tiny models people actually train, for engine tests (importable by any test folder).

Each builder returns a :class:`ZooCase`: the model (eval-ready, seeded), a probe batch batched on
dim 0 and an optional ``output_fn``. Everything is built from code and configs (no downloads)
and tiny, so that the float64 brute-force reference of ``tests/_reference.py`` stays fast.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

__all__ = ["ZOO", "ZOO_MULTI_INPUT", "ZooCase", "build"]


@dataclasses.dataclass
class ZooCase:
    model: nn.Module
    x: Any
    output_fn: Optional[Callable[[Any], Tensor]] = None
    # Some op of the model has no forward-mode AD rule on CPU: implementation="ntvp" must raise
    # ForwardADUnsupportedError instead of computing the kernel.
    no_forward_ad: bool = False


class _Head(nn.Module):
    """``body`` then mean over dim 1 (positions) then a Linear head."""

    def __init__(self, body: nn.Module, d: int, o: int = 3) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(d, o)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)).mean(1))


def gpt2(dtype: torch.dtype = torch.float64, n_layer: int = 1, n: int = 3) -> ZooCase:
    """HF ``GPT2LMHeadModel`` from a tiny config; last-token logits (O = vocab = 11) of ``n``
    sequences. The position embedding ``wpe`` is indexed by position ids ``(1, T)`` shared by
    the batch."""
    import transformers

    transformers.logging.set_verbosity_error()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=11,
        n_positions=8,
        n_embd=8,
        n_layer=n_layer,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg).to(dtype).eval()
    x = torch.randint(0, 11, (n, 4), generator=torch.Generator().manual_seed(1))
    return ZooCase(model, x, lambda out: out.logits[:, -1])


class _SeqFirstEncoder(nn.Module):
    """``nn.TransformerEncoder`` in the sequence-first layout: input ``(N, T, d)`` transposed
    to ``(T, N, d)`` inside, so that every Linear/LayerNorm sees ``T`` on dim 0."""

    def __init__(self, d: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=False)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.enc(x.transpose(0, 1)).transpose(0, 1)


def encoder(batch_first: bool, dtype: torch.dtype = torch.float64, layers: int = 1) -> ZooCase:
    torch.manual_seed(0)
    d = 8
    if batch_first:
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        body: nn.Module = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    else:
        body = _SeqFirstEncoder(d)
    model = _Head(body, d).to(dtype)
    # SDPA and the encoder fast path have no forward-mode AD rule, but a measurement runs
    # attention on SDPA's math backend without the fast path (measurement_mode)
    return ZooCase(model, torch.randn(3, 5, d, dtype=dtype))


class _Mha(nn.Module):
    """``nn.MultiheadAttention`` in its default (sequence-first) layout, self-attention."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        s = x.transpose(0, 1)
        return self.attn(s, s, s, need_weights=False)[0].transpose(0, 1)


def mha(dtype: torch.dtype = torch.float64) -> ZooCase:
    torch.manual_seed(0)
    return ZooCase(_Head(_Mha(8), 8).to(dtype), torch.randn(3, 4, 8, dtype=dtype))


class _Rnn(nn.Module):
    def __init__(self, cls: type) -> None:
        super().__init__()
        self.rnn = cls(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def rnn(cls: type, dtype: torch.dtype) -> ZooCase:
    torch.manual_seed(0)
    # CPU float32 LSTM runs mkldnn_rnn_layer, which has no forward-mode AD rule.
    no_fwd = cls is nn.LSTM and dtype == torch.float32
    return ZooCase(_Rnn(cls).to(dtype), torch.randn(3, 5, 3, dtype=dtype), no_forward_ad=no_fwd)


def prelu(dtype: torch.dtype = torch.float64) -> ZooCase:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.PReLU(6), nn.Linear(6, 3), nn.PReLU(), nn.Linear(3, 2)
    )
    return ZooCase(model.to(dtype), torch.randn(3, 4, dtype=dtype))


class _CubeFn(torch.autograd.Function):
    """``x³`` with a hand-written backward and no vmap rule (``generate_vmap_rule`` unset)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # noqa: ANN401
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:  # noqa: ANN401
        (x,) = ctx.saved_tensors
        return g * 3 * x**2


class _CustomFn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(_CubeFn.apply(self.a(x)))


def custom_function(dtype: torch.dtype = torch.float64) -> ZooCase:
    torch.manual_seed(0)
    return ZooCase(_CustomFn().to(dtype), torch.randn(3, 4, dtype=dtype), no_forward_ad=True)


class _PosEmb(nn.Module):
    """Token + position embeddings; positions ``arange(T)[None]`` shared by the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(7, 6)
        self.pos = nn.Embedding(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        return self.head(torch.tanh(self.tok(ids) + self.pos(pos)).mean(1))


def shared_index_embedding(dtype: torch.dtype = torch.float64) -> ZooCase:
    torch.manual_seed(0)
    x = torch.randint(0, 7, (3, 4), generator=torch.Generator().manual_seed(2))
    return ZooCase(_PosEmb().to(dtype), x)


class _ClassToken(nn.Module):
    """ViT-style class token: a ``(1, 1, d)`` parameter ``expand``ed over the batch and
    concatenated in front of the patch embeddings; the head reads the class position."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.embed = nn.Linear(4, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], dim=1)
        h = torch.tanh(self.mix(tokens))
        return self.head(h[:, 0] + h.mean(1))


def class_token(dtype: torch.dtype = torch.float64) -> ZooCase:
    torch.manual_seed(0)
    return ZooCase(_ClassToken().to(dtype), torch.randn(3, 3, 4, dtype=dtype))


def conv_transpose(dtype: torch.dtype = torch.float64) -> ZooCase:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)
    )
    x = torch.randn(3, 2, 3, 3, dtype=dtype)
    model(x.float())  # materialise the lazy layer
    return ZooCase(model.to(dtype), x)


def depthwise_conv(dtype: torch.dtype = torch.float64) -> ZooCase:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        nn.Tanh(),
        nn.Conv2d(4, 2, 1),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 2),
    )
    return ZooCase(model.to(dtype), torch.randn(3, 4, 4, 4, dtype=dtype))


def _norm_model(norm: nn.Module, image: bool) -> nn.Module:
    if image:
        return nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), norm, nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3 * 3, 2)
        )
    return nn.Sequential(nn.Linear(4, 6), norm, nn.Tanh(), nn.Linear(6, 2))


def norm(name: str, dtype: torch.dtype = torch.float64) -> ZooCase:
    torch.manual_seed(0)
    layers = {
        "batchnorm": (nn.BatchNorm2d(4), True),
        "layernorm": (nn.LayerNorm(6), False),
        "groupnorm": (nn.GroupNorm(2, 4), True),
        "instancenorm": (nn.InstanceNorm2d(4, affine=True), True),
        "rmsnorm": (nn.RMSNorm(6), False),
    }
    layer, image = layers[name]
    with torch.no_grad():  # non-trivial affines (and running statistics for BatchNorm)
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2.0)
    model = _norm_model(layer, image).to(dtype)
    x = torch.randn(3, 2, 3, 3, dtype=dtype) if image else torch.randn(3, 4, dtype=dtype)
    return ZooCase(model, x)


class _CheckpointedBlock(nn.Module):
    """Pre-norm residual MLP block."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class _Checkpointed(nn.Module):
    """timm-style: every block runs through ``torch.utils.checkpoint.checkpoint`` whatever the
    mode (``checkpoint`` imported by name, as such code does)."""

    def __init__(self, d: int, use_reentrant: bool) -> None:
        super().__init__()
        self.use_reentrant = use_reentrant
        self.stem = nn.Linear(4, d)
        self.blocks = nn.ModuleList([_CheckpointedBlock(d) for _ in range(2)])
        self.head = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        from torch.utils.checkpoint import checkpoint

        h = self.stem(x)
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=self.use_reentrant)
        return self.head(h.mean(1))


def checkpointed(use_reentrant: bool, dtype: torch.dtype = torch.float64) -> ZooCase:
    """Blocks checkpointed unconditionally; built in training mode (as during fine-tuning)."""
    torch.manual_seed(0)
    model = _Checkpointed(8, use_reentrant).to(dtype).train()
    return ZooCase(model, torch.randn(3, 5, 4, dtype=dtype))


def _left_padded(n: int, t: int, vocab: int, pad: int = 0) -> dict[str, Tensor]:
    """``input_ids``/``attention_mask`` of ``n`` sequences, left-padded to ``t`` (lengths
    ``t, t-1, t-2, ...``)."""
    ids = torch.randint(1, vocab, (n, t), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(n, t, dtype=torch.long)
    for i in range(n):
        mask[i, : min(i, t - 1)] = 0
    return {"input_ids": ids.masked_fill(mask == 0, pad), "attention_mask": mask}


def llama_lora(dtype: torch.dtype = torch.float64) -> ZooCase:
    """HF ``LlamaForCausalLM`` from a tiny config (SDPA attention, the default) with peft LoRA
    on ``q_proj``/``v_proj`` at its default init (``lora_B = 0``), gradient checkpointing
    enabled, in training mode; left-padded ``attention_mask``; last-token logits (O = 13)."""
    import transformers

    transformers.logging.set_verbosity_error()
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=13,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        pad_token_id=0,
    )
    base = LlamaForCausalLM(cfg).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the gradient_checkpointing_* renames
        base.gradient_checkpointing_enable()
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = get_peft_model(base, lora).train()
    return ZooCase(model, _left_padded(3, 5, 13), lambda out: out.logits[:, -1])


def vit(dtype: torch.dtype = torch.float64) -> ZooCase:
    """HF ``ViTForImageClassification`` from a tiny config (class token, learned position
    embeddings, SDPA attention)."""
    import transformers

    transformers.logging.set_verbosity_error()
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=2,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=3,
    )
    model = ViTForImageClassification(cfg).to(dtype).eval()
    return ZooCase(model, torch.randn(3, 2, 8, 8, dtype=dtype), lambda out: out.logits)


class _MhaPadded(nn.Module):
    """Batch-first ``nn.MultiheadAttention`` with a ``key_padding_mask`` (fast path eligible in
    eval mode; ``need_weights=False`` takes the SDPA path)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x: Tensor, key_padding_mask: Tensor) -> Tensor:
        h = self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return self.head(torch.tanh(h).mean(1))


def _padding_mask(n: int, t: int) -> Tensor:
    """``True`` at padded positions: example ``i`` has its last ``min(i, t - 1)`` padded."""
    mask = torch.zeros(n, t, dtype=torch.bool)
    for i in range(n):
        mask[i, t - min(i, t - 1) :] = True
    return mask


def mha_padded(dtype: torch.dtype = torch.float64) -> ZooCase:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=dtype)
    return ZooCase(_MhaPadded(8).to(dtype).eval(), (x, _padding_mask(3, 5)))


class _EncoderPadded(nn.Module):
    """``nn.TransformerEncoder`` (nested-tensor fast path enabled) with a key padding mask."""

    def __init__(self, d: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(d, 3)

    def forward(self, x: Tensor, src_key_padding_mask: Tensor) -> Tensor:
        h = self.enc(x, src_key_padding_mask=src_key_padding_mask)
        return self.head(h[:, 0])


def encoder_padded(dtype: torch.dtype = torch.float64) -> ZooCase:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the nested-tensor prototype note
        model = _EncoderPadded(8).to(dtype).eval()
    x = torch.randn(3, 5, 8, dtype=dtype)
    return ZooCase(model, (x, _padding_mask(3, 5)))


ZOO: dict[str, Callable[[], ZooCase]] = {
    "gpt2": gpt2,
    "encoder_batch_first": lambda: encoder(True),
    "encoder_seq_first": lambda: encoder(False),
    "mha": mha,
    "lstm_f32": lambda: rnn(nn.LSTM, torch.float32),
    "lstm_f64": lambda: rnn(nn.LSTM, torch.float64),
    "gru_f32": lambda: rnn(nn.GRU, torch.float32),
    "gru_f64": lambda: rnn(nn.GRU, torch.float64),
    "prelu": prelu,
    "custom_function": custom_function,
    "shared_index_embedding": shared_index_embedding,
    "class_token": class_token,
    "conv_transpose": conv_transpose,
    "depthwise_conv": depthwise_conv,
    "checkpoint_reentrant": lambda: checkpointed(True),
    "checkpoint_nonreentrant": lambda: checkpointed(False),
    "vit": vit,
    **{
        f"norm_{k}": (lambda k=k: norm(k))
        for k in ("batchnorm", "layernorm", "groupnorm", "instancenorm", "rmsnorm")
    },
}


# Models whose probe is a dict or tuple of tensors (keyword arguments, masks): every engine
# test covers them; tests that need a single input tensor (a TensorDataset fit) use ZOO only.
ZOO_MULTI_INPUT: dict[str, Callable[[], ZooCase]] = {
    "llama_lora": llama_lora,
    "mha_padded": mha_padded,
    "encoder_padded": encoder_padded,
}


def build(name: str) -> ZooCase:
    return {**ZOO, **ZOO_MULTI_INPUT}[name]()
