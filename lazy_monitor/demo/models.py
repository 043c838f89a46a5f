"""Multilayer perceptrons in the NTK or the standard parameterisation (plain PyTorch).

NTK parameterisation (Jacot, Gabriel & Hongler 2018, "Neural Tangent Kernel", eq. 1): every
weight and bias is drawn from N(0, 1) and the scale lives in the forward pass,

    y = σ_w / √fan_in · x Wᵀ + σ_b · b.

Standard parameterisation: the same function at initialisation, with the scale in the
initialisation instead, ``W ~ N(0, σ_w²/fan_in)``, ``b ~ N(0, σ_b²)``, ``y = x Wᵀ + b``. The two
differ in their training dynamics: under the NTK parameterisation a fixed learning rate gives
a width-independent kernel, a relative change of the weights that shrinks like
``width^(-1/2)`` and a relative change of the kernel bounded by ``O(width^(-1/2))`` (Lee et al.
2019; measured: a log-log slope of about −0.7 to −1, docs/theory.md "Reading the demo"), which is the
setting of the lazy-regime width sweeps.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from lazy_monitor._validation import check_float, check_int, message

__all__ = ["NTKLinear", "OutputScale", "mlp"]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "identity": nn.Identity,
}
# Default σ_w per activation: √2 keeps the pre-activation variance constant through ReLU-like
# layers (He et al. 2015); 1 for the others (the edge of chaos for tanh with small σ_b).
_DEFAULT_SIGMA_W = {"relu": math.sqrt(2.0), "gelu": math.sqrt(2.0), "softplus": math.sqrt(2.0)}
_PARAMETERIZATIONS = ("ntk", "standard")


def _check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    return check_int(name, value, minimum=minimum)


def _check_float(name: str, value: object, *, positive: bool = False) -> float:
    value = check_float(name, value, minimum=0.0)
    if positive and value == 0:
        raise ValueError(message(name, "a finite number > 0", value))
    return value


def _randn(shape: tuple[int, ...], generator: Optional[torch.Generator], like: Tensor) -> Tensor:
    # Draw on the CPU so a CPU generator works for parameters on any device.
    return torch.randn(shape, generator=generator, dtype=like.dtype).to(like.device)


class NTKLinear(nn.Module):
    r"""Affine layer in the NTK parameterisation: ``y = σ_w/√fan_in · x Wᵀ + σ_b · b``.

    ``W`` (``(out_features, in_features)``) and ``b`` (``(out_features,)``) are drawn from
    N(0, 1) (Jacot et al. 2018). The output distribution at initialisation equals that of an
    ``nn.Linear`` with ``W ~ N(0, σ_w²/fan_in)``, ``b ~ N(0, σ_b²)``, but the gradient with
    respect to ``W`` is scaled by ``σ_w/√fan_in``, which makes the NTK width-independent.

    Args:
        in_features: size of each input sample (``fan_in``).
        out_features: size of each output sample.
        bias: learn the additive bias ``b``.
        sigma_w: weight scale σ_w (> 0).
        sigma_b: bias scale σ_b (>= 0; Jacot et al. use 0.1).
        generator: random generator for the initialisation (default: the global RNG).

    Raises:
        TypeError / ValueError: non-integer or non-positive sizes, non-finite or negative scales.

    Example::

        layer = NTKLinear(784, 1024, sigma_w=2**0.5)
        y = layer(torch.randn(8, 784))  # (8, 1024)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        sigma_w: float = 1.0,
        sigma_b: float = 0.1,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        self.in_features = _check_positive_int("in_features", in_features)
        self.out_features = _check_positive_int("out_features", out_features)
        self.sigma_w = _check_float("sigma_w", sigma_w, positive=True)
        self.sigma_b = _check_float("sigma_b", sigma_b, positive=False)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters(generator)

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Redraw ``W`` and ``b`` from N(0, 1) (with ``generator`` if given)."""
        with torch.no_grad():
            self.weight.copy_(_randn(tuple(self.weight.shape), generator, self.weight))
            if self.bias is not None:
                self.bias.copy_(_randn(tuple(self.bias.shape), generator, self.bias))

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in_features) -> (..., out_features)``."""
        # The parameters enter F.linear unscaled (the scales move onto the input and output):
        # same function, but the kernel engine's structured path recognises the layer as
        # ``y = a Wᵀ + b`` instead of falling back to per-example Jacobians.
        scale = self.sigma_w / math.sqrt(self.in_features)
        if self.bias is None:
            return nn.functional.linear(x * scale, self.weight)
        if self.sigma_b == 0.0:
            return nn.functional.linear(x * scale, self.weight) + self.sigma_b * self.bias
        # σ_w/√fan_in · x Wᵀ + σ_b · b  ==  σ_b · (x' Wᵀ + b)  with  x' = x · σ_w / (σ_b √fan_in)
        return self.sigma_b * nn.functional.linear(
            x * (scale / self.sigma_b), self.weight, self.bias
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, sigma_w={self.sigma_w:g}, sigma_b={self.sigma_b:g}"
        )


