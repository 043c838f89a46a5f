"""Cheap, pure estimates of what an empirical NTK costs, and the ``kind="auto"`` resolution.

:func:`estimate_ntk_cost` runs one forward pass of one example under
``torch.utils.flop_counter.FlopCounterMode`` (no graph, no kernel) to read the output size and
the forward FLOPs, then applies the cost model below. :func:`resolve_kernel_config` uses it to
pick ``full`` / ``trace`` / ``trace`` with a projection under a memory budget.

Cost model (N examples, O outputs per example after projection, P parameters, F forward FLOPs
of one example, B parameter blocks):

* kernel: ``N²·O²`` (full), ``N²·O`` (diagonal) or ``N²`` (trace) elements; ``B + 1`` such
  tensors with per-parameter blocks (``per_layer``);
* factors: the engine holds at most its factor budget (``max_memory`` of the call, default
  1 GiB) of per-example factors, or ``N·O·P`` elements if that is smaller;
* eigendecompositions (the metrics' float64 ``eigh`` of the kernel matrix): ``3·M²`` float64
  elements (matrix, eigenvectors, workspace), ``M = N·O`` (full, diagonal) or ``N`` (trace);
* FLOPs: ``O·N·3F`` for the output-gradients (O backward passes, backward ≈ 2 forwards) plus
  the contraction ``2·N²·O²·P`` (full) or ``2·N²·O·P`` (trace/diagonal) — the Jacobian
  contraction's bound; the structured path is usually cheaper.
* seconds: ``O·N`` rows at the *measured* time of one row (a forward and one backward of one
  example; at least ``3F`` FLOPs at the assumed rate) plus the contraction FLOPs at the assumed
  rate. Measuring the row catches the per-op overhead of small models with large ``O`` (a tiny
  GPT-2 with ``O = T·V`` outputs) that a FLOP count misses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from lazy_monitor._validation import gib

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
from ._common import DEFAULT_FACTOR_BUDGET, JACOBIAN_ROW_COPIES
from .config import NtkConfig
from .errors import NtkBudgetError

__all__ = [
    "DEFAULT_MAX_MEMORY",
    "DEFAULT_MAX_SECONDS",
    "SECONDS_LIMIT",
    "check_engine_memory",
    "check_probe_size",
    "check_seconds",
    "estimate_ntk_cost",
    "resolve_kernel_config",
    "AUTO_PROJECTION",
    "auto_candidates",
    "first_fitting",
]

# Default budget of kind="auto" (kernels, per-parameter blocks, their copies, factors and
# eigendecompositions): safe on a laptop next to a training run.
DEFAULT_MAX_MEMORY = 2**30

# Sustained FLOP/s assumed for the time estimate. The FLOP count is the Jacobian contraction's
# upper bound; the structured path does far fewer on Linear/Conv layers, so this effective rate
# is set above a 2-core CPU's raw ~1e10 (3-conv CNN at N=128: estimate 24 s, measured 8 s).
# A GPU is 10-100x faster, where the estimate is conservative.
DEFAULT_FLOPS_PER_SECOND = 5e10

# Default time budget of kind="auto" per kernel measurement.
DEFAULT_MAX_SECONDS = 60.0

#: Estimated seconds of one measurement above which a tracker refuses to start, whatever the
#: settings (forced ones too): 10x the per-measurement budget of ``kind="auto"``. A monitor that
#: would take over 10 minutes per measurement would hold the training run it watches hostage.
SECONDS_LIMIT = 10 * DEFAULT_MAX_SECONDS


def _fixes(kind: Optional[str], memory: bool) -> str:
    """The ways out of a refusal, for a kernel of ``kind`` (``kind="trace"`` is not offered
    again) refused on memory or on time."""
    fixes = [
        "output_fn= to select fewer outputs (e.g. lambda out: out.logits[:, -1] for the last "
        "token's logits)",
        "projection=k (cost scales with k, not O; e.g. kind='trace', projection=16)",
    ]
    if kind != "trace":
        fixes.append("kind='trace' (an N1 x N2 kernel)")
    fixes.append("a smaller probe")
    fixes.append("a larger max_memory" if memory else "kind='auto' to let the tracker choose")
    return ", ".join(fixes[:-1]) + " or " + fixes[-1]


def _forward_flops(
    fm: FunctionalModel, params: Mapping[str, Tensor], x: InputBatch
) -> tuple[int, int]:
    """``(O, FLOPs)`` of one example's forward (no graph)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        out = fm(params, x)
    return int(out.shape[1]), int(counter.get_total_flops())


