"""Structured derivatives: per-layer factorised kernels from one batched backward pass.

For a weight used as ``y = a Wᵀ (+ b)`` -- ``F.linear`` with any leading dims, ``F.conv1d`` /
``F.conv2d`` after unfolding the input (stride, padding incl. ``"same"``, dilation, groups),
``F.embedding`` with a one-hot input, ``a @ W (+ b)`` with the parameter as right operand
(``torch.addmm``/``mm``/``matmul``: HF ``Conv1D``, treated as a Linear with weight ``Wᵀ``) --
the Jacobian of example ``n``, output ``a`` is

    ∂f_a(x_n)/∂W = Σ_t G[n, a, t]ᵀ A[n, t]          G = ∂f_a/∂y (N, O, T, d_out), A (N, T, d_in)

so ``K_W[n,m,a,b] = Σ_{t,s} (G[n,a,t]·G[m,b,s]) (A[n,t]·A[m,s])`` (Novak et al. 2022,
"Fast Finite Width Neural Tangent Kernel", structured derivatives) and ``K_b = (Σ_t G)(Σ_s G)ᵀ``
for the bias. ``G`` for all examples comes from ``O`` backward passes of the one-hot output
cotangents through the *batched* output: in eval semantics examples are independent, so
``∂f_a(x_n)/∂y_m = 0`` for ``m ≠ n``. Affine normalisations ``y = x̂·γ + β`` (BatchNorm with
running statistics, GroupNorm, LayerNorm, ``F.rms_norm``) get direct per-example rows
``dγ = Σ_t G·x̂``, ``dβ = Σ_t G``; so does a parameter ``P`` broadcast over the examples in an
out-of-place ``x * P``, ``x + P``, ``x - P``, ``P - x`` or ``torch.add(x, P, alpha=c)`` against
a per-example ``x`` (HF RMSNorm ``weight * x``, ViT ``x + position_embeddings``, LayerScale)
or in ``P.expand(N, ...)`` (a class token): ``dP[n] = c·Σ G[n](·x[n])`` over the broadcast
dims (:mod:`.broadcast`). Each layer is then contracted with the cheapest exact
strategy of :mod:`.cost` (outer product, Gram over positions, or per-example gradients built
from ``(G, A)``), with matmuls and bounded memory.

Every captured use is verified to be per-example before its rule is trusted (a probe pass on
two examples, :func:`_verify_batch_mapping`): dim 0 of the use's output and input must be the
probe's batch, the gradient of example 0's outputs must vanish on every other row of the
use's output and that of example 1's outputs on example 0's row. A Linear-type use may
instead hold ``N·r`` rows on dim 0 (positions flattened, ``x.view(-1, d)``) if example 0's
gradient lives only in the first ``r`` rows (contiguous per example). Sequence-first layouts
(``nn.MultiheadAttention``, ``batch_first=False`` encoders, even when ``T == N``),
position-major ``(T·N, d)`` rows and uses whose rows other examples read (a sum over the
batch after them) fail the check, and exactly those parameters go to the fallback. A
supported op on an input shared by the batch (GPT-2's and BERT's position ids ``(1, T)``)
runs once and hands the model its output expanded to ``(N, ...)`` (input expanded likewise),
so that its weight gets per-example factors: kept only if the probe's output stays bitwise
that of a plain forward (code reading ``.shape[0]`` of the output, or a view that needs its
size-1 dim, sends those parameters to the fallback) and the expanded use passes the check
(``pos[0]`` does not), then expanded the same way on every pass. The verdict is cached per
module for an identical traced structure, probe and module state
(:func:`_cached_verification`); the whole plan with its memory split is remembered for
identical shapes, module attributes, output function and probe examples (:mod:`.._memo`), so
repeated calls on one probe (a tracker's) skip the probe pass entirely, while every factor
pass still checks that the uses it captures are the plan's.

Uses are found with a :class:`torch.overrides.TorchFunctionMode` that sees every torch call on
the parameter tensors passed to ``functional_call``: a parameter gets the structured rule only
if *all* its uses are supported ops in the same role (several uses of one Linear/Conv weight,
e.g. a module applied twice, are concatenated along positions), or if they are Linear-type and
Embedding uses of one 2-D weight of different kinds -- a tied input embedding and LM head,
``F.linear(x, W)`` with ``x @ W`` -- which :mod:`.tied` contracts on the rows of the occurring
token ids plus a Linear strategy on the other rows. ``W.t()``/``W.T`` is an alias of ``W``
with the other orientation. A parameter used any other way (left matmul operand, a custom op,
an Embedding with ``max_norm``/``scale_grad_by_freq``) falls back to the Jacobian
contraction in the same call. Outputs of supported ops that the model later modifies in place
(``ReLU(inplace=True)``) are detected through their version counter and the pass is redone with
a copy, so ``G`` is always the gradient at the op's own output.

When the factors of all layers for all examples exceed the factor budget, consecutive layer
groups are processed one after the other (:func:`_work_plan`). Groups end at *cut points*
where the probe has them -- a layer input every autograd path from the output to the earlier
layers goes through (:func:`_cut_points`: ResNet block inputs, a transformer's residual
stream) -- and run last group first, each caching ``∂out/∂h`` at its cut so that the next
group's backward starts there (:class:`_CutPass`, re-verified on every pass's own graph).

Modules, each importing only those listed before it: :mod:`.ops` (argument binding of the
supported ops, multiply-add counts), :mod:`.broadcast` (elementwise and expand rules,
batch-shared inputs), :mod:`.capture` (uses, batch-mapping verification and its cache),
:mod:`.contract` (factors and contraction strategies), :mod:`.tied` (weights with uses of
different kinds), :mod:`.planning` (rules, strategies, auto's choice), :mod:`.cuts` (cut
points), :mod:`.passes` (factor passes), :mod:`.memory` (layer groups, example blocks),
:mod:`.ntk` (:func:`structured_ntk`). A test that monkeypatches a name patches the module that
*looks it up* (e.g. ``ntk.jacobian_ntk``, ``planning.choose_strategy``, ``passes._factors``):
a patch on this package would not reach the code.
"""

from __future__ import annotations

from .capture import _forward as _forward
from .capture import _verify_batch_mapping as _verify_batch_mapping
from .cuts import _cut_points as _cut_points
from .memory import _name_bytes as _name_bytes
from .memory import _work_plan as _work_plan
from .ntk import _probe_plan as _probe_plan
from .ntk import structured_ntk
from .planning import _make_plan as _make_plan

__all__ = ["structured_ntk"]
