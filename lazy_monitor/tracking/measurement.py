"""How a :class:`~lazy_monitor.tracking.tracker.KernelTracker` evaluates the model: the
measurement backend it holds.

The tracker owns the reference, the schedule of calls and the metrics; a backend owns the
model-facing computations, each a small method: the forward ``f(probe; θ)`` (with the tracked
features), the kernel ``K`` (total and per layer), the θ₀ snapshot with ``f_lin``, the
``params/*`` inputs, the check that the tracked parameters still exist, and the cost estimate
``kind="auto"`` is resolved with (:func:`lazy_monitor.tracking.kernel_config.resolve`).

* :class:`LocalMeasurement` -- this process computes everything with the kernel engine;
* :class:`SplitMeasurement` -- the kernel split across the processes of a data-parallel run
  (:class:`~lazy_monitor.tracking.distributed.KernelSharding`): each process computes the
  blocks of its share of the parameters, one sum-reduction completes them;
* :class:`~lazy_monitor.tracking.sharded.ShardedMeasurement` -- parameters sharded by FSDP2
  (DTensors), measured through the model's own forward/backward.

:func:`choose` picks one from the model and the ``sharding`` argument.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from lazy_monitor._validation import gib
from lazy_monitor.core import _functional as F
from lazy_monitor.core.kernels import empirical_ntk, estimate_ntk_cost
from lazy_monitor.core.kernels.plan import estimate_param_costs
from lazy_monitor.core.linearization import Linearization
from lazy_monitor.tracking import kernel_config as kc
from lazy_monitor.tracking._state import TrackerState
from lazy_monitor.tracking.distributed import KernelSharding, sharded_kernel
from lazy_monitor.tracking.sharded import ShardedMeasurement, has_sharded_params

__all__ = ["LocalMeasurement", "Measurement", "SplitMeasurement", "choose"]


def current_params(model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """θ of the tracked parameters ``names`` (detached), whatever their ``requires_grad``."""
    live = dict(model.named_parameters())
    return {n: live[n].detach() for n in names}


class LocalMeasurement:
    """This process measures with the kernel engine (:func:`lazy_monitor.empirical_ntk`) and a
    frozen :class:`~lazy_monitor.Linearization` for ``f_lin``."""

    name = "local"

    def __init__(self, tracker: TrackerState) -> None:
        self.t = tracker
        #: None: no collective (the split backend sums over its processes)
        self.sharding: Optional[KernelSharding] = None

    # ------------------------------------------------------------------ construction
    def validate(self) -> None:
        """Validate implementation / output_fn / projection against the engine on one example,
        now rather than at the first measurement mid-training. Bounded: one output (the same
        code paths -- structured plan, vmap or its loop fallback, forward AD for ntvp -- at
        the cost of O = 1, not of a 1000-class head)."""
        t = self.t
        one = F.slice_batch(t._probe_on_model_device(), slice(0, 1))
        projection = t.kernel.projection
        empirical_ntk(
            t.model,
            one,
            params=self.params(),
            kind="trace",
            implementation=t.kernel.implementation,
            output_fn=t.output_fn,
            projection="sum" if projection is None else projection,
        )

    # ------------------------------------------------------------------ kernel estimate
    def implementation(self, requested: kc.KernelConfig) -> str:
        return str(requested.implementation)

    def engine_memory(self, budget: Optional[int]) -> Optional[int]:
        # half of the budget for the engine's per-example factors, the rest for the kernels
        # and eigendecompositions
        return None if budget is None else max(1, budget // 2)

    def estimate(
        self, kind: str, projection: kc.Projection, max_memory: Optional[int]
    ) -> dict[str, Any]:
        t = self.t
        return estimate_ntk_cost(
            t.model,
            t._probe_on_model_device(),
            kind=kind,
            projection=projection,
            per_layer=t.per_layer,
            output_fn=t.output_fn,
            params=self.params(),
            max_memory=self.engine_memory(max_memory),
            kernel_copies=kc.KERNEL_COPIES,
        )

    def describe(self, est: Mapping[str, Any]) -> str:
        return (
            f"N={est['n']}, O={est['o_raw']}, P={est['p']}: kernel and {est['blocks']} blocks "
            f"x{kc.KERNEL_COPIES} {gib(est['kernel_bytes'])}, factors "
            f"{gib(est['factor_bytes'])}, eigendecomposition {gib(est['eig_bytes'])}"
        )

    # ------------------------------------------------------------------ parameters
    def params(self) -> dict[str, Tensor]:
        """θ of the tracked parameters (those trainable at ``start``)."""
        return current_params(self.t.model, self.t._param_names)

    def snapshot(self) -> Linearization:
        """θ₀ = the tracked parameters now (frozen), on the snapshot device."""
        t = self.t
        return Linearization(
            t.model, self.params(), output_fn=t.output_fn, device=t.kernel.snapshot_device
        )

    def params0(self, lin: Any) -> dict[str, Tensor]:
        """θ₀ for the ``params/*`` metrics, on the metric device."""
        dev = self.t._metric_device()
        return {n: v.to(dev) for n, v in lin.params0.items()}

    def measured_params(self, lin: Any, dev: torch.device) -> dict[str, Tensor]:
        """θ for the ``params/*`` metrics, on ``dev`` (compared with :meth:`params0`)."""
        del lin
        return {n: v.to(dev) for n, v in self.params().items()}

    def params_problem(self, lin: Any) -> Optional[str]:
        """Why the tracked parameters can no longer be measured (None if they can): a tracked
        name is gone from ``model.named_parameters()`` or its shape changed."""
        live = dict(self.t.model.named_parameters())
        missing = [n for n in self.t._param_names if n not in live]
        if missing:
            return (
                f"parameters {missing[:4]}{'...' if len(missing) > 4 else ''} tracked since "
                "start() are no longer parameters of the model"
            )
        shapes0 = {} if lin is None else lin.params0
        changed = [
            n for n, v in shapes0.items() if n in live and tuple(live[n].shape) != tuple(v.shape)
        ]
        if changed:
            return (
                f"parameters {changed[:4]}{'...' if len(changed) > 4 else ''} changed shape since "
                "start()"
            )
        return None

    def eval_forward(self, lin: Any) -> Callable[[F.InputBatch], Tensor]:
        """The side-effect-free eval-mode forward ``x -> f(x) (n, O)`` for the batch check."""
        return lin.f0

    # ------------------------------------------------------------------ evaluation
    def forward(self, strict: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """``f(probe; θ)`` at the model's current parameters, ``(N, O)``, without side effects,
        and the tracked modules' features ``{module: (N, D)}`` recorded in the same forward."""
        t = self.t
        x = t._probe_on_model_device()
        params = self.params()
        fm = F.FunctionalModel(t.model, t.output_fn, F.compute_dtype(params, x))
        with F.side_effect_guard(t.model), torch.no_grad(), t._hooks(strict) as grams:
            f = fm(fm.cast_params(params), fm.cast_inputs(x)).detach()
        return f, t._on_metric_device(grams)

    def kernel(self) -> tuple[Tensor, dict[str, Tensor]]:
        """Total kernel and per-layer kernels (one engine call), on the metric device."""
        t = self.t
        dev = t._metric_device()
        # (data-dependent control flow: implementation="auto" falls back inside the engine)
        result = self._engine(self.params(), blocks=t.per_layer)
        if not t.per_layer:
            return result.to(dev), {}
        kernel, blocks = result
        layers = {}
        for layer, names in t._layers.items():
            missing = [n for n in names if n not in blocks]
            if missing:
                raise RuntimeError(
                    f"the kernel engine returned no block for parameters {missing}; the model's "
                    "trainable parameters changed since the tracker was built -- build a new "
                    "KernelTracker for the changed model"
                )
            layers[layer] = torch.stack([blocks[n] for n in names]).sum(0).to(dev)
        return kernel.to(dev), layers

    def _engine(self, params: Mapping[str, Tensor], blocks: bool) -> Any:
        """One engine call with the resolved kernel's settings."""
        t = self.t
        cfg = t._resolved
        assert cfg is not None, "the kernel configuration is resolved at start()"
        return empirical_ntk(
            t.model,
            t._probe_on_model_device(),
            params=params,
            return_blocks=blocks,
            kind=cfg.kind,
            implementation=cfg.implementation,
            projection=cfg.projection,
            projection_seed=cfg.projection_seed,
            max_memory=cfg.max_memory,
            output_fn=t.output_fn,
            chunk_size=t.kernel.chunk_size,
        )


class SplitMeasurement(LocalMeasurement):
    """:class:`LocalMeasurement` with each kernel split across the processes of a
    data-parallel run (see :mod:`lazy_monitor.tracking.distributed`); the same result on
    every process."""

    name = "split"

    def __init__(self, tracker: TrackerState, sharding: KernelSharding) -> None:
        super().__init__(tracker)
        self.sharding = sharding
        self._param_costs: Optional[dict[str, float]] = None

    def kernel(self) -> tuple[Tensor, dict[str, Tensor]]:
        if not self.sharding.active:
            return super().kernel()
        t = self.t
        x = t._probe_on_model_device()
        params = self.params()
        if self._param_costs is None or list(self._param_costs) != t._param_names:
            self._param_costs = estimate_param_costs(
                t.model, x, params=params, output_fn=t.output_fn
            )
        cfg = t._resolved
        assert cfg is not None, "the kernel configuration is resolved at start()"
        n, kind = t.probe_size, cfg.kind
        o = kc.kernel_outputs(kind, cfg.projection, t.num_outputs)
        shape = {"full": (n, n, o, o), "trace": (n, n), "diagonal": (n, n, o)}[kind]
        template = torch.zeros(shape, dtype=F.compute_dtype(params, x), device=t._model_device())
        layers = t._layers if t.per_layer else {}
        dev = t._metric_device()
        for attempt in range(2):
            errors: list[RuntimeError] = []

            def compute(names: Any, errors: list = errors) -> tuple[Tensor, dict[str, Tensor]]:
                try:
                    return self._engine({k: params[k] for k in names}, blocks=True)
                except RuntimeError as err:
                    errors.append(err)
                    raise

            result = sharded_kernel(self.sharding, compute, self._param_costs, layers, template)
            if result is not None:
                kernel, per_layer = result
                return kernel.to(dev), {k: v.to(dev) for k, v in per_layer.items()}
            # Some process failed: all switch together (as in the engine) or all raise.
            if attempt == 0 and t.kernel.implementation == "auto":
                if errors:
                    warnings.warn(
                        f"the structured kernel failed on the probe ({errors[0]}); "
                        "KernelTracker switches to implementation='jacobian' on every process.",
                        RuntimeWarning,
                        stacklevel=5,
                    )
                t.kernel = dataclasses.replace(t.kernel, implementation="jacobian")
                t._resolved = dataclasses.replace(cfg, implementation="jacobian")
                continue
            if errors:
                raise errors[0]
            raise RuntimeError(
                "the kernel computation failed on another process of the split measurement "
                "(its error is raised there); every process stops measuring"
            )
        raise AssertionError("unreachable")


#: A measurement backend (they share the interface of :class:`LocalMeasurement`).
Measurement = Union[LocalMeasurement, ShardedMeasurement]


def choose(tracker: TrackerState, sharding: Optional[KernelSharding]) -> Measurement:
    """The backend for ``tracker``'s model: FSDP2-sharded parameters (DTensors) get the
    sharded one, a ``sharding`` the split one, anything else the local one."""
    if has_sharded_params(tracker.model):
        return ShardedMeasurement(tracker, sharding)
    if sharding is not None:
        return SplitMeasurement(tracker, sharding)
    return LocalMeasurement(tracker)
