"""Capture of the parameter uses on a forward pass and verification of their batch mapping.

:class:`_Capture` (a :class:`torch.overrides.TorchFunctionMode`) records every supported call
on a differentiated parameter (Linear/Conv/Embedding, ``a @ W (+ b)``, affine normalisations)
and flags every other use; :func:`_verify_batch_mapping` sends each use that is not
verifiably per-example to the fallback, its verdict cached per module
(:func:`_cached_verification`).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_flatten

from ..._functional import FunctionalModel, InputBatch
from .._memo import module_state as _module_state

_SIGNATURES = {
    "linear": ("input", "weight", "bias"),
    "conv": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "embedding": (
        "input",
        "weight",
        "padding_idx",
        "max_norm",
        "norm_type",
        "scale_grad_by_freq",
        "sparse",
    ),
}


_OPS = {F.linear: "linear", F.conv1d: "conv", F.conv2d: "conv", F.embedding: "embedding"}


# Normalisations with an elementwise affine ``y = x̂·γ + β``: per-example rows of γ and β are
# direct sums over positions, ``dγ = Σ G·x̂``, ``dβ = Σ G`` (channel dim 1, or trailing dims).
_NORMS = {
    F.batch_norm: (
        "channel",
        ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    ),
    F.group_norm: ("channel", ("input", "num_groups", "weight", "bias", "eps")),
    F.layer_norm: ("trailing", ("input", "normalized_shape", "weight", "bias", "eps")),
}


# ``y = a @ W (+ b)`` with the parameter ``W (d_in, d_out)`` as the right operand: HF
# ``Conv1D`` (GPT-2: ``torch.addmm(bias, x.view(-1, d), W)``), ``x @ W``. These are Linear uses
# with a transposed weight; the kernel does not depend on how a weight's entries are ordered,
# so the factors are built for ``Wᵀ (d_out, d_in)``.
_MATMULS = {
    torch.addmm: "addmm",
    Tensor.addmm: "addmm",
    torch.mm: "mm",
    Tensor.mm: "mm",
    torch.matmul: "mm",
    Tensor.matmul: "mm",
    Tensor.__matmul__: "mm",
}


def _bind_matmul(kind: str, args: tuple, kwargs: dict) -> Optional[dict]:
    """``{"input", "weight", "bias"}`` of a matmul-family call, or None if it is not
    ``a @ W (+ b)`` with a 2-D right operand, a 1-D bias and ``alpha = beta = 1``."""
    if kind == "addmm":  # torch.addmm(input=bias, mat1, mat2, *, beta, alpha)
        names = ("bias", "input", "weight", "beta", "alpha")
        rename = {"input": "bias", "self": "bias", "mat1": "input", "mat2": "weight"}
    else:  # torch.mm(input, mat2), torch.matmul(input, other)
        names = ("input", "weight")
        rename = {"self": "input", "mat2": "weight", "other": "weight"}
    if "out" in kwargs:
        return None
    bound = dict(zip(names, args))
    bound.update({rename.get(k, k): v for k, v in kwargs.items()})
    bias, a, w = bound.get("bias"), bound.get("input"), bound.get("weight")
    if kind == "addmm" and (
        bound.get("beta", 1) != 1
        or bound.get("alpha", 1) != 1
        or not isinstance(bias, Tensor)
        or bias.dim() != 1
    ):
        return None
    if not (isinstance(a, Tensor) and isinstance(w, Tensor) and w.dim() == 2 and a.dim() >= 2):
        return None
    return {"input": a, "weight": w, "bias": bias}


# ``Wᵀ`` of a 2-D parameter (``W.t()``, ``W.T``, ``W.mT``, ``W.transpose(0, 1)``): recorded
# as an alias of ``W`` whose Linear/matmul uses take the other orientation (``x @ W.t()`` is
# ``F.linear(x, W)``), so that a hand-written head ``h @ emb.weight.T`` keeps a rule.
_TRANSPOSES = (torch.t, Tensor.t, torch.transpose, Tensor.transpose)
_TRANSPOSE_PROPERTIES = (Tensor.T, Tensor.mT)


def _transpose_source(func: Any, args: tuple, kwargs: dict) -> Optional[Tensor]:
    """The 2-D tensor whose transpose ``func`` returns, or None."""
    src = args[0] if args else kwargs.get("input")
    if not isinstance(src, Tensor) or src.dim() != 2:
        return None
    owner = getattr(func, "__self__", None)
    if any(owner is p for p in _TRANSPOSE_PROPERTIES) or func in (torch.t, Tensor.t):
        return src
    if func in (torch.transpose, Tensor.transpose):
        dims = [*args[1:3], *(kwargs[k] for k in ("dim0", "dim1") if k in kwargs)]
        if len(dims) == 2 and all(isinstance(d, int) for d in dims):
            return src if {d % 2 for d in dims} == {0, 1} else None
    return None


def _bind(func: Any, args: tuple, kwargs: dict) -> Optional[dict]:
    """Arguments by name of a supported op's call (normalisation, Linear/Conv/Embedding,
    ``a @ W (+ b)``); None for any other op or matmul form."""
    if func in _NORMS:
        names = _NORMS[func][1]
    elif func in _OPS:
        names = _SIGNATURES[_OPS[func]]
    elif func in _MATMULS:
        return _bind_matmul(_MATMULS[func], args, kwargs)
    else:
        return None
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _affine_norm(func: Any, layout: str, bound: dict) -> tuple[Tensor, Tensor]:
    """``(x̂, y)`` for a normalisation call: the op without its affine, then the affine."""
    weight, bias = bound.get("weight"), bound.get("bias")
    plain = dict(bound, weight=None, bias=None)
    xhat = func(**plain)
    if layout == "channel":
        shape = (1, -1) + (1,) * (xhat.dim() - 2)
        weight = None if weight is None else weight.reshape(shape)
        bias = None if bias is None else bias.reshape(shape)
    y = xhat if weight is None else xhat * weight
    return xhat, (y if bias is None else y + bias)


def _first(args: tuple, kwargs: dict, *names: str) -> Optional[Tensor]:
    """The first of ``args`` or, by name, of ``kwargs``; None if it is not a Tensor."""
    t = args[0] if args else next((kwargs[k] for k in names if k in kwargs), None)
    return t if isinstance(t, Tensor) else None


def _matmul_macs(args: tuple, kwargs: dict, out: Any) -> int:
    """``|out| · k`` with ``k`` the contracted size (last dim of the left operand)."""
    a = args[1] if len(args) > 2 else kwargs.get("mat1", kwargs.get("batch1"))
    if isinstance(a, Tensor) and isinstance(out, Tensor) and a.dim() >= 1:
        return out.numel() * a.shape[-1]
    return 0


def _left_macs(args: tuple, kwargs: dict, out: Any) -> int:
    a = _first(args, kwargs, "input")
    if isinstance(a, Tensor) and isinstance(out, Tensor) and a.dim() >= 1:
        return out.numel() * a.shape[-1]
    return 0


def _conv_macs(args: tuple, kwargs: dict, out: Any) -> int:
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    if isinstance(w, Tensor) and isinstance(out, Tensor) and w.dim() >= 1:
        return out.numel() * (w.numel() // w.shape[0])
    return 0


def _attention_macs(args: tuple, kwargs: dict, out: Any) -> int:
    q = _first(args, kwargs, "query")
    k = args[1] if len(args) > 1 else kwargs.get("key")
    if isinstance(q, Tensor) and isinstance(k, Tensor) and q.dim() >= 2 and k.dim() >= 2:
        return 2 * (q.numel() // q.shape[-1]) * k.shape[-2] * q.shape[-1]
    return 0


# Multiply-adds of the calls that dominate a forward pass (the cost model's [FP]).
_MAC_COUNTERS = {
    F.linear: _left_macs,
    torch.matmul: _left_macs,
    Tensor.matmul: _left_macs,
    Tensor.__matmul__: _left_macs,
    torch.mm: _left_macs,
    Tensor.mm: _left_macs,
    torch.bmm: _left_macs,
    Tensor.bmm: _left_macs,
    torch.addmm: _matmul_macs,
    Tensor.addmm: _matmul_macs,
    torch.baddbmm: _matmul_macs,
    Tensor.baddbmm: _matmul_macs,
    F.conv1d: _conv_macs,
    F.conv2d: _conv_macs,
    F.conv_transpose1d: _conv_macs,
    F.conv_transpose2d: _conv_macs,
    F.scaled_dot_product_attention: _attention_macs,
}


@dataclasses.dataclass
class _Use:
    """One call of a supported op on a differentiated parameter."""

    op: str  # "linear" | "conv" | "embedding"
    weight: Optional[str]
    bias: Optional[str]
    inp: Tensor
    out: Tensor  # handle whose gradient is G
    version: int
    meta: dict


class _Capture(torch.overrides.TorchFunctionMode):
    """Record supported uses of the parameter tensors; flag every other use."""

    def __init__(
        self,
        tensors: Mapping[str, Tensor],
        copy_outputs: bool,
        entries_of: Optional[Mapping[str, Tensor]] = None,
    ) -> None:
        super().__init__()
        self.by_id = {id(t): k for k, t in tensors.items()}
        self.copy_outputs = copy_outputs
        self.uses: list[_Use] = []
        self.other: set[str] = set()
        self.aliases: dict[int, Tensor] = {}  # id -> Wᵀ of a parameter (kept alive: ids unique)
        self.n = 0  # examples in the pass (dim 0 of the output), set by _forward
        # for the cost model (:func:`~.cost.path_costs`): torch calls and multiply-adds of the
        # pass (matmul-family, convolution and attention calls, whatever their operands)
        self.ops = 0
        self.macs = 0
        # entries: name -> (input tensor, its version) of the parameter's first call, the
        # candidate cut points of :func:`_cut_points` (None: first call is no supported op)
        self.entry_ids = {id(t): k for k, t in (entries_of or {}).items()}
        self.entries: dict[str, Optional[tuple[Tensor, int]]] = {}

    def _record_entries(self, func: Any, args: tuple, kwargs: dict, flat: list) -> None:
        names = [
            self.entry_ids[id(a)] for a in flat if isinstance(a, Tensor) and id(a) in self.entry_ids
        ]
        names = [k for k in names if k not in self.entries]
        if not names:
            return
        inp = (_bind(func, args, kwargs) or {}).get("input")
        for k in names:
            self.entries[k] = (inp, inp._version) if isinstance(inp, Tensor) else None

    def entry(self, name: str) -> Optional[Tensor]:
        """The input of ``name``'s first call, if it was a supported op and the input was not
        modified in place afterwards."""
        e = self.entries.get(name)
        if e is None or e[0]._version != e[1]:
            return None
        return e[0]

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        hit = [self.by_id[id(a)] for a in flat if isinstance(a, Tensor) and id(a) in self.by_id]
        if self.entry_ids:
            self._record_entries(func, args, kwargs, flat)
        out = func(*args, **kwargs)
        self.ops += 1
        if func in _MAC_COUNTERS:
            self.macs += _MAC_COUNTERS[func](args, kwargs, out)
        if not hit:
            return out
        src = _transpose_source(func, args, kwargs) if len(hit) == 1 else None
        if src is not None and id(src) not in self.aliases and isinstance(out, Tensor):
            self.by_id[id(out)], self.aliases[id(out)] = hit[0], out
            return out
        flipped = {id(a) for a in flat if isinstance(a, Tensor) and id(a) in self.aliases}
        norm = _NORMS.get(func)
        if norm is not None and flipped:
            self.other.update(hit)  # a transposed parameter as a normalisation affine
            return out
        if norm is not None:
            layout = norm[0]
            bound = _bind(func, args, kwargs)
            w = self.by_id.get(id(bound.get("weight")))
            b = self.by_id.get(id(bound.get("bias")))
            roles = [k for k in (w, b) if k is not None]
            if (
                bound.get("training", False)
                or hit.count(w) > 1
                or hit.count(b) > 1
                or (set(hit) - set(roles))
            ):
                self.other.update(hit)  # batch statistics couple examples: no rule
                return out
            xhat, handle = _affine_norm(func, layout, bound)
            self.uses.append(
                _Use("norm", w, b, xhat.detach(), handle, handle._version, {"layout": layout})
            )
            return handle.clone() if self.copy_outputs else handle
        bound = _bind(func, args, kwargs)
        op = _OPS.get(func, "linear" if func in _MATMULS else None)
        if bound is not None and op is not None:
            w_flipped = id(bound.get("weight")) in flipped
            transposed = (func in _MATMULS) != w_flipped
            w = self.by_id.get(id(bound.get("weight")))
            b = self.by_id.get(id(bound.get("bias"))) if op != "embedding" else None
            if op == "embedding" and (
                w_flipped
                or bound.get("max_norm") is not None
                or bound.get("scale_grad_by_freq", False)
            ):
                w = None  # renormalised / frequency-scaled weights: no structured rule
            if id(bound.get("bias")) in flipped:
                b = None
            roles = [k for k in (w, b) if k is not None]
            self.other.update(k for k in hit if k not in roles or hit.count(k) > 1)
            if roles:
                handle = out
                if self.copy_outputs:
                    out = out.clone()
                meta = {
                    k: v
                    for k, v in bound.items()
                    if k not in ("input", "weight", "bias", "beta", "alpha")
                }
                if transposed:
                    meta["transposed"] = True
                self.uses.append(
                    _Use(op, w, b, bound["input"].detach(), handle, handle._version, meta)
                )
            return out
        out_flat, _ = tree_flatten(out)
        name = getattr(func, "__name__", "")
        if any(isinstance(t, Tensor) for t in out_flat) or name.endswith("_") or "set" in name:
            self.other.update(hit)  # a transform / in-place use we cannot factorise
        return out


def _use_rows_ok(use: _Use, n: int) -> bool:
    """The use's output (and, except for norms, its input) has the ``n`` examples on dim 0 --
    or, for a Linear-type use, ``n·r`` rows (positions flattened into dim 0, ``(N·T, d)``);
    :func:`_verify_batch_mapping` then checks that the rows are contiguous per example."""
    if use.out.dim() < 1:
        return False
    rows = use.out.shape[0]
    if use.op == "norm":
        return rows == n
    if use.inp.dim() < 1 or use.inp.shape[0] != rows:
        return False
    return rows == n or (use.op == "linear" and use.out.dim() == 2 and rows % n == 0)


def _rows_per_example(use: _Use, n: int) -> int:
    """``r``: dim 0 of the use holds ``n·r`` rows, example ``k`` in rows ``k·r .. k·r + r``."""
    return use.out.shape[0] // n


def _per_example(t: Tensor, n: int) -> Tensor:
    """``(n·r, ...)`` rows contiguous per example -> ``(n, r, ...)``; ``(n, ...)`` unchanged."""
    if t.shape[0] == n:
        return t
    return t.reshape(n, t.shape[0] // n, *t.shape[1:])


def _weight_shape(use: _Use, weight: Tensor) -> tuple[int, ...]:
    """``(d_out, d_in, *kernel)`` of the use's rule: ``Wᵀ`` for a right matmul operand."""
    if use.meta.get("transposed", False):
        return (weight.shape[1], weight.shape[0])
    return tuple(weight.shape)


