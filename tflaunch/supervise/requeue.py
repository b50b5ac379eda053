"""The same run in the next allocation of its job (:class:`Requeues`): a run submitted to a scheduler that
requeues jobs, with a budget (Slurm: ``run --slurm --max-requeues N``, the spec's ``recovery.max_requeues``).

When the scheduler stops the run for its job to be requeued (stop reason
:data:`~tflaunch.schedule.REQUEUED`: a preemption or ``scontrol requeue``, or tflaunch itself before the
time limit, see :mod:`tflaunch.schedule.slurm`) and a requeue is left, the supervisor does not finalize:
:meth:`Requeues.hand_over` brings the hosts' outputs into the working copy (a ``--scratch`` copy's into the
record: the next allocation may be on another node), has the scheduler requeue the job and hold the run
(its lease), records the run Queued with the next ``attempt`` and a ``requeues`` entry (event
``requeued``), and the supervisor exits (status 0). In the job's next allocation the supervisor finds the
run Queued with requeues: the attempt goes on from there (``TFLAUNCH_ATTEMPT``), the working directory
is the same (a scratch one is made again, with the record's outputs), each log gets a separator line.
An allocation that ended without handing the run over (its node failed, Slurm killed tflaunch before it
was done) counts as a requeue too when the scheduler says that the job was started again. With no
requeue left the run ends as it would without requeues (and the scheduler makes its job end for good).
"""
from __future__ import annotations

import logging
import os
import shutil

from .. import fsio
from ..history.collect import COLLECTED
from ..history.store import FINALIZING, QUEUED, RECOVERING, RUNNING, now_iso
from ..schedule import REQUEUED

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

    from ..launch.session import Session

__all__ = ["Requeues", "REQUEUED"]

log = logging.getLogger(__name__)


class Requeues:
    """The requeues of one run: read from its status when the supervisor starts (this process may continue
    the run in a new allocation), added to when it hands the run back to the scheduler."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.max = int((session.spec.recovery or {}).get("max_requeues") or 0)
        status = session.record.read_status(check_lease=False) or {}
        self.entries: list[dict[str, Any]] = list(status.get("requeues") or [])
        self.resumed = False  # this process continues the run in a new allocation of its job
        self.lost: str | None = None  # the status the previous allocation left the run in, without a hand-over
        state = status.get("status")
        if state == QUEUED and self.entries:
            self.resumed = True
            session.attempt = int(status.get("attempt") or len(self.entries) + 1)
        elif state in (RUNNING, RECOVERING, FINALIZING) and session.scheduler.restarted():
            self.resumed = True
            self.lost = str(state)
            session.attempt = int(status.get("attempt") or 1) + 1

    @property
    def left(self) -> int:
        return max(0, self.max - len(self.entries))

    def _add(self, reason: str, message: str) -> dict[str, Any]:
        entry = {"attempt": self.session.attempt, "time": now_iso(), "reason": reason, "message": message}
        self.entries.append(entry)
        self.session.record.event("requeued", **entry)
        return entry

    def begin(self) -> None:
        """The supervisor holds the run: tell the scheduler how many requeues are left and, in a new
        allocation, mark the logs; a run that cannot go on is stopped before it starts."""
        session, record = self.session, self.session.record
        if self.lost is not None:
            why = (f"the job's previous allocation ended while the run was {self.lost}, without tflaunch "
                   "handing it over (a node failure?)")
            if self.left <= 0:
                session.policy.stop(REQUEUED, why + (f"; max_requeues={self.max} used up" if self.max else ""))
                return
            self._add(REQUEUED, why)
            record.write_status(attempt=session.attempt, requeues=list(self.entries), max_requeues=self.max)
        if self.max:
            session.scheduler.allow_requeues(self.left)
        if self.resumed:
            last = self.entries[-1] if self.entries else {}
            log.info("run %s: attempt %d in a new allocation (%s)", record.id, session.attempt, last.get("message"))
            _mark_logs(session, f"\n===== tflaunch: attempt {session.attempt} (requeued: {last.get('message')}) "
                                "=====\n")

    def needs_copy(self, work_dir: str, first: bool) -> bool:
        """Whether the working copy must be made: it does not exist (the run's first start; a requeued
        run's next allocation on node-local ``--scratch``). Later attempts go on in it (checkpoints); at
        the run's first start one left by an allocation that ended before the run began is made again."""
        if first and self.session.attempt == 1 and not self.resumed and os.path.isdir(work_dir):
            log.warning("run %s: a working copy %s is there already; made again", self.session.record.id, work_dir)
            shutil.rmtree(work_dir)
        return not os.path.isdir(work_dir)

    def restore(self, work_dir: str) -> None:
        """The working copy's ``./outputs`` and ``./logs``, with what a previous allocation left in the
        record (its working copy was on node-local ``--scratch``, or it was finalizing when it ended)."""
        record = self.session.record
        for name in COLLECTED:
            src, dst = record.path(name), os.path.join(work_dir, name)
            if self.resumed and os.path.isdir(src) and not os.path.lexists(dst):
                shutil.move(src, dst)  # a rename, or a copy across filesystems
            elif self.resumed and os.path.isdir(src):
                shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
                shutil.rmtree(src)
            os.makedirs(dst, exist_ok=True)

    def hand_over(self) -> dict[str, Any] | None:
        """The processes stopped with reason ``requeued``: hand the run back to the scheduler for the job's
        next allocation; the run object (Queued), or None when the run ends now (with the policy's stop
        reason and detail, updated with why)."""
        from .finalize import merge_remote_outputs

        session, record, policy = self.session, self.session.record, self.session.policy
        if self.left <= 0:
            policy.stop_detail += (f" (attempt {session.attempt}; max_requeues={self.max} used up)" if self.max
                                   else " (the run has no --max-requeues: it ends here)")
            return None
        try:  # the outputs come in while the job still has its nodes
            merge_remote_outputs(session)
            if os.path.realpath(session.work_dir) != os.path.realpath(record.work_dir):
                record.collect_outputs(session.work_dir)  # node-local scratch: the next allocation may be elsewhere
                shutil.rmtree(session.work_dir, ignore_errors=True)
        except OSError as exc:
            policy.stop_detail += f"; bringing the outputs in failed ({exc.strerror or exc}): the run ends here"
            return None
        refused = session.scheduler.requeue()
        if refused is not None:
            policy.stop_reason, policy.stop_detail = refused
            return None
        for warning in session.warnings:
            record.event("warning", message=warning)
        reason, message = policy.stop_reason, policy.stop_detail
        session.attempt += 1
        self._add(str(reason), message)
        log.info("run %s: requeued (%s); attempt %d goes on in the job's next allocation", record.id, message,
                 session.attempt)
        fields = {**policy.status_fields(), "attempt": session.attempt, "requeues": list(self.entries),
                  "max_requeues": self.max}
        return record.write_status(QUEUED, **fields)


def _mark_logs(session: Session, line: str) -> None:
    """Append ``line`` to the log files of the previous allocation's processes (``processes.json``)."""
    try:
        rows = fsio.read_json(session.record.path("processes.json"))
    except (OSError, ValueError):
        return
    data = line.encode("utf-8", "replace")
    for row in rows if isinstance(rows, list) else ():
        for key in ("stdout", "stderr"):
            path = session.record.path(str(row.get(key) or ""))
            if row.get(key) and os.path.isfile(path):
                try:
                    with open(path, "ab") as fh:
                        fh.write(data)
                except OSError as exc:
                    log.warning("run %s: cannot write to %s: %s", session.record.id, path, exc)
