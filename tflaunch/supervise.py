"""Supervision: the launcher's side of a run, from Preparing to its final status.

:class:`Supervisor` holds the run's lease (heartbeat), builds the working copy, starts the processes
through an agent (:mod:`tflaunch.launch`), streams their output when attached, enforces the timeout,
turns Ctrl-C / SIGTERM / SIGHUP / ``runs cancel`` into a graceful stop (SIGTERM, then SIGKILL after the
grace period; a second Ctrl-C kills at once), moves ``./outputs`` and ``./logs`` into the record and
writes the final status. :func:`spawn_detached` runs the same supervisor in a background process
(``run --detach``, :meth:`tflaunch.Experiment.submit`).
"""
from __future__ import annotations

import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time

from . import agent as agent_mod
from . import fsio, tail
from .errors import TflaunchError
from .launch import AgentConnection
from .launch.local import discard_agent, start_local
from .plan import RunContext, plan
from .snapshot import MANIFEST, materialize
from .spec import JobSpec
from .store import (CANCELED, COMPLETED, FAILED, FINALIZING, LOG_DIR, RUNNING, TERMINAL, RunRecord, Store,
                    now_iso)

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, TextIO

__all__ = ["Supervisor", "spawn_detached", "detached_main", "DEFAULT_GRACE"]

log = logging.getLogger(__name__)

DEFAULT_GRACE = 10.0
ORPHAN_GRACE = 2.0
CANCEL_POLL = 0.5
STREAM_POLL = 0.1


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


