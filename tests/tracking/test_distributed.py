"""Kernel work split across processes (issue 9): balance, the sharded tracker, strategy check.

The ranks here are threads sharing a summing barrier (the reduction hook of KernelSharding),
so every configuration is checked in-process; tests/callbacks/test_cb_distributed.py runs the
real thing (ddp_spawn, gloo).
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
from torch import nn

from lazy_monitor import KernelTracker
from lazy_monitor.core.kernels.plan import estimate_param_costs
from lazy_monitor.tracking import KernelConfig
from lazy_monitor.tracking.distributed import KernelSharding, balance, check_strategy


class _ThreadWorld:
    """``world`` threads whose ``all_reduce`` sums their tensors (a test double of a group).

    torch's forward-AD levels are process-global, so the threads take turns: one lock is held
    while a thread computes and released only while it waits in the reduction."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(world)
        self.slots: list = [None] * world
        self.calls = 0

    def sharding(self, rank: int) -> KernelSharding:
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.lock.release()
            try:
                self.barrier.wait()
                total = sum(self.slots[1:], self.slots[0].clone())
                self.barrier.wait()
            finally:
                self.lock.acquire()
            if rank == 0:
                self.calls += 1
            return total

        return KernelSharding(rank, self.world, all_reduce)

    def run(self, fn) -> list:
        out: list = [None] * self.world
        errors: list = []

        def target(r: int) -> None:
            with self.lock:
                try:
                    out[r] = fn(r, self.sharding(r))
                except BaseException as err:  # surfaced below
                    errors.append(err)
                    self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        if errors:
            raise errors[0]
        return out


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).double()


def _probe() -> torch.Tensor:
    return torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(1)).double()


def _perturb(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _run_tracker(sharding, kind: str, per_layer: bool, **kw) -> tuple[dict, dict]:
    model = _cnn()
    tracker = KernelTracker(
        model,
        _probe(),
        targets=torch.tensor([0, 1, 2, 0, 1]),
        kernel=KernelConfig(kind=kind),
        per_layer=per_layer,
        sharding=sharding,
        **kw,
    )
    start = tracker.start()
    _perturb(model)
    return start, tracker.measure(7)


def _identical(a: dict, b: dict) -> bool:
    """Same keys and bit-equal values, NaN equal to NaN (``opt/lr`` is NaN without an lr)."""
    return list(a) == list(b) and all(
        x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a.values(), b.values())
    )


def _close(a: dict, b: dict, rel: float = 1e-6) -> list[str]:
    bad = []
    for k in b:
        x, y = a[k], b[k]
        if math.isnan(y) and math.isnan(x):
            continue
        if not abs(x - y) <= rel * max(abs(y), 1e-12):
            bad.append(f"{k}: {x} vs {y}")
    return bad


@pytest.mark.parametrize(
    "kind,per_layer,world",
    [("full", True, 2), ("trace", True, 3), ("diagonal", False, 2), ("full", True, 9)],
)
def test_split_kernel_metrics_equal_the_single_process_ones(kind, per_layer, world):
    single = _run_tracker(None, kind, per_layer)
    w = _ThreadWorld(world)
    ranks = w.run(lambda r, s: _run_tracker(s, kind, per_layer))
    for start, after in ranks:
        assert _identical(start, ranks[0][0]) and _identical(after, ranks[0][1])  # every rank
    assert list(ranks[0][1]) == list(single[1])
    assert not _close(ranks[0][0], single[0]) and not _close(ranks[0][1], single[1])
    assert ranks[0][0]["ntk/rel_change"] == 0.0  # exact at θ₀, as without the split
    # per measurement: one reduction of the kernels and one of the metrics
    assert w.calls == 4