def _row_seconds(fm: FunctionalModel, params: Mapping[str, Tensor], x: InputBatch) -> float:
    """Measured wall time of one Jacobian row (forward + one backward of one example's summed
    output; the faster of two runs, the first warms up): the per-row overhead of small models
    (many small ops) that a FLOP count misses."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    best = math.inf
    for _ in range(2):
        start = time.perf_counter()
        out = fm(leaves, x)
        torch.autograd.grad(out.sum(), list(leaves.values()), allow_unused=True)
        best = min(best, time.perf_counter() - start)
    return best


def estimate_ntk_cost(
    model: nn.Module,
    x: InputBatch,
    *,
    kind: str = "full",
    projection: Union[None, int, str] = None,
    per_layer: bool = False,
    output_fn: Optional[OutputFn] = None,
    params: Optional[Mapping[str, Tensor]] = None,
    max_memory: Optional[int] = None,
    flops_per_second: float = DEFAULT_FLOPS_PER_SECOND,
    kernel_copies: int = 1,
) -> dict[str, Any]:
    """Estimated memory and time of ``empirical_ntk(model, x, kind=kind, projection=...)``.

    Pure and cheap: one forward of ``x[:1]`` under a FLOP counter, no gradient, the model left
    untouched (same guard as the engine). See the module docstring for the model.

    Returns:
        ``{"n", "o", "o_raw", "p", "blocks", "kernel_bytes", "factor_bytes", "eig_bytes",
        "bytes", "forward_flops", "flops", "seconds"}``: ``o`` the outputs per example after
        projection (``o_raw`` before), ``p`` the differentiated parameter count, ``blocks``
        the number of per-parameter blocks kept (0 unless ``per_layer``), ``bytes`` the peak
        estimate (kernel tensors + factors + eigendecomposition workspace for ``full``),
        ``seconds = flops / flops_per_second``. ``kernel_copies``: copies of the kernel and
        its blocks the caller holds at once (counted in ``kernel_bytes``).
    """
    cfg = NtkConfig(kind=kind, projection=projection, max_memory=max_memory)
    measured = _measure(model, x, output_fn, params)
    return _cost(measured, cfg, per_layer, flops_per_second, kernel_copies)


def _measure(
    model: nn.Module,
    x: InputBatch,
    output_fn: Optional[OutputFn],
    params: Optional[Mapping[str, Tensor]],
) -> dict[str, int]:
    """The model-dependent numbers of the cost model, from one example's forward."""
    n = batch_size(x)
    named = resolve_params(model, params)
    dtype = compute_dtype(named, x)
    with side_effect_guard(model):
        fm = FunctionalModel(model, output_fn, dtype)
        one = fm.cast_inputs(slice_batch(x, slice(0, 1)))
        o_raw, fwd = _forward_flops(fm, fm.cast_params(named), one)
        row_seconds = _row_seconds(fm, fm.cast_params(named), one)
    p = sum(v.numel() for v in named.values())
    return {
        "row_seconds": row_seconds,
        "n": n,
        "o_raw": o_raw,
        "p": p,
        "n_params": len(named),
        "itemsize": torch.finfo(dtype).bits // 8,
        # ops the counter does not know (RNN kernels) count as 2 FLOPs per parameter
        "fwd": max(fwd, 2 * p),
    }


