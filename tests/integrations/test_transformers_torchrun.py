"""The Hugging Face callback under ``torchrun --nproc_per_node 2`` (gloo, CPU) with its defaults:
both ranks finish, agree, and log what a single-process run with the same global batch logs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).with_name("_hf_ddp.py")
ROOT = SCRIPT.parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(out: Path, *launcher: str) -> None:
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, *launcher, str(SCRIPT), str(out), "defaults"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]


def _close(a: float, b: float) -> bool:
    return (a != a and b != b) or abs(a - b) <= 1e-5 * max(1.0, abs(a))


def test_torchrun_two_processes_with_defaults_match_one_process(tmp_path: Path) -> None:
    port = f"--master_port={_free_port()}"
    _run(tmp_path / "ddp", "-m", "torch.distributed.run", "--nproc_per_node=2", port)
    _run(tmp_path / "single")
    r0, r1 = (json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1))
    single = json.loads((tmp_path / "single" / "rank0.json").read_text())
    assert r0["world"] == r1["world"] == 2 and single["world"] == 1
    assert abs(r0["checksum"] - single["checksum"]) <= 1e-4  # the same training
    # both ranks measured at the same steps (the budget's decision is rank 0's) and agree
    assert sorted(r0["logged"]) == sorted(r1["logged"]) and {"0", "6"} <= set(r0["logged"])
    for step, values in r0["logged"].items():
        tracked = {k: v for k, v in values.items() if not k.startswith("monitor/")}
        assert tracked == {k: r1["logged"][step][k] for k in tracked}
        if step in single["logged"]:
            other = single["logged"][step]
            bad = [k for k in tracked if not _close(tracked[k], other[k])]
            assert not bad, {k: (tracked[k], other[k]) for k in bad}
    # only process zero writes TensorBoard: one monitor event file next to the Trainer's
    events = list((tmp_path / "ddp" / "runs").rglob("events.out.tfevents.*"))
    assert len(events) == 2
