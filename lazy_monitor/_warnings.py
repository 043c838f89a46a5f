"""Warnings that point at the user's line, not at library internals (torch-free).

A warning raised inside a Lightning hook is several frames below the user's ``trainer.fit``;
a fixed ``stacklevel`` would name a file of Lightning or of this package. :func:`warn` counts
the frames of this package and of the frameworks that call it (``lightning``,
``pytorch_lightning``, ``lightning_fabric``, ``transformers``, ``accelerate``, ``torch``) and
points at the first frame outside them (Python 3.12's ``skip_file_prefixes``, for 3.10+).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings

__all__ = ["user_stacklevel", "warn"]

_FRAMEWORKS = (
    "lazy_monitor",
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "transformers",
    "accelerate",
    "torch",
)


def _prefixes() -> tuple[str, ...]:
    found = []
    for name in _FRAMEWORKS:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        for location in (spec.submodule_search_locations or []) if spec else []:
            found.append(os.path.join(os.path.abspath(location), ""))
    return tuple(found)


_PREFIXES: tuple[str, ...] = ()


def user_stacklevel(skip: int = 1) -> int:
    """The ``stacklevel`` (seen from the caller) of the first frame outside the packages above
    ``skip`` frames up; the outermost frame if every frame is internal."""
    global _PREFIXES
    if not _PREFIXES:
        _PREFIXES = _prefixes()
    frame = sys._getframe(skip)
    level = 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        _PREFIXES
    ):
        frame = frame.f_back
        level += 1
    return level


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the user's line (see the module doc)."""
    warnings.warn(message, category, stacklevel=user_stacklevel(2) + 1)