# Verdicts of :func:`_verify_batch_mapping` per module, for repeated calls on the same probe
# (the tracker measures the same probe examples every time): the key is everything the batch
# mapping can depend on except the parameter values (see :func:`_mapping_key`).
_MAPPING_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_MAPPING_CACHE_SIZE = 8


def _mapping_key(
    fm: FunctionalModel,
    params: Mapping[str, Tensor],
    probe_x: InputBatch,
    out: Tensor,
    cap: _Capture,
) -> tuple:
    """What the verification of a probe pass depends on: the output function (by identity),
    parameter names/shapes/dtypes/devices, the probe's structure and *values*, the output
    shape, and the traced structure -- every captured use (op, names, input/output shapes,
    static arguments) and the parameters already flagged. Parameter values are left out (they
    change every training step; a model whose example mixing depends on its parameter values
    but not on its traced structure would defeat the cache)."""
    leaves, spec = tree_flatten(probe_x)
    probe = tuple(
        ("T", tuple(t.shape), t.dtype, t.device) if isinstance(t, Tensor) else ("V", repr(t))
        for t in leaves
    )
    uses = tuple(
        (
            u.op,
            u.weight,
            u.bias,
            tuple(u.inp.shape),
            tuple(u.out.shape),
            tuple(sorted((k, repr(v)) for k, v in u.meta.items() if not isinstance(v, Tensor))),
        )
        for u in cap.uses
    )
    shapes = tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in params.items())
    return (
        str(spec),
        probe,
        shapes,
        tuple(out.shape),
        out.dtype,
        uses,
        frozenset(cap.other),
        _module_state(fm.model),
    )


