"""Benchmark of the empirical NTK engine: time and peak memory per implementation.

Cases (full kernel, O = 10, float32, inputs 784-dim or 3x32x32):

* ``mlp``: MLP 784-1024-1024-1024-10 at N = 32 / 128 / 512;
* ``cnn``: 3 convs 3->64->128->256 (3x3, strides 1/2/2, pad 1, ReLU), global average pool,
  dense 10, at N = 32 / 128;
* ``resnet18``: ResNet-18-style CNN (BasicBlocks [2, 2, 2, 2], widths 64-128-256-512,
  BatchNorm, ~11.2M parameters) at N = 128;
* ``lm``: large-output language model, Embedding 50257x128 -> mean over 12 tokens -> 256 tanh
  -> 50257 logits (O = 50257, ~19.4M parameters), N = 16, *projected trace* kernel (k = 16,
  ``kind="trace", projection=16``);
* ``gpt2``: HF ``GPT2LMHeadModel`` from a config (2 layers, 4 heads, width 64, vocab 512, no
  download), last-token logits of 16-token inputs, N = 32, projected trace (k = 16).

Every (case, method) runs in its own subprocess: one warm-up call, then the median of
``--repeats`` (default 5; the ResNet case, which has a memory target only and takes minutes,
makes one cold call unless ``--repeats`` is given) timed calls, and the peak RSS (``ru_maxrss``) of the subprocess
above its value once the model and inputs exist. ``tutorial`` is the torch.func tutorial's
Jacobian contraction (``vmap(jacrev)`` + einsum per parameter block), the baseline every other
method is compared with (``speedup`` = baseline median / method median, both measured in the
same run). Methods that would run out of memory or take far too long are not run; the table
says why, with an estimate.

Usage::

    python benchmarks/bench_kernels.py            # everything (~15 min on a 2-core CPU)
    python benchmarks/bench_kernels.py --quick    # N = 32 cases, 3 repeats (~2 min)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Optional

import torch
from torch import nn

METHODS = ["tutorial", "jacobian", "ntvp", "structured", "auto"]
GIB = 2**30


# ----------------------------------------------------------------------------------- models
def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 1024),
        nn.ReLU(),
        nn.Linear(1024, 1024),
        nn.ReLU(),
        nn.Linear(1024, 1024),
        nn.ReLU(),
        nn.Linear(1024, 10),
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, 1, 1),
        nn.ReLU(),
        nn.Conv2d(64, 128, 3, 2, 1),
        nn.ReLU(),
        nn.Conv2d(128, 256, 3, 2, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(256, 10),
    )


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stem, BasicBlocks [2, 2, 2, 2], 64-128-256-512, dense 10."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        blocks, c_in = [], 64
        for c_out, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [_BasicBlock(c_in, c_out, stride), _BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


class LargeOutputLM(nn.Module):
    """Embedding 50257x128 -> mean over tokens -> 256 tanh -> 50257 logits."""

    def __init__(self, vocab: int = 50257, d: int = 128, hidden: int = 256) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.hid = nn.Linear(d, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hid(self.emb(ids).mean(1))))


class TinyGPT2(nn.Module):
    """HF GPT-2 from a config; last-token logits."""

    def __init__(self) -> None:
        super().__init__()
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel

        transformers.logging.set_verbosity_error()
        cfg = GPT2Config(
            vocab_size=512,
            n_positions=32,
            n_embd=64,
            n_layer=2,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
        )
        self.gpt = GPT2LMHeadModel(cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.gpt(ids).logits[:, -1]


MODELS = {
    "mlp": (mlp, (784,)),
    "cnn": (cnn, (3, 32, 32)),
    "resnet18": (ResNet18, (3, 32, 32)),
    "lm": (LargeOutputLM, ("tokens", 50257, 12)),
    "gpt2": (TinyGPT2, ("tokens", 512, 16)),
}
# Engine options per model (default: the full kernel).
OPTIONS = {
    "lm": {"kind": "trace", "projection": 16},
    "gpt2": {"kind": "trace", "projection": 16},
}

# (model, N) cases, and methods not run with the reason (an estimate from the anchors
# measured on this machine, the project notes (ntk-methods.md), and from the scaling of each method).
CASES = [
    ("mlp", 32),
    ("mlp", 128),
    ("mlp", 512),
    ("cnn", 32),
    ("cnn", 128),
    ("resnet18", 128),
    ("lm", 16),
    ("gpt2", 32),
]
# The ResNet case has a memory target only and takes minutes per call: one cold call.
REPEATS = {"resnet18": 1}
SKIP = {
    ("mlp", 128, "tutorial"): "OOM: N·O·P·4 B = 14.9 GB of Jacobian (measured: >14 GiB)",
    ("mlp", 512, "tutorial"): "OOM: 60 GB of Jacobian",
    ("mlp", 128, "jacobian"): "too slow: ~16x N=32 time (N² contraction + N·O passes)",
    ("mlp", 512, "jacobian"): "too slow: ~256x N=32 time",
    ("mlp", 128, "ntvp"): "too slow: N²·O forward passes (~16x N=32)",
    ("mlp", 512, "ntvp"): "too slow: ~256x N=32 time",
    ("cnn", 32, "ntvp"): "too slow: N²·O = 10k forward passes of the CNN (> 20 s)",
    ("cnn", 128, "ntvp"): "too slow: 164k forward passes",
    ("cnn", 128, "jacobian"): "too slow: ~16x N=32 time",
    ("resnet18", 128, "tutorial"): "OOM: N·O·P·4 B = 57 GB of Jacobian",
    ("resnet18", 128, "jacobian"): "too slow: N²O²P = 1.8e13 multiply-adds (hours)",
    ("resnet18", 128, "ntvp"): "too slow: 164k ResNet forward passes (hours)",
    ("resnet18", 128, "structured"): "same code path and plan as auto (see auto row)",
    ("lm", 16, "tutorial"): "no projection in the tutorial: N·O·P·4 B = 62 TB of Jacobian",
    ("lm", 16, "jacobian"): "too slow: N·k·P = 5e9 Jacobian entries rebuilt per block (> 10 min)",
    ("lm", 16, "ntvp"): "N²·k forward passes through a 50257-wide head; not the intended use",
    ("lm", 16, "structured"): "same code path and plan as auto (see auto row)",
    ("gpt2", 32, "tutorial"): "no projection in the tutorial",
    ("gpt2", 32, "ntvp"): "CPU scaled_dot_product_attention has no forward-mode AD (raises)",
    ("gpt2", 32, "structured"): "same code path and plan as auto (see auto row)",
}


# ------------------------------------------------------------------------------- baselines
def tutorial_ntk(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The torch.func tutorial's method 1: ``vmap(jacrev)`` + einsum per parameter block."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f_single(p: dict, xi: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = torch.func.vmap(torch.func.jacrev(f_single), (None, 0))(params, x)
    jac = [j.flatten(2) for j in jac.values()]
    return sum(torch.einsum("Naf,Mbf->NMab", j, j) for j in jac)


# ------------------------------------------------------------------------------ one worker
def _rss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _model_and_inputs(model_name: str, n: int) -> tuple[nn.Module, torch.Tensor]:
    """The case's model in eval mode and ``n`` generated inputs (seed 0)."""
    torch.manual_seed(0)
    make, shape = MODELS[model_name]
    model = make().eval()
    if shape[0] == "tokens":
        return model, torch.randint(0, shape[1], (n, shape[2]))
    return model, torch.randn(n, *shape)


