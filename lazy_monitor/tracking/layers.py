"""Layer groups for the per-layer metrics of deep networks.

One metric per module is unreadable on a real network (a 24-block MLP with BatchNorm has ~50
parametrised modules, a ResNet or a transformer hundreds). :func:`group_layers` merges the
modules into at most ``max_groups`` groups that follow the network's own structure:

1. normalization layers (BatchNorm, LayerNorm, GroupNorm, RMSNorm, ...) fold into the
   neighbouring module of their block: the one after them in a pre-norm block
   (``blocks.3.norm`` -> ``blocks.3.fc``), else the one before (``net.1`` BatchNorm ->
   ``net.0`` Linear);
2. modules are grouped by their dotted name cut at one depth: the shallowest depth with the
   most groups not above ``max_groups`` (``layer1``, ``layer2`` of a ResNet at depth 1 or ``layer1.0``,
   ``layer1.1``, ... at depth 2; ``transformer.h.0`` ... of GPT-2 at depth 3);
3. when that depth gives fewer than 4 groups while the next one gives more than ``max_groups``
   (e.g. ``net`` vs ``net.0`` ... ``net.46`` of a deep ``nn.Sequential``), the finer groups are
   merged into ``max_groups`` consecutive runs named ``first..last``.

A group is named by its module prefix, so the metric names stay ``ntk_layer/<group>/...``.

>>> from torch import nn
>>> net = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(4, 4), nn.BatchNorm1d(4))])
>>> {g: len(p) for g, p in group_layers(net, [n for n, _ in net.named_parameters()], 8).items()}
{'0': 4, '2': 4, '4': 4}
>>> list(group_layers(net, [n for n, _ in net.named_parameters()], 2))
['0', '2..4']
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lazy_monitor.core.metrics import group_by_layer

__all__ = ["DEFAULT_LAYER_GROUPS", "NORM_TYPES", "group_layers"]

#: Default maximum number of layer groups of the callbacks' per-layer metrics.
DEFAULT_LAYER_GROUPS = 16

#: Module types folded into the block before them.
NORM_TYPES: tuple[type, ...] = tuple(
    t
    for t in (
        getattr(nn.modules.batchnorm, "_NormBase", None),
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
        nn.LocalResponseNorm,
    )
    if t is not None
)


def _is_norm(module: object) -> bool:
    # also by name, for norms of other libraries (transformers' LlamaRMSNorm, T5LayerNorm, ...)
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith(("Norm", "Norm2d"))


def _prefix(layer: str, depth: int) -> str:
    return ".".join(layer.split(".")[:depth])


def _shared(a: str, b: str) -> int:
    """Number of leading dotted components ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        n += 1
    return n


def _chunk(groups: dict[str, list[str]], n: int) -> dict[str, list[str]]:
    """``groups`` merged into ``n`` consecutive runs of (nearly) equal length."""
    keys = list(groups)
    out: dict[str, list[str]] = {}
    for i in range(n):
        run = keys[i * len(keys) // n : (i + 1) * len(keys) // n]
        if run:
            name = run[0] if len(run) == 1 else f"{run[0]}..{run[-1]}"
            out[name] = [p for key in run for p in groups[key]]
    return out


def group_layers(
    model: nn.Module, param_names: Sequence[str], max_groups: int
) -> dict[str, list[str]]:
    """Parameter names grouped into at most ``max_groups`` layer groups (see the module doc).

    Args:
        model: the network whose parameters are named (module types decide what a norm is).
        param_names: names as in ``model.named_parameters()``, in that order.
        max_groups: the largest number of groups (``>= 1``).

    Returns:
        ``{group: [param_name, ...]}`` in parameter order; every name in exactly one group.
    """
    if max_groups < 1:
        raise ValueError(f"max_groups must be >= 1, got {max_groups!r}")
    modules = dict(model.named_modules())
    by_module = group_by_layer(param_names)
    layers = list(by_module)
    norm = [_is_norm(modules.get(layer)) for layer in layers]
    if all(norm):  # nothing to fold into
        norm = [False] * len(layers)
    home = {layer: layer for layer, is_norm in zip(layers, norm) if not is_norm}
    for i, layer in enumerate(layers):
        if not norm[i]:
            continue
        # the neighbouring module in the same block: pre-norm blocks (LayerNorm before the
        # attention) fold into the next module, post-norm ones (Linear, BatchNorm) into the
        # previous one; the closer relative by dotted name wins, the previous one on a tie
        prev = next((layers[j] for j in range(i - 1, -1, -1) if not norm[j]), None)
        after = next((layers[j] for j in range(i + 1, len(layers)) if not norm[j]), None)
        home[layer] = prev or after  # type: ignore[assignment]
        if prev is not None and after is not None and _shared(layer, after) > _shared(layer, prev):
            home[layer] = after
    units: dict[str, list[str]] = {}
    for layer in layers:
        if not norm[layers.index(layer)]:
            units[layer] = []
    for layer, names in by_module.items():
        units[home[layer]].extend(names)
    # keep parameter order inside each unit
    order = {name: i for i, name in enumerate(param_names)}
    unit_list = [(layer, sorted(names, key=order.__getitem__)) for layer, names in units.items()]

    def at_depth(depth: int) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for layer, names in unit_list:
            groups.setdefault(_prefix(layer, depth), []).extend(names)
        return groups

    max_depth = max(len(layer.split(".")) for layer, _ in unit_list)
    best: dict[str, list[str]] = {}
    for depth in range(1, max_depth + 1):
        groups = at_depth(depth)
        if len(groups) > max_groups:
            if len(best) < min(4, max_groups):  # too coarse: split the finer level evenly
                return _chunk(groups, max_groups)
            break
        if len(groups) > len(best):  # a deeper cut that splits nothing keeps the shorter names
            best = groups
    return best
