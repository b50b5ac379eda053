"""The supervisor: one run from Preparing to its final status, in this process.

It holds the run's lease (heartbeat), materializes the working copy, has the run's launcher
(:mod:`tflaunch.launch.launcher`) start the processes, serves the agents' events (output to the
record's logs and, when attached, the console), watches for signals and ``runs cancel`` requests, and
leaves what each exit means to the outcome policy (:mod:`tflaunch.supervise.policy`) and what
allocates the hosts to the scheduler (:mod:`tflaunch.schedule`). At the end it has the launcher clean up,
brings remote ``./outputs`` and ``./logs`` home and writes the final status
(:mod:`tflaunch.supervise.finalize`), unless the scheduler requeues the job: then the run goes on in
its next allocation (:mod:`tflaunch.supervise.requeue`). It never tests which distribution, launcher or
scheduler a run has.
"""
from __future__ import annotations

import logging
import os
import select
import sys
import time

from .. import fsio, progress
from ..errors import SpecError
from ..launch.hostprep import HostPrep, PrepFailure
from ..launch.hostrun import LAUNCHER_INDEX, LaunchFailure
from ..launch.launcher import launcher_for
from ..launch.local import discard_agent
from ..launch.session import Session
from ..launch.transfer import collect_remote
from ..plan.processes import plan
from ..schedule import scheduler_for
from ..history.snapshot import MANIFEST, materialize
from ..spec import JobSpec
from ..history.store import LOG_DIR, RUNNING, TERMINAL, now_iso
from ..history.withheld import DEFINITION_KEY as WITHHELD
from .finalize import finalize, stderr_exception, stderr_tail
from .signals import SignalHandling
from .policy import FailFast
from .requeue import REQUEUED, Requeues

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, TextIO

    from ..launch import AgentConnection
    from ..launch.hostrun import HostRun
    from ..history.store import RunRecord
    from .watchdog import HangWatchdog

__all__ = ["Supervisor", "DEFAULT_GRACE"]

log = logging.getLogger(__name__)

DEFAULT_GRACE = 10.0
CANCEL_POLL = 0.5
STREAM_POLL = 0.1


def hang_watchdog(session: Session) -> HangWatchdog | None:
    """The run's hang watchdog (:mod:`tflaunch.supervise.watchdog`), None when it has no ``hang_timeout``."""
    if not (session.spec.recovery or {}).get("hang_timeout"):
        return None
    from .watchdog import HangWatchdog

    return HangWatchdog(session)


class _RanksStarting:
    """The ranks stage's progress in an attempt: ``ranks: 6/8 running`` until every one has started (one
    process that starts them all, mpirun or an srun step: once it has started)."""

    def __init__(self, session: Session, launcher: str) -> None:
        self.session = session
        self.launcher = launcher
        self.seen: set[tuple[str, Any]] = set()
        self.done = False

    def started(self, host: str, index: Any) -> None:
        if self.done:
            return
        total = len(self.session.processes)
        if index == LAUNCHER_INDEX:
            self.done = True
            progress.report("ranks", f"ranks: {self.launcher} started, {total} rank{'s' if total != 1 else ''}",
                            done=True)
            return
        self.seen.add((host, index))
        self.done = len(self.seen) >= total
        progress.report("ranks", f"ranks: {len(self.seen)}/{total} running", done=self.done)


