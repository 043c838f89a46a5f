"""`lazy-monitor demo --phase / --catapult` and `report` naming the phase image (tiny settings)."""

from __future__ import annotations

import contextlib
import io

from lazy_monitor.cli.main import main


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_demo_phase_writes_the_grid_csv_to_out(tmp_path):
    argv = ["demo", "--phase", "--out", str(tmp_path), "--phase-widths", "8,16",
            "--phase-alphas", "1,10", "--phase-steps", "5"]  # fmt: skip
    code, out, _ = _run(argv)
    assert code == 0 and (tmp_path / "phase.csv").is_file()
    assert "exponent" in out.lower() or "boundary" in out.lower()


def test_demo_catapult_prints_the_verdicts(tmp_path):
    argv = ["demo", "--catapult", "--catapult-factors", "0.5", "--catapult-width", "8",
            "--catapult-steps", "5"]  # fmt: skip
    code, out, _ = _run(argv)
    assert code == 0 and "lr_crit" in out and "stable" in out


def test_demo_phase_and_catapult_are_exclusive(tmp_path):
    code, _, err = _run(["demo", "--phase", "--catapult", "--out", str(tmp_path)])
    assert code == 2 and "not allowed with" in err


def test_report_names_the_phase_image_of_the_folder(tmp_path):
    (tmp_path / "phase.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # only its presence matters
    code, out, _ = _run(["report", str(tmp_path)])
    assert code == 0
    assert f"phase diagram (lazy-monitor demo --phase): {tmp_path / 'phase.png'}" in out
    code, _, err = _run(["report", str(tmp_path / "missing")])
    assert code == 2
