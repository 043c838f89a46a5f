"""How :class:`~lazy_monitor.tracking.session.MonitorSession` sets up a measurement at start:
the probe drawn from the training data and the tracker built on it, split across processes.

``session`` is a ``MonitorSession`` (typed ``Any``: this module must not import the session
module, which imports it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from torch import nn

from lazy_monitor.tracking.distributed import KernelSharding
from lazy_monitor.tracking.kernel_config import KernelConfig
from lazy_monitor.tracking.network import device_of
from lazy_monitor.tracking.probe import Probe, build_tracker, draw_from_dataset, draw_probe
from lazy_monitor.tracking.sharded import has_sharded_params, mesh_sharding
from lazy_monitor.tracking.tracker import KernelTracker

__all__ = ["build", "draw"]


def draw(session: Any, data: Any) -> Probe:
    """The session's ``probe_size`` examples drawn from ``data`` (a loader, loaders or a
    dataset) with its seed.

    Raises:
        ValueError: without ``data`` (names the two ways to give a probe).
    """
    if data is None:
        raise ValueError(
            f"{session.owner}(probe_size={session.probe_size}) draws the probe from the training "
            "data, but none was given; pass probe=x or probe=(x, y), or start(model, "
            "data=train_loader)"
        )
    if (
        hasattr(data, "__getitem__")
        and not hasattr(data, "dataset")
        and hasattr(data, "__len__")
        and not isinstance(data, (list, tuple, Mapping))
    ):
        return draw_from_dataset(data, session.probe_size, session.seed, session.batch_to_probe)
    return draw_probe(data, session.probe_size, session.seed, session.batch_to_probe)


def build(
    session: Any,
    network: nn.Module,
    probe: Probe,
    kernel: KernelConfig,
    per_layer: bool,
) -> tuple[KernelTracker, Probe]:
    """The session's tracker on ``network`` and ``probe`` and the probe it measures on."""
    return build_tracker(
        network,
        probe,
        device_of(network),
        drawn=session.probe is None,
        sharding=_sharding(session, network),
        kernel=kernel,
        per_layer=per_layer,
        feature_modules=session.feature_modules,
        layer_groups=session.layer_groups if per_layer else None,
        lazy_thresholds=session.lazy_thresholds,
        output_fn=session.output_fn,
    )


def _sharding(session: Any, network: nn.Module) -> Optional[KernelSharding]:
    """Split the kernel over the processes through the session's collectives."""
    collectives = session.collectives
    if has_sharded_params(network):
        # FSDP2: always summed over the parameters' mesh, on its process group
        return mesh_sharding(network, lambda t, group: collectives.reduce_sum(t, group=group))
    world = collectives.world_size
    if not session.split_across_ranks or world <= 1:
        return None
    return KernelSharding(collectives.rank, world, collectives.reduce_sum)
