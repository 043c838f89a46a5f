"""KernelTracker: names, step-0 values, state round trip, side-effect freedom, validation."""

import io
import math

import pytest
import torch
from torch import nn

from lazy_monitor import KernelTracker, empirical_ntk
from lazy_monitor import metrics as M
from lazy_monitor.demo.models import mlp
from lazy_monitor.tracking import KernelConfig

FIXED_NAMES = [
    "ntk/rel_change", "ntk/distance", "ntk/velocity", "ntk/alignment", "ntk/eig_max",
    "ntk/eig_min", "ntk/trace", "ntk/eff_rank", "ntk/cond", "ntk/log10_cond", "ntk/rank",
    "ntk/eig_overlap",
    "params/rel_change", "params/distance", "lin/rel_error", "lin/rmse", "lin/agreement",
]  # fmt: skip
CHANGES = ["ntk/rel_change", "ntk/distance", "ntk/velocity", "params/rel_change",
           "params/distance", "lin/rel_error", "lin/rmse"]  # fmt: skip


def _data(n=8, dim=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = torch.arange(n) % classes
    return x, y


def _net(width=32, seed=0):
    return mlp(5, width, 3, depth=2, seed=seed)


def _train(model, x, y, steps, lr=0.5):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


# ------------------------------------------------------------------ names


def test_names_are_exactly_the_documented_ones_for_a_classifier():
    x, y = _data()
    tracker = KernelTracker(_net(), x, targets=y)
    layers = ["fc1", "fc2", "readout"]
    expected = (
        FIXED_NAMES
        + [f"ntk_layer/{name}/rel_change" for name in layers]
        + [f"params_layer/{name}/rel_change" for name in layers]
        + ["regime/lazy", "health/nonfinite", "opt/lr", "ntk/lr_eig_max", "regime/catapult"]
        + [f"features/{name}/cka" for name in layers[:-1]]  # hidden layers, not the readout
    )
    assert tracker.metric_names() == expected
    assert list(tracker.start()) == expected
    _train(tracker.model, x, y, 2)
    out = tracker.measure(2)
    assert list(out) == expected
    assert all(isinstance(v, float) for v in out.values())


@pytest.mark.parametrize(
    "targets, per_layer, absent",
    [
        (None, True, {"ntk/alignment", "lin/agreement"}),
        ("regression", True, {"lin/agreement"}),
        ("classes", False, {"layer"}),
    ],
)
def test_optional_names_follow_the_configuration(targets, per_layer, absent):
    x, y = _data()
    t = {"regression": torch.randn(8, 3), "classes": y, None: None}[targets]
    tracker = KernelTracker(_net(), x, targets=t, per_layer=per_layer)
    names = tracker.metric_names()
    assert list(tracker.start()) == names
    for name in ("ntk/alignment", "lin/agreement"):
        assert (name in names) == (name not in absent)
    assert any("_layer/" in n for n in names) == ("layer" not in absent)


@pytest.mark.parametrize("kind, size", [("full", 8 * 3), ("trace", 8), ("diagonal", 8 * 3)])
def test_every_kind_gives_the_same_names_and_its_own_spectrum_size(kind, size):
    x, y = _data()
    tracker = KernelTracker(_net(), x, targets=y, kernel=KernelConfig(kind=kind))
    assert list(tracker.start()) == tracker.metric_names()
    assert tracker.last_eigenvalues.shape == (size,)
    assert tracker.kernel0.dim() == {"full": 4, "trace": 2, "diagonal": 3}[kind]


# ------------------------------------------------------------------ values


def test_start_returns_exact_zero_changes_and_measure_without_training_too():
    x, y = _data()
    tracker = KernelTracker(_net(), x, targets=y)
    for out in (tracker.start(), tracker.measure(1)):
        for name in CHANGES + [n for n in out if n.endswith("_layer/fc1/rel_change")]:
            assert out[name] == 0.0, name
        assert out["ntk/eig_overlap"] == 1.0
        assert out["lin/agreement"] == 1.0
        assert out["regime/lazy"] == 1.0 and out["health/nonfinite"] == 0.0


def test_metrics_match_the_pure_functions():
    x, y = _data()
    model = _net()
    tracker = KernelTracker(model, x, targets=y)
    tracker.start()
    k_prev = tracker.last_kernel
    _train(model, x, y, 3)
    out = tracker.measure(3)
    k = empirical_ntk(model, x)
    torch.testing.assert_close(tracker.last_kernel, k)
    assert out["ntk/rel_change"] == pytest.approx(M.kernel_rel_change(k, tracker.kernel0).item())
    assert out["ntk/velocity"] == pytest.approx(M.kernel_distance(k, k_prev).item() / 3)
    assert out["ntk/alignment"] == pytest.approx(M.kernel_alignment(k, y).item())
    assert out["ntk/eig_max"] == pytest.approx(torch.linalg.eigvalsh(M.kernel_matrix(k))[-1].item())
    assert out["ntk/trace"] == pytest.approx(M.kernel_matrix(k).trace().item())
    assert 0 < out["ntk/rel_change"] and 0 < out["params/rel_change"] < 1
    assert 0 < out["lin/rel_error"] < math.inf and out["lin/rmse"] > 0


def test_velocity_divides_by_the_steps_between_measurements():
    x, y = _data()
    model = _net()
    a, b = KernelTracker(model, x), KernelTracker(model, x)
    a.start()
    b.start()
    _train(model, x, y, 2)
    ra, rb = a.measure(1), b.measure(4)
    assert ra["ntk/velocity"] > 0
    assert rb["ntk/velocity"] == pytest.approx(ra["ntk/velocity"] / 4, rel=1e-12)
    assert b.last_step == 4


def test_nonfinite_weights_give_nan_metrics_and_the_health_flag_not_an_exception():
    x, y = _data()
    model = _net()
    tracker = KernelTracker(model, x, targets=y)
    tracker.start()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    out = tracker.measure(1)
    assert out["health/nonfinite"] == 1.0
    assert out["regime/lazy"] == 0.0
    assert math.isnan(out["ntk/rel_change"]) and math.isnan(out["params/rel_change"])


def test_regime_follows_thresholds_in_both_directions():
    x, y = _data()
    model = _net(width=8)
    tracker = KernelTracker(
        model, x, targets=y, lazy_thresholds={"ntk/rel_change": 1e-3, "lin/agreement": 0.5}
    )
    assert tracker.start()["regime/lazy"] == 1.0
    _train(model, x, y, 20, lr=2.0)
    out = tracker.measure(20)
    lazy, reason = tracker.regime_decision(out)
    assert out["ntk/rel_change"] > 1e-3 and not lazy and out["regime/lazy"] == 0.0
    assert "ntk/rel_change" in reason and "> 0.001" in reason
    strict = KernelTracker(model, x, targets=y, lazy_thresholds={"ntk/eig_overlap": 1.0})
    strict.start()
    assert strict.regime_decision({"ntk/eig_overlap": 0.99}) == (
        False,
        "ntk/eig_overlap = 0.99 < 1",
    )


# ------------------------------------------------------------------ state


def _state_is_plain(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.device.type == "cpu"
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _state_is_plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_state_is_plain(v) for v in obj)
    return obj is None or isinstance(obj, (bool, int, float, str))


def test_state_dict_round_trip_reproduces_identical_metrics():
    x, y = _data()
    model = _net()
    tracker = KernelTracker(model, x, targets=y)
    tracker.start()
    _train(model, x, y, 3)
    tracker.measure(3)
    state = tracker.state_dict()
    assert _state_is_plain(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restored = KernelTracker(model, x.clone(), targets=y.clone())
    assert not restored.started
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.started and restored.last_step == 3
    _train(model, x, y, 3)
    assert restored.measure(6) == tracker.measure(6)


def test_load_state_dict_rejects_another_probe_or_configuration():
    x, y = _data()
    model = _net()
    tracker = KernelTracker(model, x, targets=y)
    tracker.start()
    state = tracker.state_dict()
    with pytest.raises(ValueError, match="different probe"):
        KernelTracker(model, x + 1, targets=y).load_state_dict(state)
    with pytest.raises(ValueError, match="kind='full' but this tracker has kind='trace'"):
        KernelTracker(model, x, targets=y, kernel=KernelConfig(kind="trace")).load_state_dict(state)


def test_unstarted_state_round_trips_and_measure_needs_start():
    x, _ = _data()
    tracker = KernelTracker(_net(), x)
    with pytest.raises(RuntimeError, match="before start"):
        tracker.measure(1)
    other = KernelTracker(tracker.model, x)
    other.load_state_dict(tracker.state_dict())
    assert not other.started


# ------------------------------------------------------------------ side effects


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.bn(self.fc(x)))))


