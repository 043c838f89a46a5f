"""The probe batch: validation of a given probe and deterministic draws from the train data.

The probe is a fixed set of inputs ``x`` (and optionally targets ``y``) on which the kernel
``K(x, x')`` is evaluated at every measurement. Drawn from the training dataset with an own seeded
``torch.Generator``: the global RNGs (torch, Python ``random``, NumPy) and the train loader's
sampler are left exactly as they were, so training is bit-identical with or without the monitor.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import IterableDataset
from torch.utils.data._utils.collate import default_collate

from lazy_monitor.core._functional import InputBatch, batch_size, map_batch
from lazy_monitor.tracking.tracker import KernelTracker

__all__ = [
    "Probe",
    "build_tracker",
    "default_batch_to_probe",
    "draw_from_dataset",
    "draw_probe",
    "probe_size",
    "split_probe",
    "validate_probe",
]

Probe = tuple[InputBatch, Optional[Tensor]]
BatchToProbe = Callable[[Any], Any]


def _is_inputs(obj: Any) -> bool:
    if isinstance(obj, Tensor):
        return True
    if isinstance(obj, Mapping):
        return len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())
    return False


def split_probe(obj: Any, where: str) -> Probe:
    """Normalise ``x`` / ``(x, y)`` / ``{"kw": x}`` into ``(inputs, targets or None)``.

    A tuple/list of length 2 is ``(x, y)``; ``x`` may itself be a tensor, a dict of tensors
    (keyword inputs) or a tuple of tensors (positional inputs); ``y`` may be None.

    Raises:
        TypeError: ``obj`` is none of these forms.
    """
    if _is_inputs(obj):
        return obj, None
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)) and len(obj) == 2:
        x, y = obj
        if y is not None and not isinstance(y, Tensor):
            raise TypeError(f"{where}: targets y must be a Tensor or None, got {type(y).__name__}")
        if _is_inputs(x) or (
            isinstance(x, Sequence) and x and all(isinstance(t, Tensor) for t in x)
        ):
            return x, y
    raise TypeError(
        f"{where} must be a Tensor x, a dict of Tensors (keyword inputs), or a pair (x, y), got "
        f"{type(obj).__name__}{_describe(obj)}"
    )


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        return f" with keys {list(obj)[:8]}"
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return f" of length {len(obj)}"
    return ""


def validate_probe(probe: Probe, where: str) -> int:
    """Check shapes of ``(x, y)``; return the number of probe examples.

    Raises:
        ValueError: empty probe, mismatched dim-0 sizes, or non-finite floating inputs.
    """
    x, y = probe
    try:
        n = batch_size(x)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}: {err}") from None
    if y is not None and (y.dim() == 0 or y.shape[0] != n):
        raise ValueError(
            f"{where}: targets y have shape {tuple(y.shape)} but the inputs hold {n} examples; "
            "y must be batched on dim 0 like x"
        )
    bad = []
    map_batch(x, lambda t: bad.append(t) if t.is_floating_point() and not t.isfinite().all() else t)
    if bad:
        raise ValueError(f"{where}: the probe inputs contain NaN or inf; pass finite inputs")
    return n


def default_batch_to_probe(batch: Any) -> Any:
    """Default ``batch_to_probe``: a tensor is ``x``; ``(x, y, *rest)`` gives ``(x, y)``.

    Raises:
        TypeError: for dict batches and other structures (pass ``batch_to_probe``).
    """
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 1:
        if len(batch) == 1:
            return batch[0]
        y = batch[1] if isinstance(batch[1], Tensor) else None
        return batch[0], y
    raise TypeError(
        f"cannot tell inputs from targets in a training batch of type {type(batch).__name__}"
        f"{_describe(batch)}; pass KernelRegimeMonitor(batch_to_probe=...) returning x or (x, y), "
        "e.g. batch_to_probe=lambda b: (b['x'], b['y'])"
    )


@contextlib.contextmanager
def _all_rngs_preserved() -> Iterator[None]:
    """Restore torch (CPU+CUDA), Python and NumPy RNG states on exit (datasets may use any)."""
    py_state = random.getstate()
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        np, np_state = None, None
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        if np is not None:
            np.random.set_state(np_state)


def _single_loader(loaders: Any) -> Any:
    """The train dataloader; for a collection of loaders the first one (documented)."""
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, Sequence) and not isinstance(loaders, (str, bytes)):
        return loaders[0] if loaders else None
    return loaders


def draw_probe(loaders: Any, size: int, seed: int, batch_to_probe: BatchToProbe) -> Probe:
    """Draw ``size`` examples from the train loader's dataset (see :func:`draw_from_dataset`),
    collated with the loader's ``collate_fn``; for a collection of loaders the first one.

    Raises:
        ValueError: no train dataloader / dataset, or fewer examples than ``size``.
    """
    loader = _single_loader(loaders)
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        raise ValueError(
            f"KernelRegimeMonitor(probe_size={size}) draws the probe from the train dataloader's "
            f"dataset, but the train dataloader ({type(loader).__name__}) has no `.dataset`; pass "
            "an explicit probe=x or probe=(x, y)"
        )
    collate = getattr(loader, "collate_fn", None) or default_collate
    return draw_from_dataset(dataset, size, seed, batch_to_probe, collate)


def draw_from_dataset(
    dataset: Any,
    size: int,
    seed: int,
    batch_to_probe: BatchToProbe = default_batch_to_probe,
    collate: Callable[[list[Any]], Any] = default_collate,
) -> Probe:
    """Draw ``size`` examples from ``dataset``, deterministically and without side effects.

    Map-style datasets: indices ``torch.randperm(len(dataset), generator=Generator(seed))[:size]``,
    collated with ``collate``. Iterable datasets: the first ``size`` examples of a fresh iterator.
    No sampler is touched and all global RNG states are restored afterwards.

    Returns:
        ``(x, y)`` on CPU as produced by ``batch_to_probe`` (``y`` may be None).

    Raises:
        ValueError: fewer examples than ``size``.
    """
    with _all_rngs_preserved():
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            items = []
            for item in dataset:
                items.append(item)
                if len(items) == size:
                    break
            available = len(items)
        else:
            available = len(dataset)
            generator = torch.Generator().manual_seed(seed)
            index = torch.randperm(available, generator=generator)[:size].tolist()
            items = [dataset[i] for i in index]
        if available < size:
            raise ValueError(
                f"KernelRegimeMonitor(probe_size={size}) but the training dataset has only "
                f"{available} examples; lower probe_size to at most {available}"
            )
        batch = collate(items)
    converted = batch_to_probe(batch)
    probe = split_probe(converted, "the probe returned by batch_to_probe")
    validate_probe(probe, "the probe drawn from the training data")
    x, y = probe
    return map_batch(x, lambda t: t.detach().cpu()), (None if y is None else y.detach().cpu())


def probe_size(probe: Probe) -> int:
    """Number of examples ``N`` of a probe ``(x, y)``."""
    return batch_size(probe[0])


def build_tracker(
    network: nn.Module,
    probe: Probe,
    device: torch.device,
    *,
    drawn: bool,
    **tracker_kwargs: Any,
) -> tuple[KernelTracker, Probe]:
    """A :class:`KernelTracker` on ``probe`` (moved to ``device``), and the probe it uses.

    Targets of a *drawn* probe come from the training batches (``batch[1]`` by default) and need
    not fit the alignment (one class only, sequence labels, multi-hot or differently sized
    regression targets): they are dropped with a warning when the tracker builds without them.
    Targets of an explicit probe (``drawn=False``) must fit: the tracker's error propagates.
    An error the tracker still raises without targets is not about the targets and propagates.

    Returns:
        ``(tracker, (x, y))`` with the probe on CPU and ``y`` None when dropped.
    """
    x, y = probe
    if y is not None and drawn and not y.is_floating_point() and y.numel():
        if bool((y == y.reshape(-1)[0]).all()):
            warnings.warn(
                f"the {probe_size(probe)} drawn probe examples all have class "
                f"{int(y.reshape(-1)[0])}: ntk/alignment and lin/agreement are undefined "
                "and not logged; raise probe_size or pass probe=(x, y) with several classes",
                UserWarning,
                stacklevel=3,
            )
            y = None
    x_dev = map_batch(x, lambda t: t.detach().to(device))

    def build(targets: Optional[Tensor]) -> KernelTracker:
        targets = None if targets is None else targets.detach().to(device)
        return KernelTracker(network, x_dev, targets=targets, **tracker_kwargs)

    try:
        tracker = build(y)
    except TypeError as err:
        if "argument" not in str(err) or y is None:
            raise
        # forward(a, b) given a pair (a, b): the pair was read as (inputs, targets)
        raise TypeError(
            f"{err}; KernelRegimeMonitor reads a pair (a, b) as (inputs, targets): for a model "
            "with several inputs pass probe=((a, b), y) or probe=((a, b), None), and for drawn "
            "batches (a, b, y) batch_to_probe=lambda batch: ((batch[0], batch[1]), batch[2])"
        ) from err
    except ValueError as err:
        if y is None or not drawn:
            raise
        tracker = build(None)
        warnings.warn(
            f"the targets of the drawn probe cannot be used ({err}); ntk/alignment and "
            "lin/agreement are not logged. Pass batch_to_probe returning (x, y) with class "
            "indices of shape (N,) or float targets of shape (N, O), or batch_to_probe "
            "returning x alone to measure without targets",
            UserWarning,
            stacklevel=3,
        )
        y = None
    cpu_probe = (map_batch(x, lambda t: t.detach().cpu()), None if y is None else y.detach().cpu())
    return tracker, cpu_probe
