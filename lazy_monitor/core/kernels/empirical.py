"""Public entry point of the empirical NTK engine: :func:`empirical_ntk`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from lazy_monitor._validation import check_callable

from .._functional import (
    FunctionalModel,
    InputBatch,
    OutputFn,
    _leaves,
    batch_size,
    compute_dtype,
    resolve_params,
    sample_threads,
    select_output,
    settle_threads,
    side_effect_guard,
    slice_batch,
)
from ._common import (
    _FACTOR_BUDGET,
    _BlockSink,
    check_same_outputs,
    finalize,
    kernel_shape,
    warn_once,
)
from ._memo import ModelMemo, call_key
from .config import NtkConfig, NtkImplementation
from .errors import NtkBudgetError, StructuredPlanError, check_materialized, probe_error
from .estimate import check_engine_memory
from .jacobian import JacobianRows, jacobian_ntk
from .ntvp import ntvp_ntk
from .structured import structured_ntk

__all__ = ["NtkImplementation", "empirical_ntk", "empirical_ntk_fn", "projection_matrix"]


def _device_of(x: InputBatch) -> torch.device:
    return _leaves(x)[0][1].device


def _output_shape(
    model: nn.Module,
    fm: FunctionalModel,
    params: Mapping[str, Tensor],
    x: InputBatch,
    name: str,
) -> tuple[int, ...]:
    """The selected output's shape per example (e.g. ``(T, V)``), from one example's forward
    (no graph). The model's own error on its input names the user's batch shape (the forward is
    rerun on the whole batch for the message, not on the internal one-example slice)."""
    try:
        with torch.no_grad():
            raw = fm.raw(params, slice_batch(x, slice(0, 1)))
    except (RuntimeError, TypeError) as err:
        try:
            with torch.no_grad():
                fm.raw(params, x)
        except (RuntimeError, TypeError) as whole:
            raise probe_error(whole, model, x, name) from whole
        raise probe_error(err, model, x, name) from err
    out = select_output(raw, fm.output_fn)
    if out.dim() == 0 or out.shape[0] != 1:
        raise ValueError(
            f"the model output has shape {tuple(out.shape)} for one example, which has no batch "
            "dimension of size 1 on dim 0; the output must be batched like the inputs"
        )
    if out[0].numel() == 0:
        raise ValueError("the model output has 0 entries per example; nothing to differentiate")
    return tuple(out.shape[1:])


# The selected output's shape per example, per module (see :mod:`._memo`).
_SHAPES = ModelMemo()


def _jacobian_numel(params: Mapping[str, Tensor], implementation: NtkImplementation) -> int:
    """Size of the largest parameter whose per-example Jacobian rows the call builds for sure:
    any parameter for ``"jacobian"``/``"ntvp"``; none for the structured path, where a tied
    parameter (GPT-2's embedding and LM head, a weight used by ``F.linear`` and ``@``) has a
    structured rule too (:mod:`.structured.tied`, rows of the occurring token ids only)."""
    if implementation in (NtkImplementation.JACOBIAN, NtkImplementation.NTVP):
        return max(v.numel() for v in params.values())
    return 0


def _projected_outputs(projection: Union[None, int, str], o_raw: int) -> int:
    """Outputs per example after ``projection``; a projection to ``k >= O`` is refused."""
    if projection is None:
        return o_raw
    if projection == "sum":
        return 1
    k = int(projection)
    if k >= o_raw:
        raise ValueError(
            f"projection={k} is not smaller than the model's O={o_raw} outputs per example: a "
            "random projection only saves work when k < O (and is an estimate, not the "
            "kernel); use projection=None for the exact kernel, which is cheaper here"
        )
    return k


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
    projection: Union[None, int, str] = None,
    projection_seed: int = 0,
    max_memory: Optional[int] = None,
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
        projection: ``None`` (default): the kernel of the outputs themselves. ``k`` (int): the
            kernel of ``g(x) = Rᵀ f(x) / √k`` with ``R (O, k)`` i.i.d. N(0, 1) drawn from
            ``projection_seed`` (:func:`projection_matrix`; the same seed gives the same ``R``,
            so kernels measured at different times are comparable). ``kind="trace"`` is then
            an unbiased estimate of the exact trace kernel (``E[R Rᵀ] = k·I``) and
            ``kind="full"`` gives ``(N1, N2, k, k)``. The projection is applied to the output
            before any derivative is taken, so the cost scales with ``k``, not ``O``; ``k``
            must be smaller than ``O`` (a projection to ``k >= O`` saves nothing and is still
            an estimate: use ``None``).
            ``"sum"``: the pseudo-NTK (Mohamadi & Sutherland 2023), the kernel of
            ``Σ_o f_o(x) / √O``, ``(N1, N2)`` (``(N1, N2, 1, 1)`` for ``kind="full"``).
            Sequence outputs ``(N, T, V)`` are flattened to ``O = T·V`` first.
        projection_seed: seed of ``R`` (its own ``torch.Generator``; global RNG untouched).
        max_memory: bytes of per-example factors held at once (default: 1 GiB minus the
            kernel). Before anything large is allocated, the call's peak is estimated from one
            example's forward -- the kernel (with its blocks and its final layout copy) and
            one example's rows (``O × O_raw`` output-gradient rows, ``3·O·numel`` for a
            parameter the Jacobian path builds, e.g. a tied embedding) -- and the call is
            refused with :class:`~lazy_monitor.core.kernels.errors.NtkBudgetError` when it
            exceeds ``max(max_memory, 1 GiB)`` (a smaller ``max_memory`` only makes the blocks
            below smaller; see :func:`~lazy_monitor.core.kernels.estimate.check_engine_memory`).
            When the
            structured factors of all layers for all examples do not fit, consecutive groups
            of layers whose factors fit are contracted one after the other (one forward and
            backward per group); a layer too large on its own, and the other implementations,
            work in example blocks sized to fit (``chunk_size`` forces example blocks).
            Forward/backward passes are split so their activations take at most half of it.

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
            A ``projection`` ``k >= O``; parameters without data (meta device, lazy modules):
            materialise the model first.
        NtkBudgetError: (a ValueError) the estimated peak exceeds the memory limit above; the
            message has the estimate and the fixes (``output_fn``, ``projection``, ``kind``, a
            smaller probe, ``max_memory``).
        TypeError: inputs that are not tensors (or containers of tensors), floating inputs
            needed where integer tensors were given, a non-tensor output without
            ``output_fn``.
        RuntimeError: (or TypeError) the model cannot run on ``x1``/``x2``: the model's own
            error with the inputs' shapes and what its first layer expects.
        StructuredPlanError: (``"structured"`` only; a RuntimeError) the structured plan could
            not be made or verified on this model (e.g. data-dependent control flow):
            ``"auto"`` switches to the Jacobian contraction by itself, with one warning, on
            any failure of the structured attempt other than a memory refusal.
        ForwardADUnsupportedError: (``"ntvp"`` only; a NotImplementedError) an op of the model
            has no forward-mode AD rule: use ``"auto"`` or ``"jacobian"``.

    Example::

        k = empirical_ntk(model, x_probe)                       # (N, N, O, O)
        k_tr, blocks = empirical_ntk(model, x_probe, kind="trace", return_blocks=True)
    """
    check_callable("output_fn", output_fn, fix="e.g. output_fn=lambda out: out.logits")
    config = NtkConfig(
        kind=kind,
        implementation=implementation,
        projection=projection,
        projection_seed=projection_seed,
        chunk_size=chunk_size,
        max_memory=max_memory,
    )
    return _compute(model, x1, x2, config, params, output_fn, return_blocks)


def empirical_ntk_fn(
    model: nn.Module,
    *,
    output_fn: Optional[OutputFn] = None,
    return_blocks: bool = False,
    **config: Any,
) -> Callable[..., Union[Tensor, tuple[Tensor, dict[str, Tensor]]]]:
    """``ntk(x1, x2=None, params=None)``: :func:`empirical_ntk` with the configuration bound
    and validated once (neural-tangents' ``empirical_ntk_fn`` style).

    ``config``: ``kind``, ``implementation``, ``projection``, ``projection_seed``,
    ``chunk_size``, ``max_memory`` (see :func:`empirical_ntk`); invalid values raise here.
    The returned function carries the validated :class:`NtkConfig` as ``.config``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_callable("output_fn", output_fn, fix="e.g. output_fn=lambda out: out.logits")
    cfg = NtkConfig(**config)

    def ntk(
        x1: InputBatch,
        x2: Optional[InputBatch] = None,
        params: Optional[Mapping[str, Tensor]] = None,
    ) -> Union[Tensor, tuple[Tensor, dict[str, Tensor]]]:
        return _compute(model, x1, x2, cfg, params, output_fn, return_blocks)

    ntk.config = cfg  # type: ignore[attr-defined]
    return ntk


def projection_matrix(
    o: int,
    k: int,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float64,
    device: Union[str, torch.device, None] = None,
) -> Tensor:
    """``R (o, k)`` i.i.d. N(0, 1) from ``torch.Generator().manual_seed(seed)`` (drawn in
    float64 on the CPU, so the same seed gives the same ``R`` on every device and dtype)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    r = torch.randn((o, k), generator=gen, dtype=torch.float64)
    return r.to(dtype=dtype, device=device)


class _Projected:
    """Output function ``f -> Rᵀ f / √k`` (or ``Σ_o f_o / √O``) applied after ``output_fn``."""

    def __init__(
        self, output_fn: Optional[OutputFn], r: Optional[Tensor], scale: float, spec: Any
    ) -> None:
        self.output_fn = output_fn
        self.r = r
        self.scale = scale
        # a new wrapper every call: memos (:mod:`._memo`) compare the user's function and the
        # projection (``(k, seed)`` or ``"sum"``) instead of this object
        self.memo_identity = output_fn
        self.memo_key = ("projection", spec)

    def __call__(self, out: Any) -> Tensor:
        t = select_output(out, self.output_fn)
        if t.dim() == 0:
            return t
        flat = t.reshape(t.shape[0], -1)
        if self.r is None:
            return flat.sum(1, keepdim=True) * self.scale
        return (flat @ self.r.to(flat.dtype)) * self.scale


def _run_explicit(
    impl: NtkImplementation,
    fm: FunctionalModel,
    p: dict[str, Tensor],
    xa: InputBatch,
    xb: Optional[InputBatch],
    n1: int,
    n2: Optional[int],
    n_out: int,
    config: NtkConfig,
    dtype: torch.dtype,
    device: torch.device,
    keep_blocks: bool,
    rows_fn: JacobianRows,
) -> _BlockSink:
    """One implementation's kernel; ``n_out``: outputs per example after the projection (read
    by :func:`_compute` before the memory check)."""
    names = list(p)
    if impl in (NtkImplementation.STRUCTURED, NtkImplementation.AUTO):
        return structured_ntk(
            fm,
            p,
            xa,
            xb,
            n1,
            n2,
            config.kind,
            dtype,
            device,
            keep_blocks,
            config.chunk_size,
            rows_fn,
            choose=impl is NtkImplementation.AUTO,  # auto: priced against the Jacobian path
            n_out=n_out,
        )
    sink = _BlockSink(
        config.kind,
        kernel_shape(config.kind, n1, n2 or n1, n_out),
        dtype,
        device,
        keep_blocks,
        symmetric=xb is None,
    )
    if impl is NtkImplementation.JACOBIAN:
        jacobian_ntk(fm, p, names, xa, xb, n1, n2, n_out, sink, config.chunk_size, rows_fn)
    else:
        ntvp_ntk(fm, p, names, xa, xb, n1, n2, n_out, sink, config.chunk_size)
    return sink


def _run_auto(*args: Any) -> _BlockSink:
    """``AUTO`` (the cheapest priced plan, see :func:`~lazy_monitor.core.kernels.cost.choose_path`);
    ``JACOBIAN`` when its plan cannot be made or verified on this model.

    Any exception of the structured attempt counts (typed plan errors, and the autograd errors
    of a plan pass on a data-dependent branch such as "element 0 of tensors does not require
    grad"), except a memory refusal or exhaustion, which the Jacobian path would only make
    worse. The warning is given once the Jacobian kernel exists, so an error of the model
    itself is raised as the Jacobian path's error, without a misleading fallback note."""
    try:
        return _run_explicit(NtkImplementation.AUTO, *args)
    except (NtkBudgetError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - see docstring: any failed plan falls back
        # the Jacobian path's own notes (e.g. its per-example loop) join the one warning
        with warnings.catch_warnings(record=True) as notes:
            warnings.simplefilter("always")
            sink = _run_explicit(NtkImplementation.JACOBIAN, *args)
        also = "".join(f"; {str(n.message)[:300]}" for n in notes)
        reason = getattr(err, "reason", None) or f"{type(err).__name__}: {err}"
        warn_once(
            args[0].model,
            f"plan: {reason}",
            f"empirical_ntk: the structured plan could not be verified on this model ({reason}); "
            f"its kernels use the Jacobian contraction (same kernel){also}",
            stacklevel=4,
        )
        return sink


def _run_structured(*args: Any) -> _BlockSink:
    """``STRUCTURED`` only: a failure of its plan is a :class:`StructuredPlanError` that says
    what to use instead."""
    try:
        return _run_explicit(NtkImplementation.STRUCTURED, *args)
    except (StructuredPlanError, NtkBudgetError, MemoryError, torch.OutOfMemoryError):
        raise
    except RuntimeError as err:
        raise StructuredPlanError(
            f"implementation='structured' could not build or verify its per-layer plan on this "
            f"model ({err}), e.g. because of data-dependent control flow; use "
            "implementation='auto' (falls back by itself) or 'jacobian'"
        ) from err


# One entry per implementation: what runs for it.
_DISPATCH: dict[NtkImplementation, Callable[..., _BlockSink]] = {
    NtkImplementation.AUTO: _run_auto,
    NtkImplementation.STRUCTURED: _run_structured,
    NtkImplementation.JACOBIAN: lambda *a: _run_explicit(NtkImplementation.JACOBIAN, *a),
    NtkImplementation.NTVP: lambda *a: _run_explicit(NtkImplementation.NTVP, *a),
}


def _compute(
    model: nn.Module,
    x1: InputBatch,
    x2: Optional[InputBatch],
    config: NtkConfig,
    params: Optional[Mapping[str, Tensor]],
    output_fn: Optional[OutputFn],
    return_blocks: bool,
) -> Union[Tensor, tuple[Tensor, dict[str, Tensor]]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    kind = config.kind
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
    check_materialized(model)
    named = resolve_params(model, params)
    _check_examples_independent(model)
    dtype = compute_dtype(named, x1 if x2 is None else [*_flat(x1), *_flat(x2)])
    device = _device_of(x1)

    # the thread choice's last samples are taken after the setup, not in 1 ms sleeps
    with side_effect_guard(model, defer_threads=True):
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
        # Cloned so that nothing the forward might do in place reaches the module's weights
        # (a parameter cast to the compute dtype is a copy already).
        p = {
            k: v.clone() if v.data_ptr() == named[k].data_ptr() else v
            for k, v in fm.cast_params(named).items()
        }
        sample_threads()  # the clone took ~1-2 ms: the thread choice's second sample
        xa = fm.cast_inputs(x1)
        xb = None if x2 is None else fm.cast_inputs(x2)
        # One example's forward (no graph): O, and the memory rule before any allocation;
        # remembered for repeated calls on the same probe (:mod:`._memo`).
        firsts = [slice_batch(x, slice(0, 1)) for x in (xa, xb) if x is not None]
        shape_key = ("output shape", call_key(fm, p, xa, xb))
        shape = _SHAPES.get(fm, shape_key, firsts)
        if shape is None:
            shape = _output_shape(model, fm, p, xa, "x1")
            if xb is not None:  # before projecting: R is sized for x1's outputs
                check_same_outputs(
                    math.prod(shape), math.prod(_output_shape(model, fm, p, xb, "x2"))
                )
            _SHAPES.put(fm, shape_key, firsts, shape)
        o_raw = math.prod(shape)
        o = _projected_outputs(config.projection, o_raw)
        budget = check_engine_memory(
            kind=kind,
            n1=n1,
            n2=n2,
            o=o,
            o_raw=o_raw,
            output_shape=shape,
            blocks=len(p) if return_blocks else 0,
            itemsize=dtype.itemsize,
            max_memory=config.max_memory,
            jacobian_numel=_jacobian_numel(p, config.implementation),
        )
        if config.projection == "sum":
            fm.output_fn = _Projected(output_fn, None, 1.0 / math.sqrt(o_raw), "sum")
        elif config.projection is not None:
            r = projection_matrix(o_raw, o, config.projection_seed, dtype=dtype, device=device)
            spec = (o, config.projection_seed)
            fm.output_fn = _Projected(output_fn, r, 1.0 / math.sqrt(o), spec)
        settle_threads()
        token = _FACTOR_BUDGET.set(budget)
        try:
            sink = _DISPATCH[config.implementation](
                fm, p, xa, xb, n1, n2, o, config, dtype, device, return_blocks, JacobianRows()
            )
        finally:
            _FACTOR_BUDGET.reset(token)
        if sink.blocks is not None:
            for name in p:
                sink.declare(name)
    kernel = finalize(sink.kernel.detach(), kind)
    if return_blocks:
        assert sink.blocks is not None
        return kernel, {k: finalize(sink.blocks[k].detach(), kind) for k in p}
    return kernel


def _flat(x: InputBatch) -> list[Tensor]:
    return [t for _, t in _leaves(x)]
