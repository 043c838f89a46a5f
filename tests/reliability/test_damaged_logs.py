"""Damaged event files make ``lazy-monitor check`` exit 2 naming the file and the damage.

TensorBoard's reader stops silently at the first truncated record or failed checksum, so a log
whose tail was lost (disk full, killed copy, bit rot) used to *pass* a threshold that the intact
run fails: the violation was in the lost tail. Every case here drives the real CLI.
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from lazy_monitor.cli.main import main

METRIC = "ntk/rel_change"
STEPS = 200
# The drift stays at 0.1 and jumps to 2.0 only in the last 10 % of the steps: a threshold of 1.0
# passes on any prefix of the log and fails on the whole of it.
LATE_JUMP = 180
CHECK = ["--max", f"{METRIC}=1.0"]


def _write_late_violation_run(run_dir: Path) -> Path:
    """One event file with a drift curve that violates ``CHECK`` only near its end."""
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(run_dir))
    for step in range(STEPS):
        writer.add_scalar(METRIC, 0.1 if step < LATE_JUMP else 2.0, step)
    writer.close()
    (path,) = [p for p in run_dir.iterdir() if "tfevents" in p.name]
    return path


def _record_starts(data: bytes) -> list[int]:
    """Byte offsets where the records of an intact event file start."""
    starts, offset = [], 0
    while offset < len(data):
        starts.append(offset)
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        offset += 12 + length + 4
    return starts


def _check(logdir: Path, capsys) -> tuple[int, str, str]:
    code = main(["check", str(logdir), *CHECK])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def event_file(tmp_path) -> Path:
    return _write_late_violation_run(tmp_path / "logs" / "run")


def test_intact_run_fails_the_threshold(event_file, capsys):
    # The reference for every damaged case below: the whole log violates the threshold.
    code, out, err = _check(event_file.parent.parent, capsys)
    assert code == 1, (out, err)
    assert "FAIL  run" in out
    assert f"2 at step {LATE_JUMP}" in out


def test_truncated_to_60_percent_exits_2_naming_file_and_byte(event_file, capsys):
    data = event_file.read_bytes()
    cut = int(0.6 * len(data))
    assert cut not in _record_starts(data), "the cut must fall inside a record"
    event_file.write_bytes(data[:cut])

    code, out, err = _check(event_file.parent.parent, capsys)
    assert code == 2, (out, err)
    assert "PASS" not in out
    assert str(event_file) in err
    assert f"truncated at byte {cut}" in err
    assert "metric not found" not in err


def test_64_random_bytes_in_the_middle_exit_2_with_crc_mismatch(event_file, capsys):
    data = bytearray(event_file.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = random.Random(0).randbytes(64)
    event_file.write_bytes(bytes(data))
    starts = _record_starts(event_file.read_bytes()[:middle])
    damaged_record = len(starts) - 1  # the record that holds byte `middle`

    code, out, err = _check(event_file.parent.parent, capsys)
    assert code == 2, (out, err)
    assert "PASS" not in out
    assert str(event_file) in err
    assert f"CRC mismatch in the data of record {damaged_record} " in err


def test_zero_byte_file_exits_2_saying_empty_not_metric_not_found(tmp_path, capsys):
    path = tmp_path / "run" / "events.out.tfevents.1700000000.host.1.0"
    path.parent.mkdir()
    path.write_bytes(b"")

    code, out, err = _check(tmp_path, capsys)
    assert code == 2, (out, err)
    assert str(path) in err
    assert "empty (0 bytes)" in err
    assert "metric not found" not in err


def test_garbage_file_exits_2_saying_not_an_event_file(tmp_path, capsys):
    path = tmp_path / "run" / "events.out.tfevents.1700000000.host.1.0"
    path.parent.mkdir()
    path.write_bytes(random.Random(1).randbytes(4096))

    code, out, err = _check(tmp_path, capsys)
    assert code == 2, (out, err)
    assert str(path) in err
    assert "not a TensorBoard event file" in err
    assert "metric not found" not in err


def test_one_damaged_run_among_intact_ones_fails_the_whole_check(tmp_path, capsys):
    # A gate must not pass on the runs it could read while ignoring one it could not.
    good = tmp_path / "good"
    good.mkdir()
    writer = SummaryWriter(log_dir=str(good))
    writer.add_scalar(METRIC, 0.1, 0)
    writer.close()
    bad = _write_late_violation_run(tmp_path / "bad")
    bad.write_bytes(bad.read_bytes()[:-3])

    code, out, err = _check(tmp_path, capsys)
    assert code == 2, (out, err)
    assert str(bad) in err
    assert "truncated at byte" in err


def test_check_json_reports_a_damaged_file_as_an_error(event_file, capsys):
    # A CI gate reading --json must see "error", not an empty stdout.
    event_file.write_bytes(event_file.read_bytes()[:-3])
    code = main(["check", str(event_file.parent.parent), *CHECK, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 2
    assert report["status"] == "error"
    assert str(event_file) in report["error"] and "truncated at byte" in report["error"]


def test_report_also_refuses_a_truncated_file(event_file, capsys):
    event_file.write_bytes(event_file.read_bytes()[:-3])
    assert main(["report", str(event_file.parent.parent)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lazy-monitor report: error: ")
    assert str(event_file) in err


def test_console_entry_point_truncated_file_exit_2_without_traceback(event_file):
    data = event_file.read_bytes()
    event_file.write_bytes(data[: int(0.6 * len(data))])
    proc = subprocess.run(
        [sys.executable, "-m", "lazy_monitor", "check", str(event_file.parent.parent), *CHECK],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "lazy-monitor check: error: " in proc.stderr
    assert "truncated at byte" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- the verifier itself: every kind of damage it names ---------------------------------------
# (imported per test so that the CLI tests above also run, and fail for the right reason, on a
# version of the package without the verifier)


def test_verify_counts_every_record_of_an_intact_file(event_file):
    from lazy_monitor.cli._events import _verify_records, load_runs

    # One file_version event, then one event per logged point.
    assert _verify_records(event_file) == 1 + STEPS
    (run,) = load_runs(event_file.parent)
    assert run.curves[METRIC].steps == tuple(range(STEPS))


def test_verify_names_a_header_cut_off(event_file):
    from lazy_monitor.cli._events import CorruptEventFileError, _verify_records

    data = event_file.read_bytes()
    start = _record_starts(data)[5]
    event_file.write_bytes(data[: start + 7])  # 7 of the record's 12 header bytes
    with pytest.raises(CorruptEventFileError) as info:
        _verify_records(event_file)
    assert info.value.path == event_file
    assert f"truncated at byte {start + 7}: record 5 starts at byte {start}" in info.value.what


def test_verify_names_a_length_field_crc_mismatch(event_file):
    from lazy_monitor.cli._events import CorruptEventFileError, _verify_records

    data = bytearray(event_file.read_bytes())
    start = _record_starts(bytes(data))[3]
    data[start] ^= 0x01  # flip one bit of record 3's length
    event_file.write_bytes(bytes(data))
    with pytest.raises(CorruptEventFileError, match=f"length field of record 3 at byte {start}"):
        _verify_records(event_file)


def test_verify_names_a_well_framed_record_that_is_not_an_event(tmp_path):
    from tensorboard.summary.writer.record_writer import RecordWriter

    from lazy_monitor.cli._events import CorruptEventFileError, _verify_records

    path = tmp_path / "events.out.tfevents.1700000000.host.1.0"
    with open(path, "wb") as fh:
        RecordWriter(fh).write(b"\xff\xff\xff\xff not a protobuf")
    with pytest.raises(CorruptEventFileError, match="not a TensorBoard event file: record 0"):
        _verify_records(path)
