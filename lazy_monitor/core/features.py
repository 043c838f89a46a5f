r"""Feature movement per layer: linear CKA between a layer's features at θ₀ and now.

A kernel can move while the representations stay put (e.g. only the readout grew), and features
can rotate or rescale without changing what they represent. Linear centred kernel alignment
(CKA, Kornblith, Norouzi, Lee & Hinton 2019, "Similarity of Neural Network Representations
Revisited", eq. for linear CKA) compares two feature matrices of the same ``N`` examples,

    CKA(X, Y) = ‖Ycᵀ Xc‖²_F / (‖Xcᵀ Xc‖_F · ‖Ycᵀ Yc‖_F)
              = ⟨H X Xᵀ H, H Y Yᵀ H⟩_F / (‖H X Xᵀ H‖_F · ‖H Y Yᵀ H‖_F),

with ``Xc = H X`` the column-centred features and ``H = I − 11ᵀ/N``. It lies in ``[0, 1]``, is 1
for identical features, and is invariant to orthogonal transforms ``X → X Q`` and to isotropic
scaling ``X → c X`` (but not to arbitrary invertible linear maps): "1 = features unchanged up to a
rotation and a scale". The Gram form costs ``O(N² (D1 + D2))`` and never builds a ``D × D``
matrix, so wide (e.g. convolutional) features are fine for probe sizes of a few hundred.

:func:`capture_features` records layer outputs on a probe with forward hooks during one
side-effect-free forward; :func:`feature_hooks` is the hook part alone, for callers that
already run such a forward (the tracker's ``f`` evaluation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lazy_monitor.core._functional import (
    FunctionalModel,
    InputBatch,
    batch_size,
    compute_dtype,
    map_batch,
    side_effect_guard,
)

__all__ = [
    "capture_features",
    "centered_gram",
    "gram_cka",
    "default_feature_modules",
    "feature_cka",
    "feature_hooks",
    "linear_cka",
]


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of two feature matrices of the same examples (Kornblith et al. 2019).

    Computed in float64 from the centred Gram matrices (see the module docstring).

    Args:
        x: ``(N, D1)`` features of ``N`` examples.
        y: ``(N, D2)`` features of the same examples (same order).

    Returns:
        CKA in ``[0, 1]`` (up to rounding); the constant-feature cases as :func:`gram_cka`
        (both constant: 1, one constant: 0). NaN if either input contains NaN/inf.

    Raises:
        ValueError: inputs not 2-D, different ``N``, or ``N < 2``.

    Example::

        linear_cka(feats0["fc1"], feats["fc1"])   # 1.0: fc1's representation did not move
    """
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"x and y must be Tensors, got {type(x).__name__}, {type(y).__name__}")
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(
            f"x and y must be (N, D) feature matrices, got shapes {tuple(x.shape)} and "
            f"{tuple(y.shape)}; flatten per example with t.reshape(N, -1)"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must hold the same N examples, got N={x.shape[0]} and N={y.shape[0]}"
        )
    if x.shape[0] < 2:
        raise ValueError(f"CKA needs at least 2 examples (centring), got N={x.shape[0]}")
    return gram_cka(centered_gram(x), centered_gram(y.to(x.device)))


def centered_gram(features: Tensor) -> Tensor:
    """``H X Xᵀ H`` in float64: the ``(N, N)`` centred Gram matrix of ``(N, D)`` features.

    All that linear CKA needs of one side: a tracker can store this for the reference features
    at θ₀ (``N²`` numbers per layer) instead of the ``N·D`` features themselves. Exactly 0 for
    features that are the same for every example; NaN-filled if the features contain NaN/inf.
    """
    if not isinstance(features, Tensor) or features.dim() != 2:
        raise ValueError(
            f"features must be an (N, D) tensor, got {getattr(features, 'shape', features)!r}"
        )
    x = features.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        return torch.full(
            (x.shape[0], x.shape[0]), float("nan"), dtype=torch.float64, device=x.device
        )
    # H X = H (X − 1 x₀ᵀ): subtracting the first example first is exact, so features that are
    # constant across the examples give exactly 0 (the mean of N equal values can round off)
    xs = x - x[:1]
    xc = xs - xs.mean(dim=0, keepdim=True)  # centring the columns = H X
    return xc @ xc.T


