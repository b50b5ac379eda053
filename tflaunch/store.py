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

Run ids (``20261123-101530-123-5f3a9c1e``) sort by creation time and carry 32 random bits, so
concurrent submitters never need a global lock. A run whose launcher is gone (same machine: its pid
is dead; elsewhere: no heartbeat within the lease timeout) is reported, and recorded, as Failed with
reason ``launcher_lost``. A run inside a Slurm job has the job id in its lease (``slurm_job_id``):
when Slurm says the job ended and the run recorded no end, the end is recorded with Slurm's reason
(time limit, node failure, preemption, canceled; see :func:`tflaunch.slurm.final_fields`).
"""
from __future__ import annotations

import calendar
import errno
import json
import logging
import os
import re
import shutil
import signal
import time
from datetime import datetime, timezone

from . import fsio
from .errors import PathSafetyError, RunNotFoundError, SpecError, StoreError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Iterable

__all__ = [
    "PREPARING", "QUEUED", "RUNNING", "FINALIZING", "COMPLETED", "FAILED", "CANCELED", "TERMINAL",
    "Store", "RunRecord", "resolve_home", "now_iso", "exit_code_for", "local_identity",
]

log = logging.getLogger(__name__)

PREPARING, QUEUED, RUNNING, FINALIZING = "Preparing", "Queued", "Running", "Finalizing"
COMPLETED, FAILED, CANCELED = "Completed", "Failed", "Canceled"
TERMINAL = frozenset({COMPLETED, FAILED, CANCELED})
STORE_FORMAT = 1
RUN_ID_RE = re.compile(r"^\d{8}-\d{6}-\d{3}-[0-9a-f]{8}$")
EXPERIMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
LOG_DIR = "tflaunch_logs"
RANK_LOG_PREFIX = "rank-"  # rank_log()
RESERVE_BYTES = 256 * 1024
STATUS_FROM_DEFINITION = ("kind", "parent", "trial", "hyperparameters")  # sweeps (tflaunch.sweep)
USER_FILE_DIRS = ("outputs", "logs", LOG_DIR, "hosts")  # hosts/: see tflaunch.collect
_INDEX_HEADER = "tflaunch-runs-index 2"  # 2: run objects carry "metrics"


def rank_log(rank: int, stream: str) -> str:
    """A process's output file in the record: ``tflaunch_logs/rank-N.stdout`` / ``.stderr``."""
    return f"{LOG_DIR}/{RANK_LOG_PREFIX}{rank}.{stream}"


def resolve_home(home: str | os.PathLike | None = None) -> str:
    """The store directory: ``home`` if given, else ``$TFLAUNCH_HOME``, else ``~/.tflaunch``."""
    if home is None or os.fspath(home) == "":
        home = os.environ.get("TFLAUNCH_HOME") or os.path.join(os.path.expanduser("~"), ".tflaunch")
    return os.path.abspath(os.path.expanduser(os.fspath(home)))


