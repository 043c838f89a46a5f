"""Smoke-run every script in examples/ through its ``main`` with tiny settings.

Every ``examples/*.py`` must have an entry in ``CASES``: a new example without one fails
``test_every_example_has_a_smoke_case`` instead of being skipped silently.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str) -> Any:
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses / pickling need the module registered
    spec.loader.exec_module(module)
    return module


def _events(root: Path) -> list[Path]:
    return list(root.rglob("events.out.tfevents.*"))


def _quickstart(tmp: Path, capsys) -> None:
    final = _load("lightning_quickstart").main(
        [
            "--width",
            "32",
            "--steps",
            "12",
            "--n-train",
            "128",
            "--probe-size",
            "8",
            "--every-n-steps",
            "4",
            "--log-dir",
            str(tmp),
        ]
    )
    assert final["ntk/rel_change"] > 0 and final["regime/lazy"] in (0.0, 1.0)
    assert _events(tmp)
    assert "tensorboard --logdir" in capsys.readouterr().out


def _lightning_cli(namespace: str, config: str) -> Callable[[Path, Any], None]:
    def case(tmp: Path, capsys) -> None:
        cli = _load("lightning_cli").main(
            [
                "fit",
                "--config",
                str(EXAMPLES / config),
                "--trainer.max_steps=6",
                f"--trainer.logger.init_args.save_dir={tmp}",
                "--model.width=16",
                "--model.n_train=128",
                "--trainer.enable_progress_bar=false",
            ],
            namespace=namespace,
        )
        assert cli.trainer.global_step == 6
        assert "ntk/rel_change" in cli.trainer.callback_metrics
        assert _events(tmp)
        assert re.search(r"ntk/rel_change \S+ .*-> (lazy|NOT lazy)", capsys.readouterr().out)

    return case


def _linearized_vs_real(tmp: Path, capsys) -> None:
    code = _load("linearized_vs_real").main(
        [
            "--width",
            "16",
            "128",
            "--steps",
            "10",
            "--n-train",
            "16",
            "--n-test",
            "16",
            "--log-every",
            "5",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "width 16" in out and "width 128" in out
    assert len(re.findall(r"-> (lazy|NOT lazy): relative gap", out)) == 2


def _plain_loop(tmp: Path, capsys) -> None:
    metrics = _load("plain_pytorch_loop").main(
        [
            "--width",
            "32",
            "--steps",
            "10",
            "--measure-every",
            "5",
            "--n-train",
            "64",
            "--n-probe",
            "8",
            "--quiet",
        ]
    )
    assert metrics["ntk/rel_change"] > 0


def _gated_sweep(tmp: Path, capsys) -> None:
    results = _load("gated_sweep").main(
        [
            "--widths",
            "16",
            "512",
            "--lrs",
            "0.1",
            "5",
            "--steps",
            "20",
            "--every-n-steps",
            "5",
            "--out",
            str(tmp),
        ]
    )
    by_run = {r["run"]: r for r in results}
    assert len(results) == 4
    narrow_fast = by_run["w00016_lr5"]
    assert narrow_fast["stopped"] and narrow_fast["steps"] < 20
    assert "ntk/rel_change" in narrow_fast["reason"] or "lin/rel_error" in narrow_fast["reason"]
    wide_slow = by_run["w00512_lr0.1"]
    assert not wide_slow["stopped"] and wide_slow["steps"] == 20
    assert len([p for p in tmp.iterdir() if p.is_dir()]) == 4
    assert "configurations that stayed lazy:" in capsys.readouterr().out


def _hf_trainer(tmp: Path, capsys) -> None:
    pytest.importorskip("transformers")
    out = _load("hf_trainer").main(
        ["--steps", "6", "--every-n-steps", "3", "--max-drift", "1e-9", "--output-dir", str(tmp)]
    )
    assert out["stopped"] and out["steps"] == 3  # the gate stops at the first measurement
    assert [e["step"] for e in out["history"]] == [0, 3]
    assert _events(tmp / "runs")
    assert "tensorboard --logdir" in capsys.readouterr().out


CASES: dict[str, Callable[[Path, Any], None]] = {
    "lightning_quickstart": _quickstart,
    "lightning_cli[lightning]": _lightning_cli("lightning", "lightning_cli.yaml"),
    "lightning_cli[pytorch_lightning]": _lightning_cli(
        "pytorch_lightning", "lightning_cli_pytorch_lightning.yaml"
    ),
    "linearized_vs_real": _linearized_vs_real,
    "plain_pytorch_loop": _plain_loop,
    "gated_sweep": _gated_sweep,
    "hf_trainer": _hf_trainer,
}


@pytest.fixture
def one_thread():
    # Tiny models: several intra-op threads only spin-wait on a shared CPU (10x+ slower here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_example_has_a_smoke_case():
    scripts = {p.stem for p in EXAMPLES.glob("*.py")}
    covered = {name.split("[")[0] for name in CASES}
    assert scripts == covered, f"examples without a smoke case: {sorted(scripts - covered)}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs(name, tmp_path, capsys, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)  # anything an example writes by default stays in tmp
    monkeypatch.setattr(sys, "argv", [f"{name}.py"])  # not pytest's own arguments
    CASES[name](tmp_path / "logs", capsys)