def gram_cka(gram_x: Tensor, gram_y: Tensor) -> float:
    """Linear CKA from two centred Gram matrices (:func:`centered_gram`), ``(N, N)`` each:
    ``⟨Gx, Gy⟩_F / (‖Gx‖_F ‖Gy‖_F)``.

    Constant features (the same for every probe example) have a zero centred Gram, where the
    ratio is 0/0. They carry no information about the examples, and CKA compares what the
    features tell the examples apart by, so: both zero -> 1 (the same, empty, representation);
    exactly one zero -> 0 (nothing in common: e.g. a layer whose output collapsed to a constant,
    or one that was constant at θ₀ -- the tracker omits such layers when it is built). NaN if
    either Gram is non-finite.
    """
    if gram_x.shape != gram_y.shape or gram_x.dim() != 2:
        raise ValueError(
            f"gram_x and gram_y must be (N, N) of the same N, got {tuple(gram_x.shape)} and "
            f"{tuple(gram_y.shape)}"
        )
    gx = gram_x.to(torch.float64)
    gy = gram_y.to(device=gx.device, dtype=torch.float64)
    if not (bool(torch.isfinite(gx).all()) and bool(torch.isfinite(gy).all())):
        return float("nan")
    nx, ny = torch.linalg.matrix_norm(gx), torch.linalg.matrix_norm(gy)
    if float(nx) == 0.0 or float(ny) == 0.0:
        return 1.0 if float(nx) == float(ny) else 0.0
    if torch.equal(gx, gy):
        return 1.0  # identical features: exactly 1, not 1 - rounding (e.g. at the reference step)
    return float((gx * gy).sum() / (nx * ny))


def _on_model_device(model: nn.Module, probe: InputBatch) -> InputBatch:
    first = next(iter(model.parameters()), None)
    if first is None:
        return probe
    return map_batch(probe, lambda t: t.to(first.device))


def default_feature_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose outputs are tracked by default: those that own parameters.

    The same grouping as the per-layer kernel (``ntk_layer/<layer>/...``): a trainable parameter
    ``"a.b.weight"`` belongs to module ``"a.b"`` (its name prefix); every distinct prefix is
    listed once, in the order of ``model.named_parameters()``. Parameters registered on the root
    module itself (no prefix) are skipped: the root's output is the model output, which the
    linearization metrics already track.

    Raises:
        ValueError: no trainable parameter is owned by a submodule (nothing to track).
    """
    names: list[str] = []
    for param_name, p in model.named_parameters():
        prefix = param_name.rpartition(".")[0]
        if p.requires_grad and prefix and prefix not in names:
            names.append(prefix)
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no submodule owning a trainable parameter; pass the "
            "module names to track explicitly (see model.named_modules())"
        )
    return names


def _first_tensor(out: Any) -> Optional[Tensor]:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]  # e.g. (hidden_states, attention) of HF blocks, (output, h_n) of RNNs
    return None


def _output_size(out: Any, n: int) -> Optional[int]:
    """Values per example of a model's output (its ``logits`` for a ``ModelOutput``-like)."""
    if not isinstance(out, Tensor) and isinstance(getattr(out, "logits", None), Tensor):
        out = out.logits
    t = _first_tensor(out)
    if t is None or t.dim() == 0 or t.shape[0] != n:
        return None
    return t.numel() // n


def _output_layer(
    model: nn.Module, order: Sequence[str], dims: Mapping[str, int], out_size: Optional[int]
) -> Optional[str]:
    """The recorded module that computes the model's output: the last one to finish, if no
    other module with parameters of its own runs after it (its enclosing modules aside) and it
    has as many values per example as the output. Follows parameter-free tails (a scale, a
    softmax, a view, ``output_fn``); an output computed by a parametrised module that is not
    recorded (a frozen or tied LM head) gives None."""
    named = dict(model.named_modules())
    last = max((i for i, name in enumerate(order) if name in dims), default=None)
    if last is None or out_size is None:
        return None
    name = order[last]
    for later in order[last + 1 :]:
        encloses = later == "" or name.startswith(later + ".")
        if not encloses and next(named[later].parameters(recurse=False), None) is not None:
            return None
    return name if dims[name] == out_size else None


