"""The outcome policy of a run: what each process's exit means, when the run stops and how it ends.

:class:`FailFast` is the policy of every distribution today: the first process that fails is the root
cause and stops the run at once, on every host; where the distribution's lead decides
(:attr:`~tflaunch.plan.distributions.Distribution.lead_decides`: the chief, else worker 0, of a ps or
multiworker job) its exit 0 is the run's outcome and the others wind down (stopped at once, or given
the grace period to end on their own, the evaluator ``evaluator_grace``); the timeout
(``max_run_duration_seconds``) and cancel stop the run; a scheduler that stopped the processes
(a Slurm time limit, a preemption) is asked why. The supervisor reports events to it and asks it for
the final fields; the launcher stops what it is told to stop. :class:`tflaunch.supervise.restart.Restarts`
is the policy of a run with a recovery: it extends this one.
"""
from __future__ import annotations

import logging
import signal
import time

from ..launch.hostrun import LAUNCHER_INDEX
from ..history.store import CANCELED, COMPLETED, FAILED

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Callable

    from ..launch.launcher import Launcher
    from ..launch.session import Session

__all__ = ["FailFast", "signal_name", "how"]

log = logging.getLogger(__name__)


def signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def how(rc: int) -> str:
    return f"was killed by {signal_name(rc)}" if rc < 0 else f"exited with code {rc}"


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(str(r) for r in sorted(ranks)[:8])
    return shown + (", ..." if len(ranks) > 8 else "")