class OutputScale(nn.Module):
    """Multiplies its input by a fixed factor α (no parameter): ``y = α · x``."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.alpha

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}"


def _standard_linear(
    fan_in: int,
    fan_out: int,
    bias: bool,
    sigma_w: float,
    sigma_b: float,
    generator: Optional[torch.Generator],
) -> nn.Linear:
    # skip_init: nn.Linear's own init would draw from the global RNG.
    layer = torch.nn.utils.skip_init(nn.Linear, fan_in, fan_out, bias=bias)
    with torch.no_grad():
        w = _randn((fan_out, fan_in), generator, layer.weight)
        layer.weight.copy_(w * (sigma_w / math.sqrt(fan_in)))
        if layer.bias is not None:
            layer.bias.copy_(_randn((fan_out,), generator, layer.bias) * sigma_b)
    return layer


def mlp(
    in_features: int,
    width: int,
    out_features: int,
    depth: int = 2,
    *,
    parameterization: str = "ntk",
    activation: Union[str, Callable[[], nn.Module]] = "relu",
    output_scale: float = 1.0,
    sigma_w: Optional[float] = None,
    sigma_b: float = 0.1,
    bias: bool = True,
    seed: Optional[int] = None,
) -> nn.Sequential:
    r"""A fully connected network ``in_features → width (× depth) → out_features``.

    Layers are named ``fc1, act1, …, fc{depth}, act{depth}, readout`` (and ``scale`` when
    ``output_scale != 1``), so per-layer metrics read ``fc1``, ``fc2``, ``readout``. Every
    affine layer (readout included) uses the same σ_w and σ_b. With ``parameterization="ntk"``
    the layers are :class:`NTKLinear`; with ``"standard"`` they are ``nn.Linear`` initialised
    with ``W ~ N(0, σ_w²/fan_in)``, ``b ~ N(0, σ_b²)`` (the same function at initialisation,
    not PyTorch's default uniform init).

    ``output_scale`` α multiplies the network's output: the model is ``α · f(x; θ)``. Chizat,
    Oyallon & Bach 2019 ("On Lazy Training in Differentiable Programming") show that with the
    learning rate scaled by ``1/α²`` a large α makes training lazier (the relative change of θ
    needed to fit the data shrinks like 1/α) and a small α moves it away from the lazy regime.
    The output is not centred (``f(x; θ₀) ≠ 0``), so the initial outputs also scale with α.

    Args:
        in_features: input dimension (inputs are ``(N, in_features)``).
        width: number of units of every hidden layer.
        out_features: output dimension (outputs are ``(N, out_features)``).
        depth: number of hidden layers (>= 1); the network has ``depth + 1`` affine layers.
        parameterization: ``"ntk"`` or ``"standard"``.
        activation: ``"relu"``, ``"gelu"``, ``"tanh"``, ``"sigmoid"``, ``"softplus"``,
            ``"identity"``, or a callable returning a fresh ``nn.Module``.
        output_scale: α (finite, > 0).
        sigma_w: weight scale σ_w (> 0). Default √2 for relu/gelu/softplus (keeps the
            pre-activation variance, He et al. 2015), 1 otherwise.
        sigma_b: bias scale σ_b (>= 0); 0.1 as in Jacot et al. 2018.
        bias: use biases.
        seed: seed of a private ``torch.Generator`` for the initialisation (the global RNG is
            untouched); ``None`` draws from the global RNG like ``nn.Linear``.

    Returns:
        ``nn.Sequential`` mapping ``(N, in_features)`` to ``(N, out_features)``, float32, CPU.

    Raises:
        TypeError: a size, scale or seed of the wrong type, or an activation that is neither a
            known name nor callable.
        ValueError: a non-positive size or depth, an unknown parameterisation or activation
            name, a non-finite / non-positive ``output_scale`` or ``sigma_w``, or a negative
            ``sigma_b``.

    Example::

        net = mlp(784, 1024, 10, depth=2, seed=0)   # NTK-parameterised ReLU MLP
        logits = net(torch.randn(32, 784))           # (32, 10)
    """
    _check_positive_int("in_features", in_features)
    _check_positive_int("width", width)
    _check_positive_int("out_features", out_features)
    _check_positive_int("depth", depth)
    if parameterization not in _PARAMETERIZATIONS:
        raise ValueError(
            f"parameterization must be one of {list(_PARAMETERIZATIONS)}, got {parameterization!r}"
        )
    if isinstance(activation, str):
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)} or a callable returning an "
                f"nn.Module, got {activation!r}"
            )
        make_activation = _ACTIVATIONS[activation]
        default_sigma_w = _DEFAULT_SIGMA_W.get(activation, 1.0)
    elif callable(activation):
        make_activation = activation
        default_sigma_w = 1.0
    else:
        raise TypeError(
            f"activation must be a name or a callable returning an nn.Module, got {activation!r}"
        )
    alpha = _check_float("output_scale", output_scale, positive=True)
    sw = default_sigma_w if sigma_w is None else _check_float("sigma_w", sigma_w, positive=True)
    sb = _check_float("sigma_b", sigma_b, positive=False)
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be a bool, got {bias!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {seed!r} ({type(seed).__name__})")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def affine(fan_in: int, fan_out: int) -> nn.Module:
        if parameterization == "ntk":
            return NTKLinear(fan_in, fan_out, bias, sigma_w=sw, sigma_b=sb, generator=generator)
        return _standard_linear(fan_in, fan_out, bias, sw, sb, generator)

    layers: OrderedDict[str, nn.Module] = OrderedDict()
    fan_in = in_features
    for i in range(1, depth + 1):
        layers[f"fc{i}"] = affine(fan_in, width)
        act = make_activation()
        if not isinstance(act, nn.Module):
            raise TypeError(
                f"activation() must return an nn.Module, got {type(act).__name__}; pass e.g. "
                "nn.SiLU (the class), not nn.functional.silu"
            )
        layers[f"act{i}"] = act
        fan_in = width
    layers["readout"] = affine(fan_in, out_features)
    if alpha != 1.0:
        layers["scale"] = OutputScale(alpha)
    return nn.Sequential(layers)
