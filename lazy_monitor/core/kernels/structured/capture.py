"""Capture of the parameter uses on a forward pass and verification of their batch mapping.

:class:`_Capture` (a :class:`torch.overrides.TorchFunctionMode`) records every supported call
on a differentiated parameter (Linear/Conv/Embedding, ``a @ W (+ b)``, affine normalisations,
elementwise ``x ∘ P`` and ``P.expand(N, ...)`` of :mod:`.broadcast`; a supported op on an
input shared by the batch is expanded to it) and flags every other use;
:func:`_verify_batch_mapping` sends each use that is not verifiably per-example to the
fallback, its verdict cached per module (:func:`_cached_verification`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from ..._functional import FunctionalModel, InputBatch, batch_size
from .._memo import ModelMemo, call_key
from .broadcast import _bind_elementwise, _expand_rows, _expandable
from .ops import _MAC_COUNTERS, _MATMULS, _NORMS, _OPS, _affine_norm, _bind

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


@dataclasses.dataclass
class _Use:
    """One call of a supported op on a differentiated parameter."""

    op: str  # "linear" | "conv" | "embedding" | "norm" | "elementwise"
    weight: Optional[str]
    bias: Optional[str]
    inp: Tensor
    out: Tensor  # handle whose gradient is G
    version: int
    meta: dict
    # version of ``inp`` at the call where the rule reads its values after the pass (``x`` of
    # ``x * P``, kept without a copy): an in-place change afterwards redoes the pass with copies
    inp_version: Optional[int] = None

    def changed(self) -> bool:
        """Whether the model modified the use's output (or read input) in place later on."""
        return self.out._version != self.version or (
            self.inp_version is not None and self.inp._version != self.inp_version
        )


class _Capture(torch.overrides.TorchFunctionMode):
    """Record supported uses of the parameter tensors; flag every other use."""

    def __init__(
        self,
        tensors: Mapping[str, Tensor],
        copy_outputs: bool,
        entries_of: Optional[Mapping[str, Tensor]] = None,
        batch: int = 0,
        shared: Optional[Mapping[str, Tensor]] = None,
    ) -> None:
        super().__init__()
        self.by_id = {id(t): k for k, t in tensors.items()}
        # the parameter tensors themselves: an elementwise rule reads P's own entry order, so a
        # derived tensor that another rule may add to ``by_id`` (e.g. an alias) gets none
        self.param_ids = dict(self.by_id)
        self.copy_outputs = copy_outputs
        # batch > 1: supported ops on a batch-shared input of any parameter in ``shared``
        # (differentiated or not, so that every pass expands the same uses) are expanded
        self.batch = batch
        self.shared_ids = {id(t) for t in (shared or {}).values()}
        self.expanded = False
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
            if self.batch > 1 and any(id(a) in self.shared_ids for a in flat):
                bound = _bind(func, args, kwargs)
                if func not in _NORMS and bound is not None:
                    if _expandable(bound.get("input"), out, self.batch):
                        self.expanded = True
                        return _expand_rows(out, self.batch)
            return out
        src = _transpose_source(func, args, kwargs) if len(hit) == 1 else None
        if src is not None and id(src) not in self.aliases and isinstance(out, Tensor):
            self.by_id[id(out)], self.aliases[id(out)] = hit[0], out
            return out
        flipped = {id(a) for a in flat if isinstance(a, Tensor) and id(a) in self.aliases}
        if self._elementwise(func, args, kwargs, out, hit):
            return self.uses[-1].out.clone() if self.copy_outputs else out
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
                inp = bound["input"]
                meta = {
                    k: v
                    for k, v in bound.items()
                    if k not in ("input", "weight", "bias", "beta", "alpha")
                }
                if _expandable(inp, out, self.batch):  # batch-shared input (position ids)
                    self.expanded = meta["expanded"] = True
                    out, inp = _expand_rows(out, self.batch), _expand_rows(inp, self.batch)
                handle = out
                if self.copy_outputs:
                    out = out.clone()
                if transposed:
                    meta["transposed"] = True
                self.uses.append(_Use(op, w, b, inp.detach(), handle, handle._version, meta))
            return out
        out_flat, _ = tree_flatten(out)
        name = getattr(func, "__name__", "")
        if name == "__get__" and not any(isinstance(t, Tensor) for t in out_flat):
            return out  # metadata (``P.dtype``, ``P.shape``): not a use
        mutates = name.endswith("_") or "set" in name
        if not mutates and any(out is t for t in flat if id(t) in self.by_id):
            return out  # ``P.to(P.dtype)``, ``P.contiguous()``: P itself, whose uses are seen
        if any(isinstance(t, Tensor) for t in out_flat) or mutates:
            self.other.update(hit)  # a transform / in-place use we cannot factorise
        return out

    def _elementwise(self, func: Any, args: tuple, kwargs: dict, out: Any, hit: list) -> bool:
        """Record ``x ∘ P`` / ``P.expand(N, ...)`` (:mod:`.broadcast`) if the call is one."""
        if len(hit) != 1:
            return False
        found = _bind_elementwise(func, args, kwargs, out, self.param_ids)
        if found is None:
            return False
        name, x, meta = found
        if x is None or not meta["mul"]:  # only G is needed: no operand values kept
            inp, version = out.detach(), None
        else:
            inp = x.detach().clone() if self.copy_outputs else x.detach()
            version = None if self.copy_outputs else x._version
        self.uses.append(_Use("elementwise", name, None, inp, out, out._version, meta, version))
        return True


