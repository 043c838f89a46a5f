"""Tiny LightningModules, data and event-file readers shared by the callback tests."""

from __future__ import annotations

import glob
import os
from typing import Any

import lightning.pytorch as L
import pytorch_lightning as PL
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NAMESPACES = {"lightning": L, "pytorch_lightning": PL}


def make_data(n: int = 64, d: int = 6, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(x, y)


def _body(self: Any, d: int, width: int, classes: int, norm: bool, dropout: float) -> None:
    layers: list[nn.Module] = [nn.Linear(d, width)]
    if norm:
        layers.append(nn.BatchNorm1d(width))
    layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(width, classes)]
    self.net = nn.Sequential(*layers)


def _make_module_class(pl: Any, name: str) -> type:
    class Lit(pl.LightningModule):
        def __init__(
            self,
            d: int = 6,
            width: int = 16,
            classes: int = 3,
            norm: bool = False,
            dropout: float = 0.0,
            lr: float = 0.1,
            n: int = 64,
            batch_size: int = 8,
            shuffle: bool = True,
        ) -> None:
            super().__init__()
            self.save_hyperparameters()
            _body(self, d, width, classes, norm, dropout)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

        def train_dataloader(self) -> DataLoader:
            ds = make_data(self.hparams.n, self.hparams.d, self.hparams.classes)
            return DataLoader(ds, batch_size=self.hparams.batch_size, shuffle=self.hparams.shuffle)

    Lit.__name__ = Lit.__qualname__ = name
    return Lit


LitLightning = _make_module_class(L, "LitLightning")
LitPL = _make_module_class(PL, "LitPL")
MODULES = {"lightning": LitLightning, "pytorch_lightning": LitPL}


def trainer_kwargs(tmp_path: Any, **overrides: Any) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=12,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        default_root_dir=str(tmp_path),
        deterministic=True,
    )
    kw.update(overrides)
    return kw


def read_events(log_dir: str) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import (
        HISTOGRAMS,
        IMAGES,
        SCALARS,
        TENSORS,
        EventAccumulator,
    )

    files = glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True)
    assert len(files) == 1, f"expected one event file under {log_dir}, found {files}"
    acc = EventAccumulator(
        files[0], size_guidance={SCALARS: 0, HISTOGRAMS: 0, IMAGES: 0, TENSORS: 0}
    )
    acc.Reload()
    return acc


def scalars(acc: Any, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def _recording_logger(pl: Any, name: str) -> type:
    class RecordingLogger(pl.loggers.Logger):
        """In-memory logger: every ``log_metrics`` call as ``(step, metrics)``."""

        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[int, dict[str, float]]] = []

        @property
        def name(self) -> str:
            return "recording"

        @property
        def version(self) -> int:
            return 0

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

        def log_metrics(self, metrics: dict[str, float], step: Any = None) -> None:
            self.calls.append((step, dict(metrics)))

        def series(self, tag: str) -> dict[int, float]:
            return {s: m[tag] for s, m in self.calls if tag in m}

    RecordingLogger.__name__ = RecordingLogger.__qualname__ = name
    return RecordingLogger


RecordingLogger = _recording_logger(L, "RecordingLogger")
RecordingLoggerPL = _recording_logger(PL, "RecordingLoggerPL")
