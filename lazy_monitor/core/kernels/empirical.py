"""Public entry point of the empirical NTK engine: :func:`empirical_ntk`."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .._functional import (
    FunctionalModel,
    InputBatch,
    OutputFn,
    _leaves,
    batch_size,
    compute_dtype,
    resolve_params,
    side_effect_guard,
)
from ._common import KINDS, _BlockSink, finalize, kernel_shape
from .jacobian import jacobian_ntk
from .ntvp import ntvp_ntk
from .structured import structured_ntk

__all__ = ["NtkImplementation", "empirical_ntk"]


class NtkImplementation(str, enum.Enum):
    """How :func:`empirical_ntk` computes ``K = J Jᵀ`` (Novak et al. 2022, Tables 1–2).

    Notation: N examples, O outputs per example, P parameters, [FP] the cost of one forward
    pass, per layer ``T`` positions (sequence length / output pixels), ``d_in``/``d_out`` its
    input/output features.

    * ``JACOBIAN`` -- materialise per-example Jacobian rows ``J_p (N, O, P_p)`` one parameter
      block at a time (``vmap(jacrev)``) and contract ``J_p J_pᵀ``. Time ``N·O·[FP] + N²O²P``,
      memory ``N·O·max_p P_p``. Works for every model ``torch.func`` can ``vmap``; the
      reference baseline.
    * ``NTVP`` -- NTK-vector products: for each row ``(n, a)`` a vjp gives ``J[n, a]`` and one
      jvp through the whole second batch gives the column ``J(x2) J[n, a]ᵀ``. Time
      ``N²·O·[FP]``, memory ``chunk·O·P``. Never materialises ``J(x2)``; useful when ``P`` is
      huge and ``N`` tiny, otherwise slow.
    * ``STRUCTURED`` -- per-layer factorisation: for a weight used as ``y = a Wᵀ`` (Linear
      with any leading dims, Conv1d/2d via unfold, Embedding via index matching) the
      per-example gradient is ``G_{na}ᵀ A_n`` with ``G`` the output-gradients at the layer
      output (O backward passes of one-hot cotangents through the batched output, for all
      examples at once) and ``A`` the layer input, so
      ``K_W[n,m,a,b] = Σ_{t,s} (G[n,a,t]·G[m,b,s]) (A[n,t]·A[m,s])`` is computed with matmuls:
      as an outer product (one position), a Gram matrix over positions, or from per-example
      gradients built from ``(G, A)``, whichever the cost model of
      :mod:`lazy_monitor.core.kernels.cost` finds cheapest for that layer. Biases and the
      affine parameters of BatchNorm (running statistics) / GroupNorm / LayerNorm get direct
      per-example rows (``Σ_t G``, ``Σ_t G·x̂``). Time ``O·[FP]`` for the factors plus e.g.
      ``N²O²·d_out + N²·d_in`` per Linear; memory ``N·O·Σ|y| + N·Σ|x|`` for the factors,
      bounded by processing examples in blocks. Any other parameter (custom ops, weights used
      through ``matmul``, a tied weight shared by different ops) falls back to ``JACOBIAN``
      inside the same call, so the result is always exact.
    * ``AUTO`` -- the default: ``STRUCTURED`` with its per-layer cost-model choices (and the
      Jacobian contraction for parameters without a structured rule). The two names give the
      same computation today; ``AUTO`` is the one to use, ``STRUCTURED`` pins the method.

    When to choose: ``AUTO`` always, except to cross-check (``JACOBIAN`` is the most direct
    formula) or when ``N`` is tiny and a single Jacobian row block would not fit (``NTVP``).
    """

    JACOBIAN = "jacobian"
    NTVP = "ntvp"
    STRUCTURED = "structured"
    AUTO = "auto"

    @classmethod
    def parse(cls, value: Union[str, NtkImplementation]) -> NtkImplementation:
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        allowed = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"`implementation` must be one of {allowed}, got {value!r}")


def _check_kind(kind: str) -> str:
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"`kind` must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    return kind


def _check_chunk_size(chunk_size: Optional[int]) -> Optional[int]:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"`chunk_size` must be a positive int (examples per block) or None, got {chunk_size!r}"
        )
    return chunk_size


def _device_of(x: InputBatch) -> torch.device:
    return _leaves(x)[0][1].device


def _probe_output_size(fm: FunctionalModel, params: Mapping[str, Tensor], x: InputBatch) -> int:
    """Run the forward once (no graph) to validate the output and read ``O``."""
    with torch.no_grad():
        out = fm(params, x)
    if out.shape[1] == 0:
        raise ValueError("the model output has 0 entries per example; nothing to differentiate")
    return out.shape[1]


def _check_examples_independent(model: nn.Module) -> None:
    """BatchNorm without running statistics normalises with batch statistics even in eval
    mode, so an example's output depends on the rest of the batch: no per-example NTK."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            module.running_mean is None or module.running_var is None
        ):
            raise ValueError(
                f"{name or type(model).__name__} ({type(module).__name__}) has no running "
                "statistics (track_running_stats=False), so it normalises with batch statistics "
                "even in eval mode and examples are not independent; the empirical NTK is "
                "defined per example. Use track_running_stats=True (or GroupNorm/LayerNorm)."
            )


