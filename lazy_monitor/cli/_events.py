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

Every event file is verified before it is read: TensorBoard's reader silently stops at the first
truncated record or failed checksum (right for a file that is still being written, wrong for a CI
gate, where the lost tail may hold the violation), so each record's framing and both CRC-32C
checksums are checked here and any damage raises :class:`CorruptEventFileError` naming the file,
the byte offset and what is wrong.

Metric names are read as logged or under one logger prefix: the Hugging Face Trainer logs the
monitor's ``ntk/rel_change`` as ``train/ntk/rel_change``, and ``report``/``check`` accept the plain
name there (:meth:`Run.select`) and say which tag they read.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

__all__ = [
    "CorruptEventFileError",
    "Curve",
    "Run",
    "find_runs",
    "load_run",
    "load_runs",
    "suggest",
]

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

    def select(self, metric: str) -> list[str]:
        """The tags ``metric`` (a name or a glob) reads in this run: the tags it matches, else
        the tags that match it under one logger prefix (the Hugging Face Trainer logs
        ``ntk/rel_change`` as ``train/ntk/rel_change``), preferred prefix first
        (:data:`PREFIXES`)."""
        exact = [t for t in self.curves if _matches(t, metric)]
        if exact:
            return exact
        prefixed = [t for t in self.curves if "/" in t and _matches(t.split("/", 1)[1], metric)]
        return sorted(prefixed, key=_prefix_rank)

    def tag(self, metric: str) -> Optional[str]:
        """The one tag a plain metric name reads (:meth:`select`'s first), or None."""
        tags = self.select(metric)
        return tags[0] if tags else None

    def curve(self, metric: str) -> Optional[Curve]:
        """The curve of ``metric`` (exact tag, else under a logger prefix), or None."""
        tag = self.tag(metric)
        return None if tag is None else self.curves[tag]

    def names(self) -> list[str]:
        """Every metric name this run can be asked for: its tags and, for prefixed tags, the
        name without the prefix (for suggestions)."""
        names = set(self.curves)
        names.update(t.split("/", 1)[1] for t in self.curves if t.count("/") >= 2)
        return sorted(names)


#: Logger prefixes tried in this order when a plain metric name matches several prefixed tags
#: (the training curves before evaluation ones); any other prefix after them.
PREFIXES = ("train", "eval")


def _matches(tag: str, metric: str) -> bool:
    return tag == metric or fnmatch.fnmatchcase(tag, metric)


def _prefix_rank(tag: str) -> tuple[int, str]:
    prefix = tag.split("/", 1)[0]
    return (PREFIXES.index(prefix) if prefix in PREFIXES else len(PREFIXES), tag)


def suggest(metric: str, runs: Sequence[Run]) -> Optional[str]:
    """The logged metric name closest to a misspelled ``metric`` (difflib), or None."""
    names = sorted({n for run in runs for n in run.names()})
    close = difflib.get_close_matches(metric, names, n=1, cutoff=0.6)
    return close[0] if close else None


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


class CorruptEventFileError(ValueError):
    """An event file is damaged (truncated, failed checksum, empty) or is not an event file.

    Attributes:
        path: the event file.
        what: what is wrong, e.g. ``"truncated at byte 1234: ..."``.
    """

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        self.path = Path(path)
        self.what = what
        super().__init__(f"event file {str(self.path)!r} is unreadable: {what}")


# TFRecord framing: uint64 length, uint32 masked CRC-32C of the length bytes, payload,
# uint32 masked CRC-32C of the payload (all little-endian).
_HEADER = 12
_FOOTER = 4


def _verify_records(path: Path) -> int:
    """Check the framing and both checksums of every record of ``path``; return the record count.

    Raises:
        CorruptEventFileError: empty file, a record cut off by the end of the file, a failed
            length or payload checksum, or a payload that is not an ``Event`` protobuf.
    """
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    size = path.stat().st_size
    if size == 0:
        raise CorruptEventFileError(path, "it is empty (0 bytes): no event was ever written to it")
    offset = 0
    index = 0
    with open(path, "rb") as fh:
        while offset < size:
            header = fh.read(_HEADER)
            if len(header) < _HEADER:
                raise CorruptEventFileError(
                    path,
                    f"truncated at byte {offset + len(header)}: record {index} starts at byte "
                    f"{offset} but its {_HEADER}-byte header is cut off (every point after it "
                    "is lost)",
                )
            (length,) = struct.unpack("<Q", header[:8])
            (length_crc,) = struct.unpack("<I", header[8:])
            if masked_crc32c(header[:8]) != length_crc:
                if index == 0:
                    raise CorruptEventFileError(
                        path,
                        "not a TensorBoard event file: its first record's length field fails its "
                        "CRC-32C check at byte 0",
                    )
                raise CorruptEventFileError(
                    path,
                    f"CRC mismatch in the length field of record {index} at byte {offset} "
                    "(the file is corrupted there; every point after it is lost)",
                )
            end = offset + _HEADER + length + _FOOTER
            if end > size:
                raise CorruptEventFileError(
                    path,
                    f"truncated at byte {size}: record {index} (from byte {offset}) needs "
                    f"{_HEADER + length + _FOOTER} bytes but only {size - offset} remain "
                    "(every point after it is lost)",
                )
            payload = fh.read(length)
            (payload_crc,) = struct.unpack("<I", fh.read(_FOOTER))
            if masked_crc32c(payload) != payload_crc:
                raise CorruptEventFileError(
                    path,
                    f"CRC mismatch in the data of record {index} (bytes {offset}-{end - 1}; the "
                    "file is corrupted there; every point from it on is lost)",
                )
            try:
                event_pb2.Event.FromString(payload)
            except Exception as exc:  # noqa: BLE001 -- protobuf's DecodeError differs by backend
                raise CorruptEventFileError(
                    path,
                    f"{'not a TensorBoard event file: ' if index == 0 else ''}record {index} "
                    f"(byte {offset}) has valid checksums but is not an Event protobuf ({exc})",
                ) from None
            offset = end
            index += 1
    return index


def _read_file(path: Path) -> tuple[float, dict[str, list[tuple[int, float]]]]:
    """``(time the file was started, {tag: [(step, value), ...]})`` for one event file.

    Raises:
        CorruptEventFileError: if the file is damaged (see :func:`_verify_records`).
    """
    _verify_records(path)
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

    Raises:
        CorruptEventFileError: if any event file of the run is damaged; a run is never read
            partially, since the lost points may be the ones a threshold check is about.
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
    """:func:`load_run` for every run under ``logdir`` (see :func:`find_runs`).

    Raises:
        FileNotFoundError, NotADirectoryError: see :func:`find_runs`.
        CorruptEventFileError: if any event file under ``logdir`` is damaged.
    """
    return [load_run(path, logdir) for path in find_runs(logdir)]