def test_measure_leaves_weights_buffers_grads_flags_and_rng_untouched():
    x, y = _data()
    model = _BNNet()
    tracker = KernelTracker(model, x, targets=y)
    tracker.start()
    _train(model, x, y, 2)  # moves weights and BatchNorm statistics, leaves .grad set
    model.train()
    model.drop.eval()  # a mixed flag pattern must come back exactly
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    tracker.measure(2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng)


def test_measure_works_inside_no_grad_and_inference_mode():
    x, y = _data()
    tracker = KernelTracker(_net(), x, targets=y)
    tracker.start()
    with torch.no_grad():
        a = tracker.measure(1)
    with torch.inference_mode():
        b = tracker.measure(2)
    assert a["ntk/rel_change"] == b["ntk/rel_change"] == 0.0


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"kernel": {"kind": "diag"}},
            ValueError,
            "kind must be one of 'auto', 'full', 'trace', 'diagonal', got 'diag'",
        ),
        ({"kernel": {"kind": 4}}, TypeError, "kind must be one of"),
        ({"per_layer": "false"}, TypeError, "per_layer must be True or False, got 'false'"),
        ({"targets": torch.tensor([0, 1, 2])}, ValueError, r"shape \(3,\) but the probe has 8"),
        ({"targets": torch.arange(8)}, ValueError, "class index 3 of targets is outside"),
        ({"targets": torch.zeros(8, dtype=torch.long)}, ValueError, "all probe targets are"),
        ({"targets": torch.randn(8, 2)}, ValueError, "2 values per example but the model has 3"),
        ({"targets": [0, 1]}, TypeError, "targets must be a Tensor"),
        ({"lazy_thresholds": {"ntk/rel_chnage": 0.1}}, ValueError, "unknown or unsupported"),
        ({"lazy_thresholds": {"ntk/eig_max": 1.0}}, ValueError, "'ntk/eig_max'"),
        ({"lazy_thresholds": {"ntk/rel_change": -1}}, ValueError, "finite number >= 0"),
        ({"lazy_thresholds": {"ntk/rel_change": "0.1"}}, TypeError, "must be a finite number"),
        ({"lazy_thresholds": {}}, ValueError, "lazy_thresholds is empty"),
        ({"kernel": {"topk": 100}}, ValueError, "topk=100 exceeds the kernel matrix size 24"),
        ({"kernel": {"topk": 0}}, ValueError, "topk must be an int >= 1 or None, got 0"),
        ({"kernel": {"topk": 2.0}}, TypeError, "topk must be an int"),
        (
            {"kernel": {"chunk_size": 0}},
            ValueError,
            "chunk_size must be an int >= 1 or None, got 0",
        ),
        ({"kernel": {"snapshot_device": "gpu0"}}, ValueError, "snapshot_device='gpu0'"),
        ({"kernel": {"implementation": "magic"}}, ValueError, "magic"),
        ({"output_fn": 3}, TypeError, "output_fn must be callable"),
    ],
)
def test_constructor_rejects_bad_arguments_with_a_message_naming_them(kwargs, error, match):
    x, _ = _data()
    with pytest.raises(error, match=match):
        KernelTracker(_net(), x, **kwargs)


