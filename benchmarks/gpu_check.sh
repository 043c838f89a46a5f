#!/usr/bin/env bash
# One-command GPU check (issue 9, item 4): on a machine with one CUDA GPU, run every CUDA test of
# the suite and time the kernel engine on the GPU, in under 5 minutes, logs into LOGDIR.
#
#   bash benchmarks/gpu_check.sh [LOGDIR]        # default LOGDIR: gpu_check_logs/<UTC time>
#
# Steps (each under its own time limit; the limits add up to 285 s):
#   1. environment   -> LOGDIR/env.txt        (nvidia-smi, torch, device)              15 s
#   2. CUDA tests    -> LOGDIR/cuda_tests.log, cuda_tests.xml                          150 s
#      every test whose id contains "cuda": tests/gpu/test_cuda.py and the CUDA-skipped tests
#      elsewhere in tests/. A CUDA test that is *skipped* here fails the step (on a GPU machine
#      a skip means the check did not happen).
#   3. kernel bench  -> LOGDIR/bench_gpu.md   (empirical_ntk on the GPU: median time and  90 s
#      peak torch.cuda.max_memory_allocated above the model's footprint, for the models of
#      benchmarks/bench_kernels.py). bench_kernels.py itself is run with `--device cuda` only
#      if it has that option (it times CPU subprocesses and measures RSS; without the option
#      it is skipped here, and the step-3 table is the GPU benchmark)                     30 s
# Exit status: 0 all steps passed; 1 a step failed; 3 no CUDA device. LOGDIR/summary.txt lists
# each step's outcome.
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
logdir="${1:-gpu_check_logs/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$logdir"
logdir="$(cd "$logdir" && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# Deterministic cuBLAS for the bit-identical observer-effect tests; must be set before the
# process creates its cuBLAS handles (Lightning's deterministic=True sets it too late).
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
py="${PYTHON:-python}"
summary="$logdir/summary.txt"
: >"$summary"
status=0

step() {  # step NAME RC
    local outcome="PASS"
    [ "$2" -ne 0 ] && outcome="FAIL (exit $2)" && status=1
    [ "$2" -eq 124 ] && outcome="FAIL (timed out)"
    echo "$1: $outcome" | tee -a "$summary"
}

# ---------------------------------------------------------------------------- 1. environment
{
    date -u
    nvidia-smi 2>&1 || echo "nvidia-smi not available"
    timeout 15 "$py" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0), "bf16:", torch.cuda.is_bf16_supported())
EOF
} >"$logdir/env.txt" 2>&1
if ! timeout 15 "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device (torch.cuda.is_available() is False): nothing to check; see $logdir/env.txt" |
        tee -a "$summary" >&2
    exit 3
fi
echo "environment: $(tail -1 "$logdir/env.txt")" | tee -a "$summary"

# ---------------------------------------------------------------------------- 2. CUDA tests
timeout 150 "$py" -m pytest -q -rs -p no:cacheprovider -k cuda tests \
    --junitxml="$logdir/cuda_tests.xml" >"$logdir/cuda_tests.log" 2>&1
rc=$?
# Count from the JUnit file: a skipped CUDA test on a GPU machine is a failed check.
counts="$("$py" - "$logdir/cuda_tests.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as exc:
    print(f"no JUnit report ({exc})")
    sys.exit(1)
suite = root if root.tag == "testsuite" else root.find("testsuite")
n, fail, err, skip = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
print(f"{n} collected, {n - fail - err - skip} passed, {fail} failed, {err} errors, {skip} skipped")
sys.exit(0 if n > 0 and fail == err == skip == 0 else 1)
EOF
)"
count_rc=$?
[ "$rc" -eq 0 ] && rc=$count_rc
step "CUDA tests ($counts; log: cuda_tests.log)" "$rc"

# ---------------------------------------------------------------------------- 3. kernel bench
timeout 90 "$py" - "$repo/benchmarks/bench_kernels.py" >"$logdir/bench_gpu.md" 2>"$logdir/bench_gpu.err" <<'EOF'
import importlib.util
import statistics
import sys
import time

import torch

from lazy_monitor import empirical_ntk

spec = importlib.util.spec_from_file_location("bench_kernels", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)  # the same models as the CPU benchmark

GIB = 2**30
CASES = [("mlp", 32), ("mlp", 128), ("mlp", 512), ("cnn", 32), ("cnn", 128), ("resnet18", 128)]
print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}; full kernel, O = 10, "
      "float32 (TF32 off inside the engine); median of 3 warm calls (1 for resnet18),")
print("# peak = torch.cuda.max_memory_allocated above model + inputs during one call")
print()
print("| case | N | method | median time | peak GPU memory extra |")
print("|---|---|---|---|---|")
for name, n in CASES:
    make, shape = bench.MODELS[name]
    torch.manual_seed(0)
    model = make().cuda().eval()
    x = torch.randn(n, *shape, device="cuda")
    repeats = 1 if name == "resnet18" else 3
    for method in ["auto", "structured"]:
        if name == "resnet18" and method == "structured":
            continue  # same plan as auto (bench_kernels.SKIP)
        try:
            empirical_ntk(model, x[:2], implementation=method)  # warm-up (cuDNN, cuBLAS)
            if repeats > 1:
                empirical_ntk(model, x, implementation=method)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                k = empirical_ntk(model, x, implementation=method)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            peak = (torch.cuda.max_memory_allocated() - base) / GIB
            assert k.shape == (n, n, 10, 10) and bool(torch.isfinite(k).all())
            row = f"{statistics.median(times):.3f} s | {peak:.2f} GiB"
        except Exception as exc:  # noqa: BLE001 -- one failing row must not hide the others
            row = f"failed: {type(exc).__name__}: {str(exc)[:80]} |"
        print(f"| {name} | {n} | {method} | {row} |", flush=True)
    del model, x
    torch.cuda.empty_cache()
EOF
rc=$?
grep -q "failed:" "$logdir/bench_gpu.md" && [ "$rc" -eq 0 ] && rc=1
step "GPU kernel benchmark (table: bench_gpu.md)" "$rc"

if grep -q -- '"--device"' benchmarks/bench_kernels.py; then
    timeout 30 "$py" benchmarks/bench_kernels.py --quick --device cuda --timeout 25 \
        >"$logdir/bench_kernels.md" 2>&1
    step "bench_kernels.py --quick --device cuda (bench_kernels.md)" "$?"
else
    echo "bench_kernels.py: not run (it has no --device option; CPU-only timing and RSS)" |
        tee -a "$summary"
fi

echo "logs: $logdir" | tee -a "$summary"
exit "$status"
