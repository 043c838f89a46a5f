"""One state schema for everything that saves itself (tracker, linearization, callbacks).

Every ``state_dict()`` carries its schema version under :data:`SCHEMA_KEY` and every
``load_state_dict()`` applies one compatibility rule, :func:`check_schema`: a state of this or
an older schema version loads, a newer one asks to upgrade lazy_monitor. Version 1 is the format
of lazy_monitor 0.1 (whose callbacks wrote the version under ``"version"``; still read).
Framework- and torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["SCHEMA_KEY", "SCHEMA_VERSION", "check_schema", "stamp"]

SCHEMA_KEY = "format"
#: Current schema version of every lazy_monitor state.
SCHEMA_VERSION = 1
# lazy_monitor 0.1 callbacks stored the version under this key
_LEGACY_KEYS = ("version",)


def stamp(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with the current schema version under :data:`SCHEMA_KEY` (first key)."""
    return {SCHEMA_KEY: SCHEMA_VERSION, **state}


def check_schema(state: Any, owner: str, required: Iterable[str] = ()) -> int:
    """Validate a saved state for ``owner`` (e.g. ``"KernelTracker"``); return its version.

    Raises:
        ValueError: not a mapping, a required key missing, or a schema version newer than
            this lazy_monitor reads.
    """
    required = tuple(required)
    if not isinstance(state, Mapping):
        raise ValueError(f"not a {owner} state_dict: got {type(state).__name__}")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(
            f"not a {owner} state_dict: it lacks {missing} (expected keys {list(required)}); "
            "load a state saved by this class"
        )
    version = state.get(SCHEMA_KEY)
    for key in _LEGACY_KEYS:
        if version is None:
            version = state.get(key)
    version = 1 if version is None else version
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"unsupported {owner} state format {version!r}")
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"{owner} state format {version} is newer than this lazy_monitor reads "
            f"({SCHEMA_VERSION}); upgrade lazy_monitor"
        )
    return version