def test_probe_and_step_validation():
    with pytest.raises(ValueError, match="empty"):
        KernelTracker(_net(), torch.zeros(0, 5))
    x, _ = _data()
    tracker = KernelTracker(_net(), x)
    tracker.start()
    tracker.measure(5)
    with pytest.raises(ValueError, match="got step=5 after step=5"):
        tracker.measure(5)
    with pytest.raises(TypeError, match="step must be an int"):
        tracker.measure(6.0)


# ------------------------------------------------------------------ devices and inputs


def test_snapshot_on_cpu_gives_the_same_metrics():
    x, y = _data()
    model = _net()
    a = KernelTracker(model, x, targets=y)
    b = KernelTracker(model, x, targets=y, kernel=KernelConfig(snapshot_device="cpu"))
    a.start()
    b.start()
    _train(model, x, y, 2)
    assert a.measure(2) == b.measure(2)
    assert b.kernel0.device.type == "cpu" and b.last_kernel.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_with_cpu_snapshot_matches_a_cpu_run():
    x, y = _data()
    cpu_model, gpu_model = _net(seed=1), _net(seed=1).cuda()
    cpu = KernelTracker(cpu_model, x, targets=y)
    gpu = KernelTracker(
        gpu_model, x, targets=y, kernel=KernelConfig(snapshot_device="cpu")
    )  # probe moved for us
    cpu.start()
    gpu.start()
    assert gpu.kernel0.device.type == "cpu"
    _train(cpu_model, x, y, 2)
    _train(gpu_model, x.cuda(), y.cuda(), 2)
    a, b = cpu.measure(2), gpu.measure(2)
    for name in ("ntk/rel_change", "params/rel_change", "lin/rel_error", "ntk/eig_max"):
        assert b[name] == pytest.approx(a[name], rel=1e-3, abs=1e-6), name
    state = gpu.state_dict()
    assert _state_is_plain(state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tracker_follows_a_model_moved_to_cuda_after_start():
    x, y = _data()
    model = _net()
    tracker = KernelTracker(model, x, targets=y)
    tracker.start()
    model.cuda()
    out = tracker.measure(1)
    assert out["ntk/rel_change"] == pytest.approx(0.0, abs=1e-5)
    assert tracker.last_kernel.device.type == "cuda"


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 8)
        self.b = nn.Linear(2, 8)
        self.head = nn.Linear(8, 2)
        self.scale = nn.Parameter(torch.ones(()))  # root-level parameter: its own layer

    def forward(self, x, z):
        return self.scale * self.head(torch.tanh(self.a(x) + self.b(z)))


