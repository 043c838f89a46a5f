"""The MLP anchor of issue 18 (item 7): ``empirical_ntk`` (``auto``) against neural-tangents'
compiled structured-derivatives path on the same machine, same minutes.

MLP 784-1024-1024-1024-10 (ReLU), N = 32, full kernel ``(N, N, O, O)``, float32. Each round
runs one process per tool (neural-tangents: ``jax.jit(nt.empirical_ntk_fn(...,
implementation=STRUCTURED_DERIVATIVES))`` after 3 compiling/warm-up calls; lazy_monitor:
``empirical_ntk`` after 3 warm-up calls), each timing ``--calls`` calls and reporting the
median; the tools alternate for ``--rounds`` rounds (order reversed every other round), and the
table gives the median of the per-round medians and their ratios. A third process runs the same
kernel written by hand in torch with none of the engine's checks or copies (``torch floor``). ``--threads 1`` pins both to one thread (XLA:
``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``); the default gives both
their default pools on this machine's cores.

neural-tangents 0.6.5 needs an older jax than PyPI's newest; in a separate virtualenv::

    python -m venv /tmp/ntenv
    /tmp/ntenv/bin/pip install "jax==0.4.23" "jaxlib==0.4.23" "numpy<2" "ml_dtypes<0.5" \\
        neural-tangents==0.6.5
    python benchmarks/bench_neural_tangents.py --nt-python /tmp/ntenv/bin/python

(the neural-tangents process skips ``neural_tangents.experimental``, whose TensorFlow import
is not needed for the structured path and breaks with these pins).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

_NT = r"""
import sys, time, statistics, types
sys.modules["neural_tangents.experimental"] = types.ModuleType("neural_tangents.experimental")
import jax, neural_tangents as nt
from neural_tangents import stax
layers = []
for width in (1024, 1024, 1024):
    layers += [stax.Dense(width, parameterization="standard"), stax.Relu()]
init_fn, apply_fn, _ = stax.serial(*layers, stax.Dense(10, parameterization="standard"))
key = jax.random.PRNGKey(0)
_, params = init_fn(key, (-1, 784))
x = jax.random.normal(key, (32, 784))
f = jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes=(), vmap_axes=0,
            implementation=nt.NtkImplementation.STRUCTURED_DERIVATIVES))
for _ in range(3):
    f(x, None, params).block_until_ready()
ts = []
for _ in range(CALLS):
    t = time.perf_counter(); f(x, None, params).block_until_ready()
    ts.append(time.perf_counter() - t)
print(statistics.median(ts))
"""

_OURS = r"""
import sys, time, statistics, torch
from torch import nn
from lazy_monitor import empirical_ntk
if THREADS:
    torch.set_num_threads(THREADS)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                      nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
x = torch.randn(32, 784)
for _ in range(3):
    empirical_ntk(model, x)
ts = []
for _ in range(CALLS):
    t = time.perf_counter(); empirical_ntk(model, x); ts.append(time.perf_counter() - t)
print(statistics.median(ts))
"""


# The same kernel written by hand in torch, without any of the engine's checks or copies: one
# forward keeping the layer inputs, one batched backward of the O one-hot cotangents to the
# layer outputs, ``K = Σ_l (G Gᵀ) ∘ (A Aᵀ + 1)``. The floor of this computation in torch.
_FLOOR = r"""
import sys, time, statistics, torch
import torch.nn.functional as F
from torch import nn
if THREADS:
    torch.set_num_threads(THREADS)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                      nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)).eval()
x = torch.randn(32, 784)
def kernel():
    ins, outs, h = [], [], x
    for layer in model:
        if isinstance(layer, nn.Linear):
            ins.append(h)
            h = F.linear(h, layer.weight.detach(), layer.bias.detach()).requires_grad_()
            outs.append(h)
        else:
            h = layer(h)
    n, o = h.shape
    cot = torch.eye(o).expand(n, o, o).transpose(0, 1)
    gs = torch.autograd.grad([h], outs, [cot], is_grads_batched=True)
    k = torch.zeros(n * o, n * o)
    for a, g in zip(ins, gs):
        g = g.transpose(0, 1).reshape(n * o, -1)
        k += ((g @ g.t()).view(n, o, n, o) * (a @ a.t() + 1)[:, None, :, None]).view(n * o, -1)
    return k.view(n, o, n, o).permute(0, 2, 1, 3)
for _ in range(3):
    kernel()
ts = []
for _ in range(CALLS):
    t = time.perf_counter(); kernel(); ts.append(time.perf_counter() - t)
print(statistics.median(ts))
"""


def _run(python: str, code: str, threads: int, calls: int) -> float:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    if threads:
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        env["OMP_NUM_THREADS"] = str(threads)
    code = code.replace("CALLS", str(calls)).replace("THREADS", str(threads))
    out = subprocess.run(
        [python, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    return float(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nt-python", required=True, help="python of the neural-tangents venv")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calls", type=int, default=31)
    parser.add_argument("--threads", type=int, default=0, help="0: each tool's default pool")
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {"neural-tangents": [], "lazy_monitor": [], "torch floor": []}
    tools = [
        ("neural-tangents", args.nt_python, _NT),
        ("lazy_monitor", sys.executable, _OURS),
        ("torch floor", sys.executable, _FLOOR),
    ]
    loads = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for name, python, code in tools if r % 2 == 0 else tools[::-1]:
            times[name].append(_run(python, code, args.threads, args.calls))
        loads.append(os.getloadavg()[0])
    nt_t, ours = (statistics.median(times[k]) for k in ("neural-tangents", "lazy_monitor"))
    print(
        f"MLP 784-1024x3-10, N = 32, full kernel; threads: {args.threads or 'default'}; "
        f"load average {min(loads):.2f}-{max(loads):.2f}"
    )
    print("| tool | median of round medians (s) | rounds |")
    print("|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.4f} | {', '.join(f'{t:.4f}' for t in ts)} |")
    floor = statistics.median(times["torch floor"])
    print(
        f"lazy_monitor / neural-tangents: {ours / nt_t:.2f}; lazy_monitor / torch floor: "
        f"{ours / floor:.2f}; torch floor / neural-tangents: {floor / nt_t:.2f}"
    )


if __name__ == "__main__":
    main()
