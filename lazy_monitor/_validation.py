"""One validation kit for every layer: a wrong *type* is a ``TypeError``, a bad *value* of the
right type is a ``ValueError``, and every message has one phrasing that names the argument, the
value received and the fix::

    <name> must be <what>, got <value!r>; <fix>

Torch-free, so the CLI and the catalogue can use it without importing torch.

>>> check_int("every_n_steps", 100, minimum=1)
100
>>> check_int("every_n_steps", 0, minimum=1, fix="e.g. every_n_steps=500")
Traceback (most recent call last):
...
ValueError: every_n_steps must be an int >= 1, got 0; e.g. every_n_steps=500
>>> check_bool("per_layer", "false")
Traceback (most recent call last):
...
TypeError: per_layer must be True or False, got 'false'
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any, Optional

__all__ = [
    "check_bool",
    "check_callable",
    "check_choice",
    "check_float",
    "check_int",
    "check_mapping",
    "check_str",
    "message",
]


def gib(nbytes: float) -> str:
    """``nbytes`` in GiB for messages (``"1.15 GiB"``)."""
    return f"{nbytes / 2**30:.3g} GiB"


def message(name: str, what: str, value: Any, fix: str = "") -> str:
    """``"<name> must be <what>, got <value!r>[; <fix>]"`` -- the one phrasing of the kit."""
    text = f"{name} must be {what}, got {value!r}"
    return f"{text}; {fix}" if fix else text


def check_int(
    name: str,
    value: Any,
    *,
    minimum: Optional[int] = None,
    optional: bool = False,
    fix: str = "",
) -> Any:
    """An ``int`` (not ``bool``) ``>= minimum``; ``None`` passes when ``optional``."""
    if value is None and optional:
        return None
    what = "an int" + (f" >= {minimum}" if minimum is not None else "")
    what += " or None" if optional else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(message(name, what, value, fix))
    if minimum is not None and value < minimum:
        raise ValueError(message(name, what, value, fix))
    return int(value)


def check_float(
    name: str,
    value: Any,
    *,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    optional: bool = False,
    fix: str = "",
) -> Any:
    """A finite real number (not ``bool``) in ``[minimum, maximum]``, returned as ``float``."""
    if value is None and optional:
        return None
    what = "a finite number"
    if minimum is not None and maximum is not None:
        what += f" in [{minimum:g}, {maximum:g}]"
    elif minimum is not None:
        what += f" >= {minimum:g}"
    elif maximum is not None:
        what += f" <= {maximum:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(message(name, what, value, fix))
    value = float(value)
    if (
        not math.isfinite(value)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        raise ValueError(message(name, what, value, fix))
    return value


def check_bool(name: str, value: Any, fix: str = "") -> bool:
    """Exactly ``True`` or ``False`` (a string such as ``"false"`` is a TypeError, not truthy)."""
    if not isinstance(value, bool):
        raise TypeError(message(name, "True or False", value, fix))
    return value


def _check_type(name: str, value: Any, ok: bool, what: str, optional: bool, fix: str) -> Any:
    if value is None and optional:
        return None
    if not ok:
        raise TypeError(message(name, what + (" or None" if optional else ""), value, fix))
    return value


def check_str(name: str, value: Any, *, optional: bool = False, fix: str = "") -> Any:
    """A string (``None`` passes when ``optional``)."""
    return _check_type(name, value, isinstance(value, str), "a string", optional, fix)


def check_choice(name: str, value: Any, choices: Iterable[str], fix: str = "") -> str:
    """One of ``choices`` (strings); a non-string is a TypeError."""
    allowed = tuple(choices)
    what = "one of " + ", ".join(map(repr, allowed))
    if not isinstance(value, str):
        raise TypeError(message(name, what, value, fix))
    if value not in allowed:
        raise ValueError(message(name, what, value, fix))
    return value


def check_callable(name: str, value: Any, *, optional: bool = True, fix: str = "") -> Any:
    """A callable (``None`` passes when ``optional``)."""
    return _check_type(name, value, callable(value), "callable", optional, fix)


def check_mapping(name: str, value: Any, *, optional: bool = False, fix: str = "") -> Any:
    """A mapping (``None`` passes when ``optional``)."""
    return _check_type(name, value, isinstance(value, Mapping), "a mapping", optional, fix)
