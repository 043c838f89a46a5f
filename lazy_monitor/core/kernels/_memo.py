"""Per-module memo of what a kernel call learns from its probe passes.

A tracker measures the same probe on the same model hundreds of times while only the parameter
values change. What the engine learns from a forward pass -- the output's shape, which
parameters get which structured rule, how the work is split under the memory budget -- depends
on the shapes, the modules' plain attributes, the output function and the probe's values, but
not on the parameter values. :class:`ModelMemo` keeps such facts per module (weakly: a memo
never keeps a model alive) and hands them back only when all of that is identical, so repeated
calls skip the passes that found them (on an MLP 784-1024x3-10 at N = 32: a 2-example probe
pass, its verification backward and a 1-example forward, ~1/5 of the call).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .._functional import FunctionalModel, InputBatch

_PLAIN = (bool, int, float, str, type(None))


def module_state(model: nn.Module) -> tuple:
    """Every submodule's type and plain Python attributes (flags such as ``batch_first``, a
    layout switch set after construction), and any instance-level ``forward`` override: state
    that can change how examples flow through the model without changing its parameters."""
    state = []
    for name, m in model.named_modules():
        attrs = tuple(
            sorted(
                (k, v)
                for k, v in vars(m).items()
                if isinstance(v, _PLAIN)
                or (isinstance(v, tuple) and all(isinstance(e, _PLAIN) for e in v))
            )
        )
        fwd = vars(m).get("forward")
        state.append((name, type(m), attrs, None if fwd is None else id(fwd)))
    return tuple(state)


def call_key(
    fm: FunctionalModel, params: Mapping[str, Tensor], *inputs: Optional[InputBatch]
) -> tuple:
    """Everything but values that a probe pass's findings depend on: the inputs' structure,
    shapes, dtypes and devices, the differentiated parameters' names, shapes and dtypes, the
    output dtype and the modules' plain attributes (the output function is compared by
    identity in :class:`ModelMemo`, a projection wrapper by the function it wraps and its
    ``memo_key``). Computed once per engine call (kept on ``fm`` for the same parameter dict
    and inputs): the walk over the modules costs ~1 ms on a peft Llama."""
    ids = (id(params), *map(id, inputs))
    kept = getattr(fm, "_call_key", None)
    if kept is not None and kept[0] == ids:
        return kept[1]
    leaves, spec = tree_flatten(inputs)
    key = (
        str(spec),
        tuple(
            (tuple(t.shape), t.dtype, t.device) if isinstance(t, Tensor) else ("V", repr(t))
            for t in leaves
        ),
        tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in params.items()),
        fm.dtype,
        module_state(fm.model),
    )
    fm._call_key = (ids, key)  # type: ignore[attr-defined]
    return key


def _weak(fn: Any) -> Callable[[], Any]:
    """A weak reference to an output function (a bound method through its object: the method
    object itself is made anew on every attribute access)."""
    if fn is None:
        return lambda: None
    if inspect.ismethod(fn):
        return weakref.WeakMethod(fn)
    return weakref.ref(fn)


def _same_function(a: Any, b: Any) -> bool:
    """Identity, except bound methods: the same function bound to the same object."""
    if inspect.ismethod(a) and inspect.ismethod(b):
        return a.__func__ is b.__func__ and a.__self__ is b.__self__
    return a is b


def _tensors(values: Sequence[Optional[InputBatch]]) -> list[Tensor]:
    return [t for t in tree_flatten(list(values))[0] if isinstance(t, Tensor)]


class ModelMemo:
    """Facts per module, reused for an identical key, output function (by identity) and
    identical probe values (compared exactly; stored as detached copies, so pass only the few
    examples a fact was learned from). At most ``size`` entries per module, oldest dropped."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._store: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, fm: FunctionalModel, key: tuple, values: Sequence[Optional[InputBatch]]) -> Any:
        """The fact stored for this call, or None."""
        try:
            entries = self._store.get(fm.model)
        except TypeError:  # a module that cannot be weakly referenced: no memo
            return None
        if not entries:
            return None
        current = _tensors(values)
        key = (key, getattr(fm.output_fn, "memo_key", None))
        fn = getattr(fm.output_fn, "memo_identity", fm.output_fn)
        for e_key, e_fn, e_values, fact in reversed(entries):  # newest first
            if (
                e_key == key
                and _same_function(e_fn(), fn)
                and len(e_values) == len(current)
                and all(
                    a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
                    for a, b in zip(e_values, current)
                )
            ):
                return fact
        return None

    def put(
        self, fm: FunctionalModel, key: tuple, values: Sequence[Optional[InputBatch]], fact: Any
    ) -> None:
        key = (key, getattr(fm.output_fn, "memo_key", None))
        fn = getattr(fm.output_fn, "memo_identity", fm.output_fn)
        try:
            # by weak reference: an output function closing over the model must not keep the
            # model alive through this weak-keyed memo
            fn_ref = _weak(fn)
        except TypeError:  # an output function that cannot be weakly referenced: never reused
            return
        try:
            entries = self._store.setdefault(fm.model, [])
        except TypeError:
            return
        del entries[: max(0, len(entries) - self.size + 1)]
        entries.append((key, fn_ref, [t.detach().clone() for t in _tensors(values)], fact))

    def forget(self, fm: FunctionalModel, key: tuple) -> None:
        """Drop the facts stored under ``key`` (they no longer hold for this module)."""
        key = (key, getattr(fm.output_fn, "memo_key", None))
        try:
            entries = self._store.get(fm.model)
        except TypeError:
            return
        if entries:
            entries[:] = [e for e in entries if e[0] != key]
