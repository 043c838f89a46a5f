"""The metric layout of a :class:`~lazy_monitor.tracking.tracker.KernelTracker`: which
parameters are tracked and how they group into layers, the metric names that follow from
them and the configuration (catalogue order), the lazy thresholds checked against those
names, the probe targets, and the ``topk`` and alignment targets of the measured kernel.
The tracker holds one :class:`MetricLayout`; the kernel measurement itself is elsewhere
(:mod:`lazy_monitor.tracking.measurement`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Optional, Union

from torch import Tensor, nn

from lazy_monitor import catalogue
from lazy_monitor.core import _functional as F
from lazy_monitor.core import metrics as M
from lazy_monitor.thresholds import Threshold
from lazy_monitor.tracking import _checks
from lazy_monitor.tracking import kernel_config as kc
from lazy_monitor.tracking.layers import group_layers
from lazy_monitor.tracking.regime import lazy_decision

__all__ = ["MetricLayout"]


class MetricLayout:
    """Names, groups and checks of a tracker's metrics (no tensors of the measurement).

    Built with the tracker (the parameters trainable then are the tracked ones until
    :meth:`set_param_names`); :meth:`check_outputs` once the model's ``O`` is known;
    :meth:`build_names` whenever the per-layer groups or feature modules change.

    Args:
        model: the tracked network.
        kernel: the requested kernel settings (``kind``, ``projection``, ``topk``).
        per_layer: whether the per-layer metrics are reported.
        layer_groups: at most this many layer groups (:func:`group_layers`); None: per module.
        probe_size: ``N``.
    """

    def __init__(
        self,
        model: nn.Module,
        kernel: kc.KernelConfig,
        per_layer: bool,
        layer_groups: Optional[int],
        probe_size: int,
    ) -> None:
        self.model = model
        self.kernel = kernel
        self.per_layer = per_layer
        #: at most this many per-layer groups (tracking/layers.py); None: one per module
        self.layer_groups = layer_groups
        self.probe_size = probe_size
        self.num_outputs = 0  # the model's O: check_outputs()
        #: tracked parameter names and their layer groups ``{layer: [param names]}``
        self.param_names = list(F.resolve_params(model))
        self.layers = self.group_layers()
        self.targets: Optional[Tensor] = None
        self.classification = False
        self.names: list[str] = []
        self.lazy_thresholds: dict[str, float] = {}
        self.thresholds: tuple[Threshold, ...] = ()
        #: of the resolved kernel (None before it is resolved: :meth:`apply`)
        self.topk: Optional[int] = None
        self.kernel_targets: Optional[Tensor] = None
        self._warned_params = False

    def check_outputs(
        self, num_outputs: int, targets: Optional[Tensor]
    ) -> tuple[Optional[Tensor], bool]:
        """Check ``targets`` against the probe and ``O`` and ``topk`` against the largest
        kernel matrix the configuration can give (before ``"auto"`` is resolved); the checked
        targets and whether they are class indices."""
        self.num_outputs = num_outputs
        kind = self.kernel.kind
        if kind != "auto":
            kc.warn_spectrum_size(
                kind,
                self.kernel.projection,
                probe_size=self.probe_size,
                num_outputs=num_outputs,
                stacklevel=4,  # the caller of KernelTracker()
            )
        if targets is not None:
            # only an explicit trace kernel accepts regression targets of another width than
            # O ("auto" may resolve to "full")
            outputs = None if self.kernel.kind == "trace" else num_outputs
            self.targets, self.classification = M.alignment_targets(
                targets, self.probe_size, num_outputs, outputs
            )
        self.check_topk(kind if kind != "auto" else "full", self.kernel.projection)
        return self.targets, self.classification

    def check_topk(self, kind: str, projection: Union[None, int, str]) -> int:
        """``topk`` for a kernel of this kind/projection (see :func:`kc.check_topk`)."""
        return kc.check_topk(
            self.kernel.topk,
            kind,
            projection,
            probe_size=self.probe_size,
            num_outputs=self.num_outputs,
        )

    def group_layers(self) -> dict[str, list[str]]:
        if self.layer_groups is None:
            return M.group_by_layer(self.param_names)
        return group_layers(self.model, self.param_names, self.layer_groups)

    def set_param_names(
        self, names: list[str], feature_modules: Sequence[str], regroup: bool = False
    ) -> None:
        """Fix the tracked parameter set (and the per-layer metric names that follow from it)."""
        if names == self.param_names and not regroup:
            return
        self.param_names = list(names)
        self.layers = self.group_layers()
        self.build_names(feature_modules, self.lazy_thresholds)

    def build_names(self, feature_modules: Sequence[str], thresholds: Mapping[str, float]) -> None:
        """The metric names of the configuration, then ``thresholds`` checked against them
        (:func:`_checks.check_thresholds`)."""
        self.names = catalogue.tracker_metric_names(
            list(self.layers),
            targets=self.targets is not None,
            classification=self.classification,
            per_layer=self.per_layer,
            feature_layers=list(feature_modules),
        )
        self.lazy_thresholds, self.thresholds = _checks.check_thresholds(thresholds, self.names)

    def apply(self, cfg: kc.ResolvedKernel, warn: bool) -> None:
        """Follow a resolved (or restored) kernel: ``topk`` and the alignment targets follow
        the kernel's outputs."""
        kind, projection = cfg.kind, cfg.projection
        self.topk = self.check_topk(kind, projection)
        shape = {"probe_size": self.probe_size, "num_outputs": self.num_outputs}
        if warn and self.kernel.kind == "auto":
            kc.warn_spectrum_size(kind, projection, stacklevel=5, **shape)
        self.kernel_targets = kc.project_targets(
            self.targets, self.classification, kind, projection, cfg.projection_seed, **shape
        )

    def reset(self) -> None:
        """Forget the resolved kernel's ``topk`` and targets and the warning of
        :meth:`nan_metrics` (before a new start/load)."""
        self.topk = None
        self.kernel_targets = None
        self._warned_params = False

    def nan_metrics(self, problem: str) -> dict[str, float]:
        """NaN metrics with ``health/nonfinite = 1`` (warned once until :meth:`reset`) when the
        tracked parameters cannot be measured any more."""
        if not self._warned_params:
            self._warned_params = True
            warnings.warn(
                f"KernelTracker cannot measure: {problem}; the metrics are NaN with "
                "health/nonfinite=1 from now on. Build a new KernelTracker for the changed model.",
                RuntimeWarning,
                stacklevel=3,  # the caller of measure()
            )
        out = {name: math.nan for name in self.names}
        out["regime/lazy"] = 0.0
        out["health/nonfinite"] = 1.0
        return out

    def full_spectrum(self, cfg: Optional[kc.ResolvedKernel]) -> bool:
        """Whether λmax of the measured kernel matrix is that of the ``(N·O) × (N·O)`` NTK
        (what ``ntk/lr_eig_max`` is defined with): a full kernel, or a trace/diagonal kernel of a
        single output (then the same matrix). Any other kind (e.g. a projected kernel) is not.
        Tests the kind resolved at start, ``cfg`` (``"auto"`` is resolved there)."""
        kind = self.kernel.kind if cfg is None else cfg.kind
        if cfg is not None and cfg.projection is not None:
            return False  # the kernel of projected outputs, not the NTK's spectrum
        if kind == "full":
            return True
        return kind in ("trace", "diagonal") and self.num_outputs == 1

    def decision(self, metrics: Mapping[str, float]) -> tuple[bool, str]:
        """:meth:`KernelTracker.regime_decision <lazy_monitor.KernelTracker.regime_decision>`."""
        missing = [th.metric for th in self.thresholds if not th.select(metrics)]
        if missing:
            raise ValueError(
                f"metrics lack the thresholded names {missing}; pass a result of measure()"
            )
        return lazy_decision(self.thresholds, metrics)
