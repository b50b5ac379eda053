"""What the portal shows, as plain data (the JSON endpoints return it as it is; the pages render it).

Nothing here writes to the home except what every reader of a store may write (the runs index and the
metrics cache, both rebuildable; a run whose launcher is gone being recorded Failed, as ``runs list`` does).
Files are served only from inside the home: :func:`open_run_file`.
"""
from __future__ import annotations

import os
import stat

from ..errors import PathSafetyError, SpecError, StoreError
from ..history.layout import TERMINAL, USER_FILE_DIRS

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, BinaryIO

    from ..history.record import RunRecord
    from ..history.store import Store

__all__ = ["list_runs", "metric_columns", "run_state", "log_chunk", "open_run_file", "run_files", "compare",
           "models", "SERVED_DIRS", "MAX_LOG_CHUNK"]

SERVED_DIRS = (*USER_FILE_DIRS, "snapshot")  # the top-level names of a run that can be downloaded
MAX_LOG_CHUNK = 256 * 1024  # bytes of log per request
MAX_SNAPSHOT_FILES = 2000
_STATE_FIELDS = ("id", "experiment", "status", "created", "started", "ended", "exit_code", "signal", "error",
                 "duration_seconds", "host", "user", "entry_script", "tags", "metrics", "kind", "parent", "trial",
                 "cancel_reason", "attempt", "warnings")


# -- runs --------------------------------------------------------------------------------------------------
def _tag_matches(tags: dict[str, Any], wanted: str) -> bool:
    """``key`` (present) or ``key=value`` (equal, as text)."""
    key, sep, value = wanted.partition("=")
    if key not in tags:
        return False
    return not sep or str(tags[key]) == value


def list_runs(store: Store, *, experiment: str | None = None, statuses: list[str] | None = None,
              tags: list[str] | None = None, limit: int = 500) -> list[dict[str, Any]]:
    """Run objects (newest first, metrics included) of ``experiment``, in one of ``statuses``, carrying
    every tag of ``tags`` (``key`` or ``key=value``); at most ``limit``."""
    from ..history.metrics import json_safe

    runs = store.list_runs(experiment or None, [s for s in statuses or () if s] or None, None)
    for wanted in tags or ():
        if wanted:
            runs = [r for r in runs if _tag_matches(r.get("tags") or {}, wanted)]
    return [json_safe(r) for r in runs[:limit]]


def metric_columns(runs: list[dict[str, Any]], wanted: list[str] | None = None, most: int = 6) -> list[str]:
    """The metric columns of the runs list: ``wanted`` when given, else the metrics most runs logged."""
    if wanted:
        return [m for m in dict.fromkeys(wanted) if m]
    counts: dict[str, int] = {}
    for run in runs:
        for name in run.get("metrics") or {}:
            counts[name] = counts.get(name, 0) + 1
    return sorted(counts, key=lambda n: (-counts[n], n.lower(), n))[:most]


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, 0


def state_version(record: RunRecord) -> str:
    """A token that changes whenever the run's status, events, output or metrics change (stats only)."""
    from ..history.metrics import metric_dirs

    parts = [_stat(record.path("status.json")), _stat(record.path("events.jsonl"))]
    for path, _, _ in record.process_log_streams():
        parts.append(_stat(path))
    for directory in metric_dirs(record.dir):
        try:
            names = sorted(n for n in os.listdir(directory) if not n.startswith("."))
        except OSError:
            continue
        parts += [_stat(os.path.join(directory, n)) for n in names]
    return "-".join(f"{size:x}.{mtime:x}" for size, mtime in parts)


def run_state(record: RunRecord, events_from: int = 0) -> dict[str, Any]:
    """One run's live state: the run object's main fields, its events from index ``events_from`` on, its
    output files (name, size, line prefix) and ``version`` (:func:`state_version`)."""
    from ..history.metrics import json_safe
    from ..history.runviews import with_duration, with_tracking

    version = state_version(record)  # first: a change after it shows in the next poll
    status = record.read_status()
    if status is None:
        raise StoreError(f"run {record.id} is damaged: {record.status_damage() or 'no status.json'}")
    run = with_duration(with_tracking(record, status))
    events = record.events()
    logs = []
    for path, kind, prefix in record.process_log_streams():
        logs.append({"file": os.path.relpath(path, record.dir).replace(os.sep, "/"), "kind": kind,
                     "prefix": prefix, "size": _stat(path)[0]})
    return json_safe({
        "run": {k: run.get(k) for k in _STATE_FIELDS if k in run}, "terminal": run.get("status") in TERMINAL,
        "events": events[max(0, events_from):], "event_count": len(events), "logs": logs, "version": version,
    })


