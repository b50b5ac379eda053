"""Slurm as the run's scheduler. On the submitting side (``run --slurm``, a :class:`~tflaunch.SlurmTarget`):
:func:`check`, :func:`batch_script`, :func:`submit` (sbatch; the run is Queued, leased by its job) and
:func:`cancel` (scancel). On the supervising side: inside ``salloc``/``sbatch`` (the hosts are the
allocation's nodes, one ``srun`` step starts the processes unless ``--launcher ssh``) and for a run
submitted with ``run --slurm`` (its batch script runs this supervisor on the first node). When Slurm
stops the job (a time limit, a preemption, ``scancel``, a node failure) the processes get SIGTERM:
:meth:`SlurmScheduler.ending` asks ``scontrol`` why, for the run's final status. The Slurm commands
themselves are in :mod:`tflaunch.slurm`.

Requeues (``run --slurm --max-requeues N``; the batch script has ``--requeue``, else ``--no-requeue``): when
Slurm requeues the job itself (a preemption with ``PreemptMode=REQUEUE``, ``scontrol requeue``) its
``Restarts`` count goes up at once (JobState shows COMPLETING, then PENDING): :meth:`~SlurmScheduler.ending`
says ``requeued``. Before the time limit tflaunch asks for the requeue itself: the tasks get ``--signal``
(``USR2@60``: 60 s before the limit; only the job's steps get it, not the batch script, unless ``B:``), and
half that offset before the limit (:meth:`~SlurmScheduler.tick`) the run is stopped, its outputs brought
in and ``scontrol requeue`` called (:meth:`~SlurmScheduler.requeue`). Once no requeue is left the job is
made non-requeueable (``scontrol update Requeue=0``): a preemption then ends it for good, with today's
reason.
"""
from __future__ import annotations

import logging
import os
import signal
import time

from .. import slurm
from ..errors import SpecError
from ..history.store import CANCELED, FAILED, QUEUED
from . import REQUEUED, Scheduler

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Mapping

    from ..history.record import RunRecord
    from ..spec import JobSpec

__all__ = ["SlurmScheduler", "NAME", "check", "batch_script", "describe", "submit", "cancel"]

log = logging.getLogger(__name__)

# exit statuses of a task that Slurm stopped (SIGTERM, SIGKILL after KillWait, a shell's 128 + SIGTERM)
STOPPED_BY_SLURM = (-signal.SIGTERM, -signal.SIGKILL, 128 + signal.SIGTERM)


