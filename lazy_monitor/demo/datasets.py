"""Small synthetic datasets generated in code (no download), deterministic from seeds.

Every generator draws from its own ``torch.Generator`` and never touches the global RNG. Each
dataset separates two seeds:

* ``task_seed`` fixes the *task* (the class means, the teacher network): keep it equal for a
  training and a held-out set of the same problem;
* ``seed`` fixes the *samples* (inputs, labels, noise): use different seeds for train and test.

Example::

    x_train, y_train = teacher_regression(256, 16, seed=0)
    x_test, y_test = teacher_regression(128, 16, seed=1)   # same teacher, new inputs
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lazy_monitor._validation import check_int
from lazy_monitor.demo.models import _check_float
from lazy_monitor.demo.models import _check_positive_int as _check_int

__all__ = ["gaussian_mixture", "make_loader", "teacher_regression", "two_spirals"]

# Independent streams for task and samples even when task_seed == seed.
_TASK_STREAM = 0x5EED_7A5C
_TEACHER_REFERENCE_INPUTS = 4096


def _generator(name: str, seed: object, stream: int = 0) -> torch.Generator:
    seed = check_int(name, seed, minimum=0)
    return torch.Generator().manual_seed((seed ^ stream) % (2**63))


def _orthonormal_directions(k: int, dim: int, gen: torch.Generator) -> Tensor:
    """``(k, dim)`` unit vectors; orthonormal when ``k <= dim`` (Gram–Schmidt in float64)."""
    g = torch.randn(k, dim, generator=gen, dtype=torch.float64)
    if k > dim:
        return g / g.norm(dim=1, keepdim=True)
    out = []
    for v in g:
        for u in out:
            v = v - (v @ u) * u
        out.append(v / v.norm())
    return torch.stack(out)


def gaussian_mixture(
    n: int,
    dim: int,
    classes: int,
    *,
    seed: int = 0,
    task_seed: int = 0,
    separation: float = 3.0,
    noise: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Balanced isotropic Gaussian classes: ``x = μ_y + noise · ε``, ``ε ~ N(0, I)``.

    The class means are ``μ_k = separation/√2 · u_k`` with unit vectors ``u_k``, orthonormal
    when ``classes <= dim``, so that ``‖μ_j − μ_k‖ = separation`` exactly (approximately for
    ``classes > dim``). Class ``k`` gets ``n // classes`` or one more examples, in random order.

    Args:
        n: number of examples (>= 1).
        dim: input dimension (>= 1).
        classes: number of classes (>= 2).
        seed: seed of the samples (labels order and noise).
        task_seed: seed of the class means (same value for train and test sets).
        separation: distance between class means (>= 0).
        noise: standard deviation of the isotropic noise (>= 0).

    Returns:
        ``x`` float32 ``(n, dim)`` and ``y`` int64 ``(n,)`` with values in ``[0, classes)``.

    Raises:
        TypeError / ValueError: a non-integer or out-of-range size or seed, a negative or
            non-finite ``separation`` / ``noise``.
    """
    _check_int("n", n, 1)
    _check_int("dim", dim, 1)
    _check_int("classes", classes, 2)
    separation = _check_float("separation", separation)
    noise = _check_float("noise", noise)
    task = _generator("task_seed", task_seed, _TASK_STREAM)
    sample = _generator("seed", seed)
    means = _orthonormal_directions(classes, dim, task) * (separation / math.sqrt(2.0))
    y = (torch.arange(n) % classes)[torch.randperm(n, generator=sample)]
    eps = torch.randn(n, dim, generator=sample, dtype=torch.float64)
    x = means[y] + noise * eps
    return x.float(), y