# -- files -------------------------------------------------------------------------------------------------
def _checked_parts(name: Any) -> list[str]:
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name or name.startswith("/"):
        raise PathSafetyError(f"{name!r}: give a path relative to the run, such as outputs/model.keras")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise PathSafetyError(f"{name!r}: '..', '.' and empty parts are not allowed in run file names")
    if parts[0] not in SERVED_DIRS:
        raise PathSafetyError(f"{name!r}: only files under {', '.join(SERVED_DIRS)} are served")
    return parts


def resolve_run_file(record: RunRecord, name: str) -> str:
    """The real path of run file ``name`` (``outputs/...``, ``logs/...``, ``tflaunch_logs/...``, ``hosts/...``,
    ``snapshot/...``), refusing anything that is not a plain relative path, or leads (through a symbolic link)
    outside the run, its snapshot or the home."""
    _checked_parts(name)
    target = record.safe_path(name)  # realpath, contained in the run (or its snapshot tree)
    home = os.path.realpath(record.store.home)
    if not target.startswith(home + os.sep):
        raise PathSafetyError(f"{name!r} leads outside the home")
    return target


def open_run_file(record: RunRecord, name: str) -> tuple[BinaryIO, int]:
    """Open run file ``name`` for reading (a regular file, opened without following a link): (file, size).
    Raises PathSafetyError for a refused name, FileNotFoundError when there is no such file."""
    target = resolve_run_file(record, name)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise PathSafetyError(f"{name!r} cannot be opened: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise FileNotFoundError(f"{name!r} is a directory")
        raise PathSafetyError(f"{name!r} is not a regular file")
    return os.fdopen(fd, "rb"), st.st_size


def run_files(record: RunRecord) -> list[dict[str, Any]]:
    """The run's files that can be downloaded: outputs/, logs/, tflaunch_logs/, hosts/ (as ``runs files``)
    and its snapshot's files (at most :data:`MAX_SNAPSHOT_FILES`); symbolic links are listed as such."""
    found = []
    for name, size in record.file_names():
        found.append({"name": name, "size": size, "link": os.path.islink(record.path(*name.split("/")))})
    root = record.path("snapshot")
    listed = 0
    if os.path.isdir(root):
        real = os.path.realpath(root)
        for dirpath, dirnames, filenames in os.walk(real):
            dirnames.sort()
            rel = os.path.relpath(dirpath, real).replace(os.sep, "/")
            for fn in sorted(filenames):
                path = os.path.join(dirpath, fn)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                found.append({"name": "snapshot/" + (fn if rel == "." else f"{rel}/{fn}"), "size": st.st_size,
                              "link": stat.S_ISLNK(st.st_mode)})
                listed += 1
                if listed >= MAX_SNAPSHOT_FILES:
                    return found
    return found


def _utf8_cut(data: bytes) -> int:
    """How many bytes of ``data`` end on a whole UTF-8 character (a character cut by the chunk's end waits)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return len(data)
        if byte >= 0xC0:  # a lead byte: complete when its sequence fits
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if need <= back else len(data) - back
    return len(data)


def log_chunk(record: RunRecord, name: str, offset: int, limit: int = MAX_LOG_CHUNK) -> dict[str, Any]:
    """Bytes of run file ``name`` from ``offset`` (negative: that many from the end, starting at a line) up
    to ``limit``, as text: ``{file, offset, next_offset, size, text}``; poll again from ``next_offset``."""
    if not isinstance(offset, int) or not isinstance(limit, int) or limit < 1:
        raise SpecError("offset and limit must be whole numbers (limit at least 1)")
    limit = min(limit, MAX_LOG_CHUNK)
    fh, size = open_run_file(record, name)
    with fh:
        start = max(0, size + offset) if offset < 0 else min(offset, size)
        fh.seek(start)
        data = fh.read(min(limit, max(0, size - start)))
        if offset < 0 and start > 0:  # a tail: from the first whole line
            newline = data.find(b"\n")
            skip = newline + 1 if newline >= 0 else 0
            data, start = data[skip:], start + skip
    end = _utf8_cut(data)
    data = data[:end]
    return {"file": name, "offset": start, "next_offset": start + len(data), "size": size,
            "text": data.decode("utf-8", "replace")}


# -- compare, models ---------------------------------------------------------------------------------------
def compare(a: RunRecord, b: RunRecord) -> dict[str, Any]:
    """``runs diff`` of two runs: ``{a, b, differences: [{section, key, a, b}], same}``."""
    from ..history.compare import comparable, diff
    from ..history.metrics import json_safe

    differences, same = diff(comparable(a), comparable(b))
    return json_safe({"a": a.id, "b": b.id, "differences": differences, "same": len(same)})


def models(home: str) -> list[dict[str, Any]]:
    """Every registered model version (``models list --json``), by name then version."""
    from ..history.models import Model

    return [m.to_dict() for m in Model.list(home)]

