"""Spies on the engine's internal decisions, for tests that must show which path ran."""

from __future__ import annotations

from typing import Any

import pytest

from lazy_monitor.core.kernels.structured import ntk as structured_ntk_mod


def record_fallbacks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names the structured engine sends to the Jacobian fallback, appended per call."""
    seen: list[str] = []
    real = structured_ntk_mod.jacobian_ntk

    def spy(fm: Any, params: Any, names: Any, *args: Any, **kwargs: Any) -> Any:
        seen.extend(names)
        return real(fm, params, names, *args, **kwargs)

    monkeypatch.setattr(structured_ntk_mod, "jacobian_ntk", spy)
    return seen
