"""Every ```python block of README.md and docs/*.md runs, and every concrete ``lazy-monitor``
command line in their ```bash blocks parses.

A python block runs in a fresh namespace in a temporary working directory. A block that uses a
model or data it does not build says so with a comment on the line before it,
``<!-- docs-test: NAME -->``, naming one of :data:`SETUPS` (e.g. ``lightning``: ``model`` and
``train_loader``), which provides those names small and fast. docs/DESIGN.md is left out: its
blocks are signature listings, not code.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    ROOT / "README.md",
    *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "DESIGN.md"),
]
FENCE = re.compile(
    r"(?:<!-- docs-test: (?P<setup>\w+) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S
)


def blocks(lang: str) -> list[tuple[str, str, str]]:
    """``(id, setup, code)`` of every fenced block of language ``lang``."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group("lang") == lang:
                line = text.count("\n", 0, match.start("code")) + 1
                block_id = f"{page.relative_to(ROOT)}:{line}"
                found.append((block_id, match.group("setup") or "", match.group("code")))
    return found


def _classifier_data(n: int = 256, dim: int = 16, classes: int = 4) -> tuple[Any, Any]:
    from lazy_monitor.demo.datasets import gaussian_mixture

    return gaussian_mixture(n, dim, classes, seed=0)


def _lightning() -> dict[str, Any]:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lazy_monitor.demo.models import mlp

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(16, 64, 4, depth=1, seed=0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.5)

    x, y = _classifier_data()
    return {"model": Classifier(), "train_loader": DataLoader(TensorDataset(x, y), batch_size=32)}


def _plain() -> dict[str, Any]:
    from lazy_monitor.demo.models import mlp

    x, y = _classifier_data()
    model = mlp(16, 64, 4, depth=1, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def train_one_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return {"model": model, "opt": opt, "x_probe": x[:16], "y_probe": y[:16],
            "train_one_step": train_one_step}  # fmt: skip


def _hf() -> dict[str, Any]:
    transformers = pytest.importorskip("transformers")

    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    tokens = torch.randint(0, 64, (32, 8), generator=torch.Generator().manual_seed(0))
    ds = [{"input_ids": t, "labels": t} for t in tokens]
    args = transformers.TrainingArguments(
        "hf_out", max_steps=4, per_device_train_batch_size=8, report_to=["tensorboard"],
        use_cpu=True, save_strategy="no",
    )  # fmt: skip
    return {"model": model, "ds": ds, "args": args}


SETUPS: dict[str, Callable[[], dict[str, Any]]] = {
    "": dict,
    "lightning": _lightning,
    "plain": _plain,
    "hf": _hf,
}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only spin-wait on a shared CPU
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("block_id, setup, code", blocks("python"), ids=lambda v: str(v)[:40])
def test_python_block_runs(block_id, setup, code, tmp_path, monkeypatch, one_thread):
    assert setup in SETUPS, f"{block_id}: unknown <!-- docs-test: {setup} -->"
    monkeypatch.chdir(tmp_path)
    namespace = SETUPS[setup]()
    exec(compile(code, block_id, "exec"), namespace)  # noqa: S102 - the docs' own code


def _command_lines() -> list[tuple[str, str]]:
    lines = []
    for block_id, _, code in blocks("bash"):
        for raw in code.splitlines():
            line = raw.split("  #")[0].strip()
            if line.startswith(("lazy-monitor ", "python -m lazy_monitor ")) and "[" not in line:
                lines.append((block_id, line))
    return lines


@pytest.mark.parametrize("block_id, line", _command_lines())
def test_command_lines_parse(block_id, line):
    from lazy_monitor.cli.main import build_parser

    words = shlex.split(line)
    words = words[3:] if words[0] == "python" else words[1:]
    try:
        build_parser().parse_args(words)
    except SystemExit as exc:  # argparse exits 2 on a bad option
        pytest.fail(f"{block_id}: `{line}` does not parse (exit {exc.code})")


def test_every_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, page.name