def now_iso(t: float | None = None) -> str:
    """UTC timestamp as ISO 8601 with milliseconds, e.g. ``2026-11-23T10:15:30.123Z``."""
    dt = datetime.fromtimestamp(time.time() if t is None else t, timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def parse_iso(value: str | None) -> float | None:
    """Seconds since the epoch for a :func:`now_iso` timestamp (fixed layout: sliced, not strptime-d,
    which is 20x slower and dominated ``runs list`` over 10,000 runs)."""
    if not value:
        return None
    try:
        seconds = calendar.timegm((int(value[0:4]), int(value[5:7]), int(value[8:10]), int(value[11:13]),
                                   int(value[14:16]), int(value[17:19]), 0, 0, 0))
        return seconds + int(value[20:23]) / 1000
    except (ValueError, IndexError, TypeError):
        return None


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER") or str(os.getuid())


def hostname() -> str:
    """This machine's name (as ``socket.gethostname()``, without importing socket)."""
    return os.uname().nodename


def _read_first_line(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.readline().strip()
    except OSError:
        return ""


def local_identity() -> dict[str, str]:
    """What makes two processes "on the same machine": host name, boot id, pid namespace."""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return {"host": hostname(), "boot_id": _read_first_line("/proc/sys/kernel/random/boot_id"),
            "pidns": pidns}


def process_start_time(pid: int) -> str | None:
    """Kernel start time of ``pid`` (to tell a live process from a recycled pid), or None if gone
    (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
        fields = data[data.rindex(b")") + 2:].split()
        return None if fields[0] in (b"Z", b"X") else fields[19].decode()
    except (OSError, ValueError, IndexError):
        if not os.path.isdir("/proc"):  # no procfs (macOS): fall back to a signal-0 probe
            try:
                os.kill(pid, 0)
                return ""
            except ProcessLookupError:
                return None
            except PermissionError:
                return ""
        return None


def exit_code_for(run: dict[str, Any]) -> int:
    """Exit status for ``tflaunch run``: 0 Completed, the script's own code, 128+N for signal N,
    124 timeout, 130 Canceled, 1 for any other failure."""
    status = run.get("status")
    if status == COMPLETED:
        return 0
    if status == CANCELED:
        return 130
    error = run.get("error") or {}
    if error.get("reason") == "timeout":
        return 124
    code = run.get("exit_code")
    if isinstance(code, int) and 0 < code < 256:
        return code
    sig = run.get("signal")
    if sig:
        try:
            return 128 + int(signal.Signals[sig])
        except KeyError:
            pass
    return 1


def validate_experiment_name(name: Any) -> str:
    if not isinstance(name, str) or not EXPERIMENT_RE.match(name):
        raise SpecError(f"experiment name {name!r} is invalid: use 1-255 letters, digits, '_', '-' or '.', "
                        "starting with a letter or digit")
    return name


class Store:
    """A tflaunch home directory."""

    def __init__(self, home: str | os.PathLike | None = None) -> None:
        self.home = resolve_home(home)
        self.runs_dir = os.path.join(self.home, "runs")
        self.index_path = os.path.join(self.home, "cache", "runs-index.txt")

    def __repr__(self) -> str:
        return f"Store({self.home!r})"

    # -- creation ------------------------------------------------------------------------------------
    def ensure(self) -> None:
        """Create the home if needed; raise a clear :class:`StoreError` if it is not writable."""
        try:
            for sub in ("runs", "experiments", "objects", "cache"):
                os.makedirs(os.path.join(self.home, sub), exist_ok=True)
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
        self.ensure()
        self.ensure_experiment(experiment)
        run_id = run_id or self.new_run_id()
        created = now_iso()
        staging = os.path.join(self.runs_dir, f".new-{run_id}")
        final = os.path.join(self.runs_dir, run_id)
        status = {
            "id": run_id, "experiment": experiment, "status": PREPARING, "created": created,
            "started": None, "ended": None, "exit_code": None, "signal": None, "error": None,
            "host": hostname(), "user": _user(),
            "entry_script": definition.get("spec", {}).get("entry_script"), "tags": dict(tags or {}),
        }
        for key in STATUS_FROM_DEFINITION:  # a sweep and its trials: listed with the run
            if key in definition:
                status[key] = definition[key]
        try:
            os.mkdir(staging)
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
            raise RunNotFoundError(f"no run {ref!r} in {self.home} (see `tflaunch runs list`)")
        if len(matches) > 1:
            shown = ", ".join(sorted(matches)[:5])
            raise RunNotFoundError(f"run id {ref!r} is ambiguous: {len(matches)} runs match ({shown}...)")
        return RunRecord(self, matches[0])

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


class RunRecord:
    """One run's directory. The launcher writes it; anyone may read it."""

    def __init__(self, store: Store, run_id: str, directory: str | None = None) -> None:
        self.store = store
        self.id = run_id
        self.dir = directory or os.path.join(store.runs_dir, run_id)
        self._status: dict[str, Any] | None = None
        self._slurm_cache: tuple[str, float, Any] | None = None  # (job id, when asked, scontrol's answer)

    def __repr__(self) -> str:
        return f"RunRecord({self.id!r})"

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    @property
    def work_dir(self) -> str:
        return self.path("work")

    def definition(self) -> dict[str, Any]:
        try:
            return fsio.read_json(self.path("run.json"))
        except (OSError, ValueError) as exc:
            raise StoreError(f"run {self.id}: cannot read run.json: {exc}") from None

    # -- status --------------------------------------------------------------------------------------
    def _read_status_file(self) -> dict[str, Any] | None:
        try:
            data = fsio.read_json(self.path("status.json"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def read_status(self, *, check_lease: bool = True) -> dict[str, Any] | None:
        """The run object; an unfinished run whose launcher is gone is recorded Failed first (a run in
        a Slurm job: with Slurm's reason, once the job has ended)."""
        status = self._read_status_file()
        if status is None or not check_lease or status.get("status") in TERMINAL:
            return status
        lease = self.lease()
        if lease and lease.get("slurm_job_id"):
            return self._check_slurm(status, lease)
        if self.launcher_state() == "dead":
            return self._mark_launcher_lost(status)
        return status

    def _check_slurm(self, status: dict[str, Any], lease: dict[str, Any]) -> dict[str, Any]:
        """Ask Slurm about the job holding the run's lease (at most every 2 s per record)."""
        from . import slurm

        job = str(lease["slurm_job_id"])
        now = time.monotonic()
        cached = self._slurm_cache
        if cached is not None and cached[0] == job and now - cached[1] < 2.0:
            info: Any = cached[2]
        else:
            try:
                info = slurm.job_info(job)
            except slurm.SlurmError as exc:  # Slurm cannot be asked from here: the heartbeat decides
                log.debug("run %s: %s", self.id, exc)
                if "pid" in lease and self.launcher_state() == "dead":
                    return self._mark_launcher_lost(status)
                return status
            self._slurm_cache = (job, now, info)
        fields = slurm.final_fields(info, job, None)
        if fields is None:  # the job may still run
            live = dict(status.get("slurm") or {}, job_id=job, state=slurm.job_state(info))
            if info and info.get("Reason") not in (None, "None"):
                live["reason"] = info["Reason"]
            if "pid" in lease and slurm.job_state(info) == "RUNNING" and self.launcher_state() == "dead":
                return self._mark_launcher_lost(status)  # the job goes on without tflaunch (killed inside it)
            return dict(status, slurm=live)
        current = self._read_status_file() or status  # tflaunch inside the job may just have finished
        if current.get("status") in TERMINAL:
            return current
        output = os.path.join(self.dir, LOG_DIR, f"slurm-{job}.out")
        from .tail import tail_bytes
        tail_text = "\n".join(tail_bytes(output, 2000).decode("utf-8", "replace").strip().splitlines()[-10:])
        fields = slurm.final_fields(info, job, self.cancel_requested(), tail_text)
        final = dict(current)
        final.update(fields or {}, ended=now_iso(), slurm=dict(current.get("slurm") or {}, job_id=job,
                                                               state=slurm.job_state(info)))
        try:
            self.release_reserve()
            fsio.atomic_write_json(self.path("status.json"), final)
            self.event("status", status=final["status"], **({"error": final["error"]} if final.get("error") else {}))
            os.unlink(self.path("lease.json"))
        except OSError as exc:  # a read-only viewer still reports the truth
            log.debug("could not record the end of %s: %s", self.id, exc)
        return final

    def write_status(self, status: str | None = None, **fields: Any) -> dict[str, Any]:
        """Update ``status.json`` (launcher side); logs a status event when the status changes."""
        current = dict(self._status or self._read_status_file() or {})
        previous = current.get("status")
        if status is not None:
            current["status"] = status
        current.update(fields)
        self._retry_when_full(fsio.atomic_write_json, self.path("status.json"), current)
        self._status = current
        if status is not None and status != previous:
            self.event("status", status=status, **({"error": fields["error"]} if fields.get("error") else {}))
        return current

    def event(self, kind: str, **data: Any) -> None:
        self._retry_when_full(fsio.append_jsonl, self.path("events.jsonl"),
                              {"time": now_iso(), "event": kind, **data})

    def events(self) -> list[dict[str, Any]]:
        return list(fsio.iter_jsonl(self.path("events.jsonl")))

    def _retry_when_full(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except OSError as exc:
            if not fsio.is_disk_full(exc) or not self.release_reserve():
                raise
            fn(*args)

    def release_reserve(self) -> bool:
        """Free the space set aside at creation so the final records fit on a full disk."""
        try:
            os.unlink(self.path(".reserve"))
            return True
        except OSError:
            return False

    # -- lease ---------------------------------------------------------------------------------------
    def write_lease(self, interval: float | None = None, timeout: float | None = None, *,
                    slurm_job_id: str | None = None) -> None:
        """Hold the run: this process's identity and a heartbeat (``slurm_job_id``: the Slurm job it
        runs in, asked when the heartbeat stops)."""
        interval = interval or float(os.environ.get("TFLAUNCH_LEASE_INTERVAL", "2"))
        timeout = timeout or float(os.environ.get("TFLAUNCH_LEASE_TIMEOUT", "30"))
        pid = os.getpid()
        lease = {**local_identity(), "pid": pid, "pid_start": process_start_time(pid),
                 "heartbeat": time.time(), "interval": interval, "timeout": timeout}
        if slurm_job_id:
            lease["slurm_job_id"] = str(slurm_job_id)
        data = (fsio.json_dumps(lease) + "\n").encode("ascii")
        self._retry_when_full(lambda: fsio.atomic_write_bytes(self.path("lease.json"), data, fsync=False))

    def lease_slurm_job(self, job_id: str) -> None:
        """A submitted run is held by its Slurm job until tflaunch starts inside it."""
        data = (fsio.json_dumps({"slurm_job_id": str(job_id), "submitted_by": local_identity()["host"]}) + "\n")
        self._retry_when_full(lambda: fsio.atomic_write_bytes(self.path("lease.json"), data.encode("ascii"),
                                                              fsync=False))

    def lease(self) -> dict[str, Any] | None:
        try:
            data = fsio.read_json(self.path("lease.json"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def launcher_state(self) -> str:
        """``alive``, ``dead`` or ``unknown`` for the process holding this run's lease."""
        lease = self.lease()
        if lease is None:
            try:
                age = time.time() - os.stat(self.path("status.json")).st_mtime
            except OSError:
                return "unknown"
            return "dead" if age > 60 else "unknown"
        me = local_identity()
        if all(lease.get(k) == me[k] for k in ("host", "boot_id", "pidns")) and me["boot_id"]:
            started = process_start_time(int(lease.get("pid", -1)))
            if started is None or (lease.get("pid_start") and started and started != lease["pid_start"]):
                return "dead"
            return "alive"
        if lease.get("host") == me["host"] and lease.get("boot_id") and me["boot_id"] \
                and lease.get("boot_id") != me["boot_id"] and lease.get("pidns") == me["pidns"]:
            return "dead"  # this machine rebooted since
        age = time.time() - float(lease.get("heartbeat", 0))
        return "dead" if age > float(lease.get("timeout", 30)) else "alive"

    def _mark_launcher_lost(self, status: dict[str, Any]) -> dict[str, Any]:
        lease = self.lease() or {}
        where = f"pid {lease.get('pid')} on {lease.get('host')}" if lease else "unknown"
        try:
            ended = float(lease.get("heartbeat") or time.time())  # when the launcher was last seen
        except (TypeError, ValueError):
            ended = time.time()
        # The lease is written before the status goes Running and renewed every few seconds, so the last
        # heartbeat can predate started (or created): the run never ends before it began.
        for began in (parse_iso(status.get("started")), parse_iso(status.get("created"))):
            if began is not None and began > ended:
                ended = began
        status = dict(status)
        status.update(status=FAILED, ended=now_iso(ended), error={
            "reason": "launcher_lost",
            "message": f"the launcher ({where}) stopped without finishing the run; its processes were "
                       "stopped by the tflaunch agent",
        })
        try:
            if lease and all(lease.get(k) == v for k, v in local_identity().items()):
                self._collect_after_loss()
            fsio.atomic_write_json(self.path("status.json"), status)
            self.event("status", status=FAILED, error=status["error"])
        except OSError as exc:  # a read-only viewer still reports the truth
            log.debug("could not record launcher loss of %s: %s", self.id, exc)
        return status

    def _collect_after_loss(self, wait: float = 5.0) -> None:
        """Same machine: once the agent has stopped the run's processes, move their outputs in."""
        from .agent import run_pids

        deadline = time.monotonic() + wait
        while run_pids(self.id) and time.monotonic() < deadline:  # they may be checkpointing on SIGTERM
            time.sleep(0.1)
        if os.path.isdir(self.work_dir):
            self.collect_outputs(self.work_dir, move_only=True)
            shutil.rmtree(self.work_dir, ignore_errors=True)

    # -- cancel --------------------------------------------------------------------------------------
    def request_cancel(self, reason: str) -> bool:
        """Ask the launcher to cancel; returns False if a request was already there."""
        created = fsio.create_once_json(self.path("cancel.json"), {"time": now_iso(), "reason": reason,
                                                                   "by": f"{_user()}@{hostname()}"})
        if created:
            self.event("cancel_requested", reason=reason)
        lease = self.lease()
        if lease and all(lease.get(k) == v for k, v in local_identity().items()):
            pid = int(lease.get("pid", -1))
            if pid > 0 and pid != os.getpid() and process_start_time(pid) == lease.get("pid_start"):
                try:
                    os.kill(pid, signal.SIGTERM)
                except OSError:
                    pass
        return created

    def cancel_requested(self) -> dict[str, Any] | None:
        try:
            return fsio.read_json(self.path("cancel.json"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"reason": "cancel requested"}

    # -- files ---------------------------------------------------------------------------------------
    def collect_outputs(self, work_dir: str, *, move_only: bool = False) -> list[str]:
        """Move ``work_dir/outputs`` and ``work_dir/logs`` into the record; return what was moved.

        Same filesystem: a rename. Otherwise a copy, removed again if it fails (disk full), in which
        case the OSError propagates and the files stay in ``work_dir``.
        """
        moved = []
        for name in ("outputs", "logs"):
            src, dst = os.path.join(work_dir, name), self.path(name)
            if not os.path.lexists(src):
                continue
            if os.path.lexists(dst):
                dst = self.path(f"{name}.{os.urandom(3).hex()}")
            try:
                os.rename(src, dst)
            except OSError as exc:
                if exc.errno != errno.EXDEV or move_only:
                    raise
                try:
                    _copy_tree(src, dst)
                except BaseException:
                    shutil.rmtree(dst, ignore_errors=True)
                    if os.path.lexists(dst) and not os.path.isdir(dst):
                        os.unlink(dst)
                    raise
            moved.append(name)
        return moved

    def safe_path(self, name: str) -> str:
        """Absolute path of ``name`` inside the record, refusing ``..``, absolute paths and symlink escapes."""
        if not isinstance(name, str) or not name or os.path.isabs(name) or "\x00" in name:
            raise PathSafetyError(f"{name!r}: give a path relative to the run, such as outputs/model.keras")
        parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
        if ".." in parts:
            raise PathSafetyError(f"{name!r}: '..' is not allowed in run file names")
        root = os.path.realpath(self.dir)
        if parts[:1] == ["snapshot"]:  # the run's snapshot is a link into the shared trees/
            root = os.path.realpath(self.path("snapshot"))
            parts = parts[1:]
        target = os.path.realpath(os.path.join(root, *parts))
        if target != root and not target.startswith(root + os.sep):
            raise PathSafetyError(f"{name!r} leads outside run {self.id} (through a symbolic link)")
        return target

    def process_log_streams(self) -> list[tuple[str, str, str]]:
        """(path, "stdout" | "stderr", line prefix) per output file, in rank order; the prefix is
        ``"[rank N] "`` (``"[ps 0] "`` with TF_CONFIG) when the run has several processes, else empty."""
        try:
            names = os.listdir(self.path(LOG_DIR))
        except OSError:
            return []
        found = []
        for name in names:
            stem, _, kind = name.rpartition(".")
            rank = stem[len(RANK_LOG_PREFIX):]
            if kind in ("stdout", "stderr") and stem.startswith(RANK_LOG_PREFIX) and rank.isdigit():
                found.append((int(rank), kind == "stderr", self.path(LOG_DIR, name), kind))
        labels: dict[int, str] = {}
        try:
            for row in fsio.read_json(self.path("processes.json")):
                labels[int(row["rank"])] = f"{row['label']} "
        except (OSError, ValueError, KeyError, TypeError):
            pass
        world = max(len(labels), len({rank for rank, _, _, _ in found}))  # processes.json: every process
        return [(path, kind, labels.get(rank, f"[rank {rank}] ") if world > 1 else "")
                for rank, _, path, kind in sorted(found)]

    def file_names(self) -> list[tuple[str, int]]:
        """User-facing files (outputs/, logs/, tflaunch_logs/) as (relative name, size)."""
        found = []
        for top in USER_FILE_DIRS:
            base = self.path(top)
            for dirpath, dirnames, filenames in os.walk(base):
                dirnames.sort()
                rel_dir = os.path.relpath(dirpath, self.dir).replace(os.sep, "/")
                for fn in sorted(filenames):
                    try:
                        size = os.lstat(os.path.join(dirpath, fn)).st_size
                    except OSError:
                        continue
                    found.append((f"{rel_dir}/{fn}", size))
        return found


def _copy_tree(src: str, dst: str) -> None:
    """Copy a file or tree (links as links), stopping at the first error with its real errno."""
    if os.path.islink(src) or not os.path.isdir(src):
        shutil.copy2(src, dst, follow_symlinks=False)
        return
    os.mkdir(dst)
    for entry in os.scandir(src):
        _copy_tree(entry.path, os.path.join(dst, entry.name))
    shutil.copystat(src, dst)


def with_duration(run: dict[str, Any]) -> dict[str, Any]:
    """The run object plus ``duration_seconds`` (from started, else created, to ended or now)."""
    out = dict(run)
    start = parse_iso(run.get("started")) or parse_iso(run.get("created"))
    end = parse_iso(run.get("ended")) or (None if run.get("status") in TERMINAL else time.time())
    # never negative: a record whose clock went backwards (or written before ended was kept >= started)
    out["duration_seconds"] = max(0.0, round(end - start, 3)) if start and end else None
    return out


def with_tracking(record: RunRecord, run: dict[str, Any]) -> dict[str, Any]:
    """The run object plus what its script logged: ``metrics`` (the latest value of each scalar metric),
    its tags merged over the submitted ones, and ``properties`` when it set any."""
    from . import metrics

    out = dict(run)
    try:
        out["metrics"] = metrics.latest(record.dir)
        tags, properties = metrics.properties_and_tags(record.dir)
    except (OSError, ValueError) as exc:
        log.warning("run %s: cannot read its metrics: %s", record.id, exc)
        return out
    if tags:
        out["tags"] = {**(run.get("tags") or {}), **tags}
    if properties:
        out["properties"] = properties
    return out


def describe(record: RunRecord) -> dict[str, Any]:
    """Everything ``runs show --json`` prints: the run object plus what was run and where."""
    status = record.read_status()
    if status is None:
        raise StoreError(f"run {record.id}: status.json is missing or unreadable")
    definition = record.definition()
    spec = definition.get("spec", {})
    out = with_duration(with_tracking(record, status))
    out.update({
        "arguments": spec.get("arguments", []),
        "source_directory": spec.get("source_directory"),
        "python": spec.get("python"),
        "environment_variables": sorted(spec.get("environment_variables", {})),
        "use_gpu": spec.get("use_gpu"),
        "timeout": spec.get("max_run_duration_seconds"),
        "framework": definition.get("environment"),
        "git": definition.get("git"),
        "run_dir": record.dir,
    })
    if os.path.exists(record.path("early_termination.json")):  # a sweep's policy stopped this trial
        try:
            out["early_termination"] = fsio.read_json(record.path("early_termination.json"))
        except (OSError, ValueError):
            pass
    if out.get("environment"):
        try:  # the environment's own packages (pip freeze), as the first host had them
            hosts = fsio.read_json(record.path("environment.json")).get("hosts") or {}
            first = next(iter(hosts.values()), {})
            out["environment"] = {**out["environment"], "path": first.get("path"),
                                  "freeze": list(first.get("freeze") or [])}
        except (OSError, ValueError, AttributeError, StopIteration):
            pass
    return out


def download(record: RunRecord, name: str, dest: str | None = None) -> str:
    """Copy run file (or directory) ``name`` to ``dest`` (default: its base name here); return the path."""
    source = record.safe_path(name)
    if not os.path.lexists(source):
        raise PathSafetyError(f"run {record.id} has no file {name!r} (see `tflaunch runs files {record.id}`)")
    base = os.path.basename(source.rstrip(os.sep)) or record.id
    target = os.path.abspath(dest) if dest else os.path.abspath(base)
    if os.path.isdir(target) and not os.path.isdir(source):
        target = os.path.join(target, base)
    try:
        if os.path.isdir(source):
            if os.path.exists(target):
                target = os.path.join(target, base)
            shutil.copytree(source, target, symlinks=True)
        else:
            parent = os.path.dirname(target)
            if parent:
                os.makedirs(parent, exist_ok=True)
            shutil.copyfile(source, target)
    except OSError as exc:
        raise StoreError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target
