"""The outcome policy (tflaunch.supervise.policy.FailFast) on a real recorded run: what each exit means for
each distribution, read from the distributions table (who leads, how the others wind down, role names)."""
from __future__ import annotations

import sys
import time

import pytest

from tflaunch import Estimator, MultiWorkerConfiguration, TensorflowConfiguration
from tflaunch.plan.processes import plan
from tflaunch.submit import SubmitOptions, create_run, prepare
from tflaunch.supervise import Supervisor


def _supervisor(project, home, dist=None, **kwargs):
    src = project(**{"t.py": "print('hi')"})
    estimator = Estimator(str(src), entry_script="t.py", distributed_training=dist, python=sys.executable, **kwargs)
    record = create_run(prepare(estimator, SubmitOptions(home=str(home))))
    sup = Supervisor(record)
    session = sup.session
    for p in plan(session.spec, session.context(), session.hosts):
        session.processes[p.rank] = p
    return sup


def _ranks(session, role):
    return [r for r, p in session.processes.items() if p.role == role]


def test_first_failure_is_the_root_cause_and_names_the_role(project, home):
    sup = _supervisor(project, home, TensorflowConfiguration(2, 1, chief=True))
    policy, session = sup.policy, sup.session
    worker = _ranks(session, "worker")[1]
    policy.process_exited("localhost", worker, 3)
    policy.process_exited("localhost", 0, 1)  # after the root cause: not the failure
    assert policy.stop_reason == "exit_code"
    assert policy.failure["rank"] == worker and policy.failure["role"] == "worker" and policy.failure["task_index"] == 1
    assert f"(worker 1, rank {worker} on host localhost) exited with code 3" in policy.stop_detail
    out = policy.outcome(lambda index: f"tail of {index}")
    assert out["status"] == "Failed" and out["exit_code"] == 3
    assert out["error"]["role"] == "worker" and out["error"]["stderr_tail"] == f"tail of {worker}"


def test_ps_chief_success_stops_the_others_at_once(project, home):
    sup = _supervisor(project, home, TensorflowConfiguration(2, 1, chief=True))
    policy, session = sup.policy, sup.session
    policy.process_exited("localhost", 0, 0)
    others = [r for r in session.processes if r != 0]
    assert policy.lead_done and policy.stopping == set(others) and not policy.wind_down
    for rank in others:  # stopped by tflaunch: not failures
        policy.process_exited("localhost", rank, -15)
    assert policy.outcome(lambda i: "")["status"] == "Completed"


def test_multiworker_peers_get_the_grace_period_after_the_chief(project, home):
    sup = _supervisor(project, home, MultiWorkerConfiguration(), process_count_per_node=3)
    policy, session = sup.policy, sup.session
    policy.process_exited("localhost", 0, 0)
    assert set(policy.wind_down) == {1, 2} and not policy.stopping
    assert policy.wakeup() == pytest.approx(time.monotonic() + session.grace, abs=1)
    policy.tick(time.monotonic())
    assert not policy.stopping  # not due yet
    policy.process_exited("localhost", 1, 0)  # ended on its own
    policy.tick(time.monotonic() + session.grace + 1)
    assert policy.stopping == {2} and not policy.wind_down
    policy.process_exited("localhost", 2, -15)
    assert policy.outcome(lambda i: "")["status"] == "Completed"


def test_plain_processes_have_no_lead(project, home):
    sup = _supervisor(project, home, process_count_per_node=2)
    policy = sup.policy
    policy.process_exited("localhost", 0, 0)
    assert not policy.lead_done and policy.stop_reason is None
    assert policy.outcome(lambda i: "")["status"] == "Failed"  # rank 1 never reported
    policy.process_exited("localhost", 1, -9)
    assert policy.stop_reason == "signal" and "rank 1 on host localhost) was killed by SIGKILL" in policy.stop_detail
    assert "role" not in policy.failure


def test_launcher_exit_accounts_for_ranks_that_did_not_report(project, home):
    sup = _supervisor(project, home, process_count_per_node=3)
    policy, session = sup.policy, sup.session
    policy.process_exited("localhost", 0, 0)
    policy.launcher_exited("mpirun", "localhost", 0, lambda: "")
    assert policy.returncodes == {0: 0, 1: 0, 2: 0} and "rank(s) 1, 2 did not report" in session.warnings[0]
    assert policy.outcome(lambda i: "")["status"] == "Completed"

    sup = _supervisor(project, home, process_count_per_node=2)
    sup.policy.launcher_exited("mpirun", "localhost", 1, lambda: "ORTE says no")
    assert sup.policy.stop_detail == "mpirun exited with code 1 before rank(s) 0, 1 reported: ORTE says no"
    assert sup.policy.failure["index"] == -1 and sup.policy.failure["rank"] is None


def test_timeout_and_cancel(project, home):
    sup = _supervisor(project, home, max_run_duration_seconds=5)
    policy = sup.policy
    now = time.monotonic()
    policy.running(now)
    assert policy.wakeup() == pytest.approx(now + 5)
    policy.tick(now + 1)
    assert policy.stop_reason is None
    policy.tick(now + 6)
    assert policy.stop_reason == "timeout" and "max_run_duration_seconds=5" in policy.stop_detail
    policy.cancel("later")  # the first reason stands
    assert policy.outcome(lambda i: "")["error"]["reason"] == "timeout"

    sup = _supervisor(project, home)
    sup.policy.cancel("by the user")
    out = sup.policy.outcome(lambda i: "")
    assert out["status"] == "Canceled" and out["cancel_reason"] == "by the user"
