"""NTK-vector products: ``K = J(x1) J(x2)ᵀ`` one row at a time, never materialising ``J(x2)``.

For every row ``(n, a)`` of the kernel, a vector-Jacobian product gives the parameter vector
``u = J(x1)[n, a, :]`` (``vmap(jacrev)`` over the examples of a block), and one
Jacobian-vector product through the whole second batch gives the row

    K[n, :, a, :] = J(x2) u        (N2, O)

(method 2 of Novak et al. 2022, "Fast Finite Width Neural Tangent Kernel"). Time
``N1·O·(N2·[FP])`` -- quadratic in N times a forward pass -- and memory
``block·O·(P + N2·activations)``. Choose it when ``P`` is so large that even one parameter
block of Jacobian rows does not fit, and ``N`` is small; for typical probes the structured
implementation is much faster.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor

from .._functional import FunctionalModel, InputBatch, slice_batch
from ._common import _BlockSink, block_size_for, example_blocks, reduce_full
from .errors import ForwardADUnsupportedError
from .jacobian import JacobianRows

__all__ = ["ntvp_ntk"]


class _PaddingIdxForwardAD(torch.overrides.TorchFunctionMode):
    """Make forward-mode AD of ``F.embedding`` respect ``padding_idx``.

    Reverse mode treats the ``padding_idx`` row as constant (zero gradient), but the jvp of
    ``embedding`` (torch 2.x) propagates that row's tangent; with a tied weight whose padding
    row is used elsewhere (e.g. an LM head) the jvp would then disagree with ``J``. Detaching
    the looked-up vectors at padding positions makes both modes agree.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.nn.functional.embedding:
            names = ("input", "weight", "padding_idx")
            bound = dict(zip(names, args))
            bound.update({k: v for k, v in kwargs.items() if k in names})
            pad = bound.get("padding_idx")
            if pad is not None:
                weight = bound["weight"]
                pad = pad if pad >= 0 else weight.shape[0] + pad
                keep = (bound["input"] != pad).unsqueeze(-1)
                out = torch.where(keep, out, out.detach())
        return out


def ntvp_ntk(
    fm: FunctionalModel,
    params: Mapping[str, Tensor],
    names: Sequence[str],
    x1: InputBatch,
    x2: Optional[InputBatch],
    n1: int,
    n2: Optional[int],
    n_out: int,
    sink: _BlockSink,
    chunk_size: Optional[int] = None,
) -> None:
    """Add the NTK-vector-product blocks of ``names`` to ``sink``.

    With ``return_blocks`` each parameter gets its own jvp pass (the jvp of one parameter
    only propagates from where it is used), otherwise all parameters share one pass.
    """
    rows_fn = JacobianRows()
    xb = x1 if x2 is None else x2
    n_cols = n1 if n2 is None else n2
    groups = [[k] for k in names] if sink.blocks is not None else [list(names)]
    itemsize = torch.finfo(sink.dtype).bits // 8
    for group in groups:
        fixed = {k: v.detach() for k, v in params.items() if k not in group}
        wrt = {k: params[k].detach() for k in group}

        def f_cols(p: dict[str, Tensor], fixed: dict = fixed) -> Tensor:
            return fm({**fixed, **p}, xb)

        def column(t: dict[str, Tensor], wrt: dict = wrt, f_cols=f_cols) -> Tensor:
            with _PaddingIdxForwardAD():
                return torch.func.jvp(f_cols, (wrt,), (t,))[1]

        width = sum(v.numel() for v in wrt.values())
        block = block_size_for(width * n_out * itemsize, n1, chunk_size)
        for rows in example_blocks(n1, block):
            jrows = rows_fn(fm, params, group, slice_batch(x1, rows))
            c = rows.stop - rows.start
            tangents = {k: jrows[k].reshape(c * n_out, *params[k].shape) for k in group}
            cols = _columns(column, tangents, c * n_out)  # (c·O, N2, O)
            full = cols.reshape(c, n_out, n_cols, n_out)  # internal layout K[n, a, m, b]
            sink.add(
                group[0] if len(group) == 1 else "_all",
                reduce_full(full, sink.kind),
                rows,
                slice(0, n_cols),
                mirror=False,
            )


def _columns(column, tangents: dict[str, Tensor], rows: int) -> Tensor:  # noqa: ANN001
    """``column`` vmapped over the tangents, or looped where ``vmap`` cannot run the model.

    The Jacobian rows of these examples were just computed in reverse mode, so the model runs;
    a failure of ``torch.func.jvp`` even one tangent at a time is a forward-mode problem (an op
    without a forward-mode rule such as CPU ``scaled_dot_product_attention`` or
    ``mkldnn_rnn_layer``, an ``autograd.Function`` without ``jvp``/``setup_context``):
    re-raised as :class:`ForwardADUnsupportedError` naming the implementations that do not
    need forward mode.
    """
    try:
        return torch.func.vmap(column)(tangents)
    except Exception:  # noqa: BLE001 - e.g. no batching rule: one jvp per tangent instead
        pass
    try:
        return torch.stack([column({k: v[i] for k, v in tangents.items()}) for i in range(rows)])
    except Exception as err:  # noqa: BLE001 - see docstring
        raise ForwardADUnsupportedError(
            "implementation='ntvp' needs forward-mode AD (torch.func.jvp), but this model "
            f"cannot run in forward mode ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:160]}); use implementation='auto' or 'jacobian', which "
            "use reverse mode only"
        ) from err
