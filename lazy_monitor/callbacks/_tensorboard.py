"""TensorBoard extras: custom scalar layout, eigenvalue histograms, kernel heatmaps, hparams,
verdict texts and the per-layer drift heatmap.

What TensorBoard (2.21) lets a log decide, and what follows here (measured, see issue 12):

* Time Series groups tags by the prefix before the first ``/`` in natural order and expands the
  first two groups: the ``drift/`` and ``drift_layer/`` log10 companions
  (:data:`lazy_monitor.catalogue.LOG10_COMPANIONS`) sort before Lightning's ``epoch`` and are
  what a person sees first. A log y-axis cannot be set from the logs, hence log10 values.
* Smoothing is global and cannot be switched off per tag: binary verdicts are texts (TEXT tab,
  markdown), at most :data:`MAX_TEXTS` per tag and run.
* HParams: the first hparams write of a run wins and the first run's experiment defines the
  columns, so the monitor writes one entry at fit start (before Lightning's own) with the
  module's hyperparameters (``differs=True``: the UI shows them first) and a fixed metric list.
* Custom scalars: ``Category.closed`` is honoured; torch's ``add_custom_scalars`` cannot set it,
  so the layout proto is built here.

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
from lazy_monitor._extras import require
from lazy_monitor._warnings import warn

__all__ = [
    "CLOSED_CATEGORIES",
    "HISTOGRAM_TAG",
    "HPARAMS_METRICS",
    "IMAGE_TAG",
    "LAYER_IMAGE_TAG",
    "MAX_TEXTS",
    "SUMMARY_TAG",
    "VERDICT_TAG",
    "custom_layout",
    "kernel_image",
    "layer_drift_figure",
    "log_hparams",
    "run_summary",
    "tensorboard_writers",
    "thresholds_due",
    "write_layer_heatmap",
    "write_layout",
    "write_thresholds",
]

HISTOGRAM_TAG = "ntk/eigenvalues"
#: Images live under their own ``images/`` prefix: Time Series shows a group per prefix and
#: expands the first two (``drift``, ``drift_layer``), which must stay the scalar charts; one
#: heatmap card per run there buried the per-layer drift charts on page 2 (issue 20).
IMAGE_TAG = "images/ntk_kernel"
#: Per-layer drift heatmap (layer groups × measurements, log colour).
LAYER_IMAGE_TAG = "images/layer_drift"
#: Colour range of the heatmap: 1e-4 (0.01 %, and the reference column) to 10 (1000 %).
HEATMAP_RANGE = (1e-4, 10.0)
#: Text events. The TEXT tab orders cards by tag, then run: first the alerts (regime transitions,
#: health alarms), which only runs that left the lazy regime or went non-finite have, then one
#: verdict card per run (the markdown summary at train end).
VERDICT_TAG = "lazy_monitor/0_alerts"
SUMMARY_TAG = "lazy_monitor/1_verdict"
#: TensorBoard keeps 10 text entries per tag by default: never write more.
MAX_TEXTS = 10
#: Custom-scalars categories that start collapsed (the drift categories stay open).
CLOSED_CATEGORIES = frozenset({"spectrum", "parameters", "health", "stability", "monitor cost"})
#: The HParams metrics: one fixed list for every run (the first run's experiment defines the
#: columns of the whole table), read by TensorBoard from the scalar series of the same tags.
#: The HParams table shows the first five by default: the verdict and the three drift numbers
#: of the lazy thresholds come first.
HPARAMS_METRICS = (
    "regime/lazy",
    "ntk/rel_change",
    "lin/rel_error",
    "params/rel_change",
    "ntk/distance",
    "drift/log10_ntk_rel_change",
    "ntk/eff_rank",
    "ntk/log10_cond",
)


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


def _file_writer(writer: Any) -> Any:
    get = getattr(writer, "_get_file_writer", None)
    return get() if callable(get) else None


def write_layout(writer: Any, metric_names: Sequence[str]) -> None:
    """Write the custom-scalars layout of ``metric_names`` (categories in
    :data:`CLOSED_CATEGORIES` collapsed). Writers without a torch file writer (tensorboardX)
    get ``add_custom_scalars`` (all categories open)."""
    layout = custom_layout(metric_names)
    fw = _file_writer(writer)
    if fw is None:
        writer.add_custom_scalars(layout)
        return
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.custom_scalar import layout_pb2

    categories = []
    for title, charts in layout.items():
        chart_pbs = [
            layout_pb2.Chart(title=name, multiline=layout_pb2.MultilineChartContent(tag=tags))
            for name, (_, tags) in charts.items()
        ]
        categories.append(
            layout_pb2.Category(title=title, chart=chart_pbs, closed=title in CLOSED_CATEGORIES)
        )
    proto = layout_pb2.Layout(category=categories)
    tensor = TensorProto(
        dtype="DT_STRING", string_val=[proto.SerializeToString()], tensor_shape=TensorShapeProto()
    )
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="custom_scalars"))
    value = Summary.Value(tag="custom_scalars__config__", tensor=tensor, metadata=meta)
    fw.add_summary(Summary(value=[value]))


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
    metric_names: Sequence[str] = HPARAMS_METRICS,
    step: int = 0,
    model_hparams: Optional[Mapping[str, Any]] = None,
) -> bool:
    """Write one HParams entry: the model's hyperparameters and the monitor's settings.

    ``model_hparams`` (the LightningModule's ``hparams_initial``, nested mappings flattened with
    ``/``) are the table's columns (``differs=True``), so a sweep sorts by width or learning rate
    at once. ``params`` (the monitor's ``lazy_monitor/*`` settings) are stored in every session
    but are columns only when the module has no hyperparameters: they are the same in almost
    every sweep, and the table shows only its first five columns by default. The metric columns
    are ``metric_names`` in order (the first five shown). Each metric's value is read by TensorBoard from the scalar series of that
    tag, so no extra scalar is written. Call it once per run, before any other hparams write
    (the first one in an event file wins).

    Returns:
        False if the writer exposes no file writer to write the summaries to.
    """
    fw = _file_writer(writer)
    if fw is None:
        return False
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    model = _flatten(model_hparams or {})
    merged = {**model, **_flatten(params)}
    start = plugin_data_pb2.SessionStartInfo()
    infos = []
    for name, value in merged.items():
        if isinstance(value, bool):
            start.hparams[name].bool_value = value
            dtype = api_pb2.DATA_TYPE_BOOL
        elif isinstance(value, (int, float)):
            start.hparams[name].number_value = float(value)
            dtype = api_pb2.DATA_TYPE_FLOAT64
        else:
            start.hparams[name].string_value = str(value)
            dtype = api_pb2.DATA_TYPE_STRING
        if name in model or not model:
            infos.append(api_pb2.HParamInfo(name=name, type=dtype, differs=name in model))
    experiment = api_pb2.Experiment(
        hparam_infos=infos,
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in metric_names],
    )

    def summary(tag: str, **content: Any) -> Any:
        data = plugin_data_pb2.HParamsPluginData(version=0, **content)
        meta = SummaryMetadata(
            plugin_data=SummaryMetadata.PluginData(
                plugin_name="hparams", content=data.SerializeToString()
            )
        )
        return Summary(value=[Summary.Value(tag=tag, metadata=meta)])

    fw.add_summary(summary("_hparams_/experiment", experiment=experiment), step)
    fw.add_summary(summary("_hparams_/session_start_info", session_start_info=start), step)
    return True


def layer_drift_figure(
    steps: Sequence[int], layers: Sequence[str], values: Sequence[Sequence[float]]
) -> Any:
    """Heatmap of the per-layer kernel change: layer groups (rows) × measurements (columns).

    Args:
        steps: the measured steps, ``(T,)``.
        layers: the layer group names, ``(L,)``.
        values: ``ntk_layer/<layer>/rel_change`` as ``(T, L)`` (NaN where not measured).

    Returns:
        A matplotlib ``Figure`` (log colour scale over the fixed :data:`HEATMAP_RANGE`, the
        same in every run and image so runs compare by colour; colour bar, labelled axes) for
        ``SummaryWriter.add_figure``, which closes it.
    """
    matplotlib = require("matplotlib", "the per-layer drift heatmap (tensorboard='basic' has none)")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    data = torch.tensor(values, dtype=torch.float64).T.numpy()  # (L, T)
    lo, hi = HEATMAP_RANGE
    # TensorBoard scales an image down to its card (~400 px wide): a small canvas with large
    # type keeps the labels readable there
    fig, ax = plt.subplots(figsize=(4.8, min(1.5 + 0.32 * len(layers), 10.0)), dpi=100)
    image = ax.imshow(
        data.clip(lo, hi),
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        norm=LogNorm(lo, hi),
    )
    ax.set_yticks(range(len(layers)), labels=list(layers), fontsize=10)
    ticks = sorted({0, len(steps) - 1, *range(0, len(steps), max(1, len(steps) // 4))})
    if len(ticks) > 2 and ticks[-1] - ticks[-2] < max(1, len(steps) // 8):
        ticks.pop(-2)  # two labels side by side would overlap
    ax.set_xticks(ticks, labels=[str(steps[t]) for t in ticks], fontsize=10)
    ax.set_xlabel("step (one column per measurement)", fontsize=10)
    ax.set_title("|K_l - K_l0| / |K_l0| per layer group", fontsize=10)
    bar = fig.colorbar(image, ax=ax, extend="both", pad=0.02)
    bar.ax.tick_params(labelsize=9)
    fig.tight_layout()
    return fig


def thresholds_due(count: int) -> bool:
    """Whether the ``count``-th measurement (1-based) writes the threshold series: 1, 8, 64, 512,
    ... (and the caller writes them once more at train end). Two points draw the flat line, a few
    more extend it while a run is live. Every extra point counts in TensorBoard's "ignore
    outliers" scaling (a 5-95 % quantile range over all points of a chart): one per measurement
    and run pushed a single non-lazy run of the 13-run demo off the log10 chart."""
    while count >= 8 and count % 8 == 0:
        count //= 8
    return count == 1


def write_thresholds(writer: Any, thresholds: Mapping[str, float], step: int) -> None:
    """Write the lazy thresholds as constant scalar series at ``step`` (at the measurements of
    :func:`thresholds_due` and at train end): the custom-scalars chart of each thresholded metric
    draws its threshold as a flat line next to the runs
    (:func:`lazy_monitor.catalogue.threshold_series`). TensorBoard only, so other loggers' tables
    do not grow a column per threshold."""
    for tag, value in catalogue.threshold_series(thresholds).items():
        writer.add_scalar(tag, value, global_step=step)


_heatmap_warned = False


def write_layer_heatmap(
    writer: Any,
    steps: Sequence[int],
    layers: Sequence[str],
    values: Sequence[Sequence[float]],
    step: int,
) -> bool:
    """Draw :func:`layer_drift_figure` into ``writer`` as :data:`LAYER_IMAGE_TAG` at ``step``.

    Without matplotlib (the ``viz`` extra) nothing is drawn and one warning per process names the
    install command: the heatmap is a default extra of the monitor, not a reason to stop training.

    Returns:
        Whether an image was written.
    """
    global _heatmap_warned
    try:
        figure = layer_drift_figure(steps, layers, values)
    except ImportError as exc:
        if not _heatmap_warned:
            _heatmap_warned = True
            warn(f"TensorBoard gets no heatmap: {exc}", UserWarning)
        return False
    writer.add_figure(LAYER_IMAGE_TAG, figure, step)
    return True


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def run_summary(
    *,
    step: int,
    lazy: bool,
    reason: str,
    thresholds: Sequence[str],
    final: Mapping[str, float],
    maxima: Mapping[str, float],
    transitions: int,
    measurements: int,
    seconds: float,
) -> str:
    """The markdown run summary written at train end (TEXT tab): verdict, thresholds, final and
    maximum of the key metrics."""
    verdict = "**lazy**" if lazy else f"**not lazy** ({reason})"
    lines = [
        f"### lazy_monitor: {verdict} at step {step}",
        "",
        f"thresholds: {', '.join(f'`{t}`' for t in thresholds) or 'none'}; "
        f"{measurements} measurement{'s' * (measurements != 1)} ({seconds:.1f} s), "
        f"{transitions} regime transition{'s' * (transitions != 1)}",
        "",
        "| metric | final | max |",
        "|---|---|---|",
    ]
    for name, value in final.items():
        lines.append(f"| `{name}` | {_fmt(value)} | {_fmt(maxima.get(name))} |")
    return "\n".join(lines)
