"""Shared plumbing for everything that evaluates a model as a function of its parameters.

The kernel engine and the linearization both need the same four things:

* a uniform view of a probe batch (a tensor, a tuple/list of tensors passed positionally, or a
  dict of tensors passed as keyword arguments), all batched on dim 0;
* the parameters to differentiate, with tied (shared) parameters counted once;
* a pure function ``f(params, x) -> (N, O)`` of those parameters, with the batch dimension kept
  and every other output dimension flattened into ``O``;
* a guard that evaluates in eval semantics, in full precision, with gradients enabled, and
  leaves the module exactly as it found it (training flags, buffers, RNG state, ``.grad``);
* :func:`measurement_mode`, the one place that decides how attention and activation
  checkpointing run while a model is measured (entered by :func:`side_effect_guard`, so every
  entry point of the engine, the linearization and the trackers goes through it).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

InputBatch = Union[Tensor, Sequence[Tensor], Mapping[str, Tensor]]
OutputFn = Callable[[Any], Tensor]

__all__ = [
    "InputBatch",
    "OutputFn",
    "OutputSelectionError",
    "as_device",
    "FunctionalModel",
    "batch_size",
    "call_module",
    "compute_dtype",
    "eval_mode",
    "linear_jvp",
    "map_batch",
    "measurement_mode",
    "measurement_threads",
    "resolve_params",
    "sample_threads",
    "select_output",
    "settle_threads",
    "side_effect_guard",
    "slice_batch",
]


def _leaves(x: InputBatch) -> list[tuple[str, Tensor]]:
    if isinstance(x, Tensor):
        return [("x", x)]
    if isinstance(x, Mapping):
        items = [(f"x[{k!r}]", v) for k, v in x.items()]
    elif isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        items = [(f"x[{i}]", v) for i, v in enumerate(x)]
    else:
        raise TypeError(
            f"inputs must be a Tensor, a tuple/list of Tensors or a dict of Tensors, got "
            f"{type(x).__name__}"
        )
    if not items:
        raise ValueError("inputs are an empty container: pass at least one batched tensor")
    for where, value in items:
        if not isinstance(value, Tensor):
            raise TypeError(
                f"{where} is a {type(value).__name__}; every input must be a Tensor batched on dim 0"
            )
    return items


def as_device(value: Union[str, torch.device, None], name: str) -> Optional[torch.device]:
    """``torch.device(value)``, or None; a ValueError naming the argument for anything else."""
    if value is None:
        return None
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"{name}={value!r} is not a valid torch device; use None (keep it next to the model's "
            "parameters), 'cpu' or e.g. 'cuda:0'"
        ) from err


def batch_size(x: InputBatch) -> int:
    """Number of examples in ``x`` (size of dim 0, equal for every tensor in it).

    Raises:
        ValueError: for an empty batch, a 0-dim tensor, or tensors with different dim-0 sizes.
        TypeError: for inputs that are not tensors or containers of tensors.
    """
    sizes = {}
    for where, value in _leaves(x):
        if value.dim() == 0:
            raise ValueError(
                f"{where} is a 0-dim tensor; inputs must be batched on dim 0 (use x.unsqueeze(0) "
                "for a single example)"
            )
        sizes[where] = value.shape[0]
    distinct = set(sizes.values())
    if len(distinct) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ValueError(
            f"inputs have mismatched batch sizes on dim 0 ({listing}); they must agree"
        )
    n = distinct.pop()
    if n == 0:
        raise ValueError("the input batch is empty (dim 0 has size 0); pass at least one example")
    return n


def map_batch(x: InputBatch, fn: Callable[[Tensor], Tensor]) -> InputBatch:
    """Apply ``fn`` to every tensor of ``x``, keeping its structure."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: fn(v) for k, v in x.items()}
    return type(x)(fn(v) for v in x) if isinstance(x, tuple) else [fn(v) for v in x]


def slice_batch(x: InputBatch, index: Union[slice, Tensor]) -> InputBatch:
    """Examples ``index`` of every tensor in ``x`` (dim 0)."""
    return map_batch(x, lambda t: t[index])


def call_module(module: Callable[..., Any], x: InputBatch) -> Any:
    """Call ``module`` on ``x``: a tensor positionally, a tuple/list unpacked, a dict as kwargs."""
    if isinstance(x, Tensor):
        return module(x)
    if isinstance(x, Mapping):
        return module(**x)
    return module(*x)


