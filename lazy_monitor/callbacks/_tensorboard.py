"""TensorBoard extras: custom scalar layout, eigenvalue histograms, kernel heatmaps, hparams.

Loggers are detected by duck typing on the writer (``logger.experiment`` with
``add_custom_scalars`` and ``add_histogram``), so ``TensorBoardLogger`` from both
``lightning.pytorch`` and ``pytorch_lightning`` (and tensorboardX writers) qualify. Call these on
global rank 0 only: elsewhere ``logger.experiment`` is a dummy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from lazy_monitor import catalogue

__all__ = [
    "HISTOGRAM_TAG",
    "IMAGE_TAG",
    "custom_layout",
    "kernel_image",
    "log_hparams",
    "tensorboard_writers",
]

HISTOGRAM_TAG = "ntk/eigenvalues"
IMAGE_TAG = "ntk/kernel"


def tensorboard_writers(loggers: Iterable[Any]) -> list[Any]:
    """The TensorBoard ``SummaryWriter`` of every logger that has one (call on rank 0)."""
    writers = []
    for logger in loggers:
        try:
            writer = logger.experiment
        except Exception:  # a logger whose experiment cannot start is not ours to fix
            continue
        if callable(getattr(writer, "add_custom_scalars", None)) and callable(
            getattr(writer, "add_histogram", None)
        ):
            writers.append(writer)
    return writers


def custom_layout(metric_names: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
    """The ``add_custom_scalars`` layout for the logged metrics, from the catalogue's charts
    (:func:`lazy_monitor.catalogue.tensorboard_layout`)."""
    return catalogue.tensorboard_layout(metric_names)


def kernel_image(kernel: Tensor, min_pixels: int = 256) -> Tensor:
    """Kernel as a grey-scale ``(H, W)`` image in ``[0, 1]``: 0.5 is zero, 1 is ``+max|K|``.

    ``(N, N, O, O)`` is laid out as the ``(N*O, N*O)`` block matrix ``K[n, a; m, b]``;
    ``(N, N, O)`` (diagonal) is averaged over ``O``; ``(N, N)`` is used as is. Pixels are
    repeated so the image is at least ``min_pixels`` wide.
    """
    k = kernel.detach().to("cpu", torch.float64)
    if k.dim() == 4:
        n, m, o1, o2 = k.shape
        k = k.permute(0, 2, 1, 3).reshape(n * o1, m * o2)
    elif k.dim() == 3:
        k = k.mean(dim=-1)
    elif k.dim() != 2:
        raise ValueError(f"kernel must have 2, 3 or 4 dims, got shape {tuple(kernel.shape)}")
    k = torch.nan_to_num(k, nan=0.0, posinf=0.0, neginf=0.0)
    scale = k.abs().max()
    img = (k / scale + 1) / 2 if scale > 0 else torch.full_like(k, 0.5)
    rep = max(1, math.ceil(min_pixels / max(img.shape)))
    img = img.repeat_interleave(rep, dim=0).repeat_interleave(rep, dim=1)
    return img.to(torch.float32)


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "/"))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif value is None:
            flat[name] = "None"
        else:
            flat[name] = str(value)
    return flat


def log_hparams(
    writer: Any,
    params: Mapping[str, Any],
    metric_names: Sequence[str],
    step: int,
    existing: Optional[Mapping[str, Any]] = None,
) -> bool:
    """Write an hparams session (HParams dashboard) whose metrics are the monitor's scalar tags.

    The HParams plugin reads each metric's value from the scalar series of the same tag, so the
    final values appear without logging any extra scalar point. ``existing`` hparams (e.g. the
    LightningModule's, already in this event file) are merged in so they stay visible.

    Returns:
        False if the writer exposes no file writer to write the summaries to.
    """
    file_writer = getattr(writer, "_get_file_writer", None)
    if not callable(file_writer):
        return False
    from torch.utils.tensorboard.summary import hparams

    merged = {**_flatten(existing or {}), **_flatten(params)}
    exp, ssi, sei = hparams(merged, {name: 0.0 for name in metric_names})
    fw = file_writer()
    for summary in (exp, ssi, sei):
        fw.add_summary(summary, step)
    return True
