"""Unexpected failures exit 2 ("could not check") with a one-line error, never 1 ("violated")."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from _cli_events import lazy_curves, write_corrupt_event_file, write_run

import lazy_monitor.cli._events as events
from lazy_monitor.cli.main import main


def test_corrupt_event_file_check_exits_2_not_1(tmp_path, capsys):
    write_run(tmp_path / "good", lazy_curves())
    write_corrupt_event_file(tmp_path / "bad")
    code = main(["check", str(tmp_path), "--max", "ntk/rel_change=0.5"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("lazy-monitor check: error: ")
    assert "Traceback" not in err


def test_corrupt_event_file_report_exits_2(tmp_path, capsys):
    write_corrupt_event_file(tmp_path / "bad")
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("lazy-monitor report: error: ")


def test_permission_error_while_reading_exits_2_and_names_it(tmp_path, capsys, monkeypatch):
    write_run(tmp_path / "r", lazy_curves())

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(events, "_read_file", unreadable)
    code = main(["check", str(tmp_path), "--max", "ntk/rel_change=0.5", "--json"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("lazy-monitor check: error: PermissionError: ")
    assert "Permission denied" in captured.err


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read a mode-000 file"
)
def test_unreadable_event_file_exits_2(tmp_path, capsys):
    run = write_run(tmp_path / "r", lazy_curves())
    for path in run.iterdir():
        path.chmod(0)
    try:
        assert main(["check", str(tmp_path), "--max", "ntk/rel_change=0.5"]) == 2
        assert "lazy-monitor check: error: " in capsys.readouterr().err
    finally:
        for path in run.iterdir():
            path.chmod(0o644)


def test_keyboard_interrupt_is_not_swallowed(tmp_path, monkeypatch):
    write_run(tmp_path / "r", lazy_curves())

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(events, "_read_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["check", str(tmp_path), "--max", "ntk/rel_change=0.5"])


def test_console_entry_point_corrupt_file_exit_2_without_traceback(tmp_path):
    write_corrupt_event_file(tmp_path / "bad")
    proc = subprocess.run(
        [sys.executable, "-m", "lazy_monitor", "check", str(tmp_path), "--max", "a=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "lazy-monitor check: error: " in proc.stderr
    assert "Traceback" not in proc.stderr
