"""KernelConfig: the kernel settings, typed and validated once at construction."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import lazy_monitor
from lazy_monitor import KernelConfig, KernelTracker
from lazy_monitor.core.kernels import DEFAULT_MAX_MEMORY, NtkConfig
from lazy_monitor.tracking import KernelConfig as TrackingKernelConfig


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))


def test_defaults_and_exports():
    cfg = KernelConfig()
    assert TrackingKernelConfig is KernelConfig is lazy_monitor.KernelConfig
    assert cfg.as_dict() == {
        "kind": "auto",
        "implementation": "auto",
        "projection": None,
        "projection_seed": 0,
        "max_memory": DEFAULT_MAX_MEMORY,
        "chunk_size": None,
        "topk": None,
        "snapshot_device": None,
    }


def test_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        KernelConfig("full")  # type: ignore[misc]
    cfg = KernelConfig(kind="trace")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.kind = "full"  # type: ignore[misc]
    assert dataclasses.replace(cfg, topk=3).topk == 3


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"projection_seed": 2**70}, ValueError, r"projection_seed.*2\*\*64 - 1.*got 1180591620"),
        ({"projection_seed": -1}, ValueError, r"projection_seed.*\[0, 2\*\*64 - 1\]"),
        ({"projection_seed": 1.5}, TypeError, "projection_seed` must be an int"),
        ({"projection": "mean"}, ValueError, "projection` must be None, a positive int k or 'sum'"),
        ({"projection": 0}, ValueError, "projection` must be a positive int"),
        ({"kind": "diag"}, ValueError, "kind must be one of 'auto', 'full', 'trace', 'diagonal'"),
        ({"implementation": "fast"}, ValueError, "implementation must be one of 'jacobian'"),
        ({"max_memory": 0}, ValueError, r"max_memory must be an int >= 1 or None, got 0; bytes"),
        ({"max_memory": 1e9}, TypeError, "max_memory must be an int"),
        ({"chunk_size": True}, TypeError, "chunk_size must be an int"),
        ({"topk": -2}, ValueError, "topk must be an int >= 1 or None, got -2"),
        ({"snapshot_device": "gpu0"}, ValueError, "snapshot_device='gpu0' is not a valid"),
    ],
)
def test_bad_settings_fail_at_construction_naming_the_value_and_the_fix(kwargs, error, match):
    with pytest.raises(error, match=match):
        KernelConfig(**kwargs)


def test_the_engine_rejects_an_out_of_range_seed_with_the_same_message():
    with pytest.raises(ValueError, match=r"projection_seed.*\[0, 2\*\*64 - 1\]") as engine:
        NtkConfig(projection_seed=2**70)
    with pytest.raises(ValueError) as config:
        KernelConfig(projection_seed=2**70)
    assert str(engine.value) == str(config.value)


def test_coerce_accepts_a_config_a_dict_or_none():
    cfg = KernelConfig(kind="trace", topk=4)
    assert KernelConfig.coerce(cfg) is cfg
    assert KernelConfig.coerce({"kind": "trace", "topk": 4}) == cfg
    assert KernelConfig.coerce(None) == KernelConfig()
    assert KernelConfig(snapshot_device="cpu").snapshot_device == torch.device("cpu")
    with pytest.raises(ValueError, match=r"unknown settings \['kinds'\]; the settings are kind,"):
        KernelConfig.coerce({"kinds": "trace"})
    with pytest.raises(TypeError, match="kernel must be a mapping, got 'trace'"):
        KernelConfig.coerce("trace")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="projection_seed"):
        KernelConfig.coerce({"projection_seed": 2**70})


def test_the_tracker_takes_a_config_or_a_dict_and_measures_the_same():
    x = torch.randn(5, 3)
    a = KernelTracker(_net(), x, kernel=KernelConfig(kind="trace", topk=3))
    b = KernelTracker(_net(), x, kernel={"kind": "trace", "topk": 3})
    assert a.kernel == b.kernel
    assert a.start() == b.start()
    assert a.kernel_config["kind"] == "trace" and a.topk == 3
    with pytest.raises(ValueError, match="projection_seed"):
        KernelTracker(_net(), x, kernel={"projection_seed": 2**70})


def test_old_kernel_keywords_are_gone():
    with pytest.raises(TypeError, match="unexpected keyword argument 'kind'"):
        KernelTracker(_net(), torch.randn(5, 3), kind="trace")  # type: ignore[call-arg]
