"""Run metrics, tags and properties: append-only JSON lines written by the script, read by everyone else.

Every process that logs (each rank of a job, or a driver logging to a finished run) appends to its own
files, so no two writers ever share one, on a local disk or over NFS from many hosts::

    metrics/rank-<R>.<pid>.jsonl        {"name": "loss", "value": 0.25, "step": 3, "time": 1795000000.123, "rank": 0}
    metrics/rank-<R>.<pid>.props.jsonl  {"kind": "tag" | "property", "name", "value", "time", "rank"}
    metrics/driver.<pid>.jsonl          (rank null: logged from outside the job, e.g. ``Run(...).log``)
    metrics/.cache-1.marshal            what readers parsed so far (rebuildable; see :func:`load`)

A metric's ``value`` is a number, a string, a boolean or null (``run.log``), a list (``run.log_list``) or
an object (``run.log_row``); NaN and infinities are written as Python's ``json`` writes them (``NaN``,
``Infinity``), and printed as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` in ``--json`` output
(as proto3's JSON mapping does). Each line is one ``write`` on an ``O_APPEND`` descriptor; a line torn by a
crash can only be a file's last and is ignored.

A host that does not see the record (no shared filesystem) writes the same files under its working
directory's ``logs/.tflaunch-metrics/``; they come back with ``./logs`` and are read from there.
"""
from __future__ import annotations

import gc
import json
import logging
import marshal
import os
import threading
import time

from .. import fsio
from ..errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Iterable

__all__ = ["MetricsWriter", "Series", "load", "summary", "latest", "properties_and_tags", "json_safe",
           "metric_dirs", "METRICS_DIR", "FALLBACK_DIR"]

log = logging.getLogger(__name__)

METRICS_DIR = "metrics"
FALLBACK_DIR = os.path.join("logs", ".tflaunch-metrics")
_CACHE = ".cache-1.marshal"
_CACHE_FORMAT = 1


# -- writing (in the script) ------------------------------------------------------------------------------
def _check_name(name: Any, what: str = "metric name") -> str:
    if not isinstance(name, str) or not name or "\x00" in name or len(name) > 1024:
        raise SpecError(f"{what} must be a non-empty string (at most 1024 characters), got {name!r}")
    return name


