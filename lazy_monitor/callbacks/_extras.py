"""The TensorBoard extras of a monitor run, for any adapter: custom-scalars layout, eigenvalue
histogram, kernel image, verdict texts, per-layer heatmap, run summary and HParams entry.

Framework-free (both the Lightning and the Hugging Face adapters use it; neither framework is
imported): it writes to ``SummaryWriter``-like objects the adapter hands over (process zero
only), using the presentation functions of :mod:`lazy_monitor.callbacks._tensorboard`.

Tiers (``tensorboard=``): ``"basic"`` -- layout, verdict texts, run summary; ``"standard"`` --
plus the HParams entry, the eigenvalue histogram and the per-layer heatmap; ``"full"`` -- plus the
kernel as an image at every measurement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lazy_monitor import catalogue
from lazy_monitor._validation import check_choice
from lazy_monitor.callbacks import _tensorboard as tb

__all__ = ["TENSORBOARD_TIERS", "TensorBoardExtras"]

#: ``tensorboard=`` values, cheapest first.
TENSORBOARD_TIERS = ("basic", "standard", "full")


class TensorBoardExtras:
    """What one run writes besides the scalars; state per run (call :meth:`reset` at start).

    Args:
        tier: ``"basic"``, ``"standard"`` or ``"full"`` (see the module docs).
    """

    def __init__(self, tier: str = "standard") -> None:
        self.tier = check_choice("tensorboard", tier, TENSORBOARD_TIERS)
        self.reset()

    @property
    def standard(self) -> bool:
        return self.tier != "basic"

    def reset(self) -> None:
        self._layout_written: set[int] = set()
        self._layer_history: list[tuple[int, dict[str, float]]] = []
        self._layer_images = self._layer_drawn = self._layer_log_step = 0
        self._texts = 0
        self.transitions = 0

    # ------------------------------------------------------------------ per run
    def hparams(
        self, writers: Sequence[Any], params: Mapping[str, Any], model: Mapping[str, Any]
    ) -> None:
        """One HParams entry (``standard`` and ``full``): ``model`` hyperparameters (marked as
        the columns that differ) and the monitor's ``lazy_monitor/*`` settings."""
        if self.standard:
            for writer in writers:
                tb.log_hparams(writer, params, tb.HPARAMS_METRICS, 0, model_hparams=model)

    def measurement(
        self,
        writers: Sequence[Any],
        session: Any,
        step: int,
        log_step: int,
        metrics: Mapping[str, float],
        previous: Mapping[str, float],
        final: bool,
    ) -> None:
        """Layout (once per writer), histogram, image, verdict texts, heatmap for one
        measurement of ``session`` (a :class:`~lazy_monitor.tracking.session.MonitorSession`)."""
        if not writers:
            return
        tracker = session.tracker
        for writer in writers:
            if id(writer) not in self._layout_written:
                names = list(metrics)
                charted = names + list(catalogue.log10_companions(dict.fromkeys(names, 1.0)))
                tb.write_layout(writer, charted)
                self._layout_written.add(id(writer))
            if tb.thresholds_due(session.num_measurements):
                tb.write_thresholds(writer, tracker.lazy_thresholds, log_step)
            eigenvalues = getattr(tracker, "last_eigenvalues", None)
            if self.standard and isinstance(eigenvalues, Tensor) and eigenvalues.numel():
                values = eigenvalues.detach().cpu().to(torch.float64)
                values = values[torch.isfinite(values)]
                if values.numel():
                    writer.add_histogram(tb.HISTOGRAM_TAG, values, global_step=log_step)
            kernel = getattr(tracker, "last_kernel", None)
            if self.tier == "full" and isinstance(kernel, Tensor):
                writer.add_image(tb.IMAGE_TAG, tb.kernel_image(kernel), log_step, dataformats="HW")
        self._verdicts(writers, tracker, step, log_step, metrics, previous)
        if self.standard:
            self._layers(writers, step, log_step, metrics, final)

    def finish(self, writers: Sequence[Any], session: Any, step: int, log_step: int) -> None:
        """The last heatmap (if the last measurement did not draw one) and the run summary."""
        if not writers:
            return
        if self.standard and self._layer_drawn != len(self._layer_history):
            self._draw_layers(writers)
        metrics, tracker = session.last_metrics, session.tracker
        if not metrics or tracker is None:
            return
        lazy, reason = tracker.regime_decision(metrics)
        thresholds = [
            f"{name} {'≥' if catalogue.direction_of(name) == 'min' else '≤'} {value:g}"
            for name, value in tracker.lazy_thresholds.items()
        ]
        keys = [n for n in tb.HPARAMS_METRICS if n in metrics]
        keys += [n for n in ("ntk/cond", "ntk/rank", "lin/agreement") if n in metrics]
        text = tb.run_summary(
            step=step,
            lazy=lazy,
            reason=reason,
            thresholds=thresholds,
            final={n: metrics[n] for n in keys},
            maxima=session.maxima,
            transitions=self.transitions,
            measurements=session.num_measurements,
            seconds=session.seconds,
        )
        for writer in writers:  # the threshold lines end where the run ends
            tb.write_thresholds(writer, tracker.lazy_thresholds, log_step)
        _text(writers, tb.SUMMARY_TAG, text, log_step)

    # ------------------------------------------------------------------ internals
    def _verdicts(
        self,
        writers: Sequence[Any],
        tracker: Any,
        step: int,
        log_step: int,
        metrics: Mapping[str, float],
        previous: Mapping[str, float],
    ) -> None:
        """Binary verdicts as text events (smoothing would draw a 0/1 series as a slow decay):
        regime transitions and the first non-finite measurement, at most ``MAX_TEXTS``."""
        events = []
        lazy, was = metrics.get("regime/lazy"), previous.get("regime/lazy")
        if lazy is not None and was is not None and lazy != was:
            self.transitions += 1
            if lazy == 1.0:
                events.append(f"step {step}: back in the lazy regime")
            else:
                _, reason = tracker.regime_decision(metrics)
                events.append(f"step {step}: left the lazy regime: {reason}")
        for name, value in metrics.items():
            if name.startswith("health/") and value != 0 and previous.get(name, 0.0) == 0:
                info = catalogue.lookup(name)
                what = info.formula if info is not None else name
                events.append(f"step {step}: `{name}` = {value:g} ({what})")
        for event in events:
            if self._texts >= tb.MAX_TEXTS:
                return
            if self._texts == tb.MAX_TEXTS - 1:
                event = f"step {step}: further events omitted (see `{tb.SUMMARY_TAG}`)"
            self._texts += 1
            _text(writers, tb.VERDICT_TAG, event, log_step)

    def _layers(
        self,
        writers: Sequence[Any],
        step: int,
        log_step: int,
        metrics: Mapping[str, float],
        final: bool,
    ) -> None:
        """Keep the per-layer drift history; draw the heatmap at measurements 2, 4, 8, ... (at
        most ``MAX_TEXTS - 1`` of them) and at the end."""
        prefix, suffix = "ntk_layer/", "/rel_change"
        layers = {
            k[len(prefix) : -len(suffix)]: v
            for k, v in metrics.items()
            if k.startswith(prefix) and k.endswith(suffix)
        }
        if not layers:
            return
        self._layer_history.append((step, layers))
        self._layer_log_step = log_step
        count = len(self._layer_history)
        due = count >= 2 and count & (count - 1) == 0 and self._layer_images < tb.MAX_TEXTS - 1
        if due or final:
            self._draw_layers(writers)

    def _draw_layers(self, writers: Sequence[Any]) -> None:
        writers = [w for w in writers if hasattr(w, "add_figure")]
        if not writers or not self._layer_history:
            return
        names = list(self._layer_history[-1][1])
        steps = [s for s, _ in self._layer_history]
        values = [[row.get(n, float("nan")) for n in names] for _, row in self._layer_history]
        for writer in writers:
            tb.write_layer_heatmap(writer, steps, names, values, self._layer_log_step)
        self._layer_images += 1
        self._layer_drawn = len(self._layer_history)


def _text(writers: Sequence[Any], tag: str, text: str, log_step: int) -> None:
    for writer in writers:
        if callable(getattr(writer, "add_text", None)):
            writer.add_text(tag, text, global_step=log_step)
