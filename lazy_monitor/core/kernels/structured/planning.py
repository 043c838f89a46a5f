"""The structured plan: which parameters get which rule and strategy (:func:`_make_plan`),
``implementation="auto"``'s whole-call choice (:func:`_choose_path`), sub-plans of layer
groups."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from torch import Tensor

from .._common import (
    symmetric_pairs,
)
from ..cost import (
    OP_COST,
    PassModel,
    choose_path,
    choose_strategy,
    contraction_calls,
    strategy_costs,
)
from .capture import _Capture, _rows_per_example, _Use, _weight_shape
from .tied import tied_macs, tied_plan, tied_supported


@dataclasses.dataclass
class _Plan:
    """Which parameters get which structured rule (decided on a probe pass).

    ``folded``: weight -> its bias, folded into ``A`` as a ones column (no per-name blocks
    needed). ``shared``: weight -> its bias, whose block reuses the weight's ``G Gᵀ``
    (``outer`` strategy with blocks). Other structured biases are contracted on their own.
    """

    weights: dict[str, str]  # name -> strategy
    biases: list[str]
    fallback: list[str]
    folded: dict[str, str] = dataclasses.field(default_factory=dict)
    shared: dict[str, str] = dataclasses.field(default_factory=dict)
    use_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    row_ratios: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    # for the whole-call choice (:func:`_choose_path`): per structured parameter the cost of
    # its contraction (multiply-add equivalents) and multiply-adds per example of its uses
    costs: dict[str, float] = dataclasses.field(default_factory=dict)
    macs: dict[str, float] = dataclasses.field(default_factory=dict)
    path: str = "structured"  # "structured" | "mixed" | "jacobian" (auto's choice)
    path_costs: dict[str, float] = dataclasses.field(default_factory=dict)
    # the probe expanded supported ops on batch-shared inputs (:mod:`.broadcast`): every
    # factor pass must expand the same ones
    expand: bool = False


def _make_plan(
    params: Mapping[str, Tensor],
    cap: _Capture,
    n: int,
    o: int,
    keep_blocks: bool,
    builds: float = 1.0,
    pairs: float = 1.0,
    symmetric: bool = False,
) -> _Plan:
    """Structured rule per parameter; ``builds`` and ``pairs`` as in
    :func:`~.cost.strategy_costs`; ``symmetric``: a kernel of ``x1`` with itself (a tied
    weight's rows are the token ids of one example block, not two)."""
    by_name: dict[str, list[tuple[str, _Use]]] = {}
    for use in cap.uses:
        for role, name in (("weight", use.weight), ("bias", use.bias)):
            if name is not None:
                by_name.setdefault(name, []).append((role, use))
    weights: dict[str, str] = {}
    biases: list[str] = []
    costs: dict[str, float] = {}
    macs: dict[str, float] = {}
    blocks = symmetric_pairs(n) if pairs < 1.0 else 1
    for name, roles in by_name.items():
        if name in cap.other:
            continue
        kinds = {
            (
                role,
                use.op,
                use.meta.get("groups", 1),
                use.meta.get("padding_idx"),
                use.meta.get("transposed", False),
            )
            for role, use in roles
        }
        if len(kinds) != 1:
            # uses of different kinds (tied Embedding + LM head, ``F.linear`` and ``@``): the
            # tied rule (:mod:`.tied`) if every use is a Linear-type or Embedding weight use,
            # else the Jacobian fallback
            if tied_supported(roles, params[name]):
                uses = [u for _, u in roles]
                strategy, cost = tied_plan(
                    uses, params[name], n, o, cap.n, builds, pairs, 1 if symmetric else 2
                )
                weights[name] = strategy
                costs[name] = cost + OP_COST * contraction_calls("per_example", n, blocks)
                macs[name] = tied_macs(uses, params[name], cap.n)
            continue
        role, op, groups, _, _ = kinds.pop()
        if role == "bias" or op in ("norm", "elementwise"):  # direct per-example rows
            biases.append(name)
            numel = params[name].numel()
            costs[name] = pairs * n * n * o * o * numel + OP_COST * contraction_calls(
                "row", n, blocks
            )
            macs[name] = float(sum(u.out.numel() for _, u in roles) // max(1, cap.n))
            continue
        w = params[name]
        if op == "embedding":
            t = sum(use.inp[0].numel() for _, use in roles)
            strategy = choose_strategy(n, o, t, 1, w.shape[1], dense_input=False, pairs=pairs)
            weights[name] = strategy
            options = strategy_costs(n, o, t, 1, w.shape[1], pairs=pairs)
            costs[name] = options.get(strategy, options["gram"])
            costs[name] += OP_COST * contraction_calls(strategy, n, blocks)
            macs[name] = float(t * w.shape[1])
        else:
            shape = _weight_shape(roles[0][1], w)
            t = sum(use.out.numel() // cap.n // shape[0] for _, use in roles)
            d_in = w.numel() // shape[0] + 1  # + the folded bias column
            strategy = choose_strategy(
                n, o, t, d_in, shape[0] // int(groups), int(groups), builds=builds, pairs=pairs
            )
            factor_size = sum((o * u.out.numel() + u.inp.numel()) // cap.n for _, u in roles)
            g = int(groups)
            options = strategy_costs(n, o, t, d_in, shape[0] // g, g, builds=builds, pairs=pairs)
            costs[name] = options.get(strategy, options["per_example"])
            if strategy == "per_example" and o * (w.numel() + shape[0]) <= factor_size:
                # Per-example gradients are no larger than the factors they are built from:
                # build them once per block instead of once per contraction.
                strategy = "stored"
            weights[name] = strategy
            costs[name] += OP_COST * contraction_calls(strategy, n, blocks, shape[0])
            macs[name] = float(t * shape[0] * (d_in - 1))
    plan = _Plan(weights, biases, [k for k in params if k not in set(weights) | set(biases)])
    plan.costs, plan.macs = costs, macs
    plan.expand = cap.expanded
    plan.use_counts = {k: len(v) for k, v in by_name.items()}
    plan.row_ratios = {
        k: tuple(_rows_per_example(u, cap.n) for _, u in v) for k, v in by_name.items()
    }
    for w, strategy in weights.items():
        if strategy.startswith("tied"):
            continue  # the tied rule has no bias to fold or share
        uses_w = [id(u) for role, u in by_name[w]]
        paired = {u.bias for _, u in by_name[w]}
        if len(paired) != 1:
            continue
        b = paired.pop()
        if b is None or b not in biases or [id(u) for _, u in by_name[b]] != uses_w:
            continue
        if not keep_blocks:
            plan.folded[w] = b
        elif strategy == "outer":
            plan.shared[w] = b
        else:
            continue
        plan.biases.remove(b)
    return plan


def _choose_path(
    plan: _Plan, params: Mapping[str, Tensor], cap: _Capture, n: int, o: int, pairs: float
) -> None:
    """``implementation="auto"``: price the plan against a Jacobian remainder and the
    Jacobian path (:func:`~.cost.choose_path`) and move parameters to ``plan.fallback``
    accordingly (a moved weight takes its folded/shared bias along)."""
    model = PassModel(
        n=n,
        o=o,
        fp=cap.macs / max(1, cap.n),
        calls=cap.ops,
        pairs=pairs,
        sym_blocks=symmetric_pairs(n) if pairs < 1.0 else 1,
    )
    planned = [*plan.weights, *plan.biases]
    structured = {k: (plan.costs[k], params[k].numel(), plan.macs[k]) for k in planned}
    for w, b in (*plan.folded.items(), *plan.shared.items()):
        cost, numel, macs = structured[w]
        structured[w] = (cost, numel + params[b].numel(), macs)
    forced = {k: (params[k].numel(), float(params[k].numel())) for k in plan.fallback}
    path, moved, costs = choose_path(model, structured, forced)
    plan.path, plan.path_costs = path, costs
    if path == "jacobian":
        moved = set(planned)
    for w in list(moved):
        moved.update(b for b in (plan.folded.get(w), plan.shared.get(w)) if b is not None)
    if not moved:
        return
    plan.weights = {k: v for k, v in plan.weights.items() if k not in moved}
    plan.biases = [k for k in plan.biases if k not in moved]
    plan.folded = {w: b for w, b in plan.folded.items() if w not in moved}
    plan.shared = {w: b for w, b in plan.shared.items() if w not in moved}
    kept = {*plan.weights, *plan.biases, *plan.folded.values(), *plan.shared.values()}
    plan.fallback = [k for k in params if k not in kept]


def _sub_plan(plan: _Plan, names: list[str]) -> _Plan:
    """The part of ``plan`` that covers ``names`` (weights with their folded/shared biases)."""
    keep = set(names)
    sub = _Plan(
        {k: v for k, v in plan.weights.items() if k in keep},
        [b for b in plan.biases if b in keep],
        [],
        {w: b for w, b in plan.folded.items() if w in keep},
        {w: b for w, b in plan.shared.items() if w in keep},
    )
    sub.use_counts, sub.row_ratios = plan.use_counts, plan.row_ratios
    sub.expand = plan.expand
    return sub