@contextlib.contextmanager
def feature_hooks(
    model: nn.Module,
    modules: Sequence[str],
    n: int,
    *,
    strict: bool = True,
    transform: Optional[Callable[[Tensor], Tensor]] = None,
    select: Optional[dict[str, str]] = None,
) -> Iterator[dict[str, Tensor]]:
    """Record the outputs of ``modules`` during the forwards run inside the ``with`` block.

    Yields a dict that is filled as the forward runs: ``{name: (n, D)}`` detached features, the
    module output flattened per example (a tuple/list output contributes its first tensor). The
    hooks are removed on exit, also on error. Running the forward (and its side-effect
    protection) is the caller's job.

    Args:
        model: the module containing ``modules``.
        modules: names as in ``model.named_modules()``.
        n: the batch size of the forward (outputs must be batched on dim 0 with ``n`` examples).
        strict: raise on exit for a module that cannot be tracked (below); ``False`` drops such
            modules from the dict instead (the caller compares its keys with ``modules``).
        transform: applied to each ``(n, D)`` feature matrix inside the hook, e.g.
            :func:`centered_gram` to keep only ``(n, n)`` per module instead of ``n·D`` (the
            features of a wide layer are then freed as the forward goes on).
        select: choose the modules worth tracking (a tracker's first forward): filled with
            ``{module: reason}`` for each module left out of the dict -- ``"constant"``
            (the same features for every example: CKA is undefined), ``"output"`` (only with
            ``strict=False``: the module computing the model's output, see below) and, with
            ``strict=False``, ``"unbatched"`` (an output shared by the batch, e.g. position embeddings),
            ``"untrackable"`` (not called once, no tensor).
            The output layer is the last recorded module to finish when no other module with
            parameters of its own runs after it (enclosing modules and parameter-free tails
            such as a scale or a softmax aside) and its output has as many values per example
            as the model's (its ``logits`` for a ``ModelOutput``).

    Raises:
        ValueError: an unknown module name (on entry); on exit, a module that was not called, was
            called more than once, or whose output is not batched with ``n`` examples.
        TypeError: a module output with no tensor (on exit).
    """
    named = dict(model.named_modules())
    unknown = [m for m in modules if m not in named]
    if unknown:
        some = ", ".join(repr(k) for k in list(named)[1:9])
        raise ValueError(
            f"feature modules {unknown} are not submodules of {type(model).__name__} "
            f"(some names: {some}); use names from model.named_modules()"
        )
    captured: dict[str, Tensor] = {}
    problems: list[str] = []
    bad: set[str] = set()
    constant: set[str] = set()
    unbatched: set[str] = set()  # shared by the batch (e.g. position embeddings): no features
    dims: dict[str, int] = {}
    order: list[str] = []  # every module, in the order its forward finishes (select only)
    out_size: list[Optional[int]] = [None]

    def make_hook(name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            t = _first_tensor(out)
            if t is None:
                problems.append(f"TypeError: module {name!r} returned {type(out).__name__}")
            elif name in captured or name in bad:
                problems.append(f"module {name!r} was called more than once in one forward")
            elif t.dim() == 0 or t.shape[0] != n:
                unbatched.add(name)
                problems.append(
                    f"module {name!r} output has shape {tuple(t.shape)}, not batched with {n} "
                    "examples on dim 0"
                )
            else:
                feats = t.detach().reshape(n, -1)
                dims[name] = feats.shape[1]
                if select is not None and bool((feats == feats[:1]).all()):
                    constant.add(name)
                captured[name] = feats if transform is None else transform(feats)
                return
            bad.add(name)

        return hook

    def record(name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            order.append(name)
            if name == "":
                out_size[0] = _output_size(out, n)

        return hook

    handles = [named[m].register_forward_hook(make_hook(m)) for m in modules]
    if select is not None and not strict:
        handles += [m.register_forward_hook(record(k)) for k, m in named.items()]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()
    if select is not None:
        out = None if strict else _output_layer(model, order, dims, out_size[0])
        for name in modules:
            if name in constant:
                select[name] = "constant"
            elif name == out:
                select[name] = "output"
            elif not strict and name in unbatched and name not in captured:
                select[name] = "unbatched"
            elif not strict and (name in bad or name not in captured):
                select[name] = "untrackable"
        for name in select:
            captured.pop(name, None)
    if not strict:
        for name in bad:
            captured.pop(name, None)
        return
    missing = [m for m in modules if m not in captured and m not in constant and not problems]
    if missing:
        problems.append(f"modules {missing} were not called by the forward")
    if problems:
        msg = "; ".join(problems) + " (pick modules called once per forward on batched inputs)"
        raise (TypeError if problems[0].startswith("TypeError") else ValueError)(msg)


def capture_features(
    model: nn.Module,
    probe: InputBatch,
    modules: Optional[Sequence[str]] = None,
    *,
    params: Optional[Mapping[str, Tensor]] = None,
) -> dict[str, Tensor]:
    """Each module's output features on ``probe``, from one forward without side effects.

    The forward is a functional call (``torch.func.functional_call``) under
    :func:`~lazy_monitor.core._functional.side_effect_guard`: eval semantics (BatchNorm running
    statistics, dropout off), full precision, no autograd graph; the module's weights, buffers
    (the call uses private clones), ``.grad``, training flags and the CPU/CUDA RNG states are
    left exactly as they were, and the hooks are removed afterwards.

    Args:
        model: the network.
        probe: inputs batched on dim 0 (tensor, tuple/list or dict), ``N`` examples; moved to
            the device of the model's first parameter.
        modules: module names to record (``model.named_modules()``); default
            :func:`default_feature_modules` (the modules owning parameters).
        params: optional ``{name: tensor}`` overriding some parameters for this forward (e.g.
            the θ₀ snapshot to get the reference features); default: the model's own.

    Returns:
        ``{module name: (N, D_module)}`` features, detached, in ``modules`` order, in the
        tracker's compute dtype (float64 if any parameter or floating input is float64, else
        float32).

    Raises:
        ValueError / TypeError: as :func:`feature_hooks`, or a bad probe.

    Example::

        feats0 = capture_features(model, x_probe)        # at θ₀
        ...train...
        feature_cka(feats0, capture_features(model, x_probe))   # {"fc1": 0.93, "readout": 0.99}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = default_feature_modules(model) if modules is None else list(modules)
    if not modules:
        raise ValueError("modules is empty; pass at least one module name (or None: default)")
    x = _on_model_device(model, probe)
    n = batch_size(x)
    # Every parameter explicitly (overrides win), so all of them get the compute dtype.
    state = {k: p.detach() for k, p in model.named_parameters()}
    state.update({} if params is None else {k: v.detach() for k, v in params.items()})
    # Same compute dtype rule as the tracker's forward: float64 if any parameter or input is.
    dtype = compute_dtype(state, x)
    fm = FunctionalModel(model, dtype=dtype)
    with side_effect_guard(model), torch.no_grad(), feature_hooks(model, modules, n) as feats:
        fm.raw(fm.cast_params(state), fm.cast_inputs(x))
    return {m: feats[m] for m in modules}


def feature_cka(reference: Mapping[str, Tensor], current: Mapping[str, Tensor]) -> dict[str, float]:
    """``{layer: linear_cka(reference[layer], current[layer])}`` for every layer of ``reference``.

    Args:
        reference: features at θ₀, ``{layer: (N, D)}`` (from :func:`capture_features`).
        current: features now, same layers and ``N``.

    Returns:
        ``{layer: CKA}`` in ``reference`` order (the tracker logs them as
        ``features/<layer>/cka``). 1 = unchanged up to rotation and scale; NaN as
        :func:`linear_cka`.

    Raises:
        ValueError: a layer of ``reference`` missing from ``current``.
    """
    missing = [k for k in reference if k not in current]
    if missing:
        raise ValueError(f"current features lack the layers {missing} of the reference")
    return {k: linear_cka(v, current[k]) for k, v in reference.items()}