class FailFast:
    """The first failure ends the run; the lead's success ends it too where the distribution says so."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.launcher: Launcher | None = None  # set by the supervisor once chosen
        self.dist = session.distribution
        self.deadline: float | None = None  # max_run_duration_seconds, counted from the first start
        self.evaluator_grace = float((session.spec.distributed or {}).get("evaluator_grace") or 0)
        self.begin_attempt()

    def begin_attempt(self) -> None:
        """Forget what the previous attempt's processes did (the timeout still counts from the first start)."""
        self.returncodes: dict[int, int] = {}
        self.failure: dict[str, Any] | None = None  # the first process that failed
        self.stop_reason: str | None = None  # canceled|timeout|launch_failed|agent_lost|internal|external|exit_code|signal|...
        self.stop_detail = ""
        self.killed = False
        self.lead_done = False  # the lead exited 0: the others wind down
        self.lead_ended = 0.0
        self.wind_down: dict[int, float] = {}  # rank -> when tflaunch stops it (after the lead ended)
        self.stopping: set[int] = set()  # ranks tflaunch stopped after the lead ended: not failures

    # -- stopping ------------------------------------------------------------------------------------
    def stop(self, reason: str, detail: str) -> None:
        if self.stop_reason is None:
            self.stop_reason, self.stop_detail = reason, detail
            self.wind_down.clear()  # everything is being stopped now
            log.info("stopping run %s: %s", self.session.record.id, detail)
            self.session.terminate_all(self.session.grace)

    def cancel(self, detail: str) -> None:
        self.stop("canceled", detail)

    def kill_now(self) -> None:
        self.stop("canceled", "killed (Ctrl-C twice)")
        self.killed = True
        self.session.kill_all()

    # -- time ----------------------------------------------------------------------------------------
    def running(self, now: float) -> None:
        """The first process has started: the timeout counts from now."""
        seconds = self.session.spec.max_run_duration_seconds
        if seconds and self.deadline is None:
            self.deadline = now + float(seconds)

    def status_fields(self) -> dict[str, Any]:
        """What the run object says about the policy's state while the run goes (none here)."""
        return {}

    def restart_due(self) -> float | None:
        """The attempt has ended: seconds until the next one starts, or None when the run ends now."""
        return None

    def pending(self) -> bool:
        """Processes are due to be started again within this attempt (the loop must not end yet)."""
        return False

    def wakeup(self) -> float | None:
        """When :meth:`tick` has something to do next (None: only on events)."""
        times = [t for t in [self.deadline, *self.wind_down.values()] if t is not None]
        return min(times) if times else None

    def tick(self, now: float) -> None:
        if self.wind_down and self.stop_reason is None:
            self._wind_down(now)
        if self.deadline is not None and now >= self.deadline:
            if self.lead_done:  # the lead's outcome stands: only the stragglers are stopped
                self.wind_down = {rank: now for rank in self.wind_down}
                self._wind_down(now)
            else:
                self.stop("timeout", f"run exceeded max_run_duration_seconds="
                                     f"{self.session.spec.max_run_duration_seconds:g} and was stopped")
            self.deadline = None
        if self.stop_reason is None and not self.lead_done:
            requeue = self.session.scheduler.tick(now)  # before the job's time limit: stop, to be requeued
            if requeue is not None:
                self.stop(*requeue)

    # -- exits ---------------------------------------------------------------------------------------
    def process_exited(self, host: str, index: int, rc: int) -> None:
        """A process of the run ended with ``rc`` (negative: killed by that signal)."""
        self.returncodes[index] = rc
        self.wind_down.pop(index, None)
        self.session.record.event("process_exited", index=index, returncode=rc, host=host)
        if self.stop_reason is not None or index in self.stopping:
            pass
        elif self.lead_done:  # after the lead: its outcome stands; a late failure is worth a warning
            if rc != 0:
                self.session.warnings.append(f"{self._who(index, host)} {how(rc)} after the "
                                             f"{self._role_text(0)} had ended")
        elif rc != 0:
            self._fail(host, index, rc)
        elif index == 0 and self.dist.lead_decides:
            self._lead_finished()

    def launcher_exited(self, name: str, host: str, rc: int, last_words: Callable[[], str]) -> None:
        """The one process that started every rank (mpirun, an srun step) ended with ``rc``."""
        if self.stop_reason is not None:
            return
        processes = self.session.processes
        missing = [r for r in processes if r not in self.returncodes]
        wound_down = self.lead_done and all(r in self.stopping or self.returncodes.get(r) == 0 for r in processes)
        if rc != 0 and not wound_down:
            if self._stopped_by_scheduler(rc):
                return
            last = last_words()
            self.failure = {"index": LAUNCHER_INDEX, "rank": None, "host": host, "returncode": rc}
            self.stop("signal" if rc < 0 else "exit_code",
                      f"{name} {how(rc)}" + (f" before rank(s) {_ranks(missing)} reported" if missing else "")
                      + (f": {last}" if last else ""))
        elif wound_down:
            for r in missing:  # stopped by tflaunch after the lead ended: not failures
                self.returncodes[r] = -15
        elif missing:
            for r in missing:
                self.returncodes[r] = 0
            self.session.warnings.append(f"rank(s) {_ranks(missing)} did not report their exit status; {name} "
                                         "exited with code 0, so they are counted as successful")

    def _role_text(self, rank: int) -> str:
        p = self.session.processes.get(rank)
        return f"{p.role} {p.index}" if p else f"rank {rank}"

    def _who(self, rank: int, host: str) -> str:
        session = self.session
        if len(session.processes) <= 1:
            return session.spec.entry_script
        if self.dist.roles:
            return f"{session.spec.entry_script} ({self._role_text(rank)}, rank {rank} on host {host})"
        return f"{session.spec.entry_script} (rank {rank} on host {host})"

    def _fail(self, host: str, index: int, rc: int) -> None:
        """Fail fast: the first process to fail ends the run; it is the root cause."""
        session = self.session
        p = session.processes.get(index)
        self.failure = {"index": index, "rank": index, "host": host, "returncode": rc}
        if p is not None and self.dist.roles:
            self.failure.update(role=p.role, task_index=p.index)
        if self._stopped_by_scheduler(rc):
            return
        self.stop("signal" if rc < 0 else "exit_code", f"{self._who(index, host)} {how(rc)}")

    def _stopped_by_scheduler(self, rc: int) -> bool:
        """Whether the scheduler stops the job's tasks itself (runs cancel + scancel, a time limit, a
        preemption, a requeue): then the run stops, saying why."""
        session = self.session
        if not session.scheduler.stops_tasks(rc):
            return False
        request = session.record.cancel_requested()
        ended = ("canceled", str(request.get("reason"))) if request else session.scheduler.ending(wait=1.0)
        if ended is not None:
            self.stop(*ended)
        return ended is not None

    def _lead_finished(self) -> None:
        """The lead exited 0: the run's outcome. ps tasks, and the workers of a parameter-server job, block
        in ``server.join()``: stop them now; where the distribution says "grace" (multiworker peers) they
        get the grace period to end on their own, the evaluator ``evaluator_grace``; then they are stopped."""
        self.lead_done = True
        self.lead_ended = now = time.monotonic()
        session = self.session
        for rank, p in session.processes.items():
            if rank in self.returncodes:
                continue
            if p.role == "evaluator":
                self.wind_down[rank] = now + self.evaluator_grace
            elif self.dist.after_lead == "grace":
                self.wind_down[rank] = now + session.grace
            else:
                self.wind_down[rank] = now
        log.info("run %s: %s exited with code 0; stopping the tasks still running", session.record.id,
                 self._role_text(0))
        self._wind_down(now)

    def _wind_down(self, now: float) -> None:
        launcher = self.launcher
        if launcher is not None and launcher.ranks_stop_together:
            # one launcher for every rank: they stop together, once the last of them is due
            if self.wind_down and all(at <= now for at in self.wind_down.values()):
                ranks = list(self.wind_down)
                self.stopping.update(ranks)
                self.wind_down.clear()
                launcher.stop_ranks(ranks)
            return
        due = [rank for rank, at in self.wind_down.items() if at <= now]
        if not due:
            return
        for rank in due:
            del self.wind_down[rank]
            p = self.session.processes[rank]
            if p.role == "evaluator" and now > self.lead_ended:
                self.session.warnings.append(f"the {self._role_text(rank)} was still running "
                                             f"{now - self.lead_ended:.0f} s after the {self._role_text(0)} ended "
                                             "and was stopped")
        self.stopping.update(due)
        if launcher is not None:
            launcher.stop_ranks(due)

    # -- the end -------------------------------------------------------------------------------------
    def outcome(self, stderr_tail: Callable[[int], str], prep_tail: str = "",
                exception: Callable[[int], str | None] | None = None) -> dict[str, Any]:
        """The run object's final fields: status, exit_code / signal, error (with the failed process's
        last lines of stderr: ``stderr_tail(index)``, or ``prep_tail`` when a host could not be prepared;
        and the last exception line of its Python traceback: ``exception(index)``, when there is one)."""
        fields: dict[str, Any] = {"exit_code": None, "signal": None, "error": None}
        failure = self.failure
        if failure is not None:
            rc = failure["returncode"]
            fields["signal" if rc < 0 else "exit_code"] = signal_name(rc) if rc < 0 else rc
        elif self.returncodes.get(0) is not None and self.stop_reason in ("canceled", "timeout"):
            rc = self.returncodes[0]
            fields["signal" if rc < 0 else "exit_code"] = signal_name(rc) if rc < 0 else rc
        reason = self.stop_reason
        if reason == "canceled":
            return {"status": CANCELED, **fields, "cancel_reason": self.stop_detail}
        if reason is not None:
            fields["error"] = {"reason": reason, "message": self.stop_detail}
            if failure is not None:
                fields["error"].update({k: failure[k] for k in ("rank", "host", "role", "task_index")
                                        if k in failure})
        else:
            processes = self.session.processes
            missing = [i for i in processes if i not in self.returncodes] or not processes
            if not missing:
                fields["exit_code"] = 0
                return {"status": COMPLETED, **fields}
            fields["error"] = {"reason": "internal", "message": "the processes' exit statuses were not reported"}
        index = failure["index"] if failure else 0
        tail_text = prep_tail or stderr_tail(index)
        if tail_text:
            fields["error"]["stderr_tail"] = tail_text
        line = exception(index) if exception is not None and not prep_tail else None
        if line:
            fields["error"]["exception"] = line
        return {"status": FAILED, **fields}
