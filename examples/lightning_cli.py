"""KernelRegimeMonitor + KernelDriftGate configured from YAML with LightningCLI.

    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml
    python examples/lightning_cli.py --namespace pytorch_lightning fit \
        --config examples/lightning_cli_pytorch_lightning.yaml
    tensorboard --logdir lightning_logs_cli

Needs ``pip install "lazy-monitor[cli,lightning]"`` (jsonargparse; ``lightning`` for the default
namespace). LightningCLI only accepts callback classes of its own namespace, so the
``lightning.pytorch`` config names ``lazy_monitor.callbacks.lightning.*`` and the
``pytorch_lightning`` config names ``lazy_monitor.callbacks.pytorch_lightning.*``. The model is an
NTK-parameterised MLP classifying a generated Gaussian mixture. Prints the kernel verdict at the
end; with the YAML's settings (width 256, lr 0.5, 800 steps) the kernel leaves the lazy regime::

    ntk/rel_change 0.2824  lin/rel_error 0.1391  params/rel_change 0.04953  -> NOT lazy (features moved)
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lazy_monitor._extras import require
from lazy_monitor.demo.datasets import gaussian_mixture
from lazy_monitor.demo.models import mlp

#: namespace -> the Lightning module of that namespace
NAMESPACES = {"lightning": "lightning.pytorch", "pytorch_lightning": "pytorch_lightning"}


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


def main(args: Optional[list[str]] = None, namespace: str = "lightning") -> Any:
    """Run LightningCLI and print the verdict; ``args`` as on the command line (None:
    ``sys.argv``). Returns the ``LightningCLI`` object."""
    if namespace not in NAMESPACES:
        raise ValueError(f"namespace must be one of {sorted(NAMESPACES)}, got {namespace!r}")
    require("jsonargparse", "examples/lightning_cli.py (LightningCLI)")
    if namespace == "lightning":
        require("lightning.pytorch", "examples/lightning_cli.py --namespace lightning")
    pl = importlib.import_module(NAMESPACES[namespace])
    cli_module = importlib.import_module(NAMESPACES[namespace] + ".cli")
    torch.set_num_threads(1)  # tiny CPU demo: more threads only spin-wait (10x slower if busy)
    cli = cli_module.LightningCLI(
        _classifier(pl, "Classifier"),
        args=args,
        save_config_kwargs={"overwrite": True},
        # a progress bar only on a terminal: redirected, it is hundreds of KB of updates
        trainer_defaults={"enable_progress_bar": sys.stdout.isatty()},
    )
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    if "regime/lazy" in metrics:
        shown = ("ntk/rel_change", "lin/rel_error", "params/rel_change")
        verdict = "lazy" if metrics["regime/lazy"] == 1.0 else "NOT lazy (features moved)"
        print("  ".join(f"{n} {metrics[n]:.4g}" for n in shown if n in metrics) + f"  -> {verdict}")
    return cli


if __name__ == "__main__":
    ns = "lightning"
    if sys.argv[1:2] == ["--namespace"]:
        # strip it here so that LightningCLI reads the rest from sys.argv itself (passing both
        # `args` and command-line arguments makes it warn)
        ns = sys.argv[2]
        del sys.argv[1:3]
    main(namespace=ns)
