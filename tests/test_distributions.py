"""The distributions table: one row per backend, read by planning instead of testing names."""
from __future__ import annotations

from tflaunch.plan.distributions import DISTRIBUTIONS, backend_name, distribution
from tflaunch.plan.processes import RunContext, plan, ports_needed
from tflaunch.spec.jobspec import JobSpec, procs_per_host
from tflaunch.plan.tfconfig import TF_BACKENDS

CTX = RunContext(run_id="r", experiment="e", run_dir="/r", work_dir="/w", home="/h")


def test_rows_cover_every_backend_and_name_themselves():
    assert set(DISTRIBUTIONS) == {"plain", "ps", "multiworker", "mpi"}
    assert all(d.name == name for name, d in DISTRIBUTIONS.items())
    assert TF_BACKENDS == ("ps", "multiworker")
    assert backend_name(None) == "plain" and distribution({"backend": "mpi"}).launcher == "mpirun"


def test_spread_rule_decides_processes_per_host():
    assert procs_per_host(4, {"backend": "ps", "worker_count": 2, "parameter_server_count": 1}) == 1
    assert procs_per_host(4, {"backend": "multiworker"}) == 4
    assert procs_per_host(4, None) == 4


def test_row_environment_reaches_every_process_of_that_backend_only():
    ps = JobSpec(source_directory="/s", entry_script="t.py", python="python3", distributed={
        "backend": "ps", "worker_count": 2, "parameter_server_count": 1, "chief": True, "evaluator": False,
        "port_base": 4000})
    assert {p.env.get("GRPC_FAIL_FAST") for p in plan(ps, CTX)} == {"use_caller"}
    mw = JobSpec(source_directory="/s", entry_script="t.py", python="python3", process_count_per_node=2,
                 distributed={"backend": "multiworker", "evaluator": False, "port_base": 4000})
    assert all("GRPC_FAIL_FAST" not in p.env for p in plan(mw, CTX))


def test_mpi_reserves_no_rendezvous_port_plain_one_on_the_first_host():
    mpi = JobSpec(source_directory="/s", entry_script="t.py", python="python3", process_count_per_node=2,
                  distributed={"backend": "mpi"})
    plain = JobSpec(source_directory="/s", entry_script="t.py", python="python3", process_count_per_node=2)
    assert ports_needed(mpi, None) == {}
    assert ports_needed(plain, None) == {"localhost": 1}
    assert all(p.env.get("TFLAUNCH_COORDINATOR") == "localhost:PORT" for p in plan(plain, CTX))
    assert all("TFLAUNCH_COORDINATOR" not in p.env for p in plan(mpi, CTX))