def _teacher(dim: int, out: int, width: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    w1 = torch.randn(width, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
    b1 = 0.1 * torch.randn(width, generator=gen, dtype=torch.float64)
    w2 = torch.randn(out, width, generator=gen, dtype=torch.float64) / math.sqrt(width)
    return w1, b1, w2


def teacher_regression(
    n: int,
    dim: int,
    out: int = 1,
    *,
    seed: int = 0,
    task_seed: int = 0,
    width: int = 64,
    noise: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Regression targets from a fixed random teacher: ``y = c · W₂ tanh(W₁x + b₁) + noise · ε``.

    Inputs ``x ~ N(0, I_dim)``. The teacher is a one-hidden-layer tanh network with
    ``W₁ ~ N(0, 1/dim)``, ``b₁ ~ N(0, 0.01)``, ``W₂ ~ N(0, 1/width)``, drawn from ``task_seed``;
    the constant ``c`` scales each noiseless target coordinate to unit variance (estimated on
    4096 reference inputs of the task, so it does not depend on ``n`` or ``seed``).

    Args:
        n: number of examples (>= 1).
        dim: input dimension (>= 1).
        out: number of target coordinates (>= 1).
        seed: seed of the samples (inputs and noise).
        task_seed: seed of the teacher (same value for train and test sets).
        width: hidden width of the teacher (>= 1).
        noise: standard deviation of the additive Gaussian label noise (>= 0).

    Returns:
        ``x`` float32 ``(n, dim)`` and ``y`` float32 ``(n, out)``.

    Raises:
        TypeError / ValueError: a non-integer or out-of-range size or seed, a negative or
            non-finite ``noise``.
    """
    _check_int("n", n, 1)
    _check_int("dim", dim, 1)
    _check_int("out", out, 1)
    _check_int("width", width, 1)
    noise = _check_float("noise", noise)
    task = _generator("task_seed", task_seed, _TASK_STREAM)
    sample = _generator("seed", seed)
    w1, b1, w2 = _teacher(dim, out, width, task)
    x_ref = torch.randn(_TEACHER_REFERENCE_INPUTS, dim, generator=task, dtype=torch.float64)
    scale = 1.0 / (torch.tanh(x_ref @ w1.T + b1) @ w2.T).std(dim=0).clamp_min(1e-12)
    x = torch.randn(n, dim, generator=sample, dtype=torch.float64)
    y = (torch.tanh(x @ w1.T + b1) @ w2.T) * scale
    y = y + noise * torch.randn(n, out, generator=sample, dtype=torch.float64)
    return x.float(), y.float()


def two_spirals(
    n: int, *, seed: int = 0, turns: float = 1.5, noise: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Two interleaved spirals in the plane, a classic task that needs a nonlinear boundary.

    Class 0 is ``r (cos φ, sin φ)`` with ``φ = 2π · turns · r`` and ``r = √u``, ``u ~ U(0, 1)``
    (which spreads the points about evenly along the spiral); class 1 is the same spiral
    rotated by π. Gaussian noise of standard deviation ``noise`` is added to each coordinate.
    Classes alternate (balanced).

    Args:
        n: number of examples (>= 2).
        seed: seed of the samples.
        turns: number of revolutions of each spiral (> 0).
        noise: standard deviation of the coordinate noise (>= 0).

    Returns:
        ``x`` float32 ``(n, 2)`` with coordinates in about ``[-1, 1]`` and ``y`` int64 ``(n,)``
        in ``{0, 1}``.

    Raises:
        TypeError / ValueError: a non-integer or too small ``n``, a bad seed, non-positive
            ``turns`` or negative ``noise``.
    """
    _check_int("n", n, 2)
    turns = _check_float("turns", turns, positive=True)
    noise = _check_float("noise", noise)
    sample = _generator("seed", seed)
    y = torch.arange(n) % 2
    r = torch.rand(n, generator=sample, dtype=torch.float64).sqrt().clamp_min(1e-3)
    phi = 2 * math.pi * turns * r + math.pi * y.double()
    x = torch.stack([r * torch.cos(phi), r * torch.sin(phi)], dim=1)
    x = x + noise * torch.randn(n, 2, generator=sample, dtype=torch.float64)
    return x.float(), y


def make_loader(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """A ``DataLoader`` over ``(x, y)`` whose shuffling order depends only on ``seed``.

    Args:
        x: inputs ``(N, ...)``.
        y: targets ``(N, ...)``.
        batch_size: examples per batch (>= 1).
        seed: seed of the loader's private generator (the global RNG is untouched).
        shuffle: reshuffle every epoch.
        drop_last: drop the last incomplete batch.
        num_workers: worker processes (0: load in the main process).

    Returns:
        ``DataLoader`` yielding ``[x_batch, y_batch]``.

    Raises:
        TypeError: ``x`` or ``y`` not a tensor, or a bad ``batch_size`` / ``seed`` type.
        ValueError: ``x`` and ``y`` with different numbers of examples, or no example.
    """
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor) or t.dim() == 0:
            raise TypeError(f"{name} must be a Tensor batched on dim 0, got {t!r:.60}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x has {x.shape[0]} examples but y has {y.shape[0]}; they must have the same "
            "dim-0 size"
        )
    if x.shape[0] == 0:
        raise ValueError("x and y are empty; pass at least one example")
    _check_int("batch_size", batch_size, 1)
    _check_int("num_workers", num_workers, 0)
    generator: Optional[torch.Generator] = _generator("seed", seed)
    return DataLoader(
        TensorDataset(x, y),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=generator,
    )
