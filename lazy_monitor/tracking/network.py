"""The network inside a training framework's module: unwrap ``torch.compile`` / DDP wrappers,
resolve a dotted submodule path, find its device. Framework-free (used by every adapter)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["device_of", "resolve_submodule", "unwrap"]


def unwrap(module: nn.Module) -> nn.Module:
    """Strip ``torch.compile`` (``_orig_mod``) and DDP / DataParallel (``.module``) wrappers."""
    while True:
        inner = getattr(module, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            module = inner
            continue
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
            continue
        return module


def resolve_submodule(
    root: nn.Module, path: Optional[str], where: str = "KernelRegimeMonitor"
) -> nn.Module:
    """``root`` or its (dotted) submodule, unwrapping wrappers at every level."""
    module = unwrap(root)
    if not path:
        return module
    walked = []
    for part in path.split("."):
        child = module._modules.get(part) if isinstance(module, nn.Module) else None
        if child is None:
            names = list(module._modules)[:12]
            at = ".".join(walked) or type(root).__name__
            raise ValueError(
                f"{where}(submodule={path!r}): {at} has no submodule {part!r} "
                f"(its children: {names}); pass the attribute path of the network to monitor"
            )
        module = unwrap(child)
        walked.append(part)
    return module


def device_of(module: nn.Module) -> torch.device:
    """Device of the module's first parameter (or buffer); CPU for a module without tensors."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")
