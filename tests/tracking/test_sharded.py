"""KernelTracker on FSDP2-sharded parameters (issue 9, item 2): real gloo processes.

Each test spawns 2 CPU processes, shards a float64 model with ``fully_shard`` (every Linear /
conv / block and the root), measures with the sharded route and compares with a
single-process :class:`KernelTracker` on the same weights and probe (the full weights are
gathered *by the test* only, to build that reference).
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import socket
import sys

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or sys.platform == "win32",
    reason="needs torch.distributed with gloo",
)

WORLD = 2
REL = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )


class _Block(nn.Module):
    """A tiny pre-norm transformer block on (N, T, D) tokens, read out to (N, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(x)
        return self.head(x.mean(1))


MODELS = {
    "mlp": (_mlp, lambda g: torch.randn(5, 5, generator=g), ["0", "2"]),
    "cnn": (_cnn, lambda g: torch.randn(4, 3, 6, 6, generator=g), ["0", "2", "6"]),
    "block": (_Block, lambda g: torch.randn(4, 3, 8, generator=g), ["attn", "mlp", "head"]),
}


def _shard(model: nn.Module, units: list[str], partial: bool = False) -> nn.Module:
    """``fully_shard`` every unit and the root (``partial``: all units but the last, no root,
    so the last unit's parameters stay plain replicated tensors)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for name in units[:-1] if partial else units:
        fully_shard(model.get_submodule(name), mesh=mesh)
    if not partial:
        fully_shard(model, mesh=mesh)
    return model


def _train(model: nn.Module, x: torch.Tensor, steps: int, monitor=None) -> None:
    """SGD on a fixed regression batch; ``monitor(step)`` after each step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    g = torch.Generator().manual_seed(5)
    y = torch.randn(model(x).shape, generator=g, dtype=torch.float64)
    for step in range(1, steps + 1):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        if monitor is not None:
            monitor(step)


def _full_state(model: nn.Module) -> dict:
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in model.state_dict().items()
    }


def _kwargs(cfg: dict) -> dict:
    """A test configuration as tracker arguments: the kernel settings as ``kernel=`` (a dict)."""
    from lazy_monitor import KernelConfig

    keys = {f.name for f in dataclasses.fields(KernelConfig)}
    kernel = {k: v for k, v in cfg.items() if k in keys}
    return {**{k: v for k, v in cfg.items() if k not in keys}, "kernel": kernel}


