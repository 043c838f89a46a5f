"""The metric catalogue: one entry per metric, the single source of truth for its name.

Everything that lists metrics derives the list from :data:`CATALOGUE`: the names
:class:`~lazy_monitor.KernelTracker` returns (:func:`tracker_metric_names`), the metrics a
:class:`~lazy_monitor.KernelDriftGate` threshold may name (:func:`is_known`), the direction of a
lazy threshold (:func:`direction_of`), the TensorBoard custom-scalar layout
(:func:`tensorboard_layout`), the HParams metrics (:func:`hparams_metrics`), the columns of
``lazy-monitor report`` (:func:`report_metrics`) and the metric table of docs/metrics.md
(:func:`markdown_table`; ``tests/test_catalogue.py`` fails when they disagree).

Adding a metric is one :class:`MetricInfo` entry here plus its computation.

Torch-free: the CLI imports it without importing torch.

>>> lookup("ntk_layer/net.0/rel_change").name
'ntk_layer/<layer>/rel_change'
>>> direction_of("lin/agreement")
'min'
>>> tracker_metric_names(layers=["fc"], targets=False, classification=False)[:3]
['ntk/rel_change', 'ntk/distance', 'ntk/velocity']
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Optional

__all__ = [
    "CATALOGUE",
    "LAYER",
    "LOG10_COMPANIONS",
    "LOG10_FLOOR",
    "THRESHOLD_PREFIX",
    "MetricInfo",
    "direction_of",
    "hparams_metrics",
    "is_known",
    "log10_companions",
    "lookup",
    "markdown_table",
    "report_metrics",
    "plot_metrics",
    "tensorboard_layout",
    "threshold_series",
    "tracker_metric_names",
]

#: Placeholder for a layer name (module prefix of its parameters, e.g. ``net.0``) in a pattern.
LAYER = "<layer>"

Direction = Literal["max", "min"]
#: Who computes a metric: the tracker, the callback around it, or a planned producer.
Source = Literal["tracker", "monitor"]
#: When the tracker produces it: always, only with targets, only for class-index targets,
#: only with ``per_layer=True``, or only for tracked feature modules (``feature_modules``).
Requires = Literal["", "targets", "classification", "per_layer", "features"]


@dataclass(frozen=True)
class MetricInfo:
    """One metric (or one family, with ``<layer>`` in the name).

    Attributes:
        name: the logged name / TensorBoard tag, e.g. ``ntk/rel_change`` or
            ``ntk_layer/<layer>/rel_change``.
        direction: which side is lazy: ``"max"`` -- lazy means small, a lazy threshold is a
            maximum; ``"min"`` -- lazy means large (close to 1), a threshold is a minimum;
            ``None`` -- no lazy side (descriptive metrics, the verdict itself).
        chart: ``(category, chart title)`` in the TensorBoard custom-scalars layout.
        formula: the formula, in the notation of docs/theory.md.
        description: one line on how to read it.
        paper: where it comes from (empty if nowhere in particular).
        source: ``"tracker"`` (:class:`KernelTracker` computes it) or ``"monitor"`` (the
            callback around the tracker).
        requires: the condition under which the tracker produces it.
        planned: documented and accepted by thresholds, not computed yet (another issue).
        report: a column of ``lazy-monitor report`` (final and maximum per run).
        plot: a panel of ``lazy-monitor report --plot``.
        hparams: shown in the HParams dashboard (per-layer families are not).
    """

    name: str
    direction: Optional[Direction]
    chart: tuple[str, str]
    formula: str
    description: str
    paper: str = ""
    source: Source = "tracker"
    requires: Requires = ""
    planned: bool = False
    report: bool = False
    plot: bool = False

    @property
    def is_pattern(self) -> bool:
        return LAYER in self.name

    @property
    def hparams(self) -> bool:
        return not self.is_pattern and not self.planned

    def regex(self) -> str:
        """Anchored regular expression matching the logged names of this entry."""
        head, _, tail = self.name.partition(LAYER)
        if not self.is_pattern:
            return "^" + re.escape(self.name) + "$"
        return "^" + re.escape(head) + ".+" + re.escape(tail) + "$"

    def expand(self, layers: Iterable[str]) -> list[str]:
        """The logged names for these layers (the name itself if it is not a pattern)."""
        if not self.is_pattern:
            return [self.name]
        return [self.name.replace(LAYER, layer) for layer in layers]


_DRIFT, _LIN, _SPEC, _PARAMS = "kernel drift", "linearization", "spectrum", "parameters"
_STAB, _FEAT, _COST = "stability", "features", "monitor cost"
_LOG10, _HEALTH = "drift (log10)", "health"
#: Order of the categories in the TensorBoard custom-scalars layout.
CHART_CATEGORIES = (_LOG10, _DRIFT, _LIN, _SPEC, _PARAMS, _STAB, _FEAT, _COST, _HEALTH)
#: Floor of the ``drift/log10_*`` companions (a change below it reads as "no change").
LOG10_FLOOR = 1e-8
#: Prefix of the constant series that draw a lazy threshold in its metric's custom-scalars chart
#: (``threshold/ntk/rel_change``, ``threshold/drift/log10_ntk_rel_change``).
THRESHOLD_PREFIX = "threshold/"
#: The ``drift/`` log10 companions: companion name -> the metric it is the log10 of.
LOG10_COMPANIONS = {
    "drift/log10_ntk_rel_change": "ntk/rel_change",
    "drift/log10_lin_rel_error": "lin/rel_error",
    "drift/log10_params_rel_change": "params/rel_change",
    "drift_layer/<layer>/log10_rel_change": "ntk_layer/<layer>/rel_change",
}

#: Every metric, in the order :meth:`KernelTracker.metric_names` returns them.
CATALOGUE: tuple[MetricInfo, ...] = (
    MetricInfo("ntk/rel_change", "max", (_DRIFT, "relative change |K-K0|/|K0|"),
               "‖K − K₀‖ / ‖K₀‖",
               "how far the kernel moved; ≪ 0.1 lazy, O(1) feature learning",
               "Lee et al. 2019", report=True, plot=True),
    MetricInfo("ntk/distance", "max", (_DRIFT, "kernel distance 1-cos(K, K0)"),
               "1 − ⟨K, K₀⟩ / (‖K‖ ‖K₀‖)",
               "change of the kernel's *direction* (ignores scale); 0 = same shape",
               "Fort et al. 2020", plot=True),
    MetricInfo("ntk/velocity", "max", (_DRIFT, "kernel velocity"),
               "distance(K, K_prev) / steps between measurements",
               "speed of kernel change; large early, then small (Fort et al.)",
               "Fort et al. 2020"),
    MetricInfo("ntk/alignment", None, (_DRIFT, "kernel-target alignment"),
               "⟨K_c, L_c⟩ / (‖K_c‖ ‖L_c‖), K_c = HKH, L_c = H vec(Y) vec(Y)ᵀ H, "
               "H = (I − 11ᵀ/n) ⊗ I_O (centres over examples, per output; Y one-hot for class "
               "indices); a trace kernel uses L = Y Yᵀ (N × N, [yₙ = yₘ] for classes)",
               "centred kernel–target alignment; rising = the kernel adapts to the task (only "
               "with targets)",
               "Cortes et al. 2012; Baratin et al. 2021", requires="targets"),
    MetricInfo("ntk/eig_max", None, (_SPEC, "extreme eigenvalues"),
               "largest eigenvalue of the kernel matrix",
               "λmax sets the stable learning rate (catapult above ~2/λmax, loss-normalised)",
               "Lewkowycz et al. 2020"),
    MetricInfo("ntk/eig_min", None, (_SPEC, "extreme eigenvalues"),
               "smallest eigenvalue of the kernel matrix",
               "λmin sets the slowest direction of kernel regression", ""),
    MetricInfo("ntk/trace", None, (_SPEC, "trace"), "tr K", "overall kernel scale"),
    MetricInfo("ntk/eff_rank", None, (_SPEC, "effective rank"),
               "exp(−Σ pᵢ log pᵢ), pᵢ = λᵢ/Σλ", "number of effectively used directions",
               "Roy & Vetterli 2007"),
    MetricInfo("ntk/cond", None, (_SPEC, "condition number"),
               "λmax / max(λmin, ε·λmax), ε = M·eps(kernel dtype)",
               "conditioning of kernel regression on the probe; at most 1/ε (= singular to "
               "working precision, see `ntk/rank`), never inf"),
    MetricInfo("ntk/log10_cond", None, (_SPEC, "log10 condition number"),
               "log10 ntk/cond", "the same on a readable scale (TensorBoard has no log axis)"),
    MetricInfo("ntk/rank", None, (_SPEC, "numerical rank"),
               "#{λᵢ > ε·λmax}, ε = M·eps(kernel dtype)",
               "kernel directions above round-off; below M = the probe over-determines the net"),
    MetricInfo("ntk/eig_overlap", "min", (_SPEC, "top-k eigenspace overlap with K0"),
               "‖U₀ᵀ U‖² / k, top-k eigenvectors", "1 = the leading eigenspace is unchanged"),
    MetricInfo("params/rel_change", "max", (_PARAMS, "relative change |theta-theta0|/|theta0|"),
               "‖θ − θ₀‖ / ‖θ₀‖",
               "relative weight movement (width^-1/2 or width^-1 in NTK param.)",
               "Lee et al. 2019", report=True, plot=True),
    MetricInfo("params/distance", "max", (_PARAMS, "distance |theta-theta0|"), "‖θ − θ₀‖",
               "absolute weight movement"),
    MetricInfo("lin/rel_error", "max", (_LIN, "relative error |f-f_lin|"),
               "‖f − f_lin‖ / ‖f − f₀‖",
               "fraction of the function's change the linear model misses; 0 lazy, ~1 features "
               "moved",
               "Lee et al. 2019; Liu, Zhu & Belkin 2020", report=True, plot=True),
    MetricInfo("lin/rmse", "max", (_LIN, "RMSE f vs f_lin"), "sqrt(mean((f − f_lin)²))",
               "the same in output units", "Lee et al. 2019"),
    MetricInfo("lin/agreement", "min", (_LIN, "prediction agreement f vs f_lin"),
               "mean[argmax f = argmax f_lin]; with one output, mean[(f > 0) = (f_lin > 0)]",
               "do the net and its linearization predict the same classes (class-index targets "
               "only); a single output is read as a **logit** (threshold 0), not a probability",
               requires="classification"),
    MetricInfo("ntk_layer/<layer>/rel_change", "max", (_DRIFT, "relative change per layer"),
               "‖K_l − K_l,₀‖ / ‖K₀‖, the layer's block of K over the whole K₀",
               "which layer's kernel moves (e.g. `fc1`, `readout`), all layers on one scale; "
               "finite when the layer's own K_l,₀ is 0 (LoRA's lora_A at init)",
               "Baratin et al. 2021", requires="per_layer"),
    MetricInfo("params_layer/<layer>/rel_change", "max", (_PARAMS, "relative change per layer"),
               "‖θ_l − θ_l,₀‖ / ‖θ₀‖ (whole model's θ₀; Σ_l squares = params/rel_change²)",
               "which layer's weights move, as its share of the total; finite when the "
               "layer's own θ_l,₀ is 0 (LoRA's lora_B, zero biases)", requires="per_layer"),
    MetricInfo("regime/lazy", None, (_DRIFT, "lazy regime (1 = lazy)"),
               "1 if every lazy threshold holds, else 0",
               "the verdict; default thresholds `ntk/rel_change ≤ 0.1`, `lin/rel_error ≤ 0.1` "
               "(heuristic)"),
    MetricInfo("health/nonfinite", None, (_HEALTH, "non-finite values"),
               "1 if kernel, outputs or parameters hold NaN/inf",
               "the other metrics are NaN at that step"),
    # ---- log10 companions (the callbacks log them; `drift/` sorts first in TensorBoard, whose
    # charts have no log axis settable from the logs). Not at step 0, where the change is 0.
    MetricInfo("drift/log10_ntk_rel_change", "max", (_LOG10, "log10 |K-K0|/|K0|"),
               "log10 max(ntk/rel_change, 1e-8)",
               "kernel drift on a log scale: −1 = 10 %, −3 = 0.1 %; one unit per decade",
               source="monitor"),
    MetricInfo("drift/log10_lin_rel_error", "max", (_LOG10, "log10 |f-f_lin|/|f-f0|"),
               "log10 max(lin/rel_error, 1e-8)", "linearization error on a log scale",
               source="monitor"),
    MetricInfo("drift/log10_params_rel_change", "max", (_LOG10, "log10 |theta-theta0|/|theta0|"),
               "log10 max(params/rel_change, 1e-8)", "weight movement on a log scale",
               source="monitor"),
    MetricInfo("drift_layer/<layer>/log10_rel_change", "max",
               (_LOG10, "log10 relative kernel change per layer group"),
               "log10 max(ntk_layer/<layer>/rel_change, 1e-8)",
               "which layer group's kernel moves, on a log scale", source="monitor",
               requires="per_layer"),
    # ---- stability and features (issue 10); tracker metrics after the verdict
    MetricInfo("opt/lr", None, (_STAB, "learning rate"), "η of the first param group",
               "the learning rate the optimizer used at this step (NaN if not given)"),
    MetricInfo("ntk/lr_eig_max", "max", (_STAB, "η·λmax/N (catapult above 2)"),
               "η λmax(K) / N (full kernel; NaN for trace/diagonal with O > 1)",
               "MSE stability number: < 2 stable, 2 to ~4 catapult (more for deeper ReLU nets, "
               "docs/science.md), above diverges; "
               "no stability meaning for cross-entropy or Adam",
               "Lewkowycz et al. 2020; Cohen et al. 2021"),
    MetricInfo("regime/catapult", None, (_STAB, "catapult phase (1 = catapult)"),
               "1 once ntk/lr_eig_max > 2 was followed by a 10 % fall of λmax (latched)",
               "the kernel was reshaped by a large-learning-rate catapult (heuristic)",
               "Lewkowycz et al. 2020"),
    MetricInfo("features/<layer>/cka", "min", (_FEAT, "feature CKA with init"),
               "CKA(Φ_l, Φ_l,₀) = ⟨HΦΦᵀH, HΦ₀Φ₀ᵀH⟩ / (‖HΦΦᵀH‖ ‖HΦ₀Φ₀ᵀH‖), linear",
               "1 = the layer's probe features are unchanged up to rotation and scale; "
               "hidden layers by default (the output layer only by name), a layer with constant "
               "features at θ₀ is omitted; constant features now: 0",
               "Kornblith et al. 2019", requires="features"),
    # ---- the monitor's own cost (logged with max_overhead)
    MetricInfo("monitor/seconds", None, (_COST, "seconds per measurement"),
               "wall time of the last measurement (with max_overhead)", "what monitoring costs",
               source="monitor"),
    MetricInfo("monitor/overhead", "max", (_COST, "share of fit time"),
               "measurement time / wall time since train start (with max_overhead)",
               "the monitor's share of the training time", source="monitor"),
)  # fmt: skip

_BY_NAME = {m.name: m for m in CATALOGUE}
_GLOB = re.compile(r"[*?\[]")


def lookup(name: str) -> Optional[MetricInfo]:
    """The catalogue entry of a logged name (``ntk_layer/net.0/rel_change`` -> its pattern)."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    for info in CATALOGUE:
        if info.is_pattern and re.match(info.regex(), name):
            return info
    return None


