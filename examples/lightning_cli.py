"""KernelRegimeMonitor + KernelDriftGate configured from YAML with LightningCLI.

    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml
    python examples/lightning_cli.py --namespace pytorch_lightning fit \
        --config examples/lightning_cli_pytorch_lightning.yaml
    tensorboard --logdir lightning_logs_cli

LightningCLI only accepts callback classes of its own namespace, so the ``lightning.pytorch``
config names ``lazy_monitor.callbacks.lightning.*`` and the ``pytorch_lightning`` config names
``lazy_monitor.callbacks.pytorch_lightning.*``. The model is an NTK-parameterised MLP classifying
a generated Gaussian mixture.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import lightning.pytorch as L
import pytorch_lightning as PL
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lazy_monitor.demo.datasets import gaussian_mixture
from lazy_monitor.demo.models import mlp


def _classifier(pl: Any, name: str) -> type:
    class Classifier(pl.LightningModule):
        """MLP classifier on a generated Gaussian mixture.

        Args:
            width: hidden width (wider nets train lazier, Lee et al. 2019).
            depth: number of hidden layers.
            lr: SGD learning rate.
            n_train: number of generated training examples.
            dim: input dimension.
            classes: number of classes.
            batch_size: training batch size.
        """

        def __init__(
            self,
            width: int = 256,
            depth: int = 2,
            lr: float = 0.5,
            n_train: int = 1024,
            dim: int = 16,
            classes: int = 4,
            batch_size: int = 64,
        ) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = mlp(dim, width, classes, depth=depth, seed=0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

        def train_dataloader(self) -> DataLoader:
            h = self.hparams
            x, y = gaussian_mixture(h.n_train, h.dim, h.classes, seed=0)
            return DataLoader(TensorDataset(x, y), batch_size=h.batch_size, shuffle=True)

    Classifier.__name__ = Classifier.__qualname__ = name
    return Classifier


ClassifierLightning = _classifier(L, "ClassifierLightning")
ClassifierPytorchLightning = _classifier(PL, "ClassifierPytorchLightning")


def main(args: Optional[list[str]] = None, namespace: str = "lightning") -> Any:
    """Run LightningCLI; ``args`` as on the command line (None: ``sys.argv``)."""
    if namespace == "lightning":
        from lightning.pytorch.cli import LightningCLI

        model_class = ClassifierLightning
    elif namespace == "pytorch_lightning":
        from pytorch_lightning.cli import LightningCLI

        model_class = ClassifierPytorchLightning
    else:
        raise ValueError(f"namespace must be 'lightning' or 'pytorch_lightning', got {namespace!r}")
    return LightningCLI(
        model_class,
        args=args,
        save_config_kwargs={"overwrite": True},
        # a progress bar only on a terminal: redirected, it is hundreds of KB of updates
        trainer_defaults={"enable_progress_bar": sys.stdout.isatty()},
    )


if __name__ == "__main__":
    argv = sys.argv[1:]
    ns = "lightning"
    if argv[:1] == ["--namespace"]:
        ns, argv = argv[1], argv[2:]
    main(argv, namespace=ns)
