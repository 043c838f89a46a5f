"""One Hugging Face Trainer run with KernelRegimeCallback, as a script: under ``torchrun`` (gloo,
CPU) or as one process. Writes ``<out>/rank<r>.json``: the monitor's values in
``state.log_history`` by step, and the trained weights' checksum.

    python -m torch.distributed.run --nproc_per_node 2 tests/integrations/_hf_ddp.py OUT MODE
    python tests/integrations/_hf_ddp.py OUT MODE

MODE ``defaults``: the callback's defaults (cadence and 5 % budget); ``dense``: every 2 steps,
no budget. The global batch is 8 whatever the number of processes, so both runs train alike.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from lazy_monitor.integrations.transformers import KernelRegimeCallback

VOCAB, SEQ = 16, 8


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64) -> None:
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def main(out: str, mode: str) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    args = TrainingArguments(
        output_dir=out,
        max_steps=6,
        per_device_train_batch_size=8 // world,
        learning_rate=5e-3,
        use_cpu=True,
        ddp_backend="gloo" if world > 1 else None,
        report_to=["tensorboard"],
        logging_steps=2,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=Tokens())
    if mode == "dense":
        monitor = KernelRegimeCallback(
            probe_size=4, every_n_steps=2, log_spaced_until=0, max_overhead=None
        )
    else:
        monitor = KernelRegimeCallback()
    monitor.attach(trainer)
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    logged = {
        str(e["step"]): {k: v for k, v in e.items() if "/" in k}
        for e in trainer.state.log_history
        if "ntk/rel_change" in e
    }
    checksum = sum(float(p.detach().double().sum()) for p in trainer.model.parameters())
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"world": world, "logged": logged, "checksum": checksum}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
