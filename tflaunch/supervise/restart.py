"""The outcome policy of a run with a recovery (:class:`Restarts`, ``max_restarts`` and friends, see
:mod:`tflaunch.spec.recovery`), and what happens between two attempts (:func:`between_attempts`).

A failure that :class:`~tflaunch.supervise.policy.FailFast` would end the run with starts the run
again instead, while the budget lasts: a restart keeps the run id, its working directory (checkpoints
under ``./outputs`` survive) and its logs (appended, after a separator line); each one is an
``attempt`` (``TFLAUNCH_ATTEMPT`` in the processes' environment, counted from 1), recorded as a
``restart`` event and in the run object's ``restarts``. An exit code in ``restart_on_exit_codes``
restarts without using the budget. What starts again is the distribution's rule for the failed role
(:attr:`~tflaunch.plan.distributions.Distribution.restarts`): a parameter-server job restarts the
failed worker alone (same TF_CONFIG task and port, same host: the coordinator re-dispatches to it), a
failed ps with the chief (which re-creates the variables from its checkpoint), a failed chief alone,
and an evaluator's failure never fails the run; every other failure, and any failure of a launcher that
starts all ranks as one (mpirun, an srun step), ends the attempt: every process stops, the run is
``Recovering`` for ``restart_delay`` seconds (doubled after each counted failure), then a new attempt
starts them all. Cancel while Recovering ends the run Canceled; the budget used up ends it Failed with
the last cause. A timeout, a cancel, a failed preparation (a bad setup line, an environment that does
not build) and a scheduler ending the job are never restarted.
"""
from __future__ import annotations

import dataclasses
import logging
import time

from ..history.store import RECOVERING, now_iso
from ..spec.recovery import MAX_DELAY
from .policy import FailFast, how

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Callable

    from ..launch.session import Session

__all__ = ["Restarts", "RESTARTABLE", "between_attempts", "separator"]

log = logging.getLogger(__name__)

# stop reasons a new attempt may cure (a launch failure only once the job has run: a host that rebooted)
RESTARTABLE = frozenset({"exit_code", "signal", "agent_lost", "hung", "launch_failed"})
DONE_POLL = 0.05  # waiting for an agent's "done" before it is asked to start a process again