def test_each_rank_computes_only_its_share(monkeypatch):
    import lazy_monitor.tracking.measurement as tracker_mod

    seen: dict[int, list] = {0: [], 1: []}
    real = tracker_mod.empirical_ntk
    local = threading.local()

    def spy(model, x, *args, params=None, **kw):
        if params is not None and getattr(local, "rank", None) is not None:
            seen[local.rank].append(sorted(params))
        return real(model, x, *args, params=params, **kw)

    monkeypatch.setattr(tracker_mod, "empirical_ntk", spy)

    def job(r, s):
        local.rank = r
        return _run_tracker(s, "full", True)

    _ThreadWorld(2).run(job)
    names = [n for n, _ in _cnn().named_parameters()]
    # the per-measurement calls (after the one-example validation call of each rank)
    share0, share1 = seen[0][-1], seen[1][-1]
    assert share0 and share1 and not set(share0) & set(share1)
    assert sorted(share0 + share1) == sorted(names)
    costs = estimate_param_costs(_cnn(), _probe())
    assert sorted(share0) == sorted(balance(costs, 2)[0])


def test_a_structured_failure_on_one_rank_switches_every_rank_to_jacobian(monkeypatch):
    import lazy_monitor.tracking.measurement as tracker_mod

    real = tracker_mod.empirical_ntk
    local = threading.local()

    def flaky(model, x, *args, params=None, **kw):
        if getattr(local, "rank", None) == 1 and kw.get("implementation") == "auto":
            raise RuntimeError("data-dependent use; use implementation='jacobian'")
        return real(model, x, *args, params=params, **kw)

    def job(r, s):
        tracker = KernelTracker(_cnn(), _probe(), sharding=s)
        local.rank = r
        with pytest.warns(RuntimeWarning) if r == 1 else _nullcontext():
            out = tracker.start()
        return tracker.kernel.implementation, out

    monkeypatch.setattr(tracker_mod, "empirical_ntk", flaky)
    # rank 1's structured call fails once the tracker is built; rank 0's succeeds
    ranks = _ThreadWorld(2).run(job)
    assert [r[0] for r in ranks] == ["jacobian", "jacobian"]
    assert _identical(ranks[0][1], ranks[1][1])


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_balance_is_largest_first_to_the_least_loaded_and_deterministic():
    costs = {"a": 5.0, "b": 3.0, "c": 3.0, "d": 1.0, "e": 0.5}
    assert balance(costs, 2) == [["a", "d", "e"], ["b", "c"]]
    assert balance(costs, 1) == [list(sorted(costs, key=lambda k: -costs[k]))]
    assert balance({"a": 1.0}, 3) == [["a"], [], []]  # a rank may get nothing


def test_cost_estimates_cover_every_parameter_and_rank_convs_above_biases():
    costs = estimate_param_costs(_cnn(), _probe())
    assert list(costs) == [n for n, _ in _cnn().named_parameters()]
    assert all(c > 0 for c in costs.values())
    assert costs["2.weight"] > costs["2.bias"] and costs["0.weight"] > costs["0.bias"]


def test_sharding_arguments_are_validated():
    with pytest.raises(ValueError, match="rank must be smaller than world_size=2"):
        KernelSharding(2, 2, lambda t: t)
    with pytest.raises(ValueError, match="world_size"):
        KernelSharding(0, 0, lambda t: t)
    with pytest.raises(TypeError, match="all_reduce"):
        KernelSharding(0, 2, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sharding must be a KernelSharding"):
        KernelTracker(_cnn(), _probe(), sharding="ddp")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="init_process_group"):
        KernelSharding.from_process_group()
    assert not KernelSharding(0, 1, lambda t: t).active


def test_sharded_strategies_are_rejected_naming_the_alternatives():
    class FSDPStrategy:  # matched by name along the MRO (both Lightning namespaces)
        pass

    class MyFSDP(FSDPStrategy):
        pass

    with pytest.raises(ValueError, match=r"MyFSDP \(FSDPStrategy\).*split_across_ranks=True"):
        check_strategy(MyFSDP())
    check_strategy(object())  # anything else passes