class Supervisor(SignalHandling):
    """Runs one prepared run record to completion in this process."""

    def __init__(self, record: RunRecord, *, stream: bool = False, stdout: TextIO | None = None,
                 stderr: TextIO | None = None, on_lease: Any = None,
                 agents: dict[str, AgentConnection] | None = None) -> None:
        self.record = record
        definition = record.definition()
        spec = JobSpec.from_dict(definition["spec"])
        withheld = list(definition.get(WITHHELD) or ())  # secret variables: their values are not in run.json
        values = record.withheld_values() if withheld else {}
        spec.environment_variables.update({k: v for k, v in values.items() if k in withheld})
        self.missing_withheld = [name for name in withheld if name not in values]
        self.keep_withheld = bool((spec.recovery or {}).get("max_requeues"))  # the next allocation needs them
        self.scheduler = scheduler_for(record, spec.compute_target)
        spec.compute_target = self.scheduler.allocation(spec)
        scratch = definition.get("scratch")
        self.session = session = Session(
            record, spec, self.scheduler, experiment=definition["experiment"],
            grace=float(definition.get("grace", DEFAULT_GRACE)),
            work_dir=os.path.join(scratch, record.id) if scratch else record.work_dir, stream=stream,
            stdout=stdout or sys.stdout, stderr=stderr or sys.stderr)
        self.spec = spec
        self.on_lease = on_lease
        self._prestarted = dict(agents or {})  # started early by the caller (see prestart_agents)
        self.requeues = Requeues(session)  # first: a requeued run's next allocation goes on with its attempt
        recovery = spec.recovery or {}
        if recovery.get("max_restarts") or recovery.get("restart_on_exit_codes") or recovery.get("hang_timeout"):
            from .restart import Restarts

            self.policy: FailFast = Restarts(session, recovery)
        else:
            self.policy = FailFast(session)
        session.policy = self.policy
        session.serve = self._serve
        session.prep = self.prep = HostPrep(session)  # setup lines, the job's environment, preflight, data inputs
        self.launcher = self.policy.launcher = launcher_for(session)
        self.starting = _RanksStarting(session, self.launcher.name)
        self.watchdog = hang_watchdog(session)  # None without a hang_timeout
        self.running = False  # a process has started (status Running)
        self._launched = False  # an attempt was launched in this process (its logs followed, its inputs recorded)
        self.prep_tail = ""  # output of the preparation step that failed
        self._signals: list[int] = []
        self._interrupts = 0
        self._next_cancel_poll = 0.0

    # -- main ----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Supervise the run and return its final run object."""
        session, policy = self.session, self.policy
        saved = self._install_signals()
        try:
            self.record.write_lease(**self.scheduler.lease_fields())
            fields = self.scheduler.status_fields([h.name for h in session.hosts])
            if fields:
                self.record.write_status(**fields)
            if self.on_lease is not None:
                self.on_lease()
            try:
                self.requeues.begin()  # in a requeued job's next allocation: go on, or end before the start
                self._attempts()
                collect_remote(session)
            except BaseException as exc:  # never leave a run Running or processes behind
                log.exception("run %s: launcher error", self.record.id)
                policy.stop("internal", f"tflaunch internal error: {exc!r}")
                session.abandon_agents()
                if not isinstance(exc, Exception):
                    raise
            finally:
                for run in session.runs:
                    run.conn.close()
            if policy.stop_reason == "external":
                return self.record.read_status(check_lease=False) or {}
            if policy.stop_reason == REQUEUED and (queued := self.requeues.hand_over()) is not None:
                return queued  # the run goes on in the job's next allocation
            outcome = policy.outcome(lambda index: stderr_tail(session, self.launcher, index), self.prep_tail,
                                     lambda index: stderr_exception(session, self.launcher, index))
            return finalize(session, outcome)
        finally:
            for conn in self._prestarted.values():  # never used: canceled before launch
                if conn.popen.stdin is not None and not conn.popen.stdin.closed:
                    discard_agent(conn.popen)
            for f in session.followers:
                f.close()
            session.close()
            self.launcher.close()
            self.prep.close()
            self._restore_signals(saved)

    def _attempts(self) -> None:
        """Attempts of the run until one ends it (the policy says when another is due)."""
        policy = self.policy
        while True:
            try:
                self._prepare_and_launch()
                if self.session.started:
                    self._loop()
                self.launcher.finish()
            except LaunchFailure as exc:
                policy.stop("launch_failed", str(exc))
            except PrepFailure as exc:
                self.prep_tail = exc.tail
                policy.stop(exc.reason, str(exc))
            delay = policy.restart_due()
            if delay is None or not self._recover(delay):
                return

    def _recover(self, delay: float) -> bool:
        """Between two attempts: Recovering for ``delay`` s, then a new launcher and host preparation."""
        from .restart import between_attempts

        interval = float((self.record.lease() or {}).get("interval", 2.0))
        if not between_attempts(self.session, delay, self._heartbeat, interval):
            return False
        self.launcher.close()
        self.prep.close()
        self.session.prep = self.prep = HostPrep(self.session)
        self.launcher = self.policy.launcher = launcher_for(self.session)
        self.running = False
        self.prep_tail = ""
        return True

    def _prepare_and_launch(self) -> None:
        record, session = self.record, self.session
        first, self._launched = not self._launched, True
        if self.scheduler.error:
            raise LaunchFailure(self.scheduler.error)
        if self.missing_withheld:
            raise LaunchFailure(f"the values of {', '.join(self.missing_withheld)} were withheld from the record and "
                                "are gone (they are kept only until a run's processes start): rerun it with them in "
                                "the environment or --env NAME=VALUE")
        self.launcher.begin()
        self.starting = _RanksStarting(session, self.launcher.name)
        self._check_cancel()
        if self.requeues.needs_copy(session.work_dir, first):  # later attempts, requeued ones too, go on in it
            manifest = fsio.read_json(record.path(MANIFEST))
            materialize(manifest, record.store.home, session.work_dir)
        self.requeues.restore(session.work_dir)  # ./outputs, ./logs (with what a previous allocation left)
        if first:
            self.prep.record_inputs()
        self._handle_signals()
        self._check_cancel()
        if self.policy.stop_reason:
            return
        home_env = self.prep.reuse_home_environment()  # built already: no host needs to be asked
        try:
            preview = plan(self.spec, session.context(), session.hosts,
                           pythons={h.name: home_env.python for h in session.hosts} if home_env else None)
        except SpecError as exc:
            raise LaunchFailure(str(exc)) from None
        prefix = len(preview) > 1
        for p in preview if first else ():
            session.follow(p.stdout, p.label if prefix else "", stderr=False)
            session.follow(p.stderr, p.label if prefix else "")
        if first:
            self.launcher.follow()
        with open(record.path(LOG_DIR, "launcher.log"), "ab") as agent_log:
            self.launcher.connect(agent_log, self._prestarted)
        self.launcher.start(preview)

    # -- events --------------------------------------------------------------------------------------
    def _serve(self, timeout: float) -> None:
        """Wait up to ``timeout`` for events or signals and handle them (and `runs cancel` requests)."""
        session = self.session
        fds = [self._wake_r] + [run.conn.fileno() for run in session.runs if not run.conn.eof]
        try:
            ready = select.select(fds, [], [], max(0.0, timeout))[0]
        except InterruptedError:
            ready = []
        if self._wake_r in ready:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
        self._handle_signals()
        for run in session.runs:
            if run.conn.eof:
                continue
            for event in run.conn.read_events():
                self._on_event(run, event)
        session.keepalive(time.monotonic())  # the agents' leases: each stops the run on its host without us
        if time.monotonic() >= self._next_cancel_poll:  # `runs cancel` from another machine: a request file
            self._check_cancel()
            self._next_cancel_poll = time.monotonic() + CANCEL_POLL

    def _on_event(self, run: HostRun, event: dict[str, Any]) -> None:
        if self.watchdog is not None and self.watchdog.on_event(run, event):
            return
        if self.launcher.on_event(run, event) or self.prep.on_event(run, event) or self.session.on_event(run, event):
            return
        kind = event.get("event")
        policy = self.policy
        if kind == "started":
            if run.conn.local:
                self.session.pgids.add(int(event["pid"]))
            self.record.event("process_started", index=event.get("index"), pid=event.get("pid"), host=run.name)
            self.starting.started(run.name, event.get("index"))
            if not self.running:
                self.running = True
                if not self.keep_withheld:
                    self.record.drop_withheld()
                started = {} if (self.record.read_status(check_lease=False) or {}).get("started") else \
                    {"started": now_iso()}
                self.record.write_status(RUNNING, **started, **self.prep.status_fields, **policy.status_fields())
                policy.running(time.monotonic())
            if policy.stop_reason:  # stopped while starting
                run.conn.terminate(0 if policy.killed else self.session.grace)
        elif kind == "exited":
            policy.process_exited(run.name, int(event["index"]), int(event["returncode"]))
        elif kind == "spawn_failed":
            policy.stop("launch_failed", f"could not start {self.spec.entry_script} on host {run.name}: "
                                         f"{event.get('error')}")

    def _loop(self) -> None:
        session, policy = self.session, self.policy
        lease = self.record.lease() or {}
        interval = float(lease.get("interval", 2.0))
        next_beat = time.monotonic() + interval
        self._next_cancel_poll = time.monotonic() + CANCEL_POLL
        watched = self.launcher.watched()
        while not all(run.finished for run in watched) or policy.pending():
            now = time.monotonic()
            wait = min(next_beat, self._next_cancel_poll) - now
            wakeup = policy.wakeup()
            if wakeup is not None:
                wait = min(wait, wakeup - now)
            watch = self.watchdog.wakeup() if self.watchdog is not None else None
            if watch is not None:
                wait = min(wait, watch - now)
            if session.stream:
                wait = min(wait, STREAM_POLL)
            self._serve(wait)
            for run in session.runs:
                if run.conn.eof and not run.conn.done and not run.error:
                    run.error = "lost"
                    detail = run.conn.stderr_tail()
                    policy.stop("agent_lost", f"lost the tflaunch agent on host {run.name}" +
                                (f": {detail}" if detail else ""))
                    if run.conn.local:
                        session.abandon_agents()
            now = time.monotonic()
            policy.tick(now)
            if self.watchdog is not None:
                self.watchdog.tick(now)
            if now >= next_beat:
                self._heartbeat()
                next_beat = now + interval
                if policy.stop_reason == "external":
                    break
            if session.stream:
                for f in session.followers:
                    f.poll()
        for f in session.followers:
            f.poll(final=True)

    def _heartbeat(self) -> None:
        try:
            self.record.write_lease(**self.scheduler.lease_fields())
        except OSError as exc:
            log.warning("run %s: cannot renew the lease: %s", self.record.id, exc)
        current = self.record.read_status(check_lease=False) or {}
        if current.get("status") in TERMINAL:  # someone declared us lost: stop, don't overwrite
            log.error("run %s was finalized by another process (%s); stopping", self.record.id,
                      (current.get("error") or {}).get("reason"))
            self.policy.stop("external", "finalized elsewhere")
            self.session.abandon_agents()
