"""``KernelTracker`` with default arguments (``kind="auto"``) on large-output models.

    python benchmarks/bench_auto.py                 # both rows
    python benchmarks/bench_auto.py --models lm     # the O = 50257 language model only

Rows (each in a fresh subprocess, so the peak RSS is that row's whole process):

* ``lm``: the language model of issue 8: embedding 50257×128 → mean over tokens → 256 tanh →
  50257 logits, probe of 16×12 token ids, ``KernelTracker(model, probe)``.
* ``gpt2``: ``GPT2LMHeadModel`` from a tiny ``GPT2Config`` (2 layers, 2 heads, width 16,
  vocabulary 97; no download), probe of 4×8 token ids, logits ``(N, T, V)``,
  ``KernelTracker(model, probe)``.

Printed per row: the resolved ``tracker.kernel_config`` (kind, projection, the estimate), the
wall time of construction + ``start()`` and of one ``measure()`` after an SGD step, and the
process's peak resident memory (``ru_maxrss``). One thread (``torch.set_num_threads(1)``):
small models run 10-20x slower with oversubscribed threads on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch import nn


class LanguageModel(nn.Module):
    """Embedding ``vocab×d`` → mean over tokens → ``hidden`` tanh → ``vocab`` logits."""

    def __init__(self, vocab: int = 50257, d: int = 128, hidden: int = 256) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.hidden = nn.Linear(d, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.emb(ids).mean(1))))


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "lm":
        return LanguageModel(), torch.randint(0, 50257, (16, 12))
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=97, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    return GPT2LMHeadModel(cfg), torch.randint(0, 97, (4, 8))


def _row(name: str) -> dict:
    from lazy_monitor import KernelTracker

    torch.set_num_threads(1)
    model, probe = _model(name)
    start = time.perf_counter()
    tracker = KernelTracker(model, probe)
    metrics0 = tracker.start()
    t_start = time.perf_counter() - start
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(probe)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    loss = logits.reshape(-1, logits.shape[-1]).logsumexp(-1).mean()
    loss.backward()
    opt.step()
    start = time.perf_counter()
    metrics = tracker.measure(1)
    t_measure = time.perf_counter() - start
    cfg = tracker.kernel_config
    return {
        "model": name,
        "kind": cfg["kind"],
        "projection": cfg["projection"],
        "estimated_GiB": cfg["estimated_bytes"] / 2**30,
        "estimated_s": cfg["estimated_seconds"],
        "init_and_start_s": t_start,
        "measure_s": t_measure,
        "peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "nonfinite": metrics0["health/nonfinite"] + metrics["health/nonfinite"],
        "ntk/rel_change": metrics["ntk/rel_change"],
        "lin/rel_error": metrics["lin/rel_error"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lm", "gpt2"], choices=["lm", "gpt2"])
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(_row(args.row)))
        return
    for name in args.models:
        proc = subprocess.run(
            [sys.executable, __file__, "--row", name], capture_output=True, text=True, check=True
        )
        print(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