def _use_rows_ok(use: _Use, n: int) -> bool:
    """The use's output (and, except for norms, its input) has the ``n`` examples on dim 0 --
    or, for a Linear-type use, ``n·r`` rows (positions flattened into dim 0, ``(N·T, d)``);
    :func:`_verify_batch_mapping` then checks that the rows are contiguous per example."""
    if use.out.dim() < 1:
        return False
    rows = use.out.shape[0]
    if use.op in ("norm", "elementwise"):  # x of x ∘ P has y's shape
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


# Verdicts of :func:`_verify_batch_mapping` (and of the expansion of batch-shared inputs) per
# module, for repeated calls on the same probe (the tracker measures the same probe examples
# every time): keyed by everything the batch mapping can depend on except the parameter values
# (see :func:`_mapping_key`).
_VERDICTS = ModelMemo(size=8)


def _mapping_key(
    fm: FunctionalModel,
    params: Mapping[str, Tensor],
    probe_x: InputBatch,
    out: Tensor,
    cap: _Capture,
) -> tuple:
    """What the verification of a probe pass depends on besides the output function and the
    probe's values (compared by :class:`~.._memo.ModelMemo`): the call's shapes and module
    attributes (:func:`~.._memo.call_key`), the output shape, and the traced structure -- every
    captured use (op, names, input/output shapes, static arguments) and the parameters already
    flagged. Parameter values are left out (they change every training step; a model whose
    example mixing depends on its parameter values but not on its traced structure would
    defeat the cache)."""
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
    return call_key(fm, params, probe_x) + (tuple(out.shape), out.dtype, uses, frozenset(cap.other))


def _cached(fm: FunctionalModel, key: tuple, probe_x: InputBatch, compute: Any) -> Any:
    """``compute()``, or its value from an earlier call on the same module and output function
    with an identical ``key`` (:func:`_mapping_key`) and identical probe values."""
    value = _VERDICTS.get(fm, key, [probe_x])
    if value is None:
        value = compute()
        _VERDICTS.put(fm, key, [probe_x], value)
    return value


def _cached_verification(
    fm: FunctionalModel,
    params: Mapping[str, Tensor],
    probe_x: InputBatch,
    out: Tensor,
    cap: _Capture,
) -> None:
    """:func:`_verify_batch_mapping`, reusing the verdict of an earlier call whose
    :func:`_mapping_key` and probe values are identical (same module and output function)."""

    def verify() -> frozenset[str]:
        before = set(cap.other)
        _verify_batch_mapping(out, cap)
        return frozenset(cap.other - before)

    cap.other.update(_cached(fm, _mapping_key(fm, params, probe_x, out, cap), probe_x, verify))