def _cost(
    m: dict[str, int],
    cfg: NtkConfig,
    per_layer: bool,
    flops_per_second: float,
    kernel_copies: int = 1,
) -> dict[str, Any]:
    n, o_raw, p, fwd, itemsize = m["n"], m["o_raw"], m["p"], m["fwd"], m["itemsize"]
    if cfg.projection is None:
        o = o_raw
    elif cfg.projection == "sum":
        o = 1
    else:
        o = int(cfg.projection)
    per_pair = {"full": o * o, "diagonal": o, "trace": 1}[cfg.kind]
    blocks = m["n_params"] if per_layer else 0
    kernel_bytes = n * n * per_pair * itemsize * (1 + blocks) * kernel_copies
    budget = cfg.max_memory if cfg.max_memory is not None else DEFAULT_FACTOR_BUDGET
    factor_bytes = min(budget, n * o * p * itemsize)
    # the metrics decompose in float64 whatever the kernel's dtype; a diagonal kernel's
    # eigenvectors are returned embedded in the (N·O)² matrix
    eig_bytes = 3 * (n * o) ** 2 * 8 if cfg.kind != "trace" else 3 * n * n * 8
    contraction = 2 * n * n * p * (o * o if cfg.kind == "full" else o)
    flops = float(o * n * 3 * fwd + contraction)
    # one row (output, example) costs at least the measured forward + backward of one example;
    # batched rows (vmap) are cheaper, so this bounds the slow per-row case from above
    row_seconds = max(m["row_seconds"], 3 * fwd / flops_per_second)
    seconds = o * n * row_seconds + contraction / flops_per_second
    return {
        "n": n,
        "o": o,
        "o_raw": o_raw,
        "p": p,
        "blocks": blocks,
        "kernel_bytes": kernel_bytes,
        "factor_bytes": factor_bytes,
        "eig_bytes": eig_bytes,
        "bytes": kernel_bytes + factor_bytes + eig_bytes,
        "forward_flops": fwd,
        "flops": flops,
        "row_seconds": row_seconds,
        "seconds": seconds,
    }


#: The projection ``kind="auto"`` falls back to after the full and the trace kernel (a trace of
#: ``k`` random output directions; only where ``k < O``).
AUTO_PROJECTION = 16

Candidate = tuple[str, Union[None, int, str]]


def auto_candidates(
    projection: Union[None, int, str], num_outputs: int, projection_k: int = AUTO_PROJECTION
) -> list[Candidate]:
    """``kind="auto"``'s candidates in order of preference: ``full`` and ``trace`` (of a
    forced ``projection``), then ``trace`` with ``projection_k`` directions when nothing is
    forced and ``projection_k < num_outputs``."""
    candidates: list[Candidate] = [("full", projection), ("trace", projection)]
    if projection is None and projection_k < num_outputs:
        candidates.append(("trace", projection_k))
    return candidates


def first_fitting(
    candidates: list[Candidate],
    estimate: Callable[[Candidate], dict[str, Any]],
    fits: Callable[[dict[str, Any]], bool],
) -> tuple[Candidate, list[dict[str, Any]]]:
    """The first candidate whose estimate ``fits``, else the last (the cheapest), with the
    estimates made on the way (lazily: each may cost a forward; ``[0]`` is the first
    candidate's, ``[-1]`` the choice's)."""
    estimates: list[dict[str, Any]] = []
    for candidate in candidates:
        estimates.append(estimate(candidate))
        if fits(estimates[-1]):
            break
    return candidates[len(estimates) - 1], estimates


