"""Which callbacks count as the same one: the checkpoint key (``state_key``) and the
one-per-Trainer check with the project's own message.

Lightning's ``Trainer.__init__`` refuses two stateful callbacks with equal ``state_key`` with a
generic ``RuntimeError`` ("Found more than one stateful callback ..."), before any hook of ours
runs. So that two equal monitors (or gates) get the project's message instead, an instance that
has not been set up yet reports its key with an ordinal suffix (``...#2``) while a newer equal
one is alive (or an equal one that a Trainer already set up): Lightning's check passes, and the
callback's ``setup`` then finds the duplicates in ``trainer.callbacks`` and raises the
:class:`ValueError` of :func:`check_unique`. From ``setup`` on, an instance reports the plain
key, so checkpoints are written and restored under exactly the key of earlier versions, also
when a stale equal instance is still alive in the process (a notebook's previous trainer).
The same object passed twice (``callbacks=[m, m]``) has one key and still meets Lightning's
message: nothing of ours runs before that check.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from typing import Any

__all__ = ["_Identified", "check_unique"]

# every live monitor / gate in the process -> creation serial (weak: the registry keeps nothing
# alive); serials live here, not in the instance, so copies and unpickled instances get new ones
_live: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_serials = itertools.count()


class _Identified:
    """Mixin: ``state_key`` from :meth:`_identity`, unique among the live instances not set up."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        self = super().__new__(cls)
        _live[self] = next(_serials)
        return self

    def _identity(self) -> dict[str, Any]:
        """The settings that name this callback's checkpoint entry."""
        raise NotImplementedError

    def _base_state_key(self) -> str:
        return self._generate_state_key(**self._identity())  # type: ignore[attr-defined]

    @property
    def state_key(self) -> str:
        base = self._base_state_key()
        if getattr(self, "_claimed", False):
            return base
        mine = _live.get(self, -1)
        ahead = 0
        for other, serial in list(_live.items()):
            if other is self or not hasattr(other, "_generate_state_key"):
                continue  # the Hugging Face callbacks have no Lightning state key
            if not (getattr(other, "_claimed", False) or serial > mine):
                continue
            try:
                same = other._base_state_key() == base
            except AttributeError:  # an instance whose __init__ raised, not yet collected
                continue
            ahead += same
        return base if ahead == 0 else f"{base}#{ahead + 1}"

    def _claim(self) -> None:
        """Called at ``setup``: from now on the plain key (the one checkpoints use)."""
        self._claimed = True


def _settings(callback: Any) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in callback._identity().items())


def check_unique(
    callbacks: Sequence[Any], family: type, name: str, *, equal_only: bool, why: str, fix: str
) -> None:
    """Raise ``ValueError`` when ``callbacks`` holds two ``family`` callbacks that may not share
    a Trainer: any two (``equal_only=False``) or two with the same :meth:`_identity`.

    The message names the callbacks' settings, why they cannot share the Trainer and the fix.
    """
    found = [cb for cb in callbacks if isinstance(cb, family)]
    groups: dict[str, list[Any]] = {}
    for cb in found:
        groups.setdefault(_settings(cb) if equal_only else "", []).append(cb)
    clash = next((group for group in groups.values() if len(group) > 1), None)
    if clash is None:
        return
    settings = [_settings(cb) for cb in clash]
    if len({id(cb) for cb in clash}) == 1:
        held = f"the same {name} object {len(clash)} times ({settings[0]})"
    elif len(set(settings)) == 1:
        held = f"{len(clash)} {name}s with equal {settings[0]}"
    else:
        held = f"{len(clash)} {name}s: " + "; ".join(f"{name}({s})" for s in settings)
    raise ValueError(f"the Trainer's callbacks hold {held}; {why}. Fix: {fix}")