class Restarts(FailFast):
    """:class:`FailFast` within an attempt, a new attempt (or the failed tasks started again) after a
    failure, while the budget lasts."""

    def __init__(self, session: Session, recovery: dict[str, Any]) -> None:
        self.max_restarts = int(recovery.get("max_restarts") or 0)
        self.free_codes = set(recovery.get("restart_on_exit_codes") or ())
        self.base_delay = float(recovery.get("restart_delay") or 0.0)
        # each restart: attempt, ranks, cause (a requeued run's next allocation: those of the run so far)
        self.restarts: list[dict[str, Any]] = list(((session.record.read_status(check_lease=False) or {})
                                                    .get("restarts") or []) if session.attempt > 1 else [])
        self.used = sum(1 for r in self.restarts if r.get("counted", True))  # counted against max_restarts
        self.ever_started = False
        self.partial: dict[str, Any] | None = None  # some tasks due to start again: {"ranks", "at", "cause"}
        self.restarting: set[int] = set()  # ranks stopped or ended that start again: their exits are no failure
        super().__init__(session)

    def begin_attempt(self) -> None:
        super().begin_attempt()
        self.partial = None
        self.restarting = set()

    # -- the budget ----------------------------------------------------------------------------------
    def _counted(self, rc: int | None) -> bool:
        return not (rc is not None and rc > 0 and rc in self.free_codes)

    def _left(self, counted: bool) -> bool:
        return not counted or self.used < self.max_restarts

    def _spend(self, counted: bool, cause: dict[str, Any]) -> float:
        """Use a restart; return the delay before it."""
        if counted:
            self.used += 1
            return min(MAX_DELAY, self.base_delay * 2 ** (self.used - 1)) if self.base_delay else 0.0
        return self.base_delay

    def _cause(self, reason: str, message: str, failure: dict[str, Any] | None, counted: bool) -> dict[str, Any]:
        cause = {"reason": reason, "message": message, "counted": counted}
        for key in ("rank", "host", "role", "task_index", "returncode"):
            if failure and failure.get(key) is not None:
                cause[key] = failure[key]
        return cause

    def _record(self, attempt: int, ranks: list[int] | None, cause: dict[str, Any], delay: float) -> None:
        entry = {"attempt": attempt, "ranks": ranks, "time": now_iso(), "delay": delay, **cause}
        self.restarts.append(entry)
        self.session.record.event("restart", **entry)
        log.info("run %s: attempt %d starts %s after %s", self.session.record.id, attempt,
                 "the whole job" if ranks is None else f"rank(s) {', '.join(map(str, ranks))} again",
                 cause["message"])

    def status_fields(self) -> dict[str, Any]:
        """What the run object says about the attempts so far."""
        return {"attempt": self.session.attempt, "restarts": list(self.restarts),
                "max_restarts": self.max_restarts}

    # -- exits ---------------------------------------------------------------------------------------
    def running(self, now: float) -> None:
        self.ever_started = True
        super().running(now)

    def process_exited(self, host: str, index: int, rc: int) -> None:
        if index in self.restarting and self.stop_reason is None:
            self.returncodes[index] = rc
            self.session.record.event("process_exited", index=index, returncode=rc, host=host, restarting=True)
            return
        super().process_exited(host, index, rc)

    def _fail(self, host: str, index: int, rc: int) -> None:
        session = self.session
        p = session.processes.get(index)
        rule = self.dist.restarts.get(p.role, "group") if p is not None else "group"
        if rule == "ignore":
            self.session.warnings.append(f"{self._who(index, host)} {how(rc)}; the run went on without it")
            return
        counted = self._counted(rc)
        if session.scheduler.stops_tasks(rc) or rule == "group" or self.launcher is None \
                or not self.launcher.restarts_ranks or not (self.partial is not None or self._left(counted)):
            super()._fail(host, index, rc)  # the attempt ends; restart_due() decides on the next
            return
        ranks = {index}
        if rule == "with_chief":
            ranks |= {r for r, q in session.processes.items() if q.role == "chief"}
        failure = {"rank": index, "host": host, "returncode": rc, "role": p.role, "task_index": p.index}
        cause = self._cause("signal" if rc < 0 else "exit_code", f"{self._who(index, host)} {how(rc)}", failure,
                            counted)
        if self.partial is not None:  # another task failed before the first was started again: one restart
            ranks |= self.partial["ranks"]
            delay = max(0.0, self.partial["at"] - time.monotonic())
            cause = self.partial["cause"]
        else:
            delay = self._spend(counted, cause)
        self.partial = {"ranks": ranks, "at": time.monotonic() + delay, "cause": cause, "delay": delay}
        self.restarting |= ranks
        still = [r for r in sorted(ranks) if r not in self.returncodes]
        if still:
            log.info("run %s: stopping rank(s) %s to start them again with rank %d", session.record.id,
                     ", ".join(map(str, still)), index)
            self.launcher.stop_ranks(still)

    def _lead_finished(self) -> None:
        self.partial = None  # the lead's outcome stands: nothing starts again
        super()._lead_finished()

    # -- time ----------------------------------------------------------------------------------------
    def pending(self) -> bool:
        return self.partial is not None and self.stop_reason is None

    def wakeup(self) -> float | None:
        times = [t for t in (super().wakeup(), self.partial["at"] if self.pending() else None) if t is not None]
        return min(times) if times else None

    def tick(self, now: float) -> None:
        super().tick(now)
        part = self.partial
        if part is None or self.stop_reason is not None or now < part["at"]:
            return
        ranks = sorted(part["ranks"])
        if not all(r in self.returncodes for r in ranks):
            part["at"] = now + DONE_POLL  # still stopping
            return
        session = self.session
        attempt = session.attempt + 1
        plans = [dataclasses.replace(session.processes[r], env={**session.processes[r].env,
                                                                  "TFLAUNCH_ATTEMPT": str(attempt)}) for r in ranks]
        if not self.launcher.restart_ranks(plans, set(self.returncodes)):
            part["at"] = now + DONE_POLL  # a host's agent has not reported "done" yet
            return
        session.attempt = attempt
        self.partial = None
        for r in ranks:
            self.returncodes.pop(r, None)
            self.restarting.discard(r)
        separator(session, ranks, attempt, part["cause"]["message"])
        self._record(attempt, ranks, part["cause"], part["delay"])
        session.record.write_status(**self.status_fields())

    # -- between attempts ----------------------------------------------------------------------------
    def restart_due(self) -> float | None:
        reason = self.stop_reason
        if reason not in RESTARTABLE or self.killed or (reason == "launch_failed" and not self.ever_started):
            return None
        if self.lead_done:
            return None
        failure = self.failure
        counted = self._counted((failure or {}).get("returncode"))
        if not self._left(counted):
            if self.max_restarts:
                self.stop_detail += f" (attempt {self.session.attempt}; max_restarts={self.max_restarts} used up)"
            return None
        cause = self._cause(reason, self.stop_detail, failure, counted)
        delay = self._spend(counted, cause)
        self._record(self.session.attempt + 1, None, cause, delay)
        return delay

    def outcome(self, stderr_tail: Callable[[int], str], prep_tail: str = "",
                exception: Callable[[int], str | None] | None = None) -> dict[str, Any]:
        fields = super().outcome(stderr_tail, prep_tail, exception)
        fields.update(self.status_fields())
        return fields


def separator(session: Session, ranks: list[int], attempt: int, why: str) -> None:
    """A line in each of these ranks' logs (and so on the console) where attempt ``attempt`` begins."""
    line = f"\n===== tflaunch: attempt {attempt} ({why}) =====\n".encode("utf-8", "replace")
    for rank in ranks:
        p = session.processes.get(rank)
        if p is None:
            continue
        for fd in (1, 2):
            try:
                session.rank_file(rank, fd).write(line)
            except OSError as exc:
                log.warning("run %s: cannot write to rank %d's log: %s", session.record.id, rank, exc)


def between_attempts(session: Session, delay: float, heartbeat: Callable[[], None],
                     interval: float) -> bool:
    """The attempt has ended and another is due in ``delay`` s: bring the hosts' outputs home (the next
    attempt's copy carries them), close the agents, mark the logs, record Recovering and wait, serving
    signals and ``runs cancel`` (``heartbeat``: renew the lease every ``interval`` s). Returns False
    when the run was stopped meanwhile."""
    from ..launch.transfer import collect_remote
    from .finalize import merge_remote_outputs

    record, policy = session.record, session.policy
    collect_remote(session)
    merge_remote_outputs(session)
    last = policy.restarts[-1] if policy.restarts else {}
    separator(session, sorted(session.processes), session.attempt + 1, str(last.get("message", "restart")))
    session.new_attempt()
    policy.begin_attempt()  # from here a stop (runs cancel, Ctrl-C) is the new attempt's
    record.write_status(RECOVERING, **policy.status_fields())
    until = time.monotonic() + delay
    next_beat = time.monotonic() + interval
    while policy.stop_reason is None:
        now = time.monotonic()
        if now >= until:
            break
        session.serve(min(until, next_beat) - now)
        if time.monotonic() >= next_beat:
            heartbeat()
            next_beat = time.monotonic() + interval
    return policy.stop_reason is None