def _cached_verification(
    fm: FunctionalModel,
    params: Mapping[str, Tensor],
    probe_x: InputBatch,
    out: Tensor,
    cap: _Capture,
) -> None:
    """:func:`_verify_batch_mapping`, reusing the verdict of an earlier call whose
    :func:`_mapping_key` and probe values are identical (same module and output function)."""
    key = _mapping_key(fm, params, probe_x, out, cap)
    leaves = [t for t in tree_flatten(probe_x)[0] if isinstance(t, Tensor)]
    try:
        entries = _MAPPING_CACHE.setdefault(fm.model, [])
    except TypeError:  # a module that cannot be weakly referenced: no cache
        entries = None
    for entry in entries or ():
        e_key, e_fn, e_leaves, e_bad = entry
        if (
            e_key == key
            and e_fn() is fm.output_fn
            and all(torch.equal(a, b) for a, b in zip(leaves, e_leaves))
        ):
            cap.other.update(e_bad)
            return
    before = set(cap.other)
    _verify_batch_mapping(out, cap)
    if entries is not None:
        if len(entries) >= _MAPPING_CACHE_SIZE:
            entries.pop(0)
        stored = [t.detach().clone() for t in leaves]
        # The output function by weak reference: an entry must not keep the module alive
        # (an output_fn closing over the model would, through the weak-keyed cache).
        fn = fm.output_fn
        try:
            fn_ref = weakref.ref(fn) if fn is not None else (lambda: None)
        except TypeError:  # not weakly referenceable: never reused
            fn_ref = lambda: object()  # noqa: E731
        entries.append((key, fn_ref, stored, frozenset(cap.other - before)))