def _worker(rank: int, port: int, name: str, configs: list, out_dir: str) -> None:
    import torch.distributed as dist

    from lazy_monitor import KernelTracker
    from lazy_monitor.tracking.features import feature_gram_bytes
    from lazy_monitor.tracking.sharded import ShardedMeasurement, _row_exchange_layout

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        build, make_x, units = MODELS[name]
        g = torch.Generator().manual_seed(1)
        probe = make_x(g).double()
        train_x = make_x(g).double()
        results = []
        for cfg in configs:
            torch.manual_seed(0)
            model = build().double()
            init = {k: v.clone() for k, v in model.state_dict().items()}
            partial = cfg.pop("partial", False)
            _shard(model, units, partial=partial)
            recompute = cfg.pop("recompute_j0", False)
            exchange = cfg.pop("exchange_rows", True)
            tracker = KernelTracker(model, probe, **_kwargs(cfg))
            assert isinstance(tracker.measurement, ShardedMeasurement)
            if recompute:  # a max_memory that holds the kernel's rows but not J(θ₀)'s
                tracker.start()
                est = tracker.kernel_config["estimate"]
                # (plus the feature Grams, which max_memory holds beside the kernel)
                grams = feature_gram_bytes(len(tracker._feature_modules), tracker.probe_size)
                cfg["max_memory"] = est["bytes"] - est["j0_bytes"] + grams
                tracker = KernelTracker(model, probe, **_kwargs(cfg))
            tracker.measurement.exchange_rows = (
                exchange  # False: every rank every row (FSDP2's reduce)
            )
            # the row exchange applies when FSDP2 manages every tracked parameter
            layout = _row_exchange_layout(model, tracker._param_names, WORLD)
            assert (layout is not None) == (not partial)
            start = tracker.start()
            stored = tracker.kernel_config["estimate"]["store_j0"]
            assert stored == (not recompute) and (tracker._lin.j0 is None) == recompute
            _train(model, train_x, 3)
            model.zero_grad()
            measured = tracker.measure(3)
            results.append((cfg, init, _full_state(model), start, measured))
            local = (p.to_local() if hasattr(p, "to_local") else p for p in model.parameters())
            assert max(t.numel() for t in local) < max(v.numel() for v in init.values()), (
                "the parameters must be sharded"
            )
        if name == "mlp":
            results.append(("identical", _bit_identical(probe, train_x)))
            results.append(("roundtrip", _round_trip(build, units, probe, train_x)))
            results.append(("refused", _replicated_is_refused(build, probe)))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _bit_identical(probe, train_x) -> bool:
    """Training with and without measurements ends with bit-identical local shards: an MLP with
    dropout (the measurement must restore train mode and the RNG), and a half-accumulated
    gradient at each measurement that must survive it untouched."""
    from lazy_monitor import KernelConfig, KernelTracker

    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Dropout(0.3), nn.Linear(7, 3))

    finals = []
    for monitored in (False, True):
        torch.manual_seed(0)
        model = _shard(build().double(), ["0", "3"])
        tracker = (
            KernelTracker(model, probe, kernel=KernelConfig(kind="full")) if monitored else None
        )
        if tracker is not None:
            tracker.start()

        def monitor(step: int, model=model, tracker=tracker) -> None:
            # a half-accumulated gradient must survive a measurement untouched
            model(train_x).sum().backward()
            grads = [p.grad.to_local().clone() for p in model.parameters()]
            if tracker is not None:
                tracker.measure(step)
            for p, g in zip(model.parameters(), grads):
                assert torch.equal(p.grad.to_local(), g)

        _train(model, train_x, 3, monitor)
        finals.append([p.to_local().clone() for p in model.parameters()])
    return all(torch.equal(a, b) for a, b in zip(*finals))


def _round_trip(build, units, probe, train_x) -> bool:
    """A tracker loaded from a rank's own state measures what the saved one measures; no
    measurement with gradient sync off."""
    from lazy_monitor import KernelConfig, KernelTracker

    torch.manual_seed(0)
    model = _shard(build().double(), units)
    tracker = KernelTracker(model, probe, kernel=KernelConfig(kind="full"))
    tracker.start()
    _train(model, train_x, 2)
    saved = tracker.state_dict()
    fresh = KernelTracker(model, probe, kernel=KernelConfig(kind="full"))
    fresh.load_state_dict(saved)
    loaded = fresh.measure(2)
    same = _close(loaded, tracker.measure(2)) == []
    # a custom FSDP2 gradient divide factor (here: sum over ranks) is undone
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:  # not recursive
        unit.set_gradient_divide_factor(1.0)
    summed = KernelTracker(model, probe, kernel=KernelConfig(kind="full"))
    summed.measurement.exchange_rows = (
        False  # FSDP2's own reduce-scatter, divided by the custom factor
    )
    summed.load_state_dict(saved)
    same = same and _close(summed.measure(2), loaded) == []
    for unit in units:
        unit.set_gradient_divide_factor(float(WORLD))
    # rank 0's state on every rank (what a Lightning checkpoint holds): every rank refuses
    state = tracker.state_dict()
    state["linearization"]["rank"] = 0
    try:
        KernelTracker(model, probe, kernel=KernelConfig(kind="full")).load_state_dict(state)
    except ValueError as err:
        same = same and "state is per rank" in str(err)
    else:
        same = False
    # inside an accumulation window (no gradient sync) a measurement refuses before any backward
    model.set_requires_gradient_sync(False)
    try:
        tracker.measure(3)
    except RuntimeError as err:
        refused = "set_requires_gradient_sync(False)" in str(err)
    else:
        refused = False
    model.set_requires_gradient_sync(True)
    return same and refused