def run_one(model_name: str, n: int, method: str, repeats: int) -> dict:
    from lazy_monitor.core.kernels import empirical_ntk

    model, x = _model_and_inputs(model_name, n)
    opts = OPTIONS.get(model_name, {})
    base = _rss_bytes()
    if method == "tutorial":

        def call() -> torch.Tensor:
            return tutorial_ntk(model, x)
    else:

        def call() -> torch.Tensor:
            return empirical_ntk(model, x, implementation=method, **opts)

    if repeats > 1:
        call()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        k = call()
        times.append(time.perf_counter() - t0)
    assert k.shape == ((n, n) if opts.get("kind") == "trace" else (n, n, 10, 10))
    return {
        "median_s": statistics.median(times),
        "times": times,
        "peak_rss_delta_gib": (_rss_bytes() - base) / GIB,
        "kernel_norm": float(k.double().norm()),
    }


def run_defaults(model_name: str, n: int) -> dict:
    """What ``kind="auto"`` does at start: resolve the configuration under the default budget
    (per-layer blocks on), then K₀ and one K with per-parameter blocks; the process peak RSS."""
    from lazy_monitor.core.kernels import empirical_ntk, resolve_kernel_config

    model, x = _model_and_inputs(model_name, n)
    t0 = time.perf_counter()
    cfg = resolve_kernel_config(model, x, per_layer=True)
    t1 = time.perf_counter()
    keys = ("kind", "projection", "projection_seed", "implementation", "max_memory")
    opts = {k: cfg[k] for k in keys}
    times = []
    for _ in range(2):
        t = time.perf_counter()
        empirical_ntk(model, x, return_blocks=True, **opts)
        times.append(time.perf_counter() - t)
    return {
        "config": {k: opts[k] for k in ("kind", "projection")},
        "resolve_s": t1 - t0,
        "kernel_s": times,
        "peak_rss_gib": _rss_bytes() / GIB,
    }


