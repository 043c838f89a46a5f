"""A LightningModule around any ``nn.Module`` and a short fit, for the reliability battery."""

from __future__ import annotations

from typing import Any, Callable, Optional

import lightning.pytorch as L
import pytorch_lightning as PL
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

NAMESPACES = {"lightning": L, "pytorch_lightning": PL}


def lit(
    net: nn.Module,
    data: Dataset,
    *,
    pl: Any = L,
    loss: Optional[Callable[..., Tensor]] = None,
    output_fn: Optional[Callable[[Any], Tensor]] = None,
    batch_size: int = 4,
    lr: float = 0.05,
) -> Any:
    """``pl.LightningModule`` training ``net`` on ``data``; batches ``(*inputs, y)`` with
    cross-entropy by default, or ``(x,)`` with ``loss(output)``."""

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, *x: Tensor) -> Any:
            return self.net(*x)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            if loss is not None:
                out = self(*batch)
                return loss(output_fn(out) if output_fn is not None else out)
            *x, y = batch
            return nn.functional.cross_entropy(self(*x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=lr)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(data, batch_size=batch_size)

    return Lit()


def trainer(tmp_path: Any, callbacks: list, *, pl: Any = L, **overrides: Any) -> Any:
    kw: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        default_root_dir=str(tmp_path),
    )
    kw.update(overrides)
    return pl.Trainer(callbacks=callbacks, **kw)


def classification_data(n: int = 16, d: int = 6, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)
    )


def mlp(d: int = 6, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, classes))
