"""Write TensorBoard event files the way the Lightning callback does (one scalar per tag/step)."""

from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


def write_run(run_dir: Path, curves: dict[str, list[tuple[int, float]]]) -> Path:
    """Write ``{tag: [(step, value), ...]}`` into one new event file in ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(run_dir))
    for tag, points in curves.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()
    return run_dir


def lazy_curves(scale: float = 0.01, steps: int = 5, lazy: bool = True) -> dict:
    """Monotone drift curves ``scale * step`` for the three key metrics plus the verdict."""
    return {
        "ntk/rel_change": [(s, scale * s) for s in range(steps)],
        "params/rel_change": [(s, 0.5 * scale * s) for s in range(steps)],
        "lin/rel_error": [(s, 0.1 * scale * s) for s in range(steps)],
        "regime/lazy": [(s, 1.0 if lazy else 0.0) for s in range(steps)],
        "health/nonfinite": [(s, 0.0) for s in range(steps)],
    }


def write_corrupt_event_file(run_dir: Path) -> Path:
    """An event file whose one record is correctly framed (valid CRCs) but is not an ``Event``.

    TensorBoard silently stops at a truncated record or a bad CRC; a well-framed record with a
    garbage payload is what makes its reader raise (protobuf ``DecodeError``).
    """
    from tensorboard.summary.writer.record_writer import RecordWriter

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "events.out.tfevents.1700000000.host.1.0"
    with open(path, "wb") as fh:
        RecordWriter(fh).write(b"\xff\xff\xff\xff not a protobuf")
    return path