def _subprocess(
    model_name: str, n: int, method: str, repeats: int, timeout: float, threads: Optional[int]
) -> dict:
    cmd = [sys.executable, __file__, "--worker", model_name, str(n), method, str(repeats)]
    if threads:
        cmd += ["--threads", str(threads)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
        why = "killed (out of memory?)" if res.returncode < 0 else tail[0][:80]
        return {"error": why}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}"
    )


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 32 cases only, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per method")
    parser.add_argument("--cases", default=None, help="e.g. mlp:32,cnn:128 (default: all)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per subprocess")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per run (default: torch's)"
    )
    parser.add_argument("--methods", default=None, help="e.g. tutorial,auto (default: all)")
    parser.add_argument(
        "--defaults",
        default=None,
        help="e.g. lm:16 -- resolve kind='auto' under the default budget, K0 + one K, peak RSS",
    )
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        model_name, n, method, repeats = args.worker
        print(json.dumps(run_one(model_name, int(n), method, int(repeats))))
        return
    if args.defaults:
        name, n = args.defaults.split(":")
        print(json.dumps(run_defaults(name, int(n))))
        return
    repeats = args.repeats or (3 if args.quick else 5)
    cases = CASES
    if args.cases:
        cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]
    elif args.quick:
        cases = [c for c in CASES if c[1] == 32]
    print(f"# machine: {_machine()}")
    print(f"# full kernel, O = 10 (lm/gpt2: projected trace, k = 16), float32; median of {repeats}")
    print("# warm calls; peak RSS above the")
    print("# model's footprint, measured in a subprocess per row; speedup vs the tutorial baseline")
    print()
    print("| case | N | method | median time | peak RSS extra | speedup vs tutorial |")
    print("|---|---|---|---|---|---|")
    for model_name, n in cases:
        baseline = None
        for method in args.methods.split(",") if args.methods else METHODS:
            skip = SKIP.get((model_name, n, method))
            if skip:
                print(f"| {model_name} | {n} | {method} | not run: {skip} | | |", flush=True)
                continue
            reps = repeats if args.repeats else REPEATS.get(model_name, repeats)
            r = _subprocess(model_name, n, method, reps, args.timeout, args.threads)
            if "error" in r:
                print(f"| {model_name} | {n} | {method} | failed: {r['error']} | | |", flush=True)
                continue
            if method == "tutorial":
                baseline = r["median_s"]
            speed = f"{baseline / r['median_s']:.1f}x" if baseline else "n/a (baseline not run)"
            print(
                f"| {model_name} | {n} | {method} | {r['median_s']:.3f} s | "
                f"{r['peak_rss_delta_gib']:.2f} GiB | {speed} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