def test_tuple_probe_and_root_level_parameter():
    x, _ = _data()
    z = torch.randn(8, 2)
    model = _TwoInputs()
    tracker = KernelTracker(model, (x, z), targets=torch.randn(8, 2))
    assert tracker.layers == ["scale", "a", "b", "head"]  # named_parameters() order
    assert "ntk_layer/scale/rel_change" in tracker.metric_names()
    out = tracker.start()
    assert out["ntk/rel_change"] == 0.0 and out["health/nonfinite"] == 0.0
    with torch.no_grad():
        model.scale.mul_(1.5)
    out = tracker.measure(1)
    # per layer in units of the whole model's ‖θ0‖ (= the total's change: only scale moved)
    assert out["params_layer/scale/rel_change"] == pytest.approx(out["params/rel_change"])
    assert out["params/rel_change"] == pytest.approx(
        0.5
        / torch.cat([p.detach().flatten() for p in tracker._lin.params0.values()]).norm().item(),
        rel=1e-6,
    )
    assert out["params_layer/a/rel_change"] == 0.0
    assert out["ntk/rel_change"] > 0


def test_large_spectrum_warns_at_construction_and_trace_kind_does_not():
    x = torch.randn(700, 5)  # full: M = 700 · 3 = 2100 > 2048
    with pytest.warns(UserWarning, match=r"2100×2100.*kind='trace'"):
        KernelTracker(_net(width=4), x, kernel=KernelConfig(kind="full"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KernelTracker(_net(width=4), x, kernel=KernelConfig(kind="trace"))


def test_regime_decision_needs_the_thresholded_metrics():
    x, _ = _data()
    tracker = KernelTracker(_net(), x)
    with pytest.raises(ValueError, match="lin/rel_error"):
        tracker.regime_decision({"ntk/rel_change": 0.0})


def test_kernel_implementations_give_the_same_metrics():
    x, y = _data()
    model = _net()
    trackers = [
        KernelTracker(model, x, targets=y, kernel=KernelConfig(implementation=i))
        for i in ("jacobian", "auto")
    ]
    for t in trackers:
        t.start()
    _train(model, x, y, 3)
    a, b = (t.measure(3) for t in trackers)
    for name in ("ntk/rel_change", "ntk/eig_max", "ntk/alignment", "ntk_layer/fc1/rel_change"):
        assert a[name] == pytest.approx(b[name], rel=1e-4), name


class _DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 3)

    def forward(self, x):
        return {"logits": self.body(x), "aux": x.sum()}


def test_output_fn_selects_the_output_and_is_required_for_dict_outputs():
    x, y = _data()
    tracker = KernelTracker(_DictOut(), x, targets=y, output_fn=lambda out: out["logits"])
    assert tracker.num_outputs == 3 and tracker.start()["ntk/rel_change"] == 0.0
    with pytest.raises(TypeError, match="output_fn"):
        KernelTracker(_DictOut(), x)