class Supervisor:
    """Runs one prepared run record to completion in this process."""

    def __init__(self, record: RunRecord, *, stream: bool = False, stdout: TextIO | None = None,
                 stderr: TextIO | None = None, on_lease: Any = None,
                 agent_process: subprocess.Popen | None = None) -> None:
        self.record = record
        self.definition = record.definition()
        self.spec = JobSpec.from_dict(self.definition["spec"])
        self.grace = float(self.definition.get("grace", DEFAULT_GRACE))
        self.stream = stream
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.on_lease = on_lease
        self.agent: AgentConnection | None = None
        self._agent_process = agent_process  # started early by the caller (see spawn_agent)
        self.pgids: set[int] = set()
        self.returncodes: dict[int, int] = {}
        self.stop_reason: str | None = None  # canceled|timeout|launch_failed|agent_lost|internal|external
        self.stop_detail = ""
        self.killed = False
        self.done = False
        self._signals: list[int] = []
        self._interrupts = 0
        self._followers: list[tail.Follower] = []
        scratch = self.definition.get("scratch")
        self.work_dir = os.path.join(scratch, record.id) if scratch else record.work_dir

    # -- signals -------------------------------------------------------------------------------------
    def _install_signals(self) -> tuple[Any, ...]:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        old_fd = signal.set_wakeup_fd(self._wake_w)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        return old_fd, old

    def _restore_signals(self, saved: tuple[Any, ...]) -> None:
        old_fd, old = saved
        signal.set_wakeup_fd(old_fd)
        for s, handler in old.items():
            signal.signal(s, handler)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals.append(signum)

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGINT:
                self._interrupts += 1
                if self._interrupts > 1:
                    self._kill_now()
                    continue
                self.cancel("interrupted (Ctrl-C)")
                log.info("press Ctrl-C again to kill the run's processes now")
            else:
                request = self.record.cancel_requested()  # `runs cancel` writes a request, then signals
                self.cancel(str(request.get("reason")) if request else
                            f"launcher received {signal.Signals(signum).name}")

    # -- stopping ------------------------------------------------------------------------------------
    def _stop(self, reason: str, detail: str) -> None:
        if self.stop_reason is None:
            self.stop_reason, self.stop_detail = reason, detail
            log.info("stopping run %s: %s", self.record.id, detail)
            if self.agent is not None:
                self.agent.terminate(self.grace)

    def cancel(self, detail: str) -> None:
        self._stop("canceled", detail)

    def _kill_now(self) -> None:
        self._stop("canceled", "killed (Ctrl-C twice)")
        self.killed = True
        if self.agent is not None:
            self.agent.kill()

    # -- main ----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Supervise the run and return its final run object."""
        saved = self._install_signals()
        try:
            self.record.write_lease()
            if self.on_lease is not None:
                self.on_lease()
            try:
                self._prepare_and_launch()
                if self.agent is not None:
                    self._loop()
            except BaseException as exc:  # never leave a run Running or processes behind
                log.exception("run %s: launcher error", self.record.id)
                self._stop("internal", f"tflaunch internal error: {exc!r}")
                self._abandon_agent()
                if not isinstance(exc, Exception):
                    raise
            return self._finalize()
        finally:
            if self._agent_process is not None:  # never used: canceled before launch
                discard_agent(self._agent_process)
            for f in self._followers:
                f.close()
            self._restore_signals(saved)

    def _prepare_and_launch(self) -> None:
        record = self.record
        self._check_cancel()
        manifest = fsio.read_json(record.path(MANIFEST))
        materialize(manifest, record.store.home, self.work_dir)
        for name in ("outputs", "logs"):
            os.makedirs(os.path.join(self.work_dir, name), exist_ok=True)
        self._handle_signals()
        self._check_cancel()
        if self.stop_reason:
            return
        ctx = RunContext(run_id=record.id, experiment=self.definition["experiment"], run_dir=record.dir,
                         work_dir=self.work_dir, home=record.store.home)
        processes = plan(self.spec, ctx)
        if self.stream:
            for p in processes:
                self._followers.append(tail.Follower(record.path(p.stdout), self.stdout))
                self._followers.append(tail.Follower(record.path(p.stderr), self.stderr))
        with open(record.path(LOG_DIR, "launcher.log"), "ab") as agent_log:
            self.agent = start_local(processes, token=record.id, run_dir=record.dir, grace=self.grace,
                                     orphan_grace=ORPHAN_GRACE, log=agent_log, agent=self._agent_process)
        self._agent_process = None

    def _check_cancel(self) -> None:
        request = self.record.cancel_requested()
        if request is not None:
            self.cancel(str(request.get("reason") or "cancel requested"))

    def _loop(self) -> None:
        assert self.agent is not None
        selector = selectors.DefaultSelector()
        selector.register(self.agent.fileno(), selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        lease = self.record.lease() or {}
        interval = float(lease.get("interval", 2.0))
        next_beat = time.monotonic() + interval
        next_cancel_poll = time.monotonic() + CANCEL_POLL
        deadline = None
        try:
            while not self.done:
                now = time.monotonic()
                wait = min(next_beat, next_cancel_poll) - now
                if deadline is not None:
                    wait = min(wait, deadline - now)
                if self.stream:
                    wait = min(wait, STREAM_POLL)
                for key, _ in selector.select(max(0.0, wait)):
                    if key.fd == self._wake_r:
                        try:
                            os.read(self._wake_r, 4096)
                        except BlockingIOError:
                            pass
                self._handle_signals()
                for event in self.agent.read_events():
                    started = self._on_event(event)
                    if started and self.spec.max_run_duration_seconds:
                        deadline = time.monotonic() + float(self.spec.max_run_duration_seconds)
                if self.agent.eof and not self.done:
                    self._stop("agent_lost", "the tflaunch agent ended unexpectedly")
                    self._abandon_agent()
                    break
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    self._stop("timeout", f"run exceeded max_run_duration_seconds="
                                          f"{self.spec.max_run_duration_seconds:g} and was stopped")
                    deadline = None
                if now >= next_cancel_poll:
                    self._check_cancel()
                    next_cancel_poll = now + CANCEL_POLL
                if now >= next_beat:
                    self._heartbeat()
                    next_beat = now + interval
                if self.stream:
                    for f in self._followers:
                        f.poll()
        finally:
            selector.close()
            if self.agent is not None:
                self.agent.close()
        for f in self._followers:
            f.poll(final=True)

    def _on_event(self, event: dict[str, Any]) -> bool:
        kind = event.get("event")
        if kind == "started":
            self.pgids.add(int(event["pid"]))
            self.record.event("process_started", index=event.get("index"), pid=event.get("pid"))
            if len(self.pgids) == 1:
                self.record.write_status(RUNNING, started=now_iso())
                if self.stop_reason and self.agent is not None:  # canceled while starting
                    self.agent.terminate(0 if self.killed else self.grace)
                return True
        elif kind == "exited":
            self.returncodes[int(event["index"])] = int(event["returncode"])
            self.record.event("process_exited", index=event.get("index"), returncode=event.get("returncode"))
        elif kind == "spawn_failed":
            self._stop("launch_failed", f"could not start {self.spec.entry_script}: {event.get('error')}")
        elif kind == "done":
            self.done = True
        return False

    def _heartbeat(self) -> None:
        try:
            self.record.write_lease()
        except OSError as exc:
            log.warning("run %s: cannot renew the lease: %s", self.record.id, exc)
        current = self.record.read_status(check_lease=False) or {}
        if current.get("status") in TERMINAL:  # someone declared us lost: stop, don't overwrite
            log.error("run %s was finalized by another process (%s); stopping", self.record.id,
                      (current.get("error") or {}).get("reason"))
            self._stop("external", "finalized elsewhere")
            self._abandon_agent()
            self.done = True

    def _abandon_agent(self) -> None:
        """Stop every process of the run without the agent's help."""
        if self.agent is not None:
            self.agent.kill()
        agent_mod.stop_run(self.record.id, self.pgids, 1.0, {os.getpid()})

    # -- finalize ------------------------------------------------------------------------------------
    def _stderr_tail(self) -> str:
        data = tail.tail_bytes(self.record.path(LOG_DIR, "rank-0.stderr"))
        lines = data.decode("utf-8", "replace").replace("\r", "\n").splitlines()
        return "\n".join(lines[-10:])

    def _outcome(self) -> dict[str, Any]:
        rc = self.returncodes.get(0)
        fields: dict[str, Any] = {"exit_code": None, "signal": None, "error": None}
        if rc is not None:
            if rc < 0:
                fields["signal"] = _signal_name(rc)
            else:
                fields["exit_code"] = rc
        reason = self.stop_reason
        if reason == "canceled":
            return {"status": CANCELED, **fields, "cancel_reason": self.stop_detail}
        if reason is not None:
            fields["error"] = {"reason": reason, "message": self.stop_detail}
        elif rc == 0:
            return {"status": COMPLETED, **fields}
        elif rc is None:
            fields["error"] = {"reason": "internal", "message": "the process's exit status was not reported"}
        elif rc < 0:
            fields["error"] = {"reason": "signal", "message": f"{self.spec.entry_script} was killed by "
                                                               f"{fields['signal']}"}
        else:
            fields["error"] = {"reason": "exit_code", "message": f"{self.spec.entry_script} exited with code {rc}"}
        stderr_tail = self._stderr_tail()
        if stderr_tail:
            fields["error"]["stderr_tail"] = stderr_tail
        return {"status": FAILED, **fields}

    def _finalize(self) -> dict[str, Any]:
        record = self.record
        if self.stop_reason == "external":
            return record.read_status(check_lease=False) or {}
        outcome = self._outcome()
        try:
            record.write_status(FINALIZING)
        except OSError as exc:
            log.warning("run %s: cannot record Finalizing: %s", record.id, exc)
        try:
            record.collect_outputs(self.work_dir)
        except OSError as exc:
            reason = "disk_full" if fsio.is_disk_full(exc) else "collect_failed"
            message = (f"collecting ./outputs and ./logs into the record failed: {exc.strerror or exc}; "
                       f"the files were left in {self.work_dir}")
            previous = outcome.get("error")
            if previous:
                previous["message"] += f"; then {message}"
            else:
                note = f"{outcome.get('cancel_reason')}; then " if outcome["status"] == CANCELED else ""
                outcome.update(status=FAILED, error={"reason": reason, "message": note + message})
                outcome.pop("cancel_reason", None)
        else:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        outcome["ended"] = now_iso()
        record.release_reserve()
        current = record.read_status(check_lease=False) or {}
        if current.get("status") in TERMINAL:
            return current
        status = outcome.pop("status")
        final = record.write_status(status, **outcome)
        try:
            os.unlink(record.path("lease.json"))
        except OSError:
            pass
        return final


# ---------------------------------------------------------------------------------------------------
# detached supervisor

_DETACHED_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
                  "from tflaunch.supervise import detached_main; sys.exit(detached_main(sys.argv[2:]))")


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spawn_detached(record: RunRecord, timeout: float = 60.0) -> int:
    """Start a background supervisor for ``record``; return its pid once it holds the lease.

    If it does not get that far, the run is recorded Failed (``launch_failed``) and TflaunchError raised.
    """
    log_path = record.path(LOG_DIR, "launcher.log")
    ready_r, ready_w = os.pipe()
    got = b""
    try:
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _DETACHED_BOOT, _package_root(), "--home", record.store.home,
                 "--ready-fd", str(ready_w), record.id],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True,
                pass_fds=(ready_w,), close_fds=True)
        os.close(ready_w)
        ready_w = -1
        deadline = time.monotonic() + timeout
        while b"\n" not in got:  # "ready\n" once it holds the lease; EOF if it died first
            left = deadline - time.monotonic()
            chunk = _read_with_timeout(ready_r, left) if left > 0 else b""
            if not chunk:
                break
            got += chunk
        error = "" if got.startswith(b"ready") else f"exit status {proc.poll()}"
    except OSError as exc:
        error = str(exc)
    finally:
        for fd in (ready_r, ready_w):
            if fd >= 0:
                os.close(fd)
    if error:
        message = f"the background supervisor for run {record.id} did not start ({error}); see {log_path}"
        record.write_status(FAILED, ended=now_iso(), error={"reason": "launch_failed", "message": message})
        raise TflaunchError(message)
    return proc.pid


def _read_with_timeout(fd: int, timeout: float) -> bytes:
    import select

    ready, _, _ = select.select([fd], [], [], timeout)
    return os.read(fd, 64) if ready else b""


def detached_main(argv: list[str]) -> int:
    """Entry point of the background supervisor (``--home H --ready-fd N RUN_ID``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="tflaunch-supervisor")
    parser.add_argument("--home", required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("run_id")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s supervisor %(levelname)s %(message)s")
    record = Store(args.home).run(args.run_id)

    def ready() -> None:
        os.write(args.ready_fd, b"ready\n")
        os.close(args.ready_fd)

    try:
        Supervisor(record, stream=False, on_lease=ready).run()
    except Exception:
        log.exception("supervisor for run %s failed", args.run_id)
        return 1
    return 0
