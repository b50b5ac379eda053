"""Who holds a run and whether it still lives: this machine's and process's identity, the launcher's
lease (``lease.json``: host, boot id, pid, heartbeat), and what a reader records when the holder is gone
(Failed with reason ``launcher_lost``; a run in a Slurm job: the end Slurm reports).
"""
from __future__ import annotations

import logging
import os
import shutil
import time

from .. import fsio
from .layout import FAILED, LOG_DIR, TERMINAL, now_iso, parse_iso

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["LeaseMixin", "user_name", "hostname", "local_identity", "process_start_time"]

log = logging.getLogger(__name__)


def user_name() -> str:
    """The calling user's login name (else ``$USER``, else the uid)."""
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



def record_lease_timeout(interval: float) -> float:
    """How old a heartbeat may get before readers declare the supervisor lost: ``TFLAUNCH_LEASE_TIMEOUT``
    (default 30 s; the agents read it too, where 0 means no lease: the record's cannot be off, so 0, a
    value below three heartbeats or not a number gives the default or three heartbeats)."""
    try:
        value = float(os.environ.get("TFLAUNCH_LEASE_TIMEOUT") or 30)
    except ValueError:
        value = 30.0
    return max(value, 3 * interval) if value > 0 else max(30.0, 3 * interval)

class LeaseMixin:
    """The lease and liveness half of :class:`tflaunch.history.record.RunRecord`, which gives it the record's ``id``,
    ``dir``, ``path()``, ``work_dir``, status file, events, reserve, cancel request and ``collect_outputs()``."""

    id: str
    dir: str
    _slurm_cache: tuple[str, float, Any] | None

    def write_lease(self, interval: float | None = None, timeout: float | None = None, *,
                    slurm_job_id: str | None = None, slurm_restarts: int | None = None) -> None:
        """Hold the run: this process's identity and a heartbeat (``slurm_job_id``: the Slurm job it
        runs in, asked when the heartbeat stops; ``slurm_restarts``: how often that job had been requeued
        when this allocation started)."""
        interval = interval or float(os.environ.get("TFLAUNCH_LEASE_INTERVAL", "2"))
        timeout = timeout or record_lease_timeout(interval)
        pid = os.getpid()
        lease = {**local_identity(), "pid": pid, "pid_start": process_start_time(pid),
                 "heartbeat": time.time(), "interval": interval, "timeout": timeout}
        if slurm_job_id:
            lease["slurm_job_id"] = str(slurm_job_id)
            if slurm_restarts is not None:
                lease["slurm_restarts"] = int(slurm_restarts)
        data = (fsio.json_dumps(lease) + "\n").encode("ascii")
        self._retry_when_full(lambda: fsio.atomic_write_bytes(self.path("lease.json"), data, fsync=False))

    def drop_lease(self) -> None:
        """The run has its final status: no one holds it any more."""
        try:
            os.unlink(self.path("lease.json"))
        except OSError:
            pass

    def end_unstarted(self, status: str, **fields: Any) -> dict[str, Any]:
        """End a run that never started (its submission or environment failed, it was interrupted):
        the reserve freed, the final ``status`` with ``fields``, the lease dropped."""
        self.release_reserve()
        final = self.write_status(status, ended=now_iso(), **fields)
        self.drop_lease()
        return final

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
        from ..remote.agent import run_pids

        deadline = time.monotonic() + wait
        while run_pids(self.id) and time.monotonic() < deadline:  # they may be checkpointing on SIGTERM
            time.sleep(0.1)
        if os.path.isdir(self.work_dir):
            self.collect_outputs(self.work_dir, move_only=True)
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def _check_slurm(self, status: dict[str, Any], lease: dict[str, Any]) -> dict[str, Any]:
        """Ask Slurm about the job holding the run's lease (at most every 2 s per record)."""
        from .. import slurm

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
            requeued = slurm.restarts(info) > int(lease.get("slurm_restarts") or 0)  # the holder's allocation ended
            if "pid" in lease and slurm.job_state(info) == "RUNNING" and not requeued \
                    and self.launcher_state() == "dead":
                return self._mark_launcher_lost(status)  # the job goes on without tflaunch (killed inside it)
            return dict(status, slurm=live)
        current = self._read_status_file() or status  # tflaunch inside the job may just have finished
        if current.get("status") in TERMINAL:
            return current
        output = os.path.join(self.dir, LOG_DIR, f"slurm-{job}.out")
        from ..tail import tail_bytes
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