def resolve_kernel_config(  # noqa: PLR0913
    model: nn.Module,
    x: InputBatch,
    *,
    max_memory: Optional[int] = DEFAULT_MAX_MEMORY,
    max_seconds: Optional[float] = DEFAULT_MAX_SECONDS,
    per_layer: bool = False,
    output_fn: Optional[OutputFn] = None,
    params: Optional[Mapping[str, Tensor]] = None,
    projection_k: int = AUTO_PROJECTION,
    projection_seed: int = 0,
    flops_per_second: float = DEFAULT_FLOPS_PER_SECOND,
    projection: Union[None, int, str] = None,
    kernel_copies: int = 1,
) -> dict[str, Any]:
    """Resolve ``kind="auto"``: the first of ``full``, ``trace``, ``trace`` + projection
    ``k = projection_k`` (only when ``projection_k < O``) whose estimate fits ``max_memory``
    bytes (and ``max_seconds`` if given); ``trace`` + projection if none does (the cheapest).

    ``projection`` (forced by the caller, an int ``k`` or ``"sum"``): the candidates are
    ``full`` and ``trace`` of that projection only. ``kernel_copies``: how many copies of the
    kernel and its blocks the caller holds at once (a tracker keeps the reference, the last
    and the current kernel: 3); counted in ``kernel_bytes``.

    Returns:
        ``{"kind", "projection", "projection_seed", "implementation": "auto", "max_memory",
        "estimate", "reason", "fits"}`` — pass ``kind``, ``projection``, ``projection_seed``,
        ``implementation`` and ``max_memory`` (the engine's factor budget: half of the
        budget, the rest is for kernels and eigendecompositions) to ``empirical_ntk``;
        ``estimate`` is :func:`estimate_ntk_cost`'s dict for the choice, ``reason`` a one-line
        explanation (empty when ``full`` was kept), ``fits`` whether the choice's estimate is
        within both budgets (False only when no candidate is).
    """
    if isinstance(projection_k, bool) or not isinstance(projection_k, int) or projection_k < 1:
        raise ValueError(f"`projection_k` must be a positive int, got {projection_k!r}")
    NtkConfig(projection=projection)  # validates a forced projection
    measured = _measure(model, x, output_fn, params)

    # Half of the budget for the engine's per-example factors, the rest for kernels and
    # eigendecompositions.
    factor_budget = None if max_memory is None else max(1, max_memory // 2)

    def estimate(kind: str, proj: Union[None, int, str] = None) -> dict[str, Any]:
        cfg = NtkConfig(kind=kind, projection=proj, max_memory=factor_budget)
        return _cost(measured, cfg, per_layer, flops_per_second, kernel_copies)

    full = estimate("full", projection)

    def fits(est: dict[str, Any]) -> bool:
        ok = max_memory is None or est["bytes"] <= max_memory
        return ok and (max_seconds is None or est["seconds"] <= max_seconds)

    candidates = auto_candidates(projection, full["o"], projection_k)
    (kind, proj_k), estimates = first_fitting(
        candidates, lambda c: full if c == candidates[0] else estimate(*c), fits
    )
    est = estimates[-1]
    reason = ""
    if (kind, proj_k) != ("full", projection):
        reason = (
            f"full kernel estimated at {gib(full['bytes'])} and {full['seconds']:.3g} s "
            f"(N={full['n']}, O={full['o']}, P={full['p']}) does not fit max_memory="
            f"{'None' if max_memory is None else gib(max_memory)}"
            + ("" if max_seconds is None else f", max_seconds={max_seconds:g}")
            + "; using kind='trace'"
            + ("" if proj_k is None else f" with projection={proj_k!r}")
            + f" (estimated {gib(est['bytes'])}, {est['seconds']:.3g} s)"
        )
    return {
        "kind": kind,
        "projection": proj_k,
        "projection_seed": projection_seed,
        "implementation": "auto",
        "max_memory": factor_budget,
        "estimate": est,
        "reason": reason,
        "fits": fits(est),
    }


def check_engine_memory(
    *,
    kind: str,
    n1: int,
    n2: Optional[int],
    o: int,
    o_raw: int,
    output_shape: tuple[int, ...],
    blocks: int,
    itemsize: int,
    max_memory: Optional[int],
    jacobian_numel: int = 0,
) -> int:
    """The memory rule of :func:`~lazy_monitor.core.kernels.empirical_ntk`, checked after one
    example's forward and before anything large is allocated.

    The call holds the kernel (``N1·N2·O²``, ``·O`` or ``·1`` elements for full / diagonal /
    trace, times ``1 + blocks`` with per-parameter blocks) and, while it is built, per-example
    factors. No implementation can hold less than one example's output-gradient rows at the
    model's output (``O × O_raw`` elements: ``O`` rows after projection, each as wide as the raw
    output), and a parameter whose rows the Jacobian path builds (``jacobian_numel``: the
    largest such parameter) costs :data:`JACOBIAN_ROW_COPIES` ``× O × numel`` for one example.
    The public layout of a full/diagonal kernel is one more copy at the end, when the factors
    are gone. So the peak is at least ``kernel + max(layout copy, one example's rows)`` bytes,
    which must fit ``max(max_memory, 1 GiB)``: ``max_memory`` is the budget of per-example
    factors (its meaning since the first version), which callers set below one example's
    factors on purpose to force example blocks and layer groups (the engine then runs one
    example or one layer at a time); the refusal is for computations that cannot fit the
    default budget :data:`~lazy_monitor.core.kernels._common.DEFAULT_FACTOR_BUDGET` or a larger
    one the caller gave.

    Returns:
        The factor budget for the implementations: ``max_memory`` as given, or by default
        1 GiB minus the kernel (at least one example's rows), so that a default call's peak
        stays near 1 GiB.

    Raises:
        NtkBudgetError: the estimate exceeds the limit; the message has the estimate, the
            output shape and the fixes.
    """
    limit = max(max_memory or 0, DEFAULT_FACTOR_BUDGET)
    m = n1 if n2 is None else n2
    per_pair = {"full": o * o, "diagonal": o, "trace": 1}[kind]
    kernel = n1 * m * per_pair * itemsize * (1 + blocks)
    layout = 0 if kind == "trace" else kernel
    rows = o * max(o_raw, JACOBIAN_ROW_COPIES * jacobian_numel) * itemsize
    peak = kernel + max(layout, rows)
    if peak <= limit:
        return max(rows, limit - kernel) if max_memory is None else max_memory
    shape = {"full": (n1, m, o, o), "diagonal": (n1, m, o), "trace": (n1, m)}[kind]
    flat = (
        f" (the output {output_shape} per example, flattened)"
        if len(output_shape) > 1 and o == o_raw
        else ""
    )
    raise NtkBudgetError(
        f"empirical_ntk(kind={kind!r}) with O={o} outputs per example{flat} is estimated at "
        f"{gib(peak)}: the kernel {shape}{f' and {blocks} blocks' if blocks else ''} "
        f"{gib(kernel)}{' (twice at the end, for its layout)' if layout >= rows else ''} and "
        f"one example's rows ({o} outputs x {max(o_raw, JACOBIAN_ROW_COPIES * jacobian_numel)}) "
        f"{gib(rows)}, more than "
        f"max_memory={gib(limit)}. Fixes: {_fixes(kind, memory=True)}",
        {"bytes": peak, "kernel_bytes": kernel, "row_bytes": rows, "max_memory": limit},
    )


def check_seconds(
    estimate: Mapping[str, Any], limit: Optional[float] = None, *, kind: Optional[str] = None
) -> None:
    """Refuse a tracker configuration whose estimated time per measurement exceeds ``limit``
    (default :data:`SECONDS_LIMIT`), for ``kind="auto"`` and forced settings alike.

    Args:
        estimate: an estimate dict of :func:`estimate_ntk_cost` (``"seconds"``, ``"n"``,
            ``"o"``, ``"o_raw"``, ``"p"``), e.g. a tracker's ``kernel_config["estimate"]``.
        limit: seconds; None: :data:`SECONDS_LIMIT` (read at call time).
        kind: the kernel kind estimated (for the fixes offered).

    Raises:
        NtkBudgetError: the estimate exceeds the limit; the message has it and the fixes.
    """
    limit = SECONDS_LIMIT if limit is None else limit
    seconds = float(estimate.get("seconds", 0.0))
    if not math.isfinite(seconds) or seconds <= limit:  # nan/inf: no time model to judge by
        return
    raise NtkBudgetError(
        f"one kernel measurement is estimated at {seconds:,.0f} s (N={estimate.get('n')}, "
        f"O={estimate.get('o_raw')} outputs, {estimate.get('o')} after projection, "
        f"P={estimate.get('p')} parameters), more than the limit of {limit:g} s (10x the "
        f"per-measurement budget of kind='auto'). Fixes: {_fixes(kind, memory=False)}",
        {"seconds": seconds, "limit": limit},
    )


def check_probe_size(
    n: int, max_memory: Optional[int], *, itemsize: int = 4, kernel_copies: int = 1
) -> None:
    """Refuse a probe too large for ``max_memory`` before its first forward: even the smallest
    measurement (a trace kernel, ``N × N``, ``kernel_copies`` copies, and its float64
    eigendecomposition, ``3·N²`` float64) must fit. ``max_memory=None``: no check.

    Raises:
        NtkBudgetError: the smallest measurement does not fit; the message gives the largest
            probe that does.
    """
    if max_memory is None:
        return
    per_pair = itemsize * kernel_copies + 3 * 8
    need = n * n * per_pair
    if need <= max_memory:
        return
    fits = math.isqrt(max_memory // per_pair)
    raise NtkBudgetError(
        f"a probe of N={n} examples needs at least {gib(need)} per measurement (the smallest "
        f"kernel, kind='trace', is N x N: {kernel_copies} copies and its float64 "
        f"eigendecomposition), more than max_memory={gib(max_memory)}; use a smaller probe "
        f"(N <= {fits} fits) or a larger max_memory",
        {"bytes": need, "max_memory": max_memory, "max_probe_size": fits},
    )