def matching(glob: str) -> list[MetricInfo]:
    """Entries whose names a threshold name matches: a logged name, or an :mod:`fnmatch` glob
    such as ``ntk_layer/*/rel_change`` or ``lin/*``."""
    info = lookup(glob)
    if info is not None:
        return [info]
    if not _GLOB.search(glob):
        return []
    return [m for m in CATALOGUE if fnmatch.fnmatchcase(m.name.replace(LAYER, "x"), glob)]


def is_known(name: str) -> bool:
    """Whether ``name`` (a metric name or a glob) names catalogue metrics."""
    return bool(matching(name))


def direction_of(name: str) -> Optional[str]:
    """The lazy direction (``"max"``/``"min"``) of a name or glob; None if it has none or its
    matches disagree."""
    found = {m.direction for m in matching(name)}
    return found.pop() if len(found) == 1 else None


def known_names_hint() -> str:
    """The names a threshold may use, for error messages."""
    plain = [m.name for m in CATALOGUE if not m.is_pattern]
    patterns = [m.name for m in CATALOGUE if m.is_pattern]
    return ", ".join(plain) + " or " + " / ".join(f"'{p}'" for p in patterns)


def requirement_hint(names: Iterable[str]) -> str:
    """Why the tracker may not log these names (for the gate's missing-metric error)."""
    why = {
        "targets": "needs targets: a probe (x, y)",
        "classification": "needs a classifier probe (class-index targets)",
        "per_layer": "needs per_layer=True",
        "features": "needs feature_modules (a tracked module of that name)",
    }
    parts = []
    for name in names:
        info = lookup(name)
        if info is not None and info.planned:
            parts.append(f"{name} is not computed by this version")
        elif info is not None and info.requires:
            parts.append(f"{name} {why[info.requires]}")
    return f" ({'; '.join(parts)})" if parts else ""