def compute_dtype(params: Mapping[str, Tensor], x: Optional[InputBatch] = None) -> torch.dtype:
    """float64 if any parameter or floating input is float64, else float32."""
    tensors = list(params.values())
    if x is not None:
        tensors += [t for _, t in _leaves(x)]
    if any(t.dtype == torch.float64 for t in tensors if t.is_floating_point()):
        return torch.float64
    return torch.float32


def resolve_params(
    model: nn.Module, params: Optional[Mapping[str, Tensor]] = None
) -> dict[str, Tensor]:
    """The parameters to differentiate, by name, detached.

    Default: every parameter with ``requires_grad=True``; a tied (shared) parameter appears once,
    under its first name (``torch.func.functional_call`` then substitutes it everywhere it is
    used, so its Jacobian is the sum over uses). An explicit ``params`` mapping must use names
    from ``model.named_parameters()``; its values replace the model's for the computation.

    Raises:
        ValueError: no trainable parameter, or an unknown / duplicate name in ``params``.
        TypeError: a value in ``params`` that is not a floating tensor.
    """
    named = dict(model.named_parameters())
    if params is None:
        selected = {name: p for name, p in named.items() if p.requires_grad}
        if not selected:
            raise ValueError(
                f"{type(model).__name__} has no parameter with requires_grad=True; unfreeze at "
                "least one parameter or pass params={name: tensor}"
            )
    else:
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a mapping name -> Tensor, got {type(params).__name__}")
        if not params:
            raise ValueError("params is empty; pass at least one parameter to differentiate")
        all_names = dict(model.named_parameters(remove_duplicate=False))
        unknown = [k for k in params if k not in all_names]
        if unknown:
            known = ", ".join(list(named)[:8])
            raise ValueError(
                f"params names {unknown} are not parameters of {type(model).__name__} "
                f"(known: {known}{', ...' if len(named) > 8 else ''})"
            )
        canonical: dict[int, str] = {id(p): n for n, p in reversed(list(named.items()))}
        seen: dict[str, str] = {}
        for name in params:
            first = canonical[id(all_names[name])]
            if first in seen:
                raise ValueError(
                    f"params names {seen[first]!r} and {name!r} are the same (tied) parameter; "
                    "pass it once"
                )
            seen[first] = name
        selected = dict(params)
        for name, value in selected.items():
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise TypeError(f"params[{name!r}] must be a floating Tensor, got {value!r:.60}")
            if value.shape != all_names[name].shape:
                raise ValueError(
                    f"params[{name!r}] has shape {tuple(value.shape)}, the model's parameter has "
                    f"{tuple(all_names[name].shape)}"
                )
    return {name: p.detach() for name, p in selected.items()}


class OutputSelectionError(TypeError):
    """The model's output is not a tensor and ``output_fn`` does not (or cannot) pick one: the
    fix is ``output_fn``, whatever the inputs were."""