def _example0_gradients(out: Tensor, tensors: list[Tensor]) -> tuple[Optional[Tensor], ...]:
    """Gradients w.r.t. ``tensors`` of a random cotangent on example 0's outputs only: a tensor
    whose rows are per example gets zeros on every row that is not example 0's."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    cot = torch.zeros_like(out)
    cot[0] = torch.randn(out.shape[1:], generator=gen, dtype=out.dtype).to(out.device) + 2.0
    return torch.autograd.grad([out], tensors, [cot], retain_graph=True, allow_unused=True)


def _verify_batch_mapping(out: Tensor, cap: _Capture) -> None:
    """Send every parameter whose use is not verifiably per-example to the fallback.

    The structured rules need, for every use ``y = op(a, W)``, that row ``n`` of ``y`` and
    ``a`` belong to example ``n`` and that ``f(x_n)`` depends on no other row of ``y``; then
    ``∂f(x_n)/∂W = G[n]ᵀ A[n]`` exactly. This is checked, not guessed from shapes: dim 0 of
    the use's output and input must be the probe's batch size, or for a Linear-type use a
    multiple ``N·r`` of it (catches inputs shared by the batch such as position ids ``(1, T)``,
    sequence-first layouts), and the gradient of a random cotangent on example 0's outputs
    must vanish on every row of the use's output after its first ``r`` (catches a layout whose
    dim 0 happens to equal N, and flattened rows that are not contiguous per example, e.g.
    ``(T·N, d)``). Example 0's rows then are ``0..r`` and, the rows being independent of
    example 0 beyond them, the two probe examples split dim 0 into two contiguous halves.
    """
    n = out.shape[0]
    bad: set[str] = set()
    checked = []
    for use in cap.uses:
        if _use_rows_ok(use, n):
            checked.append(use)
        else:
            bad.update(k for k in (use.weight, use.bias) if k is not None)
    handles = [u.out for u in checked if u.out.requires_grad]
    if handles and n > 1:
        grads = _example0_gradients(out, handles)
        by_handle = {id(h): g for h, g in zip(handles, grads)}
        for use in checked:
            g = by_handle.get(id(use.out))
            if g is not None and bool((g[_rows_per_example(use, n) :] != 0).any()):
                bad.update(k for k in (use.weight, use.bias) if k is not None)
    cap.other.update(bad)


def _forward(
    fm: FunctionalModel,
    params: Mapping[str, Tensor],
    wrt: Mapping[str, Tensor],
    x: InputBatch,
    entries: Sequence[str] = (),
) -> tuple[Tensor, _Capture]:
    """Forward with capture; redone with copied op outputs if any was modified in place.
    ``entries``: parameters whose first call's input to record (:meth:`_Capture.entry`)."""
    full = {**params, **wrt}
    for copy_outputs in (False, True):
        cap = _Capture(wrt, copy_outputs, {k: full[k] for k in entries})
        with cap:
            out = fm(full, x)
        cap.n = out.shape[0]
        if all(u.out._version == u.version for u in cap.uses):
            return out, cap
    return out, cap
