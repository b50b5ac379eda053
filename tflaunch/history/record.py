"""One run's directory (:class:`RunRecord`): its definition, status and events, cancel requests and files.
The launcher writes it; anyone may read it. The lease and liveness checks: :mod:`tflaunch.history.lease`.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal

from .. import fsio
from ..errors import PathSafetyError, StoreError
from .layout import LOG_DIR, RANK_LOG_PREFIX, TERMINAL, USER_FILE_DIRS, now_iso
from .lease import LeaseMixin, hostname, local_identity, process_start_time, user_name

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

    from .store import Store

__all__ = ["RunRecord"]


class RunRecord(LeaseMixin):
    """One run's directory. The launcher writes it; anyone may read it. (Its lease, and whether the launcher
    holding it lives: :class:`~tflaunch.history.lease.LeaseMixin`.)"""

    def __init__(self, store: Store, run_id: str, directory: str | None = None) -> None:
        self.store = store
        self.id = run_id
        self.dir = directory or os.path.join(store.runs_dir, run_id)
        self._status: dict[str, Any] | None = None
        self._slurm_cache: tuple[str, float, Any] | None = None  # (job id, when asked, scontrol's answer)
        # values of the secret variables withheld from run.json, in memory (set by Store.create_run)
        self.withheld: dict[str, str] | None = None

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

    # -- withheld secrets (tflaunch.history.withheld) --------------------------------------------------
    def hand_over_withheld(self) -> None:
        """Before another process starts the run (``--detach``, a Slurm job): keep the withheld values in its
        owner-only start file (nothing when there are none, or this object does not hold them)."""
        if self.withheld:
            from .withheld import write_start_file
            write_start_file(self.dir, self.withheld)

    def withheld_values(self) -> dict[str, str]:
        """The withheld values: those in memory, else those of the start file."""
        if self.withheld is None:
            from .withheld import read_start_file
            self.withheld = read_start_file(self.dir)
        return dict(self.withheld)

    def drop_withheld(self) -> None:
        """Remove the start file (the processes have started, or the run has ended)."""
        from .withheld import remove_start_file
        remove_start_file(self.dir)

    # -- status --------------------------------------------------------------------------------------
    def _read_status_file(self) -> dict[str, Any] | None:
        try:
            data = fsio.read_json(self.path("status.json"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def status_damage(self) -> str | None:
        """What is wrong with ``status.json`` when it does not read as a run object (None: nothing), for
        a record damaged outside tflaunch (a truncated copy, a disk error)."""
        try:
            with open(self.path("status.json"), "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return "status.json is missing"
        except OSError as exc:
            return f"status.json cannot be read ({exc.strerror or exc})"
        if not data.strip():
            return "status.json is empty"
        try:
            obj = json.loads(data)
        except ValueError as exc:
            return f"status.json is not valid JSON (truncated or damaged: {exc}; {len(data)} bytes)"
        return None if isinstance(obj, dict) else "status.json does not hold a JSON object"

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

    def write_status(self, status: str | None = None, **fields: Any) -> dict[str, Any]:
        """Update ``status.json`` (launcher side); logs a status event when the status changes."""
        current = dict(self._status or self._read_status_file() or {})
        previous = current.get("status")
        if status is not None:
            current["status"] = status
        current.update(fields)
        self._retry_when_full(fsio.atomic_write_json, self.path("status.json"), current)
        self._status = current
        if status in TERMINAL:
            self.drop_withheld()
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

    # -- cancel --------------------------------------------------------------------------------------
    def request_cancel(self, reason: str) -> bool:
        """Ask the launcher to cancel; returns False if a request was already there."""
        created = fsio.create_once_json(self.path("cancel.json"), {"time": now_iso(), "reason": reason,
                                                                   "by": f"{user_name()}@{hostname()}"})
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
