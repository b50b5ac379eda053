"""Schedulers: who allocates a run's nodes. ``none`` (the hosts are given: this machine, a host list)
and ``slurm`` (the nodes come from an allocation: ``run --slurm`` submits one with sbatch, or the run
starts inside ``salloc``/``sbatch``).

A scheduler's supervising side is a :class:`Scheduler`: the supervisor asks it for the hosts of the
allocation, what to record of the job, and why the job is being stopped (a time limit, a preemption)
when its processes are killed from outside; it never tests which scheduler it has. Each scheduler is
one module of this package and one line of :data:`SCHEDULERS` (imported only when a run uses it).

A scheduler that requeues jobs (Slurm, a run submitted with ``--max-requeues N``) lets the same run go on
in the job's next allocation: :meth:`Scheduler.ending` says :data:`REQUEUED` when it is putting the job
back in its queue itself (a preemption, ``scontrol requeue``), :meth:`Scheduler.tick` when the run should
be stopped so that the job is requeued (before its time limit), and :meth:`Scheduler.requeue` hands the
stopped run back to the job (see :mod:`tflaunch.supervise.requeue`).

A scheduler that takes submissions (Slurm's sbatch) has, in its module, the submitting side as
functions: ``check(spec)`` (what it must be asked for is known, its command is here; returns variables
for the processes), ``describe(spec, run_id, experiment, run_dir, home)`` (the dry run's view, in the
field ``NAME``), ``submit(record, spec, experiment)`` (the run becomes Queued, leased by its job) and
``cancel(record, status)``; :func:`submission` finds it for a compute target whose ``kind`` names it.
"""
from __future__ import annotations

import importlib
import types

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Mapping

    from ..history.record import RunRecord
    from ..spec import JobSpec

__all__ = ["Scheduler", "SCHEDULERS", "ALLOCATIONS", "REQUEUED", "scheduler_name", "scheduler_for", "submission"]

# name -> "module:class"; see scheduler_name for which one a compute target has
SCHEDULERS: dict[str, str] = {
    "none": "tflaunch.schedule.none:NoScheduler",
    "slurm": "tflaunch.schedule.slurm:SlurmScheduler",
}
# the hosts of an allocation tflaunch runs in, by where they were read (tflaunch.spec.hosts.discover)
ALLOCATIONS: dict[str, str] = {"SLURM_JOB_NODELIST": "slurm"}
# the stop reason of a run whose job goes back to the scheduler's queue (the run goes on in its next allocation)
REQUEUED = "requeued"


class Scheduler:
    """The supervising side of a scheduler, for one run (defaults: nothing allocates the hosts)."""

    name = "none"

    def __init__(self, record: RunRecord, target: Mapping[str, Any]) -> None:
        self.record = record
        self.target = dict(target)
        self.job_id: str | None = None  # the allocation's job, when there is one
        self.error: str | None = None  # why the allocation's hosts cannot be known (the run fails to launch)

    def allocation(self, spec: JobSpec) -> dict[str, Any]:
        """The compute target with the allocated hosts (the given one when nothing allocates them)."""
        return self.target

    def step_launcher(self) -> str | None:
        """The launcher that must start the processes (a name in :data:`tflaunch.launch.launcher.LAUNCHERS`),
        or None to let the distribution choose."""
        return None

    def lease_fields(self) -> dict[str, Any]:
        """What the run's lease records of the job (who else may finalize it: see RunRecord)."""
        return {}

    def status_fields(self, hosts: list[str]) -> dict[str, Any]:
        """What the run object records of the job once it starts (merged into its status)."""
        return {}

    def stops_tasks(self, returncode: int) -> bool:
        """Whether a process ending with ``returncode`` may have been stopped by the scheduler itself."""
        return False

    def ending(self, wait: float = 0.0) -> tuple[str, str] | None:
        """Why the scheduler is ending the job: (stop reason, detail), or None when it is not (or cannot
        tell within ``wait`` seconds)."""
        return None

    # -- requeues (the same run in the job's next allocation) -------------------------------------------
    def restarted(self) -> bool:
        """Whether this allocation is the job's second or later (the job was requeued before)."""
        return False

    def allow_requeues(self, left: int) -> None:
        """How many more times the run may go on in a new allocation of its job (0: none; the scheduler
        then makes the job end for good when its allocation ends)."""

    def tick(self, now: float) -> tuple[str, str] | None:
        """(:data:`REQUEUED`, detail) when the run should be stopped now for its job to be requeued
        (Slurm: before the time limit, the tasks having had the checkpoint signal); else None."""
        return None

    def requeue(self) -> tuple[str, str] | None:
        """The run's processes stopped with reason :data:`REQUEUED`: have the job requeued (ask for it
        unless the scheduler is doing it already) and hold the run until its next allocation starts.
        None when done; else (stop reason, detail) that the run ends with instead."""
        return REQUEUED, "this scheduler does not requeue jobs"


def scheduler_name(target: Mapping[str, Any] | None) -> str:
    """The scheduler of a recorded compute target: its ``scheduler`` field, else its ``kind`` when that
    names one (a job submitted to it), else the one whose allocation its hosts were read from, else
    ``none``."""
    target = target or {}
    if target.get("scheduler"):
        return str(target["scheduler"])
    if target.get("kind") in SCHEDULERS:
        return str(target["kind"])
    return ALLOCATIONS.get(str(target.get("source")), "none")


def scheduler_for(record: RunRecord, target: Mapping[str, Any] | None) -> Scheduler:
    """The :class:`Scheduler` of a run (its module imported now)."""
    module, _, cls = SCHEDULERS[scheduler_name(target)].partition(":")
    return getattr(importlib.import_module(module), cls)(record, target or {})


def submission(target: Mapping[str, Any] | None) -> types.ModuleType | None:
    """The scheduler module that submits a job to this compute target (its ``kind`` is the scheduler's
    name and the module has ``submit``), or None: the run starts here."""
    kind = (target or {}).get("kind")
    if kind not in SCHEDULERS:
        return None
    module = importlib.import_module(SCHEDULERS[kind].partition(":")[0])
    return module if hasattr(module, "submit") else None
