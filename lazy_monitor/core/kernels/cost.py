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

__all__ = ["GRAM_INEFFICIENCY", "choose_strategy", "strategy_costs"]

GRAM_INEFFICIENCY = 2.5


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
    costs = {
        "gram": pairs
        * groups
        * n
        * n
        * (t * t * d_in + GRAM_INEFFICIENCY * (t * t * o * d_out + t * o * o * d_out)),
        "per_example": groups
        * (builds * n * o * t * d_out * d_in + pairs * n * n * o * o * d_out * d_in),
    }
    if t == 1:
        costs["outer"] = pairs * groups * (n * n * o * o * d_out + n * n * d_in)
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
