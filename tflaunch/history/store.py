"""The run store: plain files under ``$TFLAUNCH_HOME`` (default ``~/.tflaunch``), safe on NFS without locks.

Layout (every path inside a record is relative, so a home can be rsynced and read elsewhere)::

    store.json                      {"format": 1}
    experiments/<name>.json         created once, idempotently
    runs/<run-id>/                  appears atomically (built as runs/.new-<id>, then renamed)
        run.json                    definition: spec, submitter, tflaunch version (never rewritten)
        status.json                 the run object (status, timestamps, exit code, error), replaced atomically
        events.jsonl                append-only history of status changes and requests
        lease.json                  the launcher's heartbeat: host, boot id, pid, time
        cancel.json                 a cancel request (first one wins)
        snapshot.json               what was snapshotted (tree id, entry script, counts)
        snapshot -> ../../trees/<sha256>   the snapshot's files (a link: unchanged trees are shared)
        work/                       the process's working directory while it runs
        outputs/, logs/             the script's ./outputs and ./logs, moved in when it ends
        tflaunch_logs/              rank-N.stdout, rank-N.stderr (raw bytes), launcher.log
    objects/ab/cdef...[.x]          snapshot file contents by SHA-256, read-only
    trees/<sha256>/, <sha256>.json  one snapshot tree (hard links into objects/) and its listing
    cache/                          rebuildable caches: runs-index.txt (finished runs), stat/
    trash/<run-id>/, <run-id>.json  deleted runs (moved here by one rename) and when/why: tflaunch.history.trash

Run ids (``20261123-101530-123-5f3a9c1e``) sort by creation time and carry 32 random bits, so
concurrent submitters never need a global lock. A run whose launcher is gone (same machine: its pid
is dead; elsewhere: no heartbeat within the lease timeout) is reported, and recorded, as Failed with
reason ``launcher_lost``. A run inside a Slurm job has the job id in its lease (``slurm_job_id``):
when Slurm says the job ended and the run recorded no end, the end is recorded with Slurm's reason
(time limit, node failure, preemption, canceled; see :func:`tflaunch.slurm.final_fields`).

Here: :class:`Store` (the home: creating, finding and listing runs). One run's directory:
:class:`tflaunch.history.record.RunRecord`; its lease and liveness: :mod:`tflaunch.history.lease`; statuses, names and
timestamps: :mod:`tflaunch.history.layout`; what is shown of a run: :mod:`tflaunch.history.runviews`. Their names are
importable from here too.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time

from .. import fsio
from ..errors import RunDeletedError, RunNotFoundError, StoreError
from .layout import (CANCELED, COMPLETED, DAMAGED, EXPERIMENT_RE, FAILED, FINALIZING, LOG_DIR, PREPARING, QUEUED,
                     RANK_LOG_PREFIX, RECOVERING, RESERVE_BYTES, RUN_ID_RE, RUNNING, STATUS_FROM_DEFINITION, STORE_FORMAT,
                     TERMINAL, TRASH_DIR, USER_FILE_DIRS, exit_code_for, now_iso, parse_iso, rank_log, resolve_home,
                     validate_experiment_name)
from .lease import hostname, local_identity, process_start_time, user_name
from .record import RunRecord
from .runviews import describe, download, with_duration, with_tracking

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Iterable

# What the rest of the package imports from here (defined in layout, lease, record and runviews).
__all__ = [
    "PREPARING", "QUEUED", "RUNNING", "RECOVERING", "FINALIZING", "COMPLETED", "FAILED", "CANCELED", "TERMINAL",
    "Store", "RunRecord", "resolve_home", "now_iso", "exit_code_for", "local_identity",
    "STORE_FORMAT", "RUN_ID_RE", "EXPERIMENT_RE", "LOG_DIR", "RANK_LOG_PREFIX", "RESERVE_BYTES",
    "STATUS_FROM_DEFINITION", "USER_FILE_DIRS", "rank_log", "parse_iso", "validate_experiment_name",
    "hostname", "process_start_time", "user_name", "with_duration", "with_tracking", "describe", "download",
]

log = logging.getLogger(__name__)

_INDEX_HEADER = "tflaunch-runs-index 2"  # 2: run objects carry "metrics"


class Store:
    """A tflaunch home directory."""

    def __init__(self, home: str | os.PathLike | None = None) -> None:
        self.home = resolve_home(home)
        self.runs_dir = os.path.join(self.home, "runs")
        self.index_path = os.path.join(self.home, "cache", "runs-index.txt")
        self.trash_dir = os.path.join(self.home, TRASH_DIR)  # deleted runs: tflaunch.history.trash

    def __repr__(self) -> str:
        return f"Store({self.home!r})"

    # -- creation ------------------------------------------------------------------------------------
    def ensure(self) -> None:
        """Create the home if needed; raise a clear :class:`StoreError` if it is not writable."""
        try:
            dir_mode = self._make_home()
            for sub in ("runs", "experiments", "objects", "cache"):
                _mkdir(os.path.join(self.home, sub), dir_mode)
            marker = os.path.join(self.home, "store.json")
            if not os.path.exists(marker):
                fsio.create_once_json(marker, {"format": STORE_FORMAT})
            elif not os.access(self.runs_dir, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), self.runs_dir)
        except OSError as exc:
            raise StoreError(f"TFLAUNCH_HOME {self.home} is not writable: {exc.strerror or exc}"
                             " (set TFLAUNCH_HOME or --home to a writable directory)") from None
        try:
            fmt = fsio.read_json(os.path.join(self.home, "store.json")).get("format")
        except (OSError, ValueError, AttributeError):
            fmt = STORE_FORMAT
        if fmt != STORE_FORMAT:
            raise StoreError(f"{self.home} holds store format {fmt}; this tflaunch reads format {STORE_FORMAT}")

    def _make_home(self) -> int:
        """Create the home owner-only (0700) when it does not exist; return the mode of the directories
        tflaunch creates in it (:func:`~tflaunch.history.withheld.home_modes`). An existing home keeps its
        mode: one readable by others while not ``shared_group`` is warned about once."""
        from .withheld import home_modes

        if not os.path.isdir(self.home):
            os.makedirs(os.path.dirname(self.home), exist_ok=True)
            _mkdir(self.home, 0o700)
            return 0o700
        dir_mode = home_modes(self.home)[0]
        try:
            mode = os.stat(self.home).st_mode & 0o777
        except OSError:
            return dir_mode
        warned = os.path.join(self.home, "cache", ".mode-warned")
        if mode & ~dir_mode & 0o077 and not os.path.exists(warned) and os.access(self.home, os.W_OK):
            log.warning("TFLAUNCH_HOME %s can be read by other users (mode %04o): new run records are owner-only, "
                        "older ones are not; `chmod -R go-rwx %s`, or set \"shared_group\": true in its config.json "
                        "for a group's home (said once)", self.home, mode, self.home)
            try:
                _mkdir(os.path.dirname(warned), dir_mode)
                fsio.create_once_json(warned, {"mode": f"{mode:04o}", "time": now_iso()})
            except OSError:
                pass
        return dir_mode

    def ensure_experiment(self, name: str) -> None:
        validate_experiment_name(name)
        path = os.path.join(self.home, "experiments", name + ".json")
        if not os.path.exists(path):
            fsio.create_once_json(path, {"name": name, "created": now_iso()})

    def experiments(self) -> list[str]:
        try:
            names = os.listdir(os.path.join(self.home, "experiments"))
        except FileNotFoundError:
            return []
        return sorted(n[:-5] for n in names if n.endswith(".json") and not n.startswith("."))

    @staticmethod
    def new_run_id(t: float | None = None) -> str:
        t = time.time() if t is None else t
        ms = int(t * 1000) % 1000
        return time.strftime("%Y%m%d-%H%M%S", time.gmtime(t)) + f"-{ms:03d}-{os.urandom(4).hex()}"

    def create_run(self, experiment: str, definition: dict[str, Any], *, run_id: str | None = None,
                   tags: dict[str, str] | None = None) -> "RunRecord":
        """Create a run record in status Preparing, leased by the calling process."""
        from .withheld import home_modes, split_definition

        self.ensure()
        self.ensure_experiment(experiment)
        definition, withheld = split_definition(definition, self.home)  # secret values never reach the record
        run_id = run_id or self.new_run_id()
        created = now_iso()
        staging = os.path.join(self.runs_dir, f".new-{run_id}")
        final = os.path.join(self.runs_dir, run_id)
        status = {
            "id": run_id, "experiment": experiment, "status": PREPARING, "created": created,
            "started": None, "ended": None, "exit_code": None, "signal": None, "error": None,
            "host": hostname(), "user": user_name(),
            "entry_script": definition.get("spec", {}).get("entry_script"), "tags": dict(tags or {}),
        }
        for key in STATUS_FROM_DEFINITION:  # a sweep and its trials: listed with the run
            if key in definition:
                status[key] = definition[key]
        try:
            _mkdir(staging, home_modes(self.home)[0])
            os.mkdir(os.path.join(staging, LOG_DIR))
            fsio.atomic_write_json(os.path.join(staging, "run.json"),
                                   {"id": run_id, "experiment": experiment, "created": created, **definition})
            fsio.atomic_write_json(os.path.join(staging, "status.json"), status)
            fsio.append_jsonl(os.path.join(staging, "events.jsonl"),
                              {"time": created, "event": "status", "status": PREPARING})
            record = RunRecord(self, run_id, staging)
            record.write_lease()
            with open(os.path.join(staging, ".reserve"), "wb") as fh:
                fh.write(b"\0" * RESERVE_BYTES)
            os.rename(staging, final)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise StoreError(f"cannot create a run in {self.home}: {exc.strerror or exc}") from None
        record = RunRecord(self, run_id, final)
        record._status = status
        record.withheld = withheld
        return record

    # -- lookup --------------------------------------------------------------------------------------
    def run_ids(self) -> list[str]:
        try:
            with os.scandir(self.runs_dir) as it:
                return [e.name for e in it if RUN_ID_RE.match(e.name)]
        except FileNotFoundError:
            return []

    def run(self, ref: str) -> "RunRecord":
        """The run with id ``ref``, or the only run whose id starts or ends with ``ref``."""
        if not isinstance(ref, str) or not ref or "/" in ref or ref in (".", ".."):
            raise RunNotFoundError(f"invalid run id {ref!r}")
        if RUN_ID_RE.match(ref) and os.path.isdir(os.path.join(self.runs_dir, ref)):
            return RunRecord(self, ref)
        ids = self.run_ids()
        matches = [i for i in ids if i.startswith(ref)] or [i for i in ids if i.endswith(ref)]
        if not matches:
            deleted = self.deleted_run_id(ref)
            if deleted:
                raise RunDeletedError(f"run {deleted} was deleted (it is in the trash; `tflaunch runs restore "
                                      f"{deleted}` brings it back)")
            raise RunNotFoundError(f"no run {ref!r} in {self.home} (see `tflaunch runs list`)")
        if len(matches) > 1:
            shown = ", ".join(sorted(matches)[:5])
            raise RunNotFoundError(f"run id {ref!r} is ambiguous: {len(matches)} runs match ({shown}...)")
        return RunRecord(self, matches[0])

    def deleted_run_id(self, ref: str) -> str | None:
        """The id of the only run in the trash whose id is, starts or ends with ``ref`` (else None)."""
        try:
            with os.scandir(self.trash_dir) as it:
                ids = [e.name for e in it if RUN_ID_RE.match(e.name) and e.is_dir()]
        except OSError:
            return None
        matches = [i for i in ids if i.startswith(ref)] or [i for i in ids if i.endswith(ref)]
        return matches[0] if len(matches) == 1 else None

    def _damaged(self, record: RunRecord) -> tuple[str, str, str] | None:
        """The listing row of a run whose status.json does not read (None: it reads now, or the run is
        gone): status ``Damaged``, ``damaged`` saying what is wrong, a warning logged. Never cached."""
        problem = record.status_damage()
        if problem is None or not os.path.isdir(record.dir):
            return None
        try:
            definition = record.definition()
        except StoreError:
            definition = {}
            problem += "; run.json does not read either"
        log.warning("run %s: %s (damaged outside tflaunch; listed as %s, see `tflaunch runs show %s`)",
                    record.id, problem, DAMAGED, record.id)
        run = {"id": record.id, "experiment": definition.get("experiment"), "status": DAMAGED,
               "created": definition.get("created"), "started": None, "ended": None, "exit_code": None,
               "signal": None, "error": None, "damaged": problem, "duration_seconds": None}
        return str(run["experiment"] or ""), DAMAGED, fsio.json_dumps(run)

    def _read_index(self) -> dict[str, tuple[str, str, str]]:
        try:
            with open(self.index_path, "rb") as fh:
                lines = fh.read().decode("ascii").split("\n")
        except (OSError, UnicodeDecodeError):
            return {}
        if not lines or lines[0] != _INDEX_HEADER:
            return {}
        cached = {}
        for line in lines[1:]:
            parts = line.split("\t", 3)
            if len(parts) == 4:
                cached[parts[0]] = (parts[1], parts[2], parts[3])
        return cached

    def _listing(self, experiment: str | None, statuses: Iterable[str] | None,
                 limit: int | None) -> list[str]:
        """Serialized run objects (``duration_seconds`` included), newest first.

        Finished runs never change, so their serialized objects are kept in ``cache/runs-index.txt``
        (one ``id, experiment, status, JSON`` line each): listing 10,000 runs parses nothing. The
        cache is rebuilt from the run directories whenever it misses a run or names a deleted one.
        """
        cached = self._read_index()
        fresh: dict[str, tuple[str, str, str]] = {}
        rows = []
        changed = False
        for run_id in self.run_ids():
            row = cached.get(run_id)
            if row is None:
                record = RunRecord(self, run_id)
                run = record.read_status()
                if run is None:
                    row = self._damaged(record)
                    if row is not None:
                        rows.append((run_id, row))
                    continue
                row = (str(run.get("experiment", "")), str(run.get("status", "")),
                       fsio.json_dumps(with_duration(with_tracking(record, run))))
                changed = changed or row[1] in TERMINAL
            if row[1] in TERMINAL:
                fresh[run_id] = row
            rows.append((run_id, row))
        if changed or len(fresh) != len(cached):
            text = "\n".join([_INDEX_HEADER] + [f"{i}\t{e}\t{st}\t{j}" for i, (e, st, j) in sorted(fresh.items())])
            try:
                os.makedirs(os.path.dirname(self.index_path), exist_ok=True)
                fsio.atomic_write_bytes(self.index_path, text.encode("ascii"), fsync=False)
            except OSError as exc:
                log.debug("could not update the run index: %s", exc)
        if experiment is not None:
            rows = [r for r in rows if r[1][0] == experiment]
        if statuses:
            wanted = {s.lower() for s in statuses}
            rows = [r for r in rows if r[1][1].lower() in wanted]
        rows.sort(key=lambda r: r[0], reverse=True)
        if limit:
            rows = rows[:limit]
        return [row[2] for _, row in rows]

    def list_runs(self, experiment: str | None = None, statuses: Iterable[str] | None = None,
                  limit: int | None = None) -> list[dict[str, Any]]:
        """Run objects (with ``duration_seconds``), newest first, optionally filtered."""
        return [json.loads(text) for text in self._listing(experiment, statuses, limit)]

    def list_runs_json(self, experiment: str | None = None, statuses: Iterable[str] | None = None,
                       limit: int | None = None) -> str:
        """The same as :meth:`list_runs`, as a JSON array (without parsing cached runs)."""
        return "[" + ", ".join(self._listing(experiment, statuses, limit)) + "]"


def _mkdir(path: str, mode: int) -> None:
    """Create directory ``path`` with exactly ``mode`` (whatever the umask; a set-group-id bit it inherits
    from its parent is kept); nothing when it exists."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return
    try:
        os.chmod(path, mode | (os.stat(path).st_mode & 0o2000))
    except OSError as exc:
        log.debug("cannot set the mode of %s: %s", path, exc)
