"""Layer groups of the per-layer metrics (tracking/layers.py) and the tracker's layer_groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lazy_monitor import KernelTracker
from lazy_monitor.tracking.layers import group_layers


def _names(model):
    return [n for n, _ in model.named_parameters()]


def _deep_bn_mlp(blocks=24, width=6):
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(self.norm(x))


class _Transformerish(nn.Module):
    def __init__(self, depth=12, d=4):
        super().__init__()
        self.embed = nn.Linear(3, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def test_every_parameter_in_exactly_one_group_in_order():
    for model, cap in ((_deep_bn_mlp(), 16), (_Transformerish(), 16), (_Transformerish(), 3)):
        groups = group_layers(model, _names(model), cap)
        flat = [p for names in groups.values() for p in names]
        assert flat == _names(model) and len(groups) <= cap


def test_batchnorm_folds_into_its_block_and_deep_sequential_is_split_evenly():
    model = _deep_bn_mlp(blocks=24)
    per_module = group_layers(model, _names(model), 10_000)
    assert len(per_module) == 25  # 24 Linear (+ their BatchNorm) and the readout
    assert per_module["0"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    groups = group_layers(model, _names(model), 16)
    assert len(groups) == 16 and list(groups)[0] == "0" and list(groups)[-1].endswith("72")


def test_transformer_groups_by_block_with_norms_folded():
    model = _Transformerish(depth=12)
    groups = group_layers(model, _names(model), 16)
    assert list(groups) == ["embed", *[f"blocks.{i}" for i in range(12)], "head"]
    assert "norm.weight" in groups["blocks.11"]  # the final norm belongs to the last block
    assert "blocks.3.norm.weight" in groups["blocks.3"]
    assert list(group_layers(model, _names(model), 3)) == ["embed", "blocks", "head"]
    # 3 top-level groups are too coarse for a cap of 8: the blocks are split into runs
    runs = list(group_layers(model, _names(model), 8))
    assert len(runs) == 8 and runs[:2] == ["embed", "blocks.0..blocks.1"]


def test_bad_max_groups():
    with pytest.raises(ValueError, match="max_groups must be >= 1"):
        group_layers(nn.Linear(2, 2), ["weight", "bias"], 0)


def test_tracker_layer_groups_and_resume_keeps_the_saved_grouping():
    torch.manual_seed(0)
    model = _Transformerish(depth=3).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    tracker = KernelTracker(model, x, layer_groups=2)
    assert tracker.layers == ["embed", "blocks..head"]
    tracker.start()
    state = tracker.state_dict()  # reference only
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = tracker.measure(1)
    layer_tags = [k for k in out if k.startswith("ntk_layer/")]
    assert len(layer_tags) == len(tracker.layers) <= 2
    # resume into a tracker built with another grouping: the saved reference decides
    other = KernelTracker(model, x, layer_groups=None)
    other.load_state_dict(state)
    assert other.layers == tracker.layers
    again = other.measure(1)
    for tag in layer_tags:
        assert again[tag] == pytest.approx(out[tag], rel=1e-9)


def test_one_group_is_the_whole_kernel():
    torch.manual_seed(0)
    model = _Transformerish(depth=2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    tracker = KernelTracker(model, x, layer_groups=1)
    assert tracker.layers == ["embed..head"]
    tracker.start()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    out = tracker.measure(1)
    assert out["ntk_layer/embed..head/rel_change"] == pytest.approx(out["ntk/rel_change"], 1e-9)
    assert out["params_layer/embed..head/rel_change"] == pytest.approx(
        out["params/rel_change"], 1e-9
    )
