"""Is my transformer training lazy? A Hugging Face ``Trainer`` run of a tiny GPT-2 with the
kernel monitor and a drift gate.

Builds a tiny GPT-2 from a config (no download), trains it on generated token sequences with the
``transformers.Trainer`` and logs the kernel metrics next to the Trainer's own (TensorBoard
under ``<output-dir>/runs``, tags ``ntk/rel_change``, ... with the custom-scalars layout, verdict
texts, run summary, HParams and per-layer heatmap; ``trainer.state.log_history``). The gate stops
the run once the kernel has moved more than ``--max-drift``::

    python examples/hf_trainer.py                    # runs in seconds on a CPU
    tensorboard --logdir hf_trainer_out/runs

Needs the ``hf`` extra: ``pip install lazy-monitor[hf]``.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from lazy_monitor.integrations.transformers import KernelDriftGateCallback, KernelRegimeCallback


class GeneratedTokens(torch.utils.data.Dataset):
    """Random token sequences with a repeated motif, as a tokenized dataset of dicts would be."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        half = torch.randint(0, vocab, (n, seq_len // 2), generator=g)
        self.ids = torch.cat([half, half], dim=1)  # second half repeats the first: learnable

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every-n-steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--max-drift", type=float, default=0.5, help="gate on ntk/rel_change")
    parser.add_argument("--output-dir", default="hf_trainer_out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny CPU demo: more threads only spin-wait (10x slower if busy)

    torch.manual_seed(0)
    vocab, seq_len = 32, 16
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=seq_len,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",  # torch SDPA has no forward-mode AD (needed for lin/*)
    )
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=args.lr,
        logging_steps=5,
        report_to=["tensorboard"],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    gate = KernelDriftGateCallback({"ntk/rel_change": args.max_drift}, action="stop")
    trainer = Trainer(
        model=GPT2LMHeadModel(config),
        args=training_args,
        train_dataset=GeneratedTokens(256, seq_len, vocab),
        callbacks=[gate],
    )
    # An exact cadence for this demo; the defaults add the log-spaced early steps 1, 2, 4, ...
    # and keep the monitor within 5 % of the wall time (max_overhead=0.05).
    KernelRegimeCallback(
        probe_size=4, every_n_steps=args.every_n_steps, log_spaced_until=0, max_overhead=None
    ).attach(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the gate's message is printed below
        trainer.train()
    history = [e for e in trainer.state.log_history if "ntk/rel_change" in e]
    for entry in history:
        print(
            f"step {entry['step']:4d}  ntk/rel_change {entry['ntk/rel_change']:.4f}  "
            f"lazy {int(entry['regime/lazy'])}"
        )
    print(f"gate: {gate.reason}" if gate.tripped else "gate: not tripped")
    print(f"tensorboard --logdir {args.output_dir}/runs")
    return {"steps": trainer.state.global_step, "stopped": gate.tripped, "history": history}


if __name__ == "__main__":
    main()
