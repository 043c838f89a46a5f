"""Read scalar curves back from TensorBoard event files.

A *run* is a directory that directly contains at least one ``*tfevents*`` file (TensorBoard's own
definition); runs are found recursively under a log directory and named by their path relative to
it. Event files are read with TensorBoard's :class:`EventAccumulator` with a size guidance of 0
for scalars and tensors, i.e. **every** logged point is kept (the default keeps a 10 000-point
reservoir sample per tag, which would make ``max`` and ``worst step`` approximate).

A run directory may hold several event files, e.g. after a resume from a checkpoint. They are
merged in the order they were started (wall time of each file's first event), and a later file
that starts a tag at step ``s`` supersedes the earlier file's points of that tag at steps ``>= s``
-- the same "orphaned data" rule TensorBoard applies to restarted runs. Within one file a step
logged twice keeps its last value.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

__all__ = ["Curve", "Run", "find_runs", "load_run", "load_runs"]

# events.out.tfevents.<unix time>.<host>.<pid>.<counter>[.suffix]
_EVENT_TIME = re.compile(r"tfevents\.(\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class Curve:
    """One scalar tag of one run: ``steps`` ascending, ``values`` as logged (float32 -> float)."""

    steps: tuple[int, ...]
    values: tuple[float, ...]

    @property
    def final(self) -> float:
        """Value at the last logged step."""
        return self.values[-1]

    @property
    def final_step(self) -> int:
        return self.steps[-1]

    def extreme(self, largest: bool) -> tuple[float, int]:
        """``(value, step)`` of the largest (or smallest) value; NaN counts as the extreme.

        A NaN is never "within" a threshold, so it is reported as the worst value wherever it
        occurs (first occurrence).
        """
        for value, step in zip(self.values, self.steps):
            if math.isnan(value):
                return value, step
        pick = max if largest else min
        index = pick(range(len(self.values)), key=lambda i: self.values[i])
        return self.values[index], self.steps[index]


@dataclass
class Run:
    """Scalar curves of one run directory."""

    name: str
    path: Path
    curves: dict[str, Curve] = field(default_factory=dict)

    @property
    def last_step(self) -> Optional[int]:
        if not self.curves:
            return None
        return max(curve.final_step for curve in self.curves.values())


def _is_event_file(path: Path) -> bool:
    # Same test as tensorboard.backend.event_processing.io_wrapper.IsSummaryEventsFile.
    return "tfevents" in path.name and not path.name.endswith(".profile-empty") and path.is_file()


def _name_time(path: Path) -> float:
    match = _EVENT_TIME.search(path.name)
    return float(match.group(1)) if match else path.stat().st_mtime


def find_runs(logdir: str | os.PathLike) -> list[Path]:
    """Directories under ``logdir`` (itself included) that directly hold event files, sorted.

    Raises:
        FileNotFoundError: if ``logdir`` does not exist.
        NotADirectoryError: if ``logdir`` is not a directory.
    """
    root = Path(logdir)
    if not root.exists():
        raise FileNotFoundError(f"log directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{str(root)!r} is not a directory")
    runs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if any(_is_event_file(Path(dirpath) / name) for name in filenames):
            runs.append(Path(dirpath))
    return sorted(runs)


def _read_file(path: Path) -> tuple[float, dict[str, list[tuple[int, float]]]]:
    """``(time the file was started, {tag: [(step, value), ...]})`` for one event file."""
    # Imported here so that `lazy-monitor --help` stays fast.
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    acc = ea.EventAccumulator(
        str(path),
        size_guidance={ea.SCALARS: 0, ea.TENSORS: 0},
        # Restarts are resolved across files in `load_run`; inside one file keep every point.
        purge_orphaned_data=False,
    )
    acc.Reload()
    try:
        # Sub-second wall time of the file's first event: orders two files started in the same
        # second (the name only holds whole seconds).
        started = float(acc.FirstEventTimestamp())
    except ValueError:  # no event at all
        started = _name_time(path)
    tags = acc.Tags()
    points: dict[str, list[tuple[int, float]]] = {}
    for tag in tags.get(ea.SCALARS, []):
        points[tag] = [(int(e.step), float(e.value)) for e in acc.Scalars(tag)]
    # New-style scalar summaries (SummaryWriter.add_scalar(..., new_style=True)) are tensors
    # owned by the scalars plugin.
    for tag in tags.get(ea.TENSORS, []):
        if acc.SummaryMetadata(tag).plugin_data.plugin_name != "scalars" or tag in points:
            continue
        points[tag] = [
            (int(e.step), float(tensor_util.make_ndarray(e.tensor_proto).reshape(-1)[0]))
            for e in acc.Tensors(tag)
        ]
    return started, points


def load_run(path: str | os.PathLike, logdir: str | os.PathLike | None = None) -> Run:
    """Read every scalar of the run directory ``path``, merging its event files by step.

    Args:
        path: a run directory (holds ``*tfevents*`` files directly).
        logdir: the log directory the run was found under; the run is named by its relative path
            (``"."`` for ``logdir`` itself). Defaults to the directory's own name.

    Returns:
        A :class:`Run` whose curves have strictly increasing steps.
    """
    path = Path(path)
    if logdir is None:
        name = path.name
    else:
        name = Path(os.path.relpath(path, logdir)).as_posix()
    files = [(*_read_file(p), p.name) for p in path.iterdir() if _is_event_file(p)]
    files.sort(key=lambda item: (item[0], item[2]))
    merged: dict[str, dict[int, float]] = {}
    for _, points, _ in files:
        for tag, pts in points.items():
            if not pts:
                continue
            first = min(step for step, _ in pts)
            kept = {s: v for s, v in merged.get(tag, {}).items() if s < first}
            for step, value in pts:
                kept[step] = value
            merged[tag] = kept
    curves = {}
    for tag in sorted(merged):
        steps = sorted(merged[tag])
        curves[tag] = Curve(tuple(steps), tuple(merged[tag][s] for s in steps))
    return Run(name=name, path=path, curves=curves)


def load_runs(logdir: str | os.PathLike) -> list[Run]:
    """:func:`load_run` for every run under ``logdir`` (see :func:`find_runs`)."""
    return [load_run(path, logdir) for path in find_runs(logdir)]