def _tensor_fields(out: Any) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of the tensor fields of a ``ModelOutput``/dict/dataclass-like output."""
    items: Any = ()
    if isinstance(out, Mapping):
        items = out.items()
    elif hasattr(out, "__dict__"):
        items = vars(out).items()
    return [(str(k), tuple(v.shape)) for k, v in items if isinstance(v, Tensor)]


def select_output(out: Any, output_fn: Optional[OutputFn]) -> Tensor:
    """``output_fn(out)`` (by default: ``out`` itself, or ``out.logits`` when ``out`` is not a
    Tensor but has a Tensor attribute ``logits``, e.g. a Hugging Face ``ModelOutput``), which
    must be a Tensor.

    Raises:
        TypeError: the selected output is not a Tensor (names ``output_fn`` as the fix).
    """
    if output_fn is not None:
        out = output_fn(out)
    elif not isinstance(out, Tensor) and isinstance(getattr(out, "logits", None), Tensor):
        out = out.logits
    if not isinstance(out, Tensor):
        what = "output_fn returned" if output_fn is not None else "the model returned"
        fields = _tensor_fields(out)
        if fields:
            name = fields[-1][0] if fields[-1][0] == "pooler_output" else fields[0][0]
            listing = ", ".join(f"{k} {shape}" for k, shape in fields)
            hint = f"its tensors: {listing}; e.g. output_fn=lambda out: out.{name}"
        else:
            hint = "e.g. output_fn=lambda out: out.logits"
        raise OutputSelectionError(
            f"{what} {type(out).__name__}, not a Tensor (no `logits`); pass output_fn=... "
            f"to select the output to measure ({hint})"
        )
    return out


class FunctionalModel:
    """``f(params, x) -> (N, O)``: the model as a pure function of (some of) its parameters.

    Parameters not in ``params`` keep the module's current values (frozen parameters are
    constants). Buffers are cloned once at construction, so nothing the forward does to them
    reaches the module; ``buffers=`` supplies them instead (e.g. a snapshot: state passed to
    ``functional_call`` alongside the parameters, used as given). The output is
    ``output_fn(model(x))`` (identity by default) reshaped to ``(N, O)``.

    Args:
        model: the module.
        output_fn: maps the module's output to a tensor, e.g. ``lambda out: out.logits``.
        dtype: cast parameters, buffers and floating inputs to this dtype (None: keep).
        buffers: the buffers (and any other constant state) to evaluate with, by name;
            None: a private clone of the module's buffers.
    """

    def __init__(
        self,
        model: nn.Module,
        output_fn: Optional[OutputFn] = None,
        dtype: Optional[torch.dtype] = None,
        buffers: Optional[Mapping[str, Tensor]] = None,
    ) -> None:
        self.model = model
        self.output_fn = output_fn
        self.dtype = dtype
        if buffers is None:  # a private copy: nothing the forward does reaches the module
            buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        self.buffers = {name: self._cast(b) for name, b in buffers.items()}

    def _cast(self, t: Tensor) -> Tensor:
        if self.dtype is not None and t.is_floating_point() and t.dtype != self.dtype:
            return t.to(self.dtype)
        return t

    def cast_inputs(self, x: InputBatch) -> InputBatch:
        """Inputs in the compute dtype; inference tensors (from a caller's ``inference_mode``)
        are cloned into normal tensors so autograd may save them."""
        return map_batch(x, lambda t: self._cast(t.clone() if t.is_inference() else t))

    def cast_params(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: self._cast(v) for k, v in params.items()}

    def raw(self, params: Mapping[str, Tensor], x: InputBatch) -> Any:
        """The module's output (before ``output_fn``) at ``params``."""
        state = {**self.buffers, **params}
        if isinstance(x, Tensor):
            args, kwargs = (x,), {}
        elif isinstance(x, Mapping):
            args, kwargs = (), dict(x)
        else:
            args, kwargs = tuple(x), {}
        try:
            return torch.func.functional_call(self.model, state, args, kwargs, strict=False)
        except RuntimeError as err:
            non_float = [
                (w, t.dtype) for w, t in _leaves(x) if not (t.is_floating_point() or t.is_complex())
            ]
            if non_float and any(s in str(err) for s in ("dtype", "type", "Long", "Int")):
                where, dt = non_float[0]
                raise TypeError(
                    f"{where} has dtype {dt} but the model needs floating inputs there "
                    f"(convert with .float()); the forward failed with: {err}"
                ) from err
            raise

    def __call__(self, params: Mapping[str, Tensor], x: InputBatch) -> Tensor:
        out = select_output(self.raw(params, x), self.output_fn)
        n = batch_size(x)
        if out.dim() == 0 or out.shape[0] != n:
            raise ValueError(
                f"the model output has shape {tuple(out.shape)}, which has no batch dimension of "
                f"size {n} on dim 0; the output must be batched like the inputs"
            )
        return out.reshape(n, -1)


def _model_devices(model: nn.Module) -> list[int]:
    devices = {t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"}
    return sorted(devices)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval semantics for the duration; every submodule's ``training`` flag restored after
    (``model.train(flag)`` on exit would overwrite submodules a user had put in another mode)."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, training in flags:
            module.training = training


class _PlainCall:
    """Stands in for ``torch.utils.checkpoint.CheckpointFunction`` (the reentrant checkpoint):
    ``apply(function, preserve_rng_state, *args)`` calls the function once, nothing saved."""

    @staticmethod
    def apply(function: Callable[..., Any], preserve_rng_state: bool, *args: Any) -> Any:
        del preserve_rng_state
        return function(*args)


def _plain_generator(*args: Any, **kwargs: Any) -> Iterator[None]:
    """Stands in for the non-reentrant checkpoint's context generator: ``checkpoint`` advances
    it once before and once after calling the function; here both steps do nothing."""
    del args, kwargs
    yield


class _CheckpointSwitch:
    """Process-wide switch (reference-counted, so nested and concurrent measurements compose)
    that turns ``torch.utils.checkpoint.checkpoint`` into a plain call of its function.

    ``checkpoint`` looks up ``CheckpointFunction`` and ``_checkpoint_without_reentrant_generator``
    in its module at call time, so replacing those two names reaches every caller, however it
    imported ``checkpoint`` (``from torch.utils.checkpoint import checkpoint``, HF's
    ``functools.partial(checkpoint, ...)``, ``checkpoint_sequential``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.saved: Optional[tuple[Any, Any]] = None

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        import torch.utils.checkpoint as cp

        if not hasattr(cp, "CheckpointFunction") or not hasattr(
            cp, "_checkpoint_without_reentrant_generator"
        ):  # pragma: no cover - a torch without these internals: leave checkpointing alone
            yield
            return
        with self.lock:
            if self.depth == 0:
                self.saved = (cp.CheckpointFunction, cp._checkpoint_without_reentrant_generator)
                cp.CheckpointFunction = _PlainCall
                cp._checkpoint_without_reentrant_generator = _plain_generator
            self.depth += 1
        try:
            yield
        finally:
            with self.lock:
                self.depth -= 1
                if self.depth == 0 and self.saved is not None:
                    cp.CheckpointFunction, cp._checkpoint_without_reentrant_generator = self.saved
                    self.saved = None


_CHECKPOINT = _CheckpointSwitch()


# The Hugging Face attention implementation measurements run with: SDPA (math backend, see
# :func:`measurement_mode`) with the mask always materialised as a boolean tensor. HF's own
# "sdpa" decides whether it may skip the mask with data-dependent checks (``padding_mask.all()``)
# that ``vmap`` cannot run; its "eager" softmax runs in float32, where a float64 model's
# fully-masked (left-padding) rows become NaN.
_HF_ATTENTION = "lazy_monitor_sdpa"
_HF_REGISTERED: list[bool] = []


def _hf_measurement_attention() -> Optional[str]:
    """Register (once) and return the name of the measurement attention in transformers'
    ``AttentionInterface``/``AttentionMaskInterface``; None where that API is missing."""
    if not _HF_REGISTERED:
        try:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
            from transformers.modeling_utils import AttentionInterface
        except Exception:  # noqa: BLE001 - transformers missing or another version's layout
            _HF_REGISTERED.append(False)
            return None

        def mask(*args: Any, **kwargs: Any) -> Any:
            kwargs["allow_is_causal_skip"] = False
            kwargs["allow_is_bidirectional_skip"] = False
            return sdpa_mask(*args, **kwargs)

        AttentionInterface.register(_HF_ATTENTION, sdpa_attention_forward)
        AttentionMaskInterface.register(_HF_ATTENTION, mask)
        _HF_REGISTERED.append(True)
    return _HF_ATTENTION if _HF_REGISTERED[0] else None


def _attention_configs(model: nn.Module) -> list[tuple[Any, str, Any]]:
    """``(config, attribute, value)`` of every Hugging Face config reachable from the model
    (each submodule's ``config`` and their ``sub_configs``) whose attention implementation is
    set and not ``"eager"``."""
    found: list[tuple[Any, str, Any]] = []
    seen: set[int] = set()
    stack = [getattr(m, "config", None) for m in model.modules()]
    while stack:
        config = stack.pop()
        if config is None or id(config) in seen or not hasattr(config, "_attn_implementation"):
            continue
        seen.add(id(config))
        # transformers keeps the value in ``_attn_implementation_internal`` behind a property
        # whose setter recurses into sub-configs: restore the stored value itself, per config.
        attr = (
            "_attn_implementation_internal"
            if hasattr(config, "_attn_implementation_internal")
            else "_attn_implementation"
        )
        value = getattr(config, attr)
        if value is not None and value != "eager":
            found.append((config, attr, value))
        for key in getattr(config, "sub_configs", None) or ():
            stack.append(getattr(config, key, None))
    return found


def _input_grad_hooks(model: nn.Module) -> list[tuple[dict, list]]:
    """``(hooks dict, its items)`` of every module carrying the forward hook that Hugging Face /
    peft install with gradient checkpointing (``enable_input_require_grads``: the embedding
    output gets ``requires_grad_(True)`` so a reentrant checkpoint has a graph input)."""
    found = []
    for module in model.modules():
        hooks = module._forward_hooks
        if any(
            getattr(h, "__name__", "").startswith("make_inputs_require_grad")
            for h in hooks.values()
        ):
            found.append((hooks, list(hooks.items())))
    return found


@contextlib.contextmanager
def measurement_mode(model: nn.Module) -> Iterator[None]:
    """How attention and activation checkpointing run while ``model`` is measured; everything
    is restored on exit (the model's own settings, torch's global switches).

    * **Attention.** Hugging Face models (``config._attn_implementation``, each config and
      sub-config) that use ``"sdpa"`` run with SDPA and an always materialised boolean mask
      (:data:`_HF_ATTENTION`): HF's own SDPA path decides whether to skip the mask with
      data-dependent checks that ``vmap`` cannot run (the Jacobian rows would fall back to a
      per-example loop, Llama 7x slower); other non-eager implementations (flash, flex) run
      eager. ``scaled_dot_product_attention`` is restricted to its
      math backend (the fused kernels have no forward-mode AD rule), and the fused fast path of
      ``nn.MultiheadAttention`` / ``nn.TransformerEncoder`` is off (``torch.backends.mha``;
      no ``vmap`` or forward AD either). All compute the same function.
    * **Checkpointing.** ``torch.utils.checkpoint.checkpoint`` (reentrant or not, HF's
      ``gradient_checkpointing_enable``, timm-style unconditional calls) becomes a plain call
      of its function, and the ``enable_input_require_grads`` hook is detached. Why: the
      reentrant variant cannot be differentiated with ``torch.autograd.grad(inputs=...)`` and
      the non-reentrant one recomputes under the batching of the backward (``vmap``, the
      structured engine's per-example checks) and aborts when the saved tensors differ.
      Checkpointing only trades memory for recomputation, and a measurement's memory is
      bounded by its own ``max_memory`` (passes split into example blocks), so dropping it
      gives the same values with fewer passes.

    Entered by :func:`side_effect_guard`, so :func:`~lazy_monitor.empirical_ntk`,
    ``empirical_ntk_fn``, :class:`~lazy_monitor.Linearization` and every tracker measurement go
    through it. The checkpoint switch is process-wide for its duration (another thread calling
    ``checkpoint`` meanwhile runs without recomputation: same values, more memory).
    """
    configs = _attention_configs(model)
    hooks = _input_grad_hooks(model)
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    try:
        if configs:
            sdpa = _hf_measurement_attention() or "eager"
            for config, attr, value in configs:
                setattr(config, attr, sdpa if value == "sdpa" else "eager")
        for d, items in hooks:
            for key, hook in items:
                if getattr(hook, "__name__", "").startswith("make_inputs_require_grad"):
                    del d[key]
        if fastpath:
            mha.set_fastpath_enabled(False)
        with _math_attention(), _CHECKPOINT.off():
            yield
    finally:
        if fastpath:
            mha.set_fastpath_enabled(True)
        for d, items in hooks:  # same dict object (hook handles refer to it), same order
            d.clear()
            d.update(items)
        for config, attr, value in reversed(configs):
            setattr(config, attr, value)


def _other_running_threads(enough: int = -1) -> Optional[int]:
    """Threads of *other* processes running right now (``/proc/loadavg``'s instantaneous
    runnable count minus this process's running threads); None where /proc is missing.

    The calling thread is itself runnable, so ``runnable - 1`` bounds the count from above;
    when that bound is at most ``enough`` it is returned without reading this process's
    threads (a quarter of a millisecond per sample: one file per thread)."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        if running - 1 <= enough:
            return max(0, running - 1)
        own = 0
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as f:
                # the state follows the parenthesised command name, which may contain spaces
                own += f.read().rpartition(")")[2].split()[0] == "R"
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - own)


class _ThreadChoice:
    """Samples of other processes' running threads (at least 1 ms apart) and the intra-op
    thread count they leave (:func:`measurement_threads`)."""

    def __init__(self) -> None:
        self.threads = torch.get_num_threads()
        try:
            self.cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            self.cores = os.cpu_count() or self.threads
        self.left = 3 if self.threads > 1 else 0
        self.seen: list[int] = []
        self.last: Optional[float] = None  # time.perf_counter() of the last sample

    def sample(self, all_left: bool, wait: bool = True) -> None:
        """Take the samples left (or only the next one) and apply the choice; without
        ``wait``, the next sample only if 1 ms has passed since the last one (no sleep)."""
        while self.left:
            if self.last is not None:
                delay = self.last + 0.001 - time.perf_counter()
                if delay > 0:
                    if not wait:
                        return
                    time.sleep(delay)
            # the exact count matters only where it could leave fewer than ``threads`` cores
            k = _other_running_threads(self.cores - self.threads)
            self.last = time.perf_counter()
            self.left -= 1
            if k is not None:
                self.seen.append(k)
                if self.cores - k <= 1:
                    self.left = 0  # one thread already: later samples cannot lower it
            if not all_left:
                break
        want = self.threads
        if self.seen:
            want = max(1, min(self.threads, self.cores - max(self.seen)))
        if want != torch.get_num_threads():
            torch.set_num_threads(want)

    def restore(self) -> None:
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)


# The choice of the innermost ``measurement_threads(defer=True)`` with samples still to take.
_PENDING: contextvars.ContextVar[Optional[_ThreadChoice]] = contextvars.ContextVar(
    "_PENDING", default=None
)


@contextlib.contextmanager
def measurement_threads(defer: bool = False) -> Iterator[None]:
    """Intra-op threads for a measurement: no more than the cores other processes leave free
    (at least one), restored on exit.

    A measurement is many small and mid-size ops; with every core's OpenMP thread spinning at
    each op's barrier, one descheduled thread (another job on the machine) stalls every op by
    a scheduler time slice: the MLP 784-1024x3-10 kernel at N = 32 went from 0.023 s to 3.6 s
    with one busy-loop process beside it on 2 cores. Fewer threads than busy cores never wait
    on a descheduled partner. Sampled three times 1 ms apart (the most others seen counts);
    sampling stops as soon as one sample already leaves a single thread (later samples cannot
    lower it further), so a busy machine pays no sleep. A sample that may overcount (the
    runnable bound of :func:`_other_running_threads`) is used only where it leaves every
    thread, so the choice is the one exact counts give.

    ``defer``: take only the first sample now (its choice applies at once) and the others in
    :func:`sample_threads` (mid-setup) and :func:`settle_threads`, which the caller runs before
    its heavy work: the setup in between (over 2 ms in ``empirical_ntk``) replaces the two 1 ms
    sleeps.
    """
    choice = _ThreadChoice()
    choice.sample(all_left=not defer)
    token = _PENDING.set(choice if defer else None)
    try:
        yield
    finally:
        _PENDING.reset(token)
        choice.restore()


def sample_threads() -> None:
    """Within ``measurement_threads(defer=True)``: the next sample, if 1 ms has passed since
    the last one (never sleeps), to be called in the middle of the setup; a no-op otherwise."""
    choice = _PENDING.get()
    if choice is not None:
        choice.sample(all_left=False, wait=False)


def settle_threads() -> None:
    """Take the samples a ``measurement_threads(defer=True)`` left (sleeping only for what is
    left of their 1 ms spacing) and apply the final thread choice; a no-op outside one."""
    choice = _PENDING.get()
    if choice is not None:
        choice.sample(all_left=True)


@contextlib.contextmanager
def side_effect_guard(model: nn.Module, defer_threads: bool = False) -> Iterator[None]:
    """Evaluate ``model`` in eval semantics and full precision, leaving no trace.

    For the duration: every submodule in eval mode (BatchNorm uses running statistics, dropout
    off), TF32 and reduced-precision matmuls off, autocast off, gradients enabled even inside a
    caller's ``no_grad``/``inference_mode``. On exit the ``training`` flag of each submodule,
    the float32 matmul precision, TF32 flags and the CPU/CUDA RNG states are exactly restored.
    Attention and checkpointing run as :func:`measurement_mode` decides, with the intra-op
    threads of :func:`measurement_threads` (``defer_threads``: its ``defer``; the caller runs
    :func:`settle_threads` before the heavy work).
    """
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=_model_devices(model)))
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        stack.enter_context(_full_matmul_precision())
        try:
            torch.backends.cudnn.allow_tf32 = False
            stack.enter_context(eval_mode(model))
            stack.enter_context(measurement_mode(model))
            stack.enter_context(measurement_threads(defer_threads))
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = cudnn_tf32


def _legacy_matmul_flags() -> bool:
    """Whether the float32 matmul precision was last set with the legacy
    ``torch.backends.cuda.matmul.allow_tf32`` flag (torch >= 2.9 keeps one precision per
    backend: the legacy flag sets only CUDA's, ``set_float32_matmul_precision`` all of them)."""
    cuda = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    cpu = getattr(mkldnn, "fp32_precision", None)
    return cuda is not None and cpu is not None and cuda != cpu and cpu == "none"


@contextlib.contextmanager
def _full_matmul_precision() -> Iterator[None]:
    """float32 matmuls in full precision, saved and restored with the API the user set them
    with, and untouched when already full. Mixing the legacy flag and the new API leaves torch
    in a state where ``get_float32_matmul_precision()`` raises (tests/reliability/
    test_global_flags.py): a user's later ``allow_tf32 = False`` must keep working."""
    if _legacy_matmul_flags():
        before = torch.backends.cuda.matmul.allow_tf32
        if before:
            torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            if before:
                torch.backends.cuda.matmul.allow_tf32 = True
        return
    precision = torch.get_float32_matmul_precision()
    if precision != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if precision != "highest":
            torch.set_float32_matmul_precision(precision)


def _math_attention() -> contextlib.AbstractContextManager:
    """``scaled_dot_product_attention`` restricted to its math backend: the fused CPU/GPU
    kernels have no forward-mode AD rule, the math composition does (same values up to
    rounding). A no-op where ``torch.nn.attention`` is missing."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _double_vjp(
    f: Callable[[dict[str, Tensor]], Tensor],
    primals: Mapping[str, Tensor],
    tangents: Mapping[str, Tensor],
    differentiable: bool,
) -> tuple[Tensor, Tensor]:
    """``(f(θ), J(θ) t)`` in reverse mode only: ``g(u) = J(θ)ᵀ u`` is linear in ``u``, so the
    vjp of ``g`` at any ``u`` with cotangent ``t`` is ``J t`` (the "double-vjp trick")."""
    with torch.enable_grad():
        wrt = {k: v.detach().requires_grad_() for k, v in primals.items()}
        out = f(wrt)
        u = torch.zeros_like(out, requires_grad=True)
        grads = torch.autograd.grad(
            [out], list(wrt.values()), [u], create_graph=True, allow_unused=True
        )
        pairs = [(g, tangents[k]) for k, g in zip(wrt, grads) if g is not None and g.requires_grad]
        if not pairs:
            jv = torch.zeros_like(out)
        else:
            (jv,) = torch.autograd.grad(
                [g for g, _ in pairs],
                [u],
                [t for _, t in pairs],
                create_graph=differentiable,
                allow_unused=True,
            )
            jv = torch.zeros_like(out) if jv is None else jv
    if not differentiable:
        out, jv = out.detach(), jv.detach()
    return out, jv


def linear_jvp(
    f: Callable[[dict[str, Tensor]], Tensor],
    primals: Mapping[str, Tensor],
    tangents: Mapping[str, Tensor],
    *,
    differentiable: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(f(θ₀), J(θ₀) t)`` for any model autograd can differentiate.

    ``torch.func.jvp`` (one forward-mode pass) with attention on its math backend; where
    forward mode cannot run the model (ops without a forward-mode rule such as
    ``mkldnn_rnn_layer`` or the fused ``_transformer_encoder_layer_fwd`` path, an
    ``autograd.Function`` without ``jvp``), the reverse-mode double-vjp trick gives the same
    product from one forward and two backward passes. If that fails too, its error (the
    model's own) propagates. ``differentiable=True`` keeps the result differentiable w.r.t.
    the tangents (for :class:`~lazy_monitor.core.linearization.LinearizedModel`).
    """
    try:
        with _math_attention():
            return torch.func.jvp(f, (dict(primals),), (dict(tangents),))
    except Exception:  # noqa: BLE001 - forward mode cannot run this model: reverse mode only
        pass
    with _math_attention():  # the fused attention backward has no double backward either
        return _double_vjp(f, primals, tangents, differentiable)