def tracker_metric_names(
    layers: Sequence[str],
    *,
    targets: bool,
    classification: bool,
    per_layer: bool = True,
    feature_layers: Sequence[str] = (),
) -> list[str]:
    """Exactly the names :class:`KernelTracker` returns for this configuration, in order.

    ``layers`` expand the per-layer kernel/parameter families, ``feature_layers`` (the tracked
    feature modules) the ``features/<layer>/cka`` family."""
    enabled = {"": True, "targets": targets, "classification": classification}
    enabled["per_layer"] = per_layer
    enabled["features"] = bool(feature_layers)
    names: list[str] = []
    for info in CATALOGUE:
        if info.source == "tracker" and not info.planned and enabled[info.requires]:
            names += info.expand(feature_layers if info.requires == "features" else layers)
    return names


def log10_companions(metrics: Mapping[str, float]) -> dict[str, float]:
    """The ``drift/`` log10 companions of the logged ``metrics`` (:data:`LOG10_COMPANIONS`):
    ``log10(max(value, LOG10_FLOOR))``; NaN stays NaN. Call it for changes measured after
    step 0 (at the reference every change is 0 by definition, a floor value there would only
    stretch the axis).

    >>> log10_companions({"ntk/rel_change": 0.01, "ntk_layer/fc/rel_change": 0.0})
    {'drift/log10_ntk_rel_change': -2.0, 'drift_layer/fc/log10_rel_change': -8.0}
    """
    out: dict[str, float] = {}
    for companion, source in LOG10_COMPANIONS.items():
        info = _BY_NAME[source]
        for name, value in metrics.items():
            if not re.match(info.regex(), name):
                continue
            layer = name[len(source.partition(LAYER)[0]) :].rpartition("/")[0]
            key = companion.replace(LAYER, layer) if LAYER in companion else companion
            v = float(value)
            out[key] = v if math.isnan(v) else math.log10(max(v, LOG10_FLOOR))
    return out


