"""Per-layer cost model of the structured contractions (Novak et al. 2022, Tables 1–2).

A weight used as ``y = a Wᵀ`` at ``T`` positions per example (1 for a plain Linear, the output
pixels of a convolution, the sequence length of a Linear on ``(N, T, d)``), in ``g`` groups of
``d_in -> d_out`` features, has per-example gradient ``dW[n, a] = G[n, a]ᵀ A[n]`` with output
gradients ``G (N, O, T, d_out)`` and inputs ``A (N, T, d_in)``. Three exact ways to get its
kernel block (multiply-adds for ``N`` examples on each side, per group):

=====================  ==============================================  =======================
strategy               time                                            extra memory
=====================  ==============================================  =======================
``outer`` (T = 1)      ``N²O²·d_out + N²·d_in``                        ``N²O²``
``gram``               ``N²·(T²·d_in + γ·(T²·O·d_out + T·O²·d_out))``  ``chunk·N·T·O·d_out``
``per_example``        ``N·O·T·d_out·d_in + N²O²·d_out·d_in``          ``chunk·N·O·d_in``
=====================  ==============================================  =======================

``γ = 2.5`` (:data:`GRAM_INEFFICIENCY`) weights the products that build and consume
``Z = (A_n A_mᵀ) G_m``: their inner dimension is only ``T`` and ``Z`` (``N²·T·O·d_out``
elements) is read only ``O`` times, so per multiply-add they run 2-3x slower than the large
GEMMs of the other strategies on the reference 2-core CPU, with ``Z`` formed one column
example at a time so that it stays in cache. Calibration (CNN 3->64->128->256, conv 3, the
two strategies alternating in one process): N = 32, Gram 0.54 s against per-example 0.9 s
(whole kernel 1.53 s vs 1.89 s); N = 128, Gram 7% slower for the whole kernel (11.1 s vs
10.3 s, medians of 5) -- a plain FLOP count favours Gram by 1.8x at both sizes. The
pairwise terms are scaled by the fraction of example pairs a symmetric kernel contracts
(``pairs``; the per-example builds are not), which is what separates the two sizes. (With
``Z`` formed for all columns at once and read back from memory, γ was ~4.) The choice is
therefore a time model, not a pure FLOP count.

``gram`` is Novak et al.'s structured-derivatives contraction over positions
(``K = Σ_{t,s} (G_t·G_s)(A_t·A_s)``, evaluated as ``G_nᵀ (A_n A_mᵀ) G_m``), ``per_example``
their Jacobian contraction restricted to the layer, with the per-example Jacobian built
cheaply from ``(G, A)`` instead of by backpropagation. ``gram`` wins when positions are few and
features many (late conv layers, short sequences), ``per_example`` when positions are many and
the weight is small (early conv layers). Memory of both is bounded by chunking, so the choice
is made on time alone; the layer factors themselves cost ``O·T·d_out + T·d_in`` per example.
When ``per_example`` wins and the per-example gradients (``O·d_out·d_in``) are no larger than
those factors, the structured engine builds them once per block of examples and keeps them
instead of ``(G, A)`` (strategy ``stored``): same arithmetic, no rebuilding per pair of
example blocks.

``builds`` counts how often each example's per-example gradients are built: 1 whenever the
factors of the parameters being contracted fit the factor budget for all examples. When all
factors together do not fit, the structured engine contracts consecutive *groups* of layers
whose factors do (one forward and one backward down to the group's first layer per group),
so ``builds`` stays 1; only a layer whose factors alone exceed the budget is processed in
example blocks and gets ``builds = 1 + column blocks``. Besides the contractions, every
structured kernel costs ``O`` backward passes of the probe (``O·N`` per-example input
gradients, about one forward's multiply-adds each); layer groups that end at cut points
start their backward at the cut, so that is about one backward of the network in all
(ResNet-18 at N = 128, O = 10: ~30 s of factor passes against ~52 s of contractions).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

__all__ = [
    "GRAM_INEFFICIENCY",
    "OP_COST",
    "PassModel",
    "choose_path",
    "choose_strategy",
    "contraction_calls",
    "strategy_costs",
    "tied_costs",
]

GRAM_INEFFICIENCY = 2.5
GRAM_MIN_OUTPUTS = 8


def strategy_costs(
    n: int,
    o: int,
    t: int,
    d_in: int,
    d_out: int,
    groups: int = 1,
    builds: float = 1.0,
    pairs: float = 1.0,
) -> dict:
    """Estimated cost (multiply-adds, Gram's ``Z`` products weighted by ``γ``) of each
    applicable strategy for one weight (see module docstring).

    ``builds``: how many times each example's per-example gradients are built. 1 when all
    examples fit in one block; when examples are processed in blocks (memory budget), a row
    block's gradients are rebuilt for every column block that streams past it.
    ``pairs``: the fraction of the ``N²`` example pairs actually contracted (a symmetric
    kernel contracts only its upper sub-blocks: :func:`~._common.symmetric_fraction`); it
    scales every pairwise term but not the per-example builds, so it favours Gram at small N.
    """
    # the product that reads Z, G_n (O x T·d_out) Z (T·d_out x O) per row example, is a
    # batch of tiny O x O results below GRAM_MIN_OUTPUTS outputs: proportionally slower (BERT
    # layers at O = 4, T = 8: ~0.7·10⁹ vs ~1.7·10⁹ multiply-adds/s for the other strategies)
    gamma = GRAM_INEFFICIENCY * max(1.0, GRAM_MIN_OUTPUTS / o)
    costs = {
        "gram": pairs
        * groups
        * n
        * n
        * (t * t * d_in + gamma * (t * t * o * d_out + t * o * o * d_out)),
        "per_example": groups
        * (builds * n * o * t * d_out * d_in + pairs * n * n * o * o * d_out * d_in),
    }
    if t == 1:
        costs["outer"] = pairs * groups * (n * n * o * o * d_out + n * n * d_in)
    return costs


def tied_costs(
    n: int,
    o: int,
    positions: Mapping[str, int],
    vocab: int,
    d: int,
    rows: int,
    builds: float = 1.0,
    pairs: float = 1.0,
) -> dict:
    """Estimated cost of each strategy for a weight ``W (vocab, d)`` with uses of different
    kinds (:mod:`.structured.tied`): ``positions`` per example of its ``"linear"``
    (``y = a Wᵀ``), ``"transposed"`` (``y = a @ W``) and ``"embedding"`` uses; ``rows``: the
    rows of ``W`` the embedding ids of a pair of example blocks can touch, at most.

    * ``tied``: per-example gradients of every row, built from the factors
      (``N·O·T·vocab·d``) and contracted (``N²O²·vocab·d``);
    * ``tied+<rest>`` (an embedding and dense uses of one orientation only): the same on the
      ``rows`` rows, plus the Linear strategy ``rest`` (``gram``/``outer`` of
      :func:`strategy_costs`) of the dense uses on the others.
    """
    t_all = sum(positions.values())

    def rows_cost(s: int) -> float:
        return builds * n * o * t_all * s * d + pairs * n * n * o * o * s * d

    costs = {"tied": rows_cost(vocab)}
    dense = [p for p in ("linear", "transposed") if positions.get(p)]
    if positions.get("embedding") and len(dense) == 1 and rows < vocab:
        d_in, d_out = (d, vocab) if dense[0] == "linear" else (vocab, d)
        rest = strategy_costs(n, o, positions[dense[0]], d_in, d_out, builds=builds, pairs=pairs)
        rest.pop("per_example")  # no cheaper than every row at once
        for k, v in rest.items():
            costs[f"tied+{k}"] = rows_cost(rows) + v
    return costs


def choose_strategy(
    n: int,
    o: int,
    t: int,
    d_in: int,
    d_out: int,
    groups: int = 1,
    dense_input: bool = True,
    builds: float = 1.0,
    pairs: float = 1.0,
) -> str:
    """The cheapest exact strategy; ``dense_input=False`` (Embedding: ``A`` is one-hot, so
    per-example gradients would be ``vocab``-sized) restricts to ``outer``/``gram``."""
    costs = strategy_costs(n, o, t, d_in, d_out, groups, builds, pairs)
    if not dense_input:
        costs.pop("per_example")
    return min(costs, key=costs.__getitem__)


# Whole-call choice (``implementation="auto"``): structured blocks, a Jacobian remainder, or the
# Jacobian path for everything. Time in multiply-add equivalents: arithmetic plus a fixed cost
# per torch call, ``OP_COST`` (dispatch and Python, ~10 µs on the reference 2-core CPU at
# ~2·10⁹ multiply-adds/s), ``VMAP_CALL_FACTOR`` times more under ``vmap`` (batching rules,
# wrapper tensors). On tiny transformers the calls dominate: a structured kernel of a 2-layer
# Llama makes ~10x more calls than the Jacobian path's two vmapped passes.
OP_COST = 2.0e4
VMAP_CALL_FACTOR = 3.0
# The structured passes and contractions are many mid-size calls (per-layer factors, Gram
# loops, symmetric sub-blocks) against the Jacobian path's few large vmapped GEMMs: priced
# this much dearer per multiply-add, so that ``auto`` leaves the Jacobian path only for a
# clear gain (calibrated on benchmarks/bench_transformers.py, N = 32).
STRUCTURED_OVERHEAD = 1.5
# Jacobian rows held per parameter group (:data:`.jacobian._GROUP_ELEMENTS`): every group
# repeats the vmapped forward and backward passes.
JACOBIAN_GROUP_ELEMENTS = 2**24


@dataclasses.dataclass(frozen=True)
class PassModel:
    """What the passes of one kernel cost: ``n`` examples, ``o`` outputs, ``fp`` multiply-adds
    of one example's forward, ``calls`` torch calls of one forward, ``pairs`` the fraction
    of example pairs contracted (:func:`~._common.symmetric_fraction`), ``sym_blocks`` the
    sub-block pairs a symmetric contraction visits (1 for a rectangular kernel)."""

    n: int
    o: int
    fp: float
    calls: int
    pairs: float = 1.0
    sym_blocks: int = 1

    def jacobian_rows(self, numel: int, weight_macs: float) -> float:
        """``vmap(jacrev)`` rows of parameters with ``numel`` entries and ``weight_macs``
        multiply-adds per example in the ops that use them, plus their contraction: a forward
        and ``O`` backward passes (input gradients ~[FP] each) per parameter group."""
        if numel == 0:
            return 0.0
        n, o = self.n, self.o
        groups = max(1, math.ceil(n * o * numel / JACOBIAN_GROUP_ELEMENTS))
        calls = 3 * self.calls * VMAP_CALL_FACTOR * OP_COST
        passes = groups * (n * self.fp + n * o * self.fp + calls)
        return passes + n * o * weight_macs + self.pairs * n * n * o * o * numel

    def factor_passes(self) -> float:
        """The structured factor passes: a forward and one batched backward of ``O``
        cotangents (``is_grads_batched``: vmapped calls)."""
        calls = self.calls * (1 + 2 * VMAP_CALL_FACTOR) * OP_COST
        return self.n * self.fp + self.n * self.o * self.fp + calls


def contraction_calls(strategy: str, n: int, sym_blocks: int, d_out: int = 1) -> int:
    """Rough torch calls of one parameter's contraction (per symmetric sub-block pair: the
    Gram strategy loops over the column examples of each pair, per-example builds loop over
    output-channel chunks)."""
    per_pair = {"outer": 8, "stored": 3, "row": 3, "per_example": 8}.get(strategy)
    if strategy == "gram":
        per_pair = 6 + 2 * max(1, n // max(1, sym_blocks))
    return sym_blocks * (per_pair or 8) + 6


def choose_path(
    model: PassModel,
    structured: Mapping[str, tuple[float, int, float]],
    forced: Mapping[str, tuple[int, float]],
) -> tuple[str, set[str], dict[str, float]]:
    """``(path, moved, costs)``: the cheapest of three plans for one kernel.

    ``structured``: name -> (cost of its structured contraction, numel, multiply-adds of its
    uses per example) for every parameter with a structured rule; ``forced``: name -> (numel,
    multiply-adds) for those without (the Jacobian remainder). Plans:

    * ``"structured"``: every structured parameter factorised, the remainder (if any) by
      Jacobian rows: factor passes + contractions + the remainder's passes;
    * ``"mixed"``: as above, but a structured parameter whose Jacobian rows cost less than
      its contraction, once the remainder's passes are paid anyway, joins the remainder
      (``moved``); without a remainder, the passes are paid for the first parameter moved;
    * ``"jacobian"``: the Jacobian path for every parameter.

    The remainder's passes cost about a whole Jacobian path's passes, so a structured plan
    with a remainder must save more in contractions than its factor passes cost; ``auto``
    takes whichever is cheapest and is therefore never priced above the Jacobian path.
    """
    f_numel = sum(v[0] for v in forced.values())
    f_macs = sum(v[1] for v in forced.values())
    all_numel = f_numel + sum(v[1] for v in structured.values())
    all_macs = f_macs + sum(v[2] for v in structured.values())
    costs = {"jacobian": model.jacobian_rows(all_numel, all_macs)}
    s_total = sum(v[0] for v in structured.values())
    costs["structured"] = STRUCTURED_OVERHEAD * (
        (model.factor_passes() if structured else 0.0) + s_total
    ) + model.jacobian_rows(f_numel, f_macs)
    # marginal Jacobian cost of one more parameter once the remainder's passes are paid
    pairwise = model.pairs * model.n * model.n * model.o * model.o
    moved = {
        k
        for k, (cost, numel, macs) in structured.items()
        if model.n * model.o * macs + pairwise * numel < STRUCTURED_OVERHEAD * cost
    }
    if moved and len(moved) < len(structured):
        keep = {k: v for k, v in structured.items() if k not in moved}
        costs["mixed"] = STRUCTURED_OVERHEAD * (
            model.factor_passes() + sum(v[0] for v in keep.values())
        ) + model.jacobian_rows(
            f_numel + sum(structured[k][1] for k in moved),
            f_macs + sum(structured[k][2] for k in moved),
        )
    path = min(costs, key=costs.__getitem__)
    return path, (moved if path == "mixed" else set()), costs
