"""The frozen linearization of a network around its initial parameters θ₀.

For a network ``f(x; θ)`` and a reference point θ₀ (usually the initialisation), the first-order
Taylor expansion in the *parameters* is

    f_lin(x; θ) = f(x; θ₀) + J(x; θ₀) (θ − θ₀),        J(x; θ₀) = ∂f(x; θ)/∂θ |_{θ=θ₀}

(Lee et al. 2019, "Wide Neural Networks of Any Depth Evolve as Linear Models Under Gradient
Descent", eq. 5). A network trains in the lazy / kernel regime when ``f`` stays close to
``f_lin`` along its whole trajectory (Chizat, Oyallon & Bach 2019). ``J (θ − θ₀)`` is one
Jacobian-vector product, computed here with a single ``torch.func.jvp`` at θ₀ with tangent
``θ − θ₀``; the same call returns ``f(x; θ₀)``, so ``f_lin`` costs one forward-mode pass
(measured ≈ 5 plain forward passes: 120–130 ms vs 26 ms for an MLP 784-1024×3-10 at N = 128 on CPU) and never materialises ``J``.

* :class:`Linearization` holds a detached snapshot of θ₀ and evaluates ``f0`` / ``f_lin`` of a
  live model without side effects (for monitoring).
* :class:`LinearizedModel` is an ``nn.Module`` whose own parameters θ start at θ₀ and whose
  forward is ``f_lin(x; θ)``: it is trained like any network, side by side with the real one.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from lazy_monitor.core._functional import (
    FunctionalModel,
    InputBatch,
    OutputFn,
    as_device,
    batch_size,
    compute_dtype,
    eval_mode,
    linear_jvp,
    measurement_mode,
    resolve_params,
    select_output,
    side_effect_guard,
)

__all__ = ["Linearization", "LinearizedModel"]

_STATE_FORMAT = 1


def _canonical_names(model: nn.Module) -> dict[str, str]:
    """Every parameter name (tied aliases included) -> the name it has in ``named_parameters()``."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters():
        first.setdefault(id(p), name)
    return {name: first[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}


def _canonicalize(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    canonical = _canonical_names(model)
    return {canonical[name]: value for name, value in params.items()}


class Linearization:
    r"""Snapshot of θ₀ and the frozen linearization ``f_lin(x; θ) = f(x; θ₀) + J(θ₀)(θ − θ₀)``.

    The snapshot holds θ₀ for the *linearized* parameters (by default every parameter with
    ``requires_grad=True``, tied parameters once under their first name) and, as constants, the
    values at snapshot time of every other parameter and of every buffer (BatchNorm statistics).
    Later changes to the model therefore move ``f_lin`` only through θ − θ₀ of the linearized
    parameters; a change of anything else (e.g. a frozen layer that gets unfrozen, running
    statistics updated by training) shows up as linearization error ``f − f_lin``, as it should.

    Evaluation is side-effect free and uses eval semantics (BatchNorm uses the snapshot's
    running statistics, dropout is off), full precision (no TF32, no autocast), with gradients
    enabled even under a caller's ``no_grad``/``inference_mode``; the model's weights, buffers,
    ``.grad``, training flags and every RNG state are left untouched. Results are detached.

    Output shape: ``(N, O)`` -- the batch dimension kept and every other output dimension
    flattened, exactly as in :func:`lazy_monitor.empirical_ntk` (so ``f_lin`` rows line up with
    kernel rows). ``flatten=False`` returns the model's own output shape instead (after
    ``output_fn``). Computation is in float64 if θ₀, the current parameters or a floating input
    are float64, else float32; each snapshot tensor is moved, for the computation only, to the
    device of the corresponding live parameter/buffer.

    Memory: one copy of the model's parameters and buffers (``device="cpu"`` keeps it in host
    memory and moves it to the model's device for each evaluation). Cost of ``f_lin``: one
    forward-mode pass through the model (``torch.func.jvp``), ≈ 5 plain forward passes
    (measured: 120–130 ms vs 26 ms for an MLP 784-1024×3-10 at N = 128 on CPU).

    Args:
        model: the network ``f``; its current parameters are θ unless ``params`` is given.
        params0: θ₀ by parameter name (names from ``model.named_parameters()``); these names are
            the linearized parameters. Default: the model's current trainable parameters.
        output_fn: maps the model's output to a tensor (e.g. ``lambda out: out.logits``).
        device: where the snapshot is stored: ``None`` (next to each parameter/buffer), or a
            device such as ``"cpu"`` to save accelerator memory.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``output_fn`` is not callable, or a value
            of ``params0`` is not a floating tensor.
        ValueError: no trainable parameter, an unknown / duplicate (tied) name or wrong shape in
            ``params0``, or an invalid ``device``.

    Example::

        lin = Linearization(model)               # snapshot θ₀ before training
        ...                                      # train the model
        f, f_lin = model(x), lin.f_lin(x)        # compare the net with its linearization
    """

    def __init__(
        self,
        model: nn.Module,
        params0: Optional[Mapping[str, Tensor]] = None,
        *,
        output_fn: Optional[OutputFn] = None,
        device: Union[str, torch.device, None] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable or None, got {type(output_fn).__name__}")
        self.model = model
        self.output_fn = output_fn
        self._device = as_device(device, "device")
        theta0 = _canonicalize(model, resolve_params(model, params0))
        self._names: tuple[str, ...] = tuple(n for n, _ in model.named_parameters() if n in theta0)
        self._params0 = {name: self._store(theta0[name]) for name in self._names}
        self._constants0 = {
            name: self._store(p.detach())
            for name, p in model.named_parameters()
            if name not in theta0
        }
        self._buffers0 = {name: self._store(b.detach()) for name, b in model.named_buffers()}

    # ------------------------------------------------------------------ snapshot access
    @property
    def names(self) -> tuple[str, ...]:
        """Names of the linearized parameters, in ``model.named_parameters()`` order."""
        return self._names

    @property
    def device(self) -> Optional[torch.device]:
        """Where the snapshot is stored (``None``: next to each parameter/buffer)."""
        return self._device

    @property
    def params0(self) -> dict[str, Tensor]:
        """θ₀ of the linearized parameters by name (the snapshot tensors, detached)."""
        return dict(self._params0)

    @property
    def buffers0(self) -> dict[str, Tensor]:
        """The model's buffers at snapshot time by name."""
        return dict(self._buffers0)

    def _store(self, t: Tensor) -> Tensor:
        if self._device is None:
            return t.detach().clone()
        return t.detach().to(self._device, copy=True)

    def _current(self, params: Optional[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """θ by name: the model's current values, overridden by ``params``."""
        live = dict(self.model.named_parameters())
        missing = [n for n in self._names if n not in live]
        if missing:
            raise RuntimeError(
                f"parameters {missing} of the snapshot are no longer parameters of "
                f"{type(self.model).__name__}; create a new Linearization for the changed model"
            )
        theta = {name: live[name].detach() for name in self._names}
        if params is not None:
            given = _canonicalize(self.model, resolve_params(self.model, params))
            foreign = [n for n in given if n not in self._params0]
            if foreign:
                raise ValueError(
                    f"params {foreign} are not linearized parameters of this Linearization "
                    f"(linearized: {list(self._names)[:8]}{', ...' if len(self._names) > 8 else ''}"
                    "); they are constants at their snapshot value"
                )
            theta.update(given)
        return theta

    def delta(self, params: Optional[Mapping[str, Tensor]] = None) -> dict[str, Tensor]:
        """``θ − θ₀`` by parameter name (detached, on θ's device, in θ's dtype).

        Args:
            params: θ by name (default: the model's current parameters; names absent from the
                mapping take the model's current value).
        """
        theta = self._current(params)
        return {n: theta[n] - self._params0[n].to(theta[n].device) for n in self._names}

    def delta_norm(self, params: Optional[Mapping[str, Tensor]] = None) -> float:
        """``‖θ − θ₀‖₂`` over all linearized parameters, accumulated in float64."""
        total = 0.0
        for d in self.delta(params).values():
            total += float(d.detach().double().pow(2).sum())
        return total**0.5

    # ------------------------------------------------------------------ evaluation
    def _functional(self, x: InputBatch, extra: Mapping[str, Tensor]) -> tuple[Any, Any, list]:
        """FunctionalModel with snapshot constants/buffers on the live devices, compute dtype."""
        live_params = dict(self.model.named_parameters())
        live_buffers = dict(self.model.named_buffers())
        dtype = compute_dtype({**self._params0, **self._constants0, **extra}, x)
        shapes: list[torch.Size] = []

        def capture(out: Any) -> Any:
            out = select_output(out, self.output_fn)  # the default (e.g. `.logits`) included
            shapes.append(out.shape)
            return out

        constants: dict[str, Tensor] = {}
        for source, live in ((self._buffers0, live_buffers), (self._constants0, live_params)):
            for name, value in source.items():
                if name not in live:
                    raise RuntimeError(
                        f"{name!r} of the snapshot is no longer a parameter/buffer of "
                        f"{type(self.model).__name__}; create a new Linearization for the "
                        "changed model"
                    )
                constants[name] = value.to(live[name].device)
        # Evaluate at the snapshot's buffers and frozen parameters, not the live module's.
        fm = FunctionalModel(self.model, capture, dtype, buffers=constants)
        theta0 = fm.cast_params(
            {n: self._params0[n].to(live_params[n].device) for n in self._names}
        )
        return fm, theta0, shapes

    @staticmethod
    def _shape(out: Tensor, shapes: list, flatten: bool) -> Tensor:
        return out if flatten else out.reshape(shapes[-1])

    def f0(self, x: InputBatch, *, flatten: bool = True) -> Tensor:
        """``f(x; θ₀)``: the model at the snapshot.

        Args:
            x: inputs batched on dim 0 (a tensor, a tuple/list passed positionally or a dict
                passed as keyword arguments).
            flatten: return ``(N, O)`` (default) or the model's output shape.

        Returns:
            ``(N, O)`` detached tensor (or the model's output shape).
        """
        batch_size(x)
        fm, theta0, shapes = self._functional(x, {})
        with side_effect_guard(self.model), torch.no_grad():
            out = fm(theta0, fm.cast_inputs(x))
        return self._shape(out.detach(), shapes, flatten)

    def f0_and_f_lin(
        self,
        x: InputBatch,
        params: Optional[Mapping[str, Tensor]] = None,
        *,
        flatten: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """``(f(x; θ₀), f_lin(x; θ))`` from one ``torch.func.jvp`` at θ₀ with tangent θ − θ₀.

        Args:
            x: inputs batched on dim 0 (tensor, tuple/list, or dict of tensors).
            params: θ by name (default: the model's current parameters; names absent from the
                mapping take the model's current value). Only linearized names are allowed.
            flatten: return ``(N, O)`` (default) or the model's output shape.

        Returns:
            Two detached ``(N, O)`` tensors (or the model's output shape).

        Raises:
            ValueError: ``params`` names a parameter that is not linearized, or a bad batch.
        """
        batch_size(x)
        theta = self._current(params)
        fm, theta0, shapes = self._functional(x, theta)
        live = dict(self.model.named_parameters())
        theta = fm.cast_params({n: theta[n].to(live[n].device) for n in self._names})
        tangent = {n: theta[n] - theta0[n] for n in self._names}
        xc = fm.cast_inputs(x)
        with side_effect_guard(self.model), torch.no_grad():
            out0, jv = linear_jvp(lambda p: fm(p, xc), theta0, tangent)
        out0 = out0.detach()
        return self._shape(out0, shapes, flatten), self._shape(out0 + jv.detach(), shapes, flatten)

    def f_lin(
        self,
        x: InputBatch,
        params: Optional[Mapping[str, Tensor]] = None,
        *,
        flatten: bool = True,
    ) -> Tensor:
        """``f_lin(x; θ) = f(x; θ₀) + J(x; θ₀)(θ − θ₀)`` (Lee et al. 2019, eq. 5).

        Args:
            x: inputs batched on dim 0 (tensor, tuple/list, or dict of tensors).
            params: θ by name (default: the model's current parameters; names absent from the
                mapping take the model's current value). Only linearized names are allowed.
            flatten: return ``(N, O)`` (default) or the model's output shape.

        Returns:
            ``(N, O)`` detached tensor (or the model's output shape).
        """
        return self.f0_and_f_lin(x, params, flatten=flatten)[1]

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """The snapshot: CPU tensors and plain Python values (safe for ``weights_only=True``)."""
        cpu = lambda d: {k: v.detach().cpu().clone() for k, v in d.items()}  # noqa: E731
        return {
            "format": _STATE_FORMAT,
            "names": list(self._names),
            "params0": cpu(self._params0),
            "constants0": cpu(self._constants0),
            "buffers0": cpu(self._buffers0),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a snapshot saved by :meth:`state_dict` (for the same architecture).

        Raises:
            ValueError: the state is not a Linearization state, or its names / shapes do not
                match this linearization's model.
        """
        required = ("format", "names", "params0", "constants0", "buffers0")
        if not isinstance(state, Mapping) or any(k not in state for k in required):
            raise ValueError(
                f"not a Linearization state_dict: expected keys {list(required)}, got "
                f"{list(state) if isinstance(state, Mapping) else type(state).__name__}"
            )
        if state["format"] != _STATE_FORMAT:
            raise ValueError(f"unsupported Linearization state format {state['format']!r}")
        if list(state["names"]) != list(self._names):
            raise ValueError(
                f"the saved linearized parameters {list(state['names'])[:8]} differ from this "
                f"Linearization's {list(self._names)[:8]}; build it with the same model and params0"
            )
        for key, mine in (
            ("params0", self._params0),
            ("constants0", self._constants0),
            ("buffers0", self._buffers0),
        ):
            saved = state[key]
            if set(saved) != set(mine):
                raise ValueError(
                    f"{key} names differ: saved {sorted(saved)[:8]}, model {sorted(mine)[:8]}"
                )
            for name, value in saved.items():
                if tuple(value.shape) != tuple(mine[name].shape):
                    raise ValueError(
                        f"{key}[{name!r}] has shape {tuple(value.shape)} in the state, "
                        f"{tuple(mine[name].shape)} in the model"
                    )
        for key, mine in (
            ("params0", self._params0),
            ("constants0", self._constants0),
            ("buffers0", self._buffers0),
        ):
            for name, value in state[key].items():
                where = self._device if self._device is not None else mine[name].device
                mine[name] = value.detach().to(where, copy=True)


class _Snapshot(nn.Module):
    """Buffers stored under dotted names, mirroring the model's module tree."""

    def set(self, name: str, value: Tensor) -> None:
        *path, leaf = name.split(".")
        module: nn.Module = self
        for part in path:
            if part not in module._modules:
                module.add_module(part, _Snapshot())
            module = module._modules[part]
        module.register_buffer(leaf, value)


class LinearizedModel(nn.Module):
    r"""A trainable linearized network: ``forward(x) = f(x; θ₀) + J(x; θ₀)(θ − θ₀)``.

    Its trainable parameters θ are those of a private deep copy of ``model`` (``self.model``),
    so they start at θ₀ and share nothing with the original; θ₀ itself is stored as buffers in
    ``self.theta0`` (same dotted names). The forward is one ``torch.func.jvp`` at θ₀ with
    tangent ``θ − θ₀``; ``torch.func.jvp`` composes with autograd, so ``loss.backward()`` gives
    the exact gradient of the linear model, ``∂L/∂θ = J(θ₀)ᵀ ∂L/∂f_lin``. Train it side by
    side with the real network (same data, optimiser and learning rate) to see how far the real
    network departs from its linearization (Lee et al. 2019, fig. 2/3).

    Semantics: the forward always runs the copy in eval mode (BatchNorm uses the running
    statistics of θ₀, dropout is off) -- the linearization is of the deterministic eval-mode
    function; buffers and the copy's frozen parameters (``requires_grad=False`` at
    construction) stay at their θ₀ values. Output: the model's own output shape (after
    ``output_fn``), in the model's dtype (convert with ``.double()`` like any module). The
    caller's grad mode and autocast are respected. Cost per forward ≈ 5 plain forward passes
    (measured for an MLP 784-1024×3-10 at N = 128 on CPU: 120–130 ms vs 26 ms); memory: one
    copy of the model plus θ₀.

    Args:
        model: the network to linearize at its current parameters (not modified).
        output_fn: maps the model's output to a tensor (e.g. ``lambda out: out.logits``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or cannot be deep-copied, or ``output_fn``
            is not callable.
        ValueError: the model has no trainable parameter.

    Example::

        lin = LinearizedModel(net)  # before training net
        opt_net, opt_lin = SGD(net.parameters(), lr), SGD(lin.parameters(), lr)
        # train both on the same batches; compare net(x_test) with lin(x_test)
    """

    def __init__(self, model: nn.Module, *, output_fn: Optional[OutputFn] = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable or None, got {type(output_fn).__name__}")
        try:
            clone = copy.deepcopy(model)
        except Exception as err:  # e.g. modules holding open handles or non-copyable state
            raise TypeError(
                f"LinearizedModel needs a private copy of the model, but {type(model).__name__} "
                f"cannot be deep-copied: {err}"
            ) from err
        names = list(resolve_params(clone))
        for p in clone.parameters():
            if p.grad is not None:
                p.grad = None
        self.model = clone
        self.theta0 = _Snapshot()
        for name in names:
            self.theta0.set(name, clone.get_parameter(name).detach().clone())
        self.output_fn = output_fn
        self._names = tuple(names)

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the linearized (trainable) parameters, as in ``self.model``."""
        return self._names

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """``f(x; θ₀) + J(x; θ₀)(θ − θ₀)`` for the inputs the model takes (args/kwargs as-is).

        Returns:
            Tensor of the model's output shape (after ``output_fn``), differentiable w.r.t. θ.
        """
        params = dict(self.model.named_parameters())
        theta0 = {n: self.theta0.get_buffer(n) for n in self._names}
        tangent = {n: params[n] - theta0[n] for n in self._names}
        # Everything not linearized is a constant: detach it so no gradient reaches it.
        constants = {n: p.detach() for n, p in params.items() if n not in theta0}
        constants.update({n: b.detach().clone() for n, b in self.model.named_buffers()})

        def f(p: dict[str, Tensor]) -> Tensor:
            out = torch.func.functional_call(
                self.model, {**constants, **p}, args, kwargs, strict=False
            )
            return select_output(out, self.output_fn)

        # the measurement's attention and checkpointing (a jvp through a checkpoint cannot run)
        with eval_mode(self.model), measurement_mode(self.model):
            out0, jv = linear_jvp(f, theta0, tangent, differentiable=True)
        return out0 + jv

    def extra_repr(self) -> str:
        return f"linearized parameters: {len(self._names)}"
