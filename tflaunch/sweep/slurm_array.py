"""A Slurm sweep's trials as one job array: one ``sbatch --array=0-N-1%K`` instead of N submissions.

Used when the trials allow it: a ``SlurmTarget`` sweep whose hyperparameters are all known before any
trial runs (grid or random sampling; Bayesian suggestions depend on results) and ``job_array`` not
turned off. Every trial's run is recorded first; the array's batch script lives in the sweep's record
with the list of those runs (``slurm/array.txt``, task *i* is line *i + 1*); each task picks its run,
sends its output into that run's record and execs tflaunch's in-job supervisor, as a one-run job does.
``%K`` (``max_concurrent_runs``) lets Slurm itself keep at most K trials running. A task is an ordinary
Slurm job to the rest of tflaunch: its run is leased by ``JOBID_TASK``, canceled with
``scancel JOBID_TASK``; a trial replaced after a loss is submitted alone.
"""
from __future__ import annotations

import os
import shlex

from .. import fsio
from ..history.store import FAILED, QUEUED

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Sequence

    from ..spec import JobSpec
    from ..history.store import RunRecord

__all__ = ["array_allowed", "submit_array", "LIST"]

LIST = "slurm/array.txt"


def array_allowed(spec: JobSpec, config: dict[str, Any]) -> bool:
    """Whether the sweep's trials go to Slurm as one job array."""
    return ((spec.compute_target or {}).get("kind") == "slurm" and config.get("job_array") is not False
            and config["hyperparameter_sampling"]["kind"] in ("grid", "random"))


def submit_array(parent: RunRecord, children: Sequence[RunRecord], spec: JobSpec, experiment: str,
                 max_concurrent: int | None) -> str:
    """``sbatch`` the recorded trial runs ``children`` as one array; each is Queued, leased by its task.
    A refused submission ends them Failed with sbatch's message and raises SlurmError."""
    from ..slurm import SCRIPT, SlurmError, submit
    from ..schedule.slurm import batch_script

    listing = parent.path(LIST)
    os.makedirs(os.path.dirname(listing), exist_ok=True)
    fsio.atomic_write_bytes(listing, "".join(f"{c.id}\n" for c in children).encode("ascii"))
    runs = shlex.quote(parent.store.runs_dir)
    prelude = [f'RUN=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(listing)})',
               f'exec >>{runs}/"$RUN"/tflaunch_logs/slurm-"$SLURM_ARRAY_JOB_ID"_"$SLURM_ARRAY_TASK_ID".out 2>&1']
    count = len(children)
    throttle = f"%{max_concurrent}" if max_concurrent and max_concurrent < count else ""
    script = batch_script(spec, parent.id, experiment, parent.dir, parent.store.home,
                          array=f"0-{count - 1}{throttle}", prelude=prelude, command_tail='"$RUN"')
    path = parent.path(SCRIPT)
    fsio.atomic_write_bytes(path, script.encode("utf-8"))
    os.chmod(path, 0o755)
    try:
        job = submit(path)
    except (SlurmError, KeyboardInterrupt) as exc:
        for child in children:
            child.end_unstarted(FAILED, error={"reason": "slurm_rejected", "message": str(exc)})
        raise
    parent.event("slurm_array_submitted", job_id=job, tasks=count, script=SCRIPT)
    script_from_child = os.path.join("..", parent.id, SCRIPT)
    for i, child in enumerate(children):
        task = f"{job}_{i}"
        child.lease_slurm_job(task)
        child.event("slurm_submitted", job_id=task, script=script_from_child, array=job)
        child.write_status(QUEUED, slurm={"job_id": task, "submitted": True, "script": script_from_child,
                                          "output": f"tflaunch_logs/slurm-{task}.out", "array": job})
    return job
