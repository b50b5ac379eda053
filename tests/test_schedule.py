"""Schedulers (tflaunch.schedule): the table, which one a recorded target has, and what each tells the
supervisor (hosts, what to record, whether a killed process was the scheduler's doing). Slurm's own
behaviour (time limits, preemption, scancel) is tested on the real cluster in test_slurm_cluster."""
from __future__ import annotations

import importlib
import sys

from tflaunch import Estimator
from tflaunch.schedule import SCHEDULERS, Scheduler, scheduler_for, scheduler_name
from tflaunch.spec import JobSpec
from tflaunch.submit import SubmitOptions, create_run, prepare


def _record(project, home):
    src = project(**{"t.py": "print('hi')"})
    return create_run(prepare(Estimator(str(src), entry_script="t.py", python=sys.executable),
                              SubmitOptions(home=str(home))))


def test_every_scheduler_in_the_table_is_a_scheduler():
    for name, where in SCHEDULERS.items():
        module, _, cls = where.partition(":")
        found = getattr(importlib.import_module(module), cls)
        assert issubclass(found, Scheduler) and found.name == name


def test_which_scheduler_a_target_has():
    assert scheduler_name(None) == "none"
    assert scheduler_name({"kind": "local", "source": None}) == "none"
    assert scheduler_name({"kind": "ssh", "source": "--hosts"}) == "none"
    assert scheduler_name({"kind": "slurm", "source": "sbatch"}) == "slurm"  # submitted with run --slurm
    assert scheduler_name({"kind": "ssh", "source": "SLURM_JOB_NODELIST"}) == "slurm"  # inside salloc/sbatch
    assert scheduler_name({"kind": "ssh", "scheduler": "pbs"}) == "pbs"  # named explicitly


def test_no_scheduler_changes_nothing(project, home):
    record = _record(project, home)
    spec = JobSpec.from_dict(record.definition()["spec"])
    none = scheduler_for(record, spec.compute_target)
    assert none.name == "none" and none.allocation(spec) == spec.compute_target and none.error is None
    assert (none.step_launcher(), none.lease_fields(), none.status_fields(["localhost"])) == (None, {}, {})
    assert not none.stops_tasks(-15) and none.ending(wait=0) is None


def test_slurm_scheduler_of_a_submitted_run_outside_its_allocation(project, home, monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST"):
        monkeypatch.delenv(name, raising=False)
    record = _record(project, home)
    spec = JobSpec.from_dict(record.definition()["spec"])
    target = {"kind": "slurm", "source": "sbatch", "hosts": [["(slurm node 1)", 1]], "launcher": "srun"}
    slurm = scheduler_for(record, target)
    assert slurm.name == "slurm" and slurm.step_launcher() == "srun" and slurm.job_id is None
    assert slurm.allocation(spec) == target and "not inside a Slurm allocation" in slurm.error
    assert not slurm.stops_tasks(-15)  # no job: nothing Slurm could have stopped
    record.lease_slurm_job("4242")  # what sbatch_run records: the job that holds the run
    slurm = scheduler_for(record, target)
    assert slurm.job_id == "4242" and slurm.lease_fields() == {"slurm_job_id": "4242"}
    assert slurm.stops_tasks(-15) and slurm.stops_tasks(-9) and slurm.stops_tasks(143) and not slurm.stops_tasks(1)
    assert slurm.status_fields(["n1"])["slurm"] == {"job_id": "4242", "submitted": True, "launcher": "srun",
                                                     "nodes": ["n1"]}


# -- a scheduler added by one registration line: this module is its module ------------------------------
NAME = "fake"
SUBMITTED: list[str] = []


class FakeScheduler(Scheduler):
    name = "fake"


class FakeTarget:
    """A compute target of the fake scheduler: what a PbsTarget would be, outside tflaunch/spec/target.py."""

    def recorded(self, node_count, procs_per_node, world=0):
        return {"kind": "fake", "source": "fake", "hosts": [[f"(fake node {i})", procs_per_node]
                                                            for i in range(node_count)]}


def check(spec):
    return {"FAKE_SIGNAL": "USR1"}


def describe(spec, run_id, experiment, run_dir, home):
    return {"would_submit": run_id}


def submit(record, spec, experiment):
    SUBMITTED.append(record.id)
    record.write_status("Queued", fake={"job_id": "f-1"})
    return record


def cancel(record, status):
    record.event("fake_canceled")


def test_a_new_scheduler_is_one_registration_line(project, home, monkeypatch):
    from tflaunch.submit import cancel_run, dry_run, start

    monkeypatch.setitem(SCHEDULERS, "fake", "test_schedule:FakeScheduler")  # the registration line
    src = project(**{"t.py": "print('hi')"})
    estimator = Estimator(str(src), entry_script="t.py", python=sys.executable, compute_target=FakeTarget(),
                          node_count=2)
    prepared = prepare(estimator, SubmitOptions(home=str(home)))
    assert prepared.spec.compute_target["kind"] == "fake"
    assert prepared.spec.environment_variables["FAKE_SIGNAL"] == "USR1"  # check()'s variables, for the processes
    shown = dry_run(prepared)
    assert shown["fake"] == {"would_submit": prepared.run_id} and shown["slurm"] is None
    SUBMITTED.clear()
    record = start(prepared)
    assert SUBMITTED == [record.id] == [prepared.run_id]
    status = record.read_status(check_lease=False)
    assert status["status"] == "Queued" and status["fake"] == {"job_id": "f-1"}
    assert type(scheduler_for(record, prepared.spec.compute_target)).__name__ == "FakeScheduler"
    cancel_run(record, "no longer needed")
    events = (home / "runs" / record.id / "events.jsonl").read_text()
    assert "fake_canceled" in events
