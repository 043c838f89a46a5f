"""A KernelTracker state saved by lazy_monitor 0.1.0 (commit beec677) still loads and continues."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from lazy_monitor import KernelTracker
from lazy_monitor.core.features import capture_features, centered_gram

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
sys.path.insert(0, FIXTURES)
from make_fixtures import sgd_steps, tracker_data, tracker_model  # noqa: E402


def _saved():
    return torch.load(os.path.join(FIXTURES, "tracker_v0_1.pt"), weights_only=True)


def test_tracker_state_of_version_0_1_continues_with_the_same_metrics():
    saved = _saved()
    model = tracker_model()
    model.load_state_dict(saved["model"])
    probe, targets, x, y = tracker_data()
    tracker = KernelTracker(model, probe, targets=targets)
    tracker.load_state_dict(saved["tracker"])
    assert tracker.started and tracker.last_step == 2
    # The state predates feature tracking: the θ₀ feature Grams are rebuilt from the snapshot.
    feats0 = capture_features(model, probe, tracker.feature_modules, params=tracker._lin.params0)
    for name, gram in tracker._reference.feature_grams0.items():
        torch.testing.assert_close(gram, centered_gram(feats0[name]), rtol=1e-12, atol=0)
    sgd_steps(model, x, y, 2)
    got = tracker.measure(4, lr=0.1)
    expected = saved["metrics_step4"]
    # the 0.1 names keep their order; the metrics added since (spectrum, stability, features)
    assert [n for n in got if n in expected] == list(expected)
    assert {n for n in got if n not in expected} == {
        "ntk/rank",
        "ntk/log10_cond",
        "opt/lr",
        "ntk/lr_eig_max",
        "regime/catapult",
        "features/0/cka",  # the hidden layer; the output layer "2" is no feature by default
    }
    # Per-layer changes were relative to the layer's own ‖K₀,l‖ / ‖θ₀,l‖ in 0.1; they are now in
    # units of the whole model's ‖K₀‖ / ‖θ₀‖: the same numbers times the layer's share.
    ref, params0 = tracker._reference, tracker._lin.params0
    k0 = float(torch.linalg.vector_norm(ref.kernel0.double()))
    t0 = math.sqrt(sum(float(p.double().pow(2).sum()) for p in params0.values()))
    for layer, names in tracker._layers.items():
        share_k = float(torch.linalg.vector_norm(ref.layer_kernels0[layer].double())) / k0
        share_t = math.sqrt(sum(float(params0[n].double().pow(2).sum()) for n in names)) / t0
        expected[f"ntk_layer/{layer}/rel_change"] *= share_k
        expected[f"params_layer/{layer}/rel_change"] *= share_t
    for name, value in expected.items():
        assert math.isclose(got[name], value, rel_tol=1e-6, abs_tol=1e-9), name
    assert got["ntk/lr_eig_max"] == 0.1 * got["ntk/eig_max"] / 6
    assert 0.0 < got["features/0/cka"] < 1.0


def test_tracker_state_of_version_0_1_is_rejected_for_another_probe():
    saved = _saved()
    probe, targets, _, _ = tracker_data()
    tracker = KernelTracker(tracker_model(), probe + 1, targets=targets)
    with pytest.raises(ValueError, match="probe"):
        tracker.load_state_dict(saved["tracker"])