def _scalar(value: Any, name: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    item = getattr(value, "item", None)  # numpy / TensorFlow scalars (np.float32, a 0-d tensor's numpy())
    if callable(item) and getattr(value, "ndim", 0) == 0:
        try:
            return _scalar(item(), name)
        except (TypeError, ValueError):
            pass
    numpy = getattr(value, "numpy", None)  # an eager tf.Tensor
    if callable(numpy):
        return _scalar(numpy(), name)
    if hasattr(value, "__float__"):
        return float(value)
    raise SpecError(f"metric {name!r}: a value must be a number, a string, a boolean or None, "
                    f"got {type(value).__name__}")


class MetricsWriter:
    """Appends one process's metrics and tags to ``directory`` (created on first use); thread-safe."""

    def __init__(self, directory: str, rank: int | None) -> None:
        self.directory = directory
        self.rank = rank
        self._stem = f"rank-{rank}" if rank is not None else "driver"
        self._fds: dict[str, int] = {}
        self._steps: dict[str, int] = {}
        self._lock = threading.Lock()
        self._pid = -1

    def _fd(self, kind: str) -> int:
        """The descriptor of this process's ``.jsonl`` or ``.props.jsonl`` (a forked child, such as a data
        loader worker, gets files of its own: a file never has two writers)."""
        if self._pid != os.getpid():
            self._fds = {}  # the parent's descriptors stay the parent's
            self._pid = os.getpid()
        fd = self._fds.get(kind)
        if fd is None:
            os.makedirs(self.directory, exist_ok=True)
            path = os.path.join(self.directory, f"{self._stem}.{self._pid}{kind}")
            fd = self._fds[kind] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        return fd

    def _write(self, kind: str, line: bytes) -> None:
        with self._lock:
            fd = self._fd(kind)
            written = os.write(fd, line)
            if written != len(line):  # a full disk: never leave a torn line for the next write to follow
                os.ftruncate(fd, os.fstat(fd).st_size - written)
                raise OSError(28, "No space left on device", self.directory)

    def log(self, name: str, value: Any, step: int | None = None) -> None:
        """Append one point; ``step`` defaults to one more than this process's last step of ``name``."""
        _check_name(name)
        if isinstance(value, (list, tuple)):
            value = [_scalar(v, name) for v in value]
        elif isinstance(value, dict):
            value = {str(_check_name(k, "column name")): _scalar(v, name) for k, v in value.items()}
        else:
            value = _scalar(value, name)
        if step is None:
            step = self._steps.get(name, 0)
        elif not isinstance(step, int) or isinstance(step, bool):
            try:
                step = int(_scalar(step, name))
            except (TypeError, ValueError):
                raise SpecError(f"metric {name!r}: step must be an integer, got {step!r}") from None
        self._steps[name] = step + 1
        line = json.dumps({"name": name, "value": value, "step": step, "time": round(time.time(), 3),
                           "rank": self.rank}, separators=(",", ":"), allow_nan=True)
        self._write(".jsonl", (line + "\n").encode("ascii"))

    def prop(self, kind: str, name: str, value: Any) -> None:
        """Append a tag or property."""
        line = json.dumps({"kind": kind, "name": _check_name(name, f"{kind} name"), "value": value,
                           "time": round(time.time(), 3), "rank": self.rank}, separators=(",", ":"))
        self._write(".props.jsonl", (line + "\n").encode("ascii"))

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                for fd in self._fds.values():
                    os.close(fd)
            self._fds = {}


# -- reading ----------------------------------------------------------------------------------------------
class Series:
    """One metric's points in columns (same length): ``value``, ``step``, ``time``, ``rank``, in the order
    of the writers' ranks, then as each wrote them."""

    __slots__ = ("name", "value", "step", "time", "rank", "ends")

    def __init__(self, name: str, value: list | None = None, step: list | None = None, time: list | None = None,
                 rank: list | None = None) -> None:
        self.name = name
        self.value = value if value is not None else []
        self.step = step if step is not None else []
        self.time = time if time is not None else []
        self.rank = rank if rank is not None else []
        self.ends = [len(self.value)] if self.value else []  # where each writer's points end (in time order)

    def __len__(self) -> int:
        return len(self.value)

    def __repr__(self) -> str:
        return f"Series({self.name!r}, {len(self)} points)"


def metric_dirs(run_dir: str) -> list[str]:
    return [os.path.join(run_dir, METRICS_DIR), os.path.join(run_dir, FALLBACK_DIR)]


def _sources(run_dir: str, suffix: str) -> list[tuple[str, os.stat_result]]:
    """(relative path, stat) of the writers' files, lowest rank first, the driver last."""
    found = []
    for directory in metric_dirs(run_dir):
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            name = entry.name
            if name.startswith(".") or not name.endswith(suffix):
                continue
            if suffix == ".jsonl" and name.endswith(".props.jsonl"):
                continue
            stem = name.split(".", 1)[0]
            rank = int(stem[5:]) if stem.startswith("rank-") and stem[5:].isdigit() else 1 << 40
            try:
                st = entry.stat()
            except OSError:
                continue
            found.append(((rank, name), os.path.relpath(entry.path, run_dir), st))
    found.sort(key=lambda item: item[0])
    return [(rel, st) for _, rel, st in found]


def _parse(data: bytes) -> list[dict]:
    """The records of complete lines (a torn or corrupt line is skipped)."""
    if not data:
        return []
    enabled = gc.isenabled()
    gc.disable()  # a million small dicts: the cyclic GC would otherwise walk them again and again
    try:
        try:  # one parse of the whole chunk as an array: ~2x faster than a loads() per line
            records = json.loads(b"[" + data.rstrip(b"\n").replace(b"\n", b",") + b"]")
            if all(type(r) is dict for r in records):
                return records
        except ValueError:
            pass
        records = []
        for line in data.split(b"\n"):
            try:
                record = json.loads(line)
            except ValueError:
                if line.strip():
                    log.warning("skipping a metrics line that does not parse: %.80r", line)
                continue
            if type(record) is dict:
                records.append(record)
        return records
    finally:
        if enabled:
            gc.enable()


def _group(records: Iterable[dict], into: dict[str, list[list]]) -> None:
    """Append records to per-name columns ``[value, step, time, rank]``."""
    for r in records:
        name = r.get("name")
        if not isinstance(name, str):
            continue
        cols = into.get(name)
        if cols is None:
            cols = into[name] = [[], [], [], []]
        cols[0].append(r.get("value"))
        cols[1].append(r.get("step"))
        cols[2].append(r.get("time"))
        cols[3].append(r.get("rank"))


def _read_new(path: str, offset: int, size: int) -> tuple[bytes, int]:
    """Complete lines of ``path`` between ``offset`` and ``size``, and the offset after them."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(max(0, size - offset))
    end = data.rfind(b"\n") + 1  # a torn (or still being written) last line waits for its newline
    return data[:end], offset + end


def load(run_dir: str, *, cache: bool = True) -> dict[str, Series]:
    """All metrics of the run in ``run_dir``, by name (sorted).

    What was parsed is kept in ``metrics/.cache-1.marshal`` (per source file: the offset read up to and its
    columns), so a second read parses only lines appended since; the files are append-only, so a file that
    shrank or was replaced is read again from the start. Readers that cannot write the cache just parse.
    """
    sources = _sources(run_dir, ".jsonl")
    cache_path = os.path.join(run_dir, METRICS_DIR, _CACHE)
    old: dict[str, Any] = {}
    if cache and sources:
        try:
            with open(cache_path, "rb") as fh:
                loaded = marshal.loads(fh.read())
            if isinstance(loaded, dict) and loaded.get("format") == _CACHE_FORMAT:
                old = loaded["sources"]
        except (OSError, ValueError, EOFError, TypeError, KeyError):
            old = {}
    new: dict[str, Any] = {}
    changed = False
    for rel, st in sources:
        entry = old.get(rel)
        if entry is None or entry["ino"] != st.st_ino or entry["offset"] > st.st_size:
            entry = {"ino": st.st_ino, "offset": 0, "columns": {}}
        if entry["offset"] < st.st_size:
            try:
                data, offset = _read_new(os.path.join(run_dir, rel), entry["offset"], st.st_size)
            except OSError as exc:
                log.warning("cannot read %s: %s", rel, exc)
                continue
            if offset != entry["offset"]:
                _group(_parse(data), entry["columns"])
                entry["offset"] = offset
                changed = True
        new[rel] = entry
    if cache and (changed or len(new) != len(old)):
        try:
            fsio.atomic_write_bytes(cache_path, marshal.dumps({"format": _CACHE_FORMAT, "sources": new}), fsync=False)
        except (OSError, ValueError) as exc:  # a read-only reader, or a value marshal cannot hold
            log.debug("could not write the metrics cache of %s: %s", run_dir, exc)
    merged: dict[str, Series] = {}
    for entry in new.values():
        for name, cols in entry["columns"].items():
            series = merged.get(name)
            if series is None:
                merged[name] = Series(name, list(cols[0]), list(cols[1]), list(cols[2]), list(cols[3]))
            else:
                series.value += cols[0]
                series.step += cols[1]
                series.time += cols[2]
                series.rank += cols[3]
                series.ends.append(len(series.value))
    return {name: merged[name] for name in sorted(merged)}


def _finite(v: Any) -> bool:
    return (type(v) is float and v - v == 0.0) or (type(v) is int)


def kind_of(series: Series) -> str:
    """``scalar``, ``list`` (``log_list``) or ``row`` (``log_row``), from the last point."""
    last = series.value[-1] if series.value else None
    return "list" if isinstance(last, list) else "row" if isinstance(last, dict) else "scalar"


def summary(series: Series) -> dict[str, Any]:
    """count, last value (the latest by time), its step/time/rank, min and max of the finite numbers,
    how many values are not finite, which ranks logged it and its kind."""
    values, times = series.value, series.time
    ends = series.ends or ([len(values)] if values else [])
    # each writer appends in time order: the latest point is the latest of the writers' last points
    last_i = max((end - 1 for end in ends), key=lambda i: (times[i] if isinstance(times[i], (int, float)) else 0.0, i),
                 default=-1)
    try:  # the common case, all finite numbers, at C speed: their sum is finite
        total = sum(values)
        fast = total - total == 0.0
    except TypeError:  # strings, None, lists: not all numbers
        fast = False
    if fast:
        numbers, nonfinite = values, 0
    else:
        numbers = [v for v in values if _finite(v)]
        nonfinite = sum(1 for v in values if type(v) is float and not v - v == 0.0)
    ranks = sorted(r for r in set(series.rank) if r is not None)
    return {
        "name": series.name, "kind": kind_of(series), "count": len(values),
        "last": values[last_i] if values else None, "step": series.step[last_i] if values else None,
        "time": series.time[last_i] if values else None, "rank": series.rank[last_i] if values else None,
        "min": min(numbers) if numbers else None, "max": max(numbers) if numbers else None,
        "nonfinite": nonfinite, "ranks": ranks,
    }


def latest(run_dir: str) -> dict[str, Any]:
    """``{name: latest value}`` of the run's scalar metrics (what ``runs list`` shows; JSON-safe)."""
    out = {}
    for name, series in load(run_dir).items():
        s = summary(series)
        if s["kind"] == "scalar":
            out[name] = json_safe(s["last"])
    return out


def properties_and_tags(run_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tags, properties) the script set: for tags the latest write wins, for properties the first."""
    tags: dict[str, Any] = {}
    props: dict[str, Any] = {}
    records = []
    for rel, _ in _sources(run_dir, ".props.jsonl"):
        records.extend(r for r in fsio.iter_jsonl(os.path.join(run_dir, rel)) if isinstance(r, dict))
    records.sort(key=lambda r: r.get("time") or 0.0)
    for r in records:
        name = r.get("name")
        if not isinstance(name, str):
            continue
        if r.get("kind") == "tag":
            tags[name] = r.get("value")
        elif r.get("kind") == "property":
            props.setdefault(name, r.get("value"))
    return tags, props


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``."""
    if type(value) is float and not value - value == 0.0:
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value


def json_safe_column(values: list) -> list:
    """A column made JSON-safe; the common all-finite case is returned as it is, without copying."""
    if all(_finite(v) for v in values):
        return values
    return [json_safe(v) for v in values]
