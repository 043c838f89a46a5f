"""Per-parameter cost estimates of one kernel computation (for splitting the work).

``K = Σ_p K_p``: the blocks of different parameters are independent, so a kernel can be split
across processes by parameters. To balance such a split, :func:`estimate_param_costs` gives
each differentiated parameter the estimated multiply-adds of its block, from the same probe
pass and cost model (:mod:`.cost`) the structured engine uses to choose its strategies. The
numbers are shapes-only (no timing), hence identical on every process for the same model and
probe.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from torch import Tensor, nn

from .._functional import (
    FunctionalModel,
    InputBatch,
    OutputFn,
    batch_size,
    compute_dtype,
    resolve_params,
    side_effect_guard,
    slice_batch,
)
from .cost import strategy_costs
from .structured import _forward, _probe_plan

__all__ = ["describe_plan", "estimate_param_costs"]


def estimate_param_costs(
    model: nn.Module,
    x: InputBatch,
    *,
    params: Optional[Mapping[str, Tensor]] = None,
    kind: str = "full",
    output_fn: Optional[OutputFn] = None,
) -> dict[str, float]:
    """Estimated multiply-adds of each parameter's kernel block ``J_p J_pᵀ`` on ``x``.

    A weight used as ``y = a Wᵀ`` (Linear, Conv, Embedding) gets the cheapest of the
    strategies of :func:`lazy_monitor.core.kernels.cost.strategy_costs` (what the structured
    engine would run); biases and normalisation affines ``N²O²·numel``; any other parameter
    the Jacobian-contraction cost ``N²O²·numel + N·O·numel`` (its rows are built by
    backpropagation). The full-kernel count is used for every ``kind``: the cheaper kinds
    scale the contraction terms of all parameters alike, which barely moves a balance.

    Args:
        model: the network.
        x: probe inputs batched on dim 0 (``N`` examples); only the first example is run.
        params: parameters to cost (default: the trainable ones, tied once).
        kind: kernel kind (accepted for symmetry with :func:`empirical_ntk`; see above).
        output_fn: maps the model's output to a tensor.

    Returns:
        ``{name: cost}`` for every parameter of ``params``, costs ``> 0``.
    """
    del kind  # see docstring: one count for every kind
    named = resolve_params(model, params)
    n = batch_size(x)
    dtype = compute_dtype(named, x)
    with side_effect_guard(model):
        fm = FunctionalModel(model, output_fn, dtype)
        wrt = {k: v.detach().to(dtype).requires_grad_() for k, v in named.items()}
        out, cap = _forward(fm, {}, wrt, fm.cast_inputs(slice_batch(x, slice(0, 1))))
        o = int(out.shape[1])
        del out
    costs = {k: float(n * n * o * o * v.numel() + n * o * v.numel()) for k, v in named.items()}
    seen: dict[str, list] = {}
    for use in cap.uses:
        rows = use.op in ("norm", "elementwise")  # direct per-example rows
        if use.weight is not None and not rows and use.weight not in cap.other:
            seen.setdefault(use.weight, []).append(use)
        if use.bias is not None or rows:
            for name in (use.weight, use.bias):
                if name is not None and name not in cap.other:
                    costs[name] = float(n * n * o * o * named[name].numel())
    for name, uses in seen.items():
        w = named[name]
        if uses[0].op == "embedding":
            t = sum(u.inp.numel() for u in uses)
            options = strategy_costs(n, o, t, 1, w.shape[1])
            options.pop("per_example", None)
        else:
            groups = int(uses[0].meta.get("groups", 1) or 1)
            t = sum(u.out.numel() // w.shape[0] for u in uses)
            options = strategy_costs(n, o, t, w[0].numel(), w.shape[0] // groups, groups)
        costs[name] = float(min(options.values()))
    return {k: max(v, 1.0) for k, v in costs.items()}


def describe_plan(
    model: nn.Module,
    x: InputBatch,
    *,
    params: Optional[Mapping[str, Tensor]] = None,
    output_fn: Optional[OutputFn] = None,
    keep_blocks: bool = False,
) -> dict[str, Any]:
    """What ``empirical_ntk(model, x)`` (``implementation="auto"``, symmetric kernel) runs.

    Returns:
        ``{"path": "structured" | "mixed" | "jacobian", "costs": {plan: estimated cost},
        "parameters": {name: strategy}, "reason": str}``; a strategy is ``"outer"``,
        ``"gram"``, ``"per_example"``, ``"stored"`` (structured weights), ``"tied"``,
        ``"tied+gram"``, ``"tied+outer"`` (a weight with uses of different kinds, e.g. a tied
        embedding and LM head: :mod:`.structured.tied`), ``"rows"`` (biases, norm affines and
        parameters broadcast over the examples: direct per-example rows), ``"folded"`` (a bias
        folded into its weight) or ``"jacobian"`` (the Jacobian remainder). Costs are the cost model's
        multiply-add equivalents (:func:`~.cost.choose_path`).
    """
    named = resolve_params(model, params)
    n = batch_size(x)
    dtype = compute_dtype(named, x)
    with side_effect_guard(model):
        fm = FunctionalModel(model, output_fn, dtype)
        p = {k: v.detach().to(dtype) for k, v in named.items()}
        plan, out, _, _ = _probe_plan(fm, p, fm.cast_inputs(x), None, n, None, keep_blocks, True)
        del out
    strategies: dict[str, str] = {k: "jacobian" for k in plan.fallback}
    strategies.update(plan.weights)
    strategies.update({k: "rows" for k in plan.biases})
    strategies.update({b: "folded" for b in (*plan.folded.values(), *plan.shared.values())})
    reasons = {
        "structured": "every factorisable parameter factorised",
        "mixed": "parameters cheaper as Jacobian rows moved to the remainder",
        "jacobian": "the Jacobian path is estimated cheaper for the whole kernel",
    }
    return {
        "path": plan.path,
        "costs": dict(plan.path_costs),
        "parameters": {k: strategies[k] for k in named},
        "reason": reasons[plan.path],
    }
