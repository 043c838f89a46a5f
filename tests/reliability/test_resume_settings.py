"""Resume with changed monitor settings is explicit (issue 21, item 2): the saved reference is
restored with the saved settings and a warning names each difference, or the run fails at train
start naming the setting and both ways out; ``reset_reference=True`` starts a new reference on
purpose. Never a silent new K0 at the resumed step (before: the curve dropped to 0)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).parents[1] / "callbacks"))
from _cb_helpers import LitLightning, RecordingLogger, trainer_kwargs  # noqa: E402

from lazy_monitor.callbacks.lightning import KernelRegimeMonitor  # noqa: E402

BASE: dict[str, Any] = dict(
    probe_size=8, every_n_steps=4, log_spaced_until=0, max_overhead=None, per_layer=True
)
STEPS, SPLIT = 16, 8


def _fit(tmp: Path, max_steps: int, monitor: KernelRegimeMonitor, ckpt: Any = None, save=False):
    logger = RecordingLogger()
    callbacks: list[Any] = [monitor]
    if save:
        callbacks.append(
            ModelCheckpoint(dirpath=tmp / "ckpt", save_top_k=-1, every_n_train_steps=SPLIT)
        )
    trainer = L.Trainer(
        **trainer_kwargs(
            tmp, max_steps=max_steps, logger=logger, callbacks=callbacks, enable_checkpointing=save
        )
    )
    torch.manual_seed(7)
    trainer.fit(LitLightning(n=64, batch_size=8, shuffle=False, lr=0.2), ckpt_path=ckpt)
    return logger


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted run and a checkpoint at step 8, both with BASE settings."""
    tmp = tmp_path_factory.mktemp("resume_settings")
    full = _fit(tmp / "full", STEPS, KernelRegimeMonitor(**BASE))
    _fit(tmp / "first", SPLIT, KernelRegimeMonitor(**BASE), save=True)
    return {
        "full": full.series("ntk/rel_change"),
        "ckpt": str(tmp / "first" / "ckpt" / "epoch=0-step=8.ckpt"),
    }


@pytest.mark.parametrize(
    "changed, named",
    [
        ({"probe_size": 4}, "probe_size=8"),
        ({"seed": 3}, "seed=0"),
        ({"kernel": {"kind": "trace"}}, "kind='auto'"),
        ({"per_layer": False}, "per_layer=True"),
    ],
    ids=["probe_size", "seed", "kind", "per_layer"],
)
def test_other_settings_restore_the_saved_reference_and_say_so(
    saved: dict[str, Any], tmp_path: Path, changed: dict[str, Any], named: str
) -> None:
    monitor = KernelRegimeMonitor(**{**BASE, **changed})
    with pytest.warns(
        UserWarning, match=rf"resuming the saved reference.*{named}.*reset_reference"
    ):
        resumed = _fit(tmp_path, STEPS, monitor, ckpt=saved["ckpt"])
    series = resumed.series("ntk/rel_change")
    assert sorted(series) == [12, 16]  # no new reference at step 8
    for step, value in series.items():  # the uninterrupted run's values: the same reference
        assert value == pytest.approx(saved["full"][step], rel=1e-6, abs=1e-9)
    # the saved settings are what is measured (and saved again)
    assert monitor.tracker.probe_size == 8 and monitor.tracker.per_layer


def test_another_submodule_raises_at_train_start_naming_both_ways_out(
    saved: dict[str, Any], tmp_path: Path
) -> None:
    monitor = KernelRegimeMonitor(**{**BASE, "submodule": "net"})
    with pytest.raises(
        ValueError, match=r"submodule=None \(saved\) vs 'net'.*reset_reference=True"
    ):
        _fit(tmp_path, STEPS, monitor, ckpt=saved["ckpt"])


def test_another_explicit_probe_raises_at_train_start(saved: dict[str, Any], tmp_path: Path):
    probe = torch.randn(8, 6, generator=torch.Generator().manual_seed(5))
    monitor = KernelRegimeMonitor(probe, **{k: v for k, v in BASE.items() if k != "probe_size"})
    with pytest.raises(ValueError, match=r"probe=.*saved probe batch.*reset_reference=True"):
        _fit(tmp_path, STEPS, monitor, ckpt=saved["ckpt"])


def test_reset_reference_starts_a_new_reference_with_a_warning(
    saved: dict[str, Any], tmp_path: Path
) -> None:
    monitor = KernelRegimeMonitor(**{**BASE, "submodule": "net", "reset_reference": True})
    with pytest.warns(
        UserWarning, match=r"reset_reference=True.*new reference K0 starts at step 8"
    ):
        resumed = _fit(tmp_path, STEPS, monitor, ckpt=saved["ckpt"])
    series = resumed.series("ntk/rel_change")
    assert sorted(series) == [8, 12, 16] and series[8] == 0.0