class SlurmScheduler(Scheduler):
    name = "slurm"

    def __init__(self, record: RunRecord, target: Mapping[str, Any]) -> None:
        super().__init__(record, target)
        self.submitted = target.get("kind") == "slurm"  # by `run --slurm`: hosts come with the allocation
        self.job_id = os.environ.get("SLURM_JOB_ID")
        # how often Slurm had requeued the job when this allocation started (None: not known here)
        self.restart_count: int | None = int(os.environ.get("SLURM_RESTART_COUNT") or 0) if self.job_id else None
        if self.submitted and self.job_id is None:
            self.job_id = (record.lease() or {}).get("slurm_job_id")
        self.requeues_left = 0
        self._requeue_at: float | None = None  # monotonic: when the run stops to be requeued before the time limit
        self._ask = False  # tflaunch asks Slurm for the requeue (before the time limit), Slurm is not doing it

    def allocation(self, spec: JobSpec) -> dict[str, Any]:
        if not self.submitted:
            return self.target
        from ..spec.target import allocation_target

        try:
            return allocation_target(self.target, spec.node_count, spec.procs_per_host)
        except SpecError as exc:
            self.error = str(exc)
            return self.target

    def step_launcher(self) -> str | None:
        return "srun" if self.target.get("launcher") == "srun" else None

    def lease_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"slurm_job_id": self.job_id}
        if self.restart_count is not None:  # known inside the job: how often it had been requeued
            fields["slurm_restarts"] = self.restart_count
        return fields

    def status_fields(self, hosts: list[str]) -> dict[str, Any]:
        if not self.job_id:
            return {}
        current = (self.record.read_status(check_lease=False) or {}).get("slurm") or {}
        restarts = {"restarts": self.restart_count} if self.restart_count else {}
        return {"slurm": {**current, "job_id": self.job_id, "submitted": self.submitted,
                          "launcher": self.target.get("launcher"), "nodes": hosts, **restarts}}

    def stops_tasks(self, returncode: int) -> bool:
        return bool(self.job_id) and returncode in STOPPED_BY_SLURM

    def ending(self, wait: float = 0.0) -> tuple[str, str] | None:
        """Why Slurm is stopping this run's job (SIGTERM at the time limit, on preemption, scancel,
        node failure): (stop reason, detail), or None when Slurm cannot tell (within ``wait`` s)."""
        if not self.job_id:
            return None
        deadline = time.monotonic() + wait
        while True:
            try:
                info = slurm.job_info(str(self.job_id))
            except slurm.SlurmError as exc:  # scontrol itself may catch the SIGTERM meant for the job
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                log.warning("run %s: cannot ask Slurm why the job is stopping: %s", self.record.id, exc)
                return None
            state = slurm.job_state(info)
            if self._requeued(info):
                return REQUEUED, (f"Slurm requeued job {self.job_id} (a preemption or scontrol requeue; "
                                  f"JobState={state}, Restarts={slurm.restarts(info)})")
            if state in ("COMPLETING", "RUNNING"):  # the end state shows once the job is gone
                state = slurm.REASON_STATES.get((info or {}).get("Reason", ""), state)
            if state in slurm.ENDED or time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        log.debug("run %s: Slurm reports job %s as %s (Reason=%s)", self.record.id, self.job_id,
                  (info or {}).get("JobState"), (info or {}).get("Reason"))
        fields = slurm.final_fields(dict(info or {}, JobState=state), str(self.job_id), None) \
            if state in slurm.ENDED else None
        if fields is None:
            return None
        if fields["status"] == CANCELED:
            return "canceled", fields["cancel_reason"]
        return fields["error"]["reason"], fields["error"]["message"]

    # -- requeues ------------------------------------------------------------------------------------
    def _requeued(self, info: Mapping[str, str] | None) -> bool:
        """Slurm is putting the job back in its queue: ``Restarts`` went up since this allocation started
        (JobState is still COMPLETING then), or the job is pending again."""
        if info is None:
            return False
        if self.restart_count is not None and slurm.restarts(info) > self.restart_count:
            return True
        return slurm.job_state(info) in ("REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "PENDING")

    def restarted(self) -> bool:
        return bool(self.restart_count)

    def _offset(self) -> int | None:
        return slurm.signal_seconds((self.target.get("slurm") or {}).get("signal"))

    def allow_requeues(self, left: int) -> None:
        self.requeues_left = left
        if not (self.submitted and self.job_id):
            return
        if left <= 0:  # a preemption now ends the job (PREEMPTED), a node failure too: the run ends with that
            try:
                slurm.set_requeue(str(self.job_id), False)
            except slurm.SlurmError as exc:
                log.warning("run %s: cannot make job %s non-requeueable: %s", self.record.id, self.job_id, exc)
            return
        self._schedule()

    def _schedule(self, info: Mapping[str, str] | None = None) -> None:
        """When to stop the run for a requeue: half the ``--signal`` offset before the job's EndTime (the
        tasks got the checkpoint signal the whole offset before it). No signal: no requeue at the limit."""
        offset = self._offset()
        if not offset:
            return
        if info is None:
            try:
                info = slurm.job_info(str(self.job_id))
            except slurm.SlurmError as exc:
                log.warning("run %s: cannot read job %s's time limit: %s", self.record.id, self.job_id, exc)
                return
        end = slurm.end_time(info)
        if end is not None:
            self._requeue_at = time.monotonic() + (end - time.time()) - offset / 2

    def tick(self, now: float) -> tuple[str, str] | None:
        if self._requeue_at is None or now < self._requeue_at or self.requeues_left <= 0:
            return None
        self._requeue_at = None
        offset = self._offset() or 0
        try:
            info = slurm.job_info(str(self.job_id))
        except slurm.SlurmError as exc:  # asked again shortly: the time limit is still coming
            log.warning("run %s: cannot ask Slurm about job %s: %s", self.record.id, self.job_id, exc)
            self._requeue_at = now + 2.0
            return None
        end = slurm.end_time(info)
        if end is not None and end - time.time() > offset / 2 + 1:  # the time limit moved (scontrol update)
            self._schedule(info)
            return None
        if (info or {}).get("Requeue") == "0":
            log.info("run %s: job %s is not requeueable; its time limit ends the run", self.record.id, self.job_id)
            return None
        self._ask = True
        return REQUEUED, (f"Slurm job {self.job_id} reaches its time limit at {(info or {}).get('EndTime')}: "
                          f"stopped {offset / 2:g} s before it, after the checkpoint signal, to be requeued")

    def requeue(self) -> tuple[str, str] | None:
        job = str(self.job_id or "")
        if not (self.submitted and job):
            return REQUEUED, (f"Slurm requeued job {job}, which this run was started in by hand (not with "
                              "run --slurm): the run ends here; the job's next start runs its batch script again")
        if self._ask:
            try:
                slurm.requeue(job)
            except slurm.SlurmError as exc:
                return "time_limit", f"Slurm job {job} was to be requeued before its time limit, but: {exc}"
        self.record.lease_slurm_job(job)
        return None


# -- submitting ------------------------------------------------------------------------------------------
NAME = "slurm"  # the dry run's field for what would be submitted


def check(spec: JobSpec) -> dict[str, str]:
    """A job to submit with sbatch: what Slurm must be asked for is known; sbatch is here. Returns the
    variables the job's processes get from it (the checkpoint signal's name), for the caller to add."""
    options = slurm.SlurmOptions.from_dict(spec.compute_target["slurm"])
    if spec.use_gpu and not spec.gpus_per_node:
        raise SpecError("--gpu with --slurm: give --gpus-per-node N, the GPUs to ask Slurm for on each node")
    slurm.require("sbatch")
    return {slurm.CHECKPOINT_SIGNAL_VAR: slurm.signal_name(options.signal) or ""} if options.signal else {}


def batch_script(spec: JobSpec, run_id: str, experiment: str, record_dir: str, home: str, **array: Any) -> str:
    """The batch script of a run submitted with ``--slurm`` (see :func:`tflaunch.slurm.batch_script`;
    ``array``: a sweep's job array, its ``array``, ``prelude`` and ``command_tail``)."""
    from ..plan.distributions import distribution
    from ..supervise.detached import in_job_command

    target = spec.compute_target or {}
    spread = distribution(spec.distributed).spread  # a ps job: its tasks are dealt over the nodes
    command = in_job_command(home, run_id)
    return slurm.batch_script(run_id=run_id, experiment=experiment, record_dir=record_dir,
                              options=slurm.SlurmOptions.from_dict(target.get("slurm")), nodes=spec.node_count,
                              ntasks_per_node=None if spread else spec.process_count_per_node,
                              ntasks=spec.world_size if spread else None,
                              gpus_per_node=spec.gpus_per_node if spec.use_gpu else None,
                              command=command[:-1] if array else command,
                              requeue=bool((spec.recovery or {}).get("max_requeues")), **array)


def describe(spec: JobSpec, run_id: str, experiment: str, run_dir: str, home: str) -> dict[str, Any]:
    """What ``--dry-run`` shows of the submission: the batch script and the sbatch command."""
    return {"script": batch_script(spec, run_id, experiment, run_dir, home),
            "sbatch": ["sbatch", "--parsable", os.path.join(run_dir, slurm.SCRIPT)],
            "note": "hosts are placeholders until Slurm allocates the nodes"}


def submit(record: RunRecord, spec: JobSpec, experiment: str) -> RunRecord:
    """Write the run's batch script into the record and ``sbatch`` it: the run is Queued, leased by its
    Slurm job. A refused submission ends the run Failed with sbatch's message (and raises SlurmError)."""
    from .. import fsio

    script = batch_script(spec, record.id, experiment, record.dir, record.store.home)
    path = record.path(slurm.SCRIPT)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fsio.atomic_write_bytes(path, script.encode("utf-8"))
    os.chmod(path, 0o755)
    try:
        job = slurm.submit(path)
    except KeyboardInterrupt:
        record.end_unstarted(CANCELED, cancel_reason="interrupted while submitting to Slurm")
        raise
    except slurm.SlurmError as exc:
        record.end_unstarted(FAILED, error={"reason": "slurm_rejected", "message": str(exc)})
        raise
    record.lease_slurm_job(job)
    record.event("slurm_submitted", job_id=job, script=slurm.SCRIPT)
    # tflaunch inside the job waits for Queued before it starts: this never overwrites its Running
    record.write_status(QUEUED, slurm={"job_id": job, "submitted": True, "script": slurm.SCRIPT,
                                       "output": slurm.OUTPUT.replace("%j", job)})
    return record


def cancel(record: RunRecord, status: Mapping[str, Any]) -> None:
    """``scancel`` the job of a submitted run (pending: it never starts; running: every task gets SIGTERM,
    then SIGKILL after Slurm's KillWait); nothing for a run started inside an allocation by hand."""
    info = status.get("slurm") or {}
    job = (record.lease() or {}).get("slurm_job_id") or info.get("job_id")
    if info.get("submitted") and job:
        slurm.cancel(str(job))
        record.event("slurm_canceled", job_id=str(job))