def _check_same_outputs(o1: int, o2: int) -> None:
    if o1 != o2:
        raise ValueError(
            f"the model gives {o1} outputs per example on x1 but {o2} on x2; the kernel needs "
            "the same output size for both (e.g. equal sequence lengths)"
        )


def empirical_ntk(
    model: nn.Module,
    x1: InputBatch,
    x2: Optional[InputBatch] = None,
    *,
    kind: str = "full",
    implementation: Union[str, NtkImplementation] = "auto",
    params: Optional[Mapping[str, Tensor]] = None,
    output_fn: Optional[OutputFn] = None,
    chunk_size: Optional[int] = None,
    return_blocks: bool = False,
) -> Union[Tensor, tuple[Tensor, dict[str, Tensor]]]:
    """Empirical neural tangent kernel ``K(x, x') = J(x) J(x')ᵀ``, ``J = ∂f/∂θ``.

    Jacot et al. 2018; computed as in Novak et al. 2022, "Fast Finite Width Neural Tangent
    Kernel". With ``f(x) ∈ R^O`` the model output flattened per example,

        K[n, m, a, b] = Σ_p ∂f_a(x1_n)/∂θ_p · ∂f_b(x2_m)/∂θ_p.

    The model is evaluated in eval semantics (BatchNorm with running statistics, dropout off)
    on a functional copy of its parameters and buffers: its weights, buffers, ``.grad``,
    train/eval flags and RNG states are left untouched. Works inside ``torch.no_grad()`` and
    ``torch.inference_mode()``; TF32 and autocast are disabled for the computation. Examples
    are assumed independent in eval mode (no layer mixes examples of a batch), as for any
    per-example NTK.

    Args:
        model: the network. Its output (after ``output_fn``) must be batched on dim 0.
        x1: probe inputs: a tensor, a tuple/list of tensors (passed positionally) or a dict of
            tensors (passed as keyword arguments), all batched on dim 0 with ``N1`` examples.
        x2: second inputs (``N2`` examples), same structure; ``None`` means ``x1`` and the
            symmetry ``K[n, m] = K[m, n]ᵀ`` is exploited.
        kind: ``"full"`` -> ``(N1, N2, O, O)``; ``"trace"`` -> ``(N1, N2)`` = ``Σ_a K[:, :, a, a]``
            (the sum, not neural-tangents' mean); ``"diagonal"`` -> ``(N1, N2, O)`` =
            ``K[:, :, a, a]``.
        implementation: ``"auto"`` (default), ``"structured"``, ``"jacobian"`` or ``"ntvp"``
            (or an :class:`NtkImplementation`); see its docstring for the math, cost and when
            to choose each. All give the same kernel up to floating-point rounding.
        params: ``{name: tensor}`` of parameters to differentiate, names as in
            ``model.named_parameters()``; values replace the model's for this computation.
            Default: every parameter with ``requires_grad=True`` (frozen ones are constants).
            A tied parameter counts once, with the Jacobian summed over its uses.
        output_fn: maps the model's output to a tensor, e.g. ``lambda out: out.logits``.
        chunk_size: examples per block whose Jacobian rows / layer factors are held in memory
            at once (peak memory grows linearly with it). ``None``: as many as a ~1 GiB
            budget allows (everything at once for small models).
        return_blocks: also return the per-parameter kernels.

    Returns:
        The kernel, detached, on the inputs' device, float32 (float64 if the parameters or
        inputs are float64). With ``return_blocks=True`` a tuple ``(kernel, blocks)`` where
        ``blocks`` maps each differentiated parameter name (tied parameters under their first
        name) to its block ``J_p J_pᵀ`` of the kernel's shape; ``sum(blocks.values()) ==
        kernel``. Group names by ``name.rpartition(".")[0]`` for per-layer kernels.

    Raises:
        ValueError: unknown ``kind``/``implementation``, invalid ``chunk_size``, an empty batch,
            mismatched batch sizes, an output without a batch dimension, no trainable
            parameter, ``x2`` structured differently from ``x1`` or giving a different output
            size, or a BatchNorm without running statistics (examples not independent).
        TypeError: inputs that are not tensors (or containers of tensors), floating inputs
            needed where integer tensors were given, a non-tensor output without
            ``output_fn``.
        RuntimeError: (``"structured"``/``"auto"``) a parameter used differently on some
            examples than on the first one (data-dependent control flow): use
            ``"jacobian"``.

    Example::

        k = empirical_ntk(model, x_probe)                       # (N, N, O, O)
        k_tr, blocks = empirical_ntk(model, x_probe, kind="trace", return_blocks=True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    kind = _check_kind(kind)
    impl = NtkImplementation.parse(implementation)
    chunk_size = _check_chunk_size(chunk_size)
    n1 = batch_size(x1)
    n2 = None if x2 is None else batch_size(x2)
    if (
        x2 is not None
        and type(x2) is not type(x1)
        and not (isinstance(x1, (tuple, list)) and isinstance(x2, (tuple, list)))
    ):
        raise ValueError(
            f"x1 is a {type(x1).__name__} but x2 is a {type(x2).__name__}; both must have the "
            "same structure"
        )
    named = resolve_params(model, params)
    _check_examples_independent(model)
    dtype = compute_dtype(named, x1 if x2 is None else [*_flat(x1), *_flat(x2)])
    device = _device_of(x1)

    with side_effect_guard(model):
        fm = FunctionalModel(model, output_fn, dtype)
        # Parameters that are not differentiated are constants; cast the ones whose dtype
        # differs (e.g. a frozen float16 layer) so the forward runs in one dtype.
        fm.buffers.update(
            {
                k: v.detach().to(dtype)
                for k, v in model.named_parameters()
                if k not in named and v.is_floating_point() and v.dtype != dtype
            }
        )
        # Cloned so that nothing the forward might do in place reaches the module's weights.
        p = {k: v.clone() for k, v in fm.cast_params(named).items()}
        xa = fm.cast_inputs(x1)
        xb = None if x2 is None else fm.cast_inputs(x2)
        names = list(p)
        if impl in (NtkImplementation.JACOBIAN, NtkImplementation.NTVP):
            n_out = _probe_output_size(fm, p, xa)
            if xb is not None:
                _check_same_outputs(n_out, _probe_output_size(fm, p, xb))
            sink = _BlockSink(
                kind,
                kernel_shape(kind, n1, n2 or n1, n_out),
                dtype,
                device,
                return_blocks,
                symmetric=xb is None,
            )
            compute = jacobian_ntk if impl is NtkImplementation.JACOBIAN else ntvp_ntk
            compute(fm, p, names, xa, xb, n1, n2, n_out, sink, chunk_size)
        else:
            sink = structured_ntk(
                fm, p, xa, xb, n1, n2, kind, dtype, device, return_blocks, chunk_size
            )
        if sink.blocks is not None:
            for name in names:
                sink.declare(name)
    kernel = finalize(sink.kernel.detach(), kind)
    if return_blocks:
        assert sink.blocks is not None
        return kernel, {k: finalize(sink.blocks[k].detach(), kind) for k in names}
    return kernel


def _flat(x: InputBatch) -> list[Tensor]:
    return [t for _, t in _leaves(x)]