def _replicated_is_refused(build, probe) -> str:
    """Replicated DTensors (not FSDP2's Shard(0)) are refused at construction."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_module

    from lazy_monitor import KernelTracker

    model = distribute_module(build().double(), init_device_mesh("cpu", (WORLD,)))
    try:
        KernelTracker(model, probe)
    except ValueError as err:
        return str(err)
    return ""


def _reference(name: str, cfg: dict, init: dict, final: dict, probe: torch.Tensor):
    from lazy_monitor import KernelTracker

    build = MODELS[name][0]
    torch.manual_seed(0)
    model = build().double()
    model.load_state_dict(init)
    tracker = KernelTracker(model, probe, **_kwargs(cfg))
    start = tracker.start()
    model.load_state_dict(final)
    return start, tracker.measure(3)


def _close(got: dict, want: dict) -> list:
    bad = []
    assert list(got) == list(want)
    for k, w in want.items():
        v = got[k]
        if not ((math.isnan(v) and math.isnan(w)) or abs(v - w) <= REL * max(abs(w), 1e-12)):
            bad.append((k, v, w))
    return bad


def _run(tmp_path, name: str, configs: list) -> None:
    import torch.multiprocessing as mp

    # forkserver: the imports happen once in the server, not in each process
    multiprocessing.set_forkserver_preload(["lazy_monitor", "torch.distributed.fsdp"])
    mp.start_processes(
        _worker,
        args=(_free_port(), name, configs, str(tmp_path)),
        nprocs=WORLD,
        start_method="forkserver",
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    g = torch.Generator().manual_seed(1)
    probe = MODELS[name][1](g).double()
    for results in ranks:
        for entry in results:
            if entry[0] == "identical":
                assert entry[1], "training with the sharded monitor diverged from training without"
                continue
            if entry[0] == "roundtrip":
                assert entry[1], "round trip, divide factor or gradient-sync refusal failed"
                continue
            if entry[0] == "refused":
                assert "placements (Replicate(),)" in entry[1] and "fully_shard" in entry[1]
                continue
            cfg, init, final, start, measured = entry
            drop = ("max_memory", "partial", "exchange_rows")
            cfg = {k: v for k, v in cfg.items() if k not in drop}
            want_start, want = _reference(name, cfg, init, final, probe)
            assert _close(start, want_start) == [], cfg
            assert _close(measured, want) == [], cfg
            assert measured["params/rel_change"] > 0 and measured["ntk/rel_change"] > 0
    # the same metrics on every rank (NaN: opt/lr without an lr)
    assert _close(ranks[0][0][4], ranks[1][0][4]) == [] and ranks[0][0][4].keys()


def test_sharded_mlp_equals_single_process_full_trace_projected_and_is_side_effect_free(
    tmp_path,
):
    _run(
        tmp_path,
        "mlp",
        [
            {"kind": "full", "targets": torch.tensor([0, 1, 2, 0, 1])},
            {"kind": "trace", "projection": 2, "per_layer": False, "exchange_rows": False},
            {"kind": "diagonal", "projection": "sum", "recompute_j0": True},
        ],
    )


def test_sharded_cnn_equals_single_process(tmp_path):
    # partial: the head is not sharded (a plain tensor on every rank, counted once)
    _run(tmp_path, "cnn", [{"kind": "full"}, {"kind": "diagonal", "partial": True}])


def test_sharded_transformer_block_equals_single_process(tmp_path):
    _run(tmp_path, "block", [{"kind": "full", "feature_modules": ["mlp", "head"]}])
