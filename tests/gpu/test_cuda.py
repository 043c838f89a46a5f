"""CUDA checks (issue 9, item 4): engine, tracker, Lightning monitor under AMP, peak memory.

Every test here needs one CUDA device and is skipped without it; ``bash benchmarks/gpu_check.sh``
runs them (together with the other CUDA tests of the suite, selected by ``-k cuda``) and fails if
any of them was skipped. Only the public API is used: :func:`lazy_monitor.empirical_ntk`,
:class:`lazy_monitor.KernelTracker` and
:class:`lazy_monitor.callbacks.lightning.KernelRegimeMonitor`.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from _reference import reference_ntk
from callbacks._cb_helpers import RecordingLogger  # tests/ is on sys.path (conftest)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lazy_monitor import KernelTracker, empirical_ntk
from lazy_monitor.callbacks.lightning import KernelRegimeMonitor
from lazy_monitor.tracking import KernelConfig

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device (torch.cuda.is_available() is False); "
    "run `bash benchmarks/gpu_check.sh LOGDIR` on a machine with one GPU",
)

IMPLEMENTATIONS = ["auto", "structured", "jacobian", "ntvp"]
GIB = 2**30
# The project's memory target for one kernel measurement (benchmarks/RESULTS.md: CNN and
# ResNet-18 at N = 128 stay <= 2 GiB above the model's footprint on CPU); the engine's factor
# budget is 1 GiB (DEFAULT_FACTOR_BUDGET), the rest is the kernel and contraction temporaries.
PEAK_BOUND_BYTES = 2 * GIB


@pytest.fixture(autouse=True)
def _restore_global_torch_flags():
    # Lightning's deterministic=True switches deterministic algorithms on process-wide; TF32 is
    # switched on by a test below. Leave the process as we found it for the other tests. The
    # matmul precision goes through torch.set_float32_matmul_precision only: assigning the legacy
    # torch.backends.cuda.matmul.allow_tf32 after it puts torch in a "mixed API" state in which
    # get_float32_matmul_precision() raises (see tests/reliability/test_global_flags.py).
    deterministic = torch.are_deterministic_algorithms_enabled()
    precision = torch.get_float32_matmul_precision()
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = cudnn_tf32


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, 1, 1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, 2, 1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def _probe(name: str, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    shape = (n, 5) if name == "mlp" else (n, 2, 6, 6)
    return torch.randn(*shape, generator=g)


MODELS = {"mlp": _mlp, "cnn": _cnn}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ----------------------------------------------------------------------------- engine
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_cuda_kernel_float64_matches_cpu_reference(model_name, implementation):
    """Every implementation on CUDA (float64) equals the brute-force CPU float64 kernel."""
    model, x = MODELS[model_name](), _probe(model_name, 5)
    ref, ref_blocks = reference_ntk(model, x)  # CPU, float64, autograd per output entry
    gpu_model, gx = copy.deepcopy(model).double().cuda(), x.double().cuda()
    k, blocks = empirical_ntk(gpu_model, gx, implementation=implementation, return_blocks=True)
    assert k.device.type == "cuda" and k.dtype == torch.float64
    assert k.shape == ref.shape == (5, 5, 3, 3)
    torch.testing.assert_close(k.cpu(), ref, rtol=1e-6, atol=1e-10)
    assert blocks.keys() == ref_blocks.keys()
    for name, block in blocks.items():
        torch.testing.assert_close(block.cpu(), ref_blocks[name], rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_cuda_kernel_float32_is_computed_without_tf32(model_name, implementation):
    """With TF32 globally on (as many training scripts set it), the float32 kernel on CUDA still
    has float32 accuracy: the engine switches TF32 off for its computation (TF32 has a 10-bit
    mantissa, ~1e-3 relative error)."""
    torch.set_float32_matmul_precision("high")  # TF32 matmuls
    torch.backends.cudnn.allow_tf32 = True  # TF32 convolutions (torch's default)
    model, x = MODELS[model_name](), _probe(model_name, 6)
    ref, _ = reference_ntk(model, x)
    k = empirical_ntk(copy.deepcopy(model).cuda(), x.cuda(), implementation=implementation)
    assert k.dtype == torch.float32
    assert _rel_err(k.cpu(), ref) < 1e-5
    # the user's flags are restored after the computation
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("kind", ["trace", "diagonal"])
def test_cuda_kernel_kinds_match_cpu_reference(kind):
    model, x = _cnn(), _probe("cnn", 4)
    ref, _ = reference_ntk(model, x, kind=kind)
    k = empirical_ntk(copy.deepcopy(model).double().cuda(), x.double().cuda(), kind=kind)
    torch.testing.assert_close(k.cpu(), ref, rtol=1e-6, atol=1e-10)


# ----------------------------------------------------------------------------- tracker
def _sgd_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_cuda_tracker_with_cpu_snapshot_keeps_state_on_cpu_and_matches_a_cpu_run():
    x, y = _probe("mlp", 8), torch.arange(8) % 3
    cpu_model = _mlp().double()
    gpu_model = copy.deepcopy(cpu_model).cuda()
    cpu = KernelTracker(cpu_model, x.double(), targets=y)
    gpu = KernelTracker(
        gpu_model, x.double(), targets=y, kernel=KernelConfig(snapshot_device="cpu")
    )
    cpu.start()
    gpu.start()
    assert gpu.kernel0.device.type == "cpu"
    assert all(p.device.type == "cuda" for p in gpu_model.parameters())
    # Same weights on both sides: train on CPU, copy the exact result to the GPU model.
    _sgd_steps(cpu_model, x.double(), y, 3)
    gpu_model.load_state_dict(cpu_model.state_dict())
    a, b = cpu.measure(3), gpu.measure(3)
    assert gpu.last_kernel.device.type == "cpu" and gpu.kernel0.device.type == "cpu"
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert math.isfinite(b[name]), name
        assert b[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    assert a["ntk/rel_change"] > 1e-4  # the weights really moved


def test_cuda_tracker_with_cpu_snapshot_holds_no_theta0_copy_on_the_gpu():
    # A model whose parameters dominate device memory: 64-2048-2048-4, ~4.3M parameters.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 2048), nn.Tanh(), nn.Linear(2048, 2048), nn.Tanh(), nn.Linear(2048, 4)
    ).cuda()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    x = torch.randn(8, 64, device="cuda")
    empirical_ntk(model, x)  # warm-up: cuBLAS workspaces etc. are not the tracker's
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    on_cpu = KernelTracker(model, x, kernel=KernelConfig(snapshot_device="cpu"))
    on_cpu.start()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    # θ₀ on the device would hold param_bytes; the CPU snapshot leaves at most the probe cache.
    assert held < param_bytes / 4, (held, param_bytes)
    assert on_cpu.kernel0.device.type == "cpu"


# ----------------------------------------------------------------------------- memory
def _bench_cnn() -> nn.Module:
    # benchmarks/bench_kernels.py's ``cnn`` case: 3 convs 3->64->128->256, GAP, dense 10.
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, 1, 1),
        nn.ReLU(),
        nn.Conv2d(64, 128, 3, 2, 1),
        nn.ReLU(),
        nn.Conv2d(128, 256, 3, 2, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(256, 10),
    )


@pytest.mark.parametrize("implementation", ["auto", "structured"])
def test_cuda_peak_memory_of_one_measurement_stays_under_2_gib(implementation):
    """Peak device memory of one full-kernel measurement, CNN at N = 128 (O = 10), is at most
    ``PEAK_BOUND_BYTES`` above the model + probe footprint (the tutorial's Jacobian method would
    need N·O·P·4 B = 1.9 GB for the Jacobian alone and twice that with the contraction)."""
    torch.manual_seed(0)
    model = _bench_cnn().cuda().eval()
    x = torch.randn(128, 3, 32, 32, device="cuda")
    empirical_ntk(model, x[:2], implementation=implementation)  # warm-up (cuDNN, cuBLAS)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    k = empirical_ntk(model, x, implementation=implementation)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert k.shape == (128, 128, 10, 10) and torch.isfinite(k).all()
    assert peak <= PEAK_BOUND_BYTES, f"peak {peak / GIB:.2f} GiB above the model's footprint"


# ----------------------------------------------------------------------------- Lightning + AMP
class _Lit(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(6, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)


def _fit(tmp_path: Any, precision: str, monitor: KernelRegimeMonitor | None):
    L.seed_everything(123, workers=True)
    module = _Lit()
    logger = RecordingLogger()
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision=precision,
        max_steps=12,
        deterministic=True,
        logger=logger,
        callbacks=[] if monitor is None else [monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module)
    return module, logger, torch.cuda.get_rng_state(), torch.get_rng_state()


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_cuda_monitor_under_mixed_precision_is_finite_and_leaves_training_bit_identical(
    tmp_path, precision
):
    if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16 support")
    plain, _, cuda_rng_plain, cpu_rng_plain = _fit(tmp_path / "plain", precision, None)
    monitor = KernelRegimeMonitor(probe_size=8, every_n_steps=4, log_spaced_until=2)
    watched, logger, cuda_rng_watched, cpu_rng_watched = _fit(
        tmp_path / "watched", precision, monitor
    )

    # Observer effect: weights, BatchNorm buffers and both RNG streams are bit-identical.
    assert monitor.num_measurements >= 4  # 0, 1, 2, 4, 8, 12 / end
    plain_state, watched_state = plain.state_dict(), watched.state_dict()
    assert plain_state.keys() == watched_state.keys()
    for name, value in plain_state.items():
        assert torch.equal(value, watched_state[name]), name
    assert torch.equal(cuda_rng_plain, cuda_rng_watched)
    assert torch.equal(cpu_rng_plain, cpu_rng_watched)

    # Metrics: every logged value finite, K measured in float32 on the GPU, exact zero at start.
    logged = [m for _, m in logger.calls if "ntk/rel_change" in m]
    assert len(logged) == monitor.num_measurements
    for metrics in logged:
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        assert not bad, bad
        assert metrics["health/nonfinite"] == 0.0
    assert logged[0]["ntk/rel_change"] == 0.0
    assert logged[-1]["ntk/rel_change"] > 0.0
    kernel = monitor.tracker.last_kernel
    assert kernel.device.type == "cuda" and kernel.dtype == torch.float32
    # Evaluated outside autocast: equals the float64 CPU kernel of the final weights to float32
    # accuracy (a half-precision leak would be off by ~1e-3).
    probe = monitor.tracker.probe
    ref = empirical_ntk(copy.deepcopy(watched.net).cpu().double(), probe.cpu().double())
    assert _rel_err(kernel.cpu(), ref) < 1e-5