def _example0_gradients(
    out: Tensor, tensors: list[Tensor], example: int = 0
) -> tuple[Optional[Tensor], ...]:
    """Gradients w.r.t. ``tensors`` of a random cotangent on the outputs of ``example`` (0 by
    default) only: a tensor whose rows are per example gets zeros on every other row."""
    gen = torch.Generator(device="cpu").manual_seed(example)
    cot = torch.zeros_like(out)
    cot[example] = torch.randn(out.shape[1:], generator=gen, dtype=out.dtype).to(out.device) + 2.0
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
    ``(T·N, d)``), and that of example 1's outputs on the first ``r`` rows (catches a model
    that reads row 0 for every example, e.g. ``pos[0]`` of a use expanded to the batch).
    Example 0's rows then are ``0..r`` and, the rows being independent of example 0 beyond
    them, the two probe examples split dim 0 into two contiguous halves.
    """
    n = out.shape[0]
    bad: set[str] = set()
    checked = []
    for use in cap.uses:
        if _use_rows_ok(use, n):
            checked.append(use)
        else:
            bad.update(k for k in (use.weight, use.bias) if k is not None)
    for use in _mixing_uses(out, checked):
        bad.update(k for k in (use.weight, use.bias) if k is not None)
    cap.other.update(bad)


def _mixing_uses(out: Tensor, uses: Sequence[_Use]) -> list[_Use]:
    """The uses (rows per example already checked) whose output rows the two probe examples
    do not read separately: example 0's gradient outside its ``r`` rows, or example 1's
    inside them."""
    n = out.shape[0]
    handles = [u.out for u in uses if u.out.requires_grad]
    if not handles or n < 2:
        return []
    first = dict(zip(map(id, handles), _example0_gradients(out, handles)))
    second = dict(zip(map(id, handles), _example0_gradients(out, handles, 1)))
    mixing = []
    for use in uses:
        r = _rows_per_example(use, n)
        g0, g1 = first.get(id(use.out)), second.get(id(use.out))
        if (g0 is not None and bool((g0[r:] != 0).any())) or (
            g1 is not None and bool((g1[:r] != 0).any())
        ):
            mixing.append(use)
    return mixing


def _capture_pass(
    fm: FunctionalModel,
    full: Mapping[str, Tensor],
    wrt: Mapping[str, Tensor],
    x: InputBatch,
    entries: Sequence[str],
    batch: int,
) -> tuple[Tensor, _Capture]:
    """Forward with capture; redone with copied op outputs if any was modified in place."""
    for copy_outputs in (False, True):
        cap = _Capture(wrt, copy_outputs, {k: full[k] for k in entries}, batch, full)
        with cap:
            out = fm(full, x)
        cap.n = out.shape[0]
        if not any(u.changed() for u in cap.uses):
            return out, cap
    return out, cap


def _expansion_ok(
    fm: FunctionalModel, full: Mapping[str, Tensor], x: InputBatch, out: Tensor, cap: _Capture
) -> bool:
    """Whether the probe pass with batch-shared inputs expanded computed the model's own
    output (bitwise that of a plain forward) and every expanded use is read per example
    (``pe.mean(0)`` is not, and would not stay bitwise for other batch sizes): later passes
    expand them all again."""
    with torch.no_grad():
        plain = fm(full, x)
    if not (out.shape == plain.shape and torch.equal(out.detach(), plain)):
        return False
    expanded = [u for u in cap.uses if u.meta.get("expanded", False)]
    return all(_use_rows_ok(u, out.shape[0]) for u in expanded) and not _mixing_uses(out, expanded)


def _forward(
    fm: FunctionalModel,
    params: Mapping[str, Tensor],
    wrt: Mapping[str, Tensor],
    x: InputBatch,
    entries: Sequence[str] = (),
    expand: str = "verify",
) -> tuple[Tensor, _Capture]:
    """Forward with capture (:func:`_capture_pass`). ``entries``: parameters whose first call's
    input to record (:meth:`_Capture.entry`). ``expand``: whether supported ops on batch-shared
    inputs are expanded to the batch (:mod:`.broadcast`): ``"on"``, ``"off"``, or ``"verify"``
    (the probe pass: on if the forward runs, its output stays bitwise that of a plain forward
    and every expanded use is read per example, else off; ``cap.expanded`` says which)."""
    full = {**params, **wrt}
    batch = batch_size(x) if expand != "off" else 0
    if expand == "verify" and batch > 1:
        try:
            out, cap = _capture_pass(fm, full, wrt, x, entries, batch)
        except Exception:  # noqa: BLE001 - e.g. a view that needs dim 0 of size 1: no expansion
            cap = None
        if cap is not None and cap.expanded:
            key = ("expansion", _mapping_key(fm, full, x, out, cap))
            if not _cached(fm, key, x, lambda: _expansion_ok(fm, full, x, out, cap)):
                cap = None
        if cap is not None:
            return out, cap
        batch = 0
    return _capture_pass(fm, full, wrt, x, entries, batch)
