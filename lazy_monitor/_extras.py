"""Optional dependencies: one import helper that names the ``pip install`` line (torch-free).

The core install (``pip install lazy-monitor``) brings torch, numpy, TensorBoard and
``pytorch-lightning``. Everything else is an extra (``pyproject.toml``), and a module that needs
one imports it through :func:`require` (or :func:`raise_missing` for a module-level import), so a missing package fails with the exact command::

    ImportError: lazy_monitor.integrations.transformers needs transformers (the "hf" extra):
    pip install "lazy-monitor[hf]"
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import NoReturn

__all__ = ["EXTRAS", "install_command", "raise_missing", "require"]

#: Top-level module -> the extra of ``pyproject.toml`` that installs it.
EXTRAS: dict[str, str] = {
    "transformers": "hf",
    "accelerate": "hf",
    "matplotlib": "viz",
    "jsonargparse": "cli",
    "lightning": "lightning",
}


def install_command(extra: str) -> str:
    """The one-line install of an extra, quoted for every shell."""
    return f'pip install "lazy-monitor[{extra}]"'


def raise_missing(exc: ModuleNotFoundError, purpose: str) -> NoReturn:
    """Re-raise a failed import of an extra's package as an ImportError with its install command.

    For module-level imports::

        try:
            from transformers import TrainerCallback
        except ModuleNotFoundError as exc:
            raise_missing(exc, "lazy_monitor.integrations.transformers")

    Args:
        exc: the error of the failed import.
        purpose: who needs the package, for the message.

    Raises:
        ImportError: always; ``exc`` itself when the missing module belongs to no extra (a
            broken install of one of the package's own dependencies keeps its message).
    """
    top = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        raise exc
    raise ImportError(
        f'{purpose} needs {top} (the "{extra}" extra): {install_command(extra)}', name=top
    ) from exc


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (e.g. ``"matplotlib.pyplot"``) inside a function that needs it, or raise
    the ImportError of :func:`raise_missing`.

    Args:
        module: dotted module name; its top-level package is a key of :data:`EXTRAS`.
        purpose: who needs it, for the message (e.g. ``"lazy-monitor report --plot"``).
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise_missing(exc, purpose)