def threshold_series(thresholds: Mapping[str, float]) -> dict[str, float]:
    """Constant series that draw each lazy threshold as a line in the custom-scalars chart of its
    metric (:func:`tensorboard_layout`), and of its ``drift/`` log10 companion. Thresholds given
    as globs have no single chart and are left out.

    >>> threshold_series({"ntk/rel_change": 0.1, "ntk_layer/*/rel_change": 0.5})
    {'threshold/ntk/rel_change': 0.1, 'threshold/drift/log10_ntk_rel_change': -1.0}
    """
    exact = {n: float(v) for n, v in thresholds.items() if not _GLOB.search(n)}
    out = {THRESHOLD_PREFIX + n: v for n, v in exact.items()}
    positive = {n: v for n, v in exact.items() if v > 0}  # log10 of a bound <= 0: no line
    out.update({THRESHOLD_PREFIX + n: v for n, v in log10_companions(positive).items()})
    return out


def lazy_threshold_names(metric_names: Iterable[str]) -> list[str]:
    """The names among ``metric_names`` that have a lazy direction (may carry a lazy threshold)."""
    out = []
    for name in metric_names:
        info = lookup(name)
        if info is not None and info.direction is not None:
            out.append(name)
    return out


def tensorboard_layout(metric_names: Sequence[str]) -> dict[str, dict[str, list[object]]]:
    """The ``SummaryWriter.add_custom_scalars`` layout for the metrics logged in a run.

    One category per chart category of the catalogue ("kernel drift", "linearization",
    "spectrum", "parameters", ...), one multiline chart per title, its tags as anchored regular
    expressions; a metric with a lazy side also brings its threshold series
    (:func:`threshold_series`), so the chart shows the threshold as a flat line. A chart is
    kept only if one of its metrics is logged, a category only if it has a chart.
    """
    charts: dict[str, dict[str, list[str]]] = {c: {} for c in CHART_CATEGORIES}
    for info in CATALOGUE:
        category, title = info.chart
        patterns = charts.setdefault(category, {}).setdefault(title, [])
        patterns.append(info.regex())
        if info.direction is not None:
            patterns.append("^" + re.escape(THRESHOLD_PREFIX) + info.regex()[1:])
    layout: dict[str, dict[str, list[object]]] = {}
    for category, by_title in charts.items():
        kept: dict[str, list[object]] = {}
        for title, patterns in by_title.items():
            if any(re.search(p, name) for p in patterns for name in metric_names):
                kept[title] = ["Multiline", patterns]
        if kept:
            layout[category] = kept
    return layout


def hparams_metrics(metric_names: Iterable[str]) -> list[str]:
    """The logged names shown in the HParams dashboard (no per-layer families)."""
    return [n for n in metric_names if (info := lookup(n)) is None or info.hparams]


def report_metrics() -> tuple[str, ...]:
    """The metrics of ``lazy-monitor report`` (final and maximum per run)."""
    return tuple(m.name for m in CATALOGUE if m.report)


def plot_metrics() -> tuple[str, ...]:
    """The panels of ``lazy-monitor report --plot``."""
    return tuple(m.name for m in CATALOGUE if m.plot)


def markdown_table() -> str:
    """The metric table of ``docs/metrics.md`` (computed metrics only, in catalogue order)."""
    rows = ["| name | formula | how to read it | source |", "|---|---|---|---|"]
    for info in CATALOGUE:
        if not info.planned:
            cells = [f"`{info.name}`", info.formula, info.description, info.paper]
            rows.append(("| " + " | ".join(cells) + " |").replace("|  |", "| |"))
    return "\n".join(rows)
