"""Slurm requeues against the real two-node Slurm 22.05 of tests/infra/slurm.py: ``run --slurm --max-requeues N``
goes on in the job's next allocation (same run id, attempt + 1, the working directory and its checkpoint kept);
without it the job is ``--no-requeue``.

A requeued job is held ~121 s (EligibleTime); the tests start it at once with ``scontrol update StartTime=now``
once it is PENDING, and a second later: a start within the second of the requeue is refused by slurmd
("Job credential revoked", the job FAILED) -- Slurm's hold is there for that."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_env, show, wait_status

CKPT = """\
import json, os, socket, sys, time
rank, attempt = os.environ["TFLAUNCH_RANK"], os.environ.get("TFLAUNCH_ATTEMPT")
os.makedirs("outputs", exist_ok=True)
path = "outputs/ckpt-%s.txt" % rank
seen = open(path).read() if os.path.exists(path) else None
print(json.dumps({"rank": int(rank), "attempt": attempt, "seen": seen, "host": socket.gethostname(),
                  "restart": os.environ.get("SLURM_RESTART_COUNT")}), flush=True)
if seen is None and os.environ.get("KILL_SUPERVISOR"):  # as if its node failed: no hand-over
    def gone(*_):
        os.kill(json.load(open(os.environ["TFLAUNCH_RUN_DIR"] + "/lease.json"))["pid"], 9)
        sys.exit(143)
    import signal; signal.signal(signal.SIGTERM, gone)
if seen is None:
    open(path, "w").write("step 10 of attempt %s" % attempt)
    open("started-%s" % rank, "w").close()
    time.sleep(float(os.environ.get("SLEEP", "300")))
"""

TIME_LIMITED = """\
import json, os, signal, sys, time
attempt = os.environ.get("TFLAUNCH_ATTEMPT")
os.makedirs("outputs", exist_ok=True)
seen = open("outputs/ckpt.txt").read() if os.path.exists("outputs/ckpt.txt") else None
print(json.dumps({"attempt": attempt, "seen": seen}), flush=True)
if seen:
    sys.exit(0)
def save(*_):
    open("outputs/ckpt.txt", "w").write("saved on %s" % os.environ["TFLAUNCH_CHECKPOINT_SIGNAL"])
signal.signal(signal.SIGUSR2, save)
time.sleep(300)
"""


@pytest.fixture
def cluster(slurm_clean, home, tmp_path):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "ckpt.py").write_text(CKPT)
    (project / "limited.py").write_text(TIME_LIMITED)
    env = {k: v for k, v in cli_env(home).items() if not k.startswith("SLURM_")}
    env.update(slurm_clean.env)
    return project, env


def _runner(env, cwd):
    def run(*args, check=False, timeout=120):
        result = subprocess.run([sys.executable, "-m", "tflaunch", *args], cwd=cwd, env=env, capture_output=True,
                                text=True, errors="replace", timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"tflaunch {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result
    return run


def _submit(tfl, *args) -> str:
    result = tfl("run", "--slurm", "--detach", *args, check=True)
    return result.stdout.strip()


def _wait_started(run: dict, ranks: int, timeout: float = 30) -> None:
    work = Path(run["run_dir"]) / "work"
    deadline = time.monotonic() + timeout
    while not all((work / f"started-{r}").exists() for r in range(ranks)):
        assert time.monotonic() < deadline, sorted(p.name for p in work.iterdir()) if work.is_dir() else "no work dir"
        time.sleep(0.1)


def _start_now(slurm, job: str) -> None:
    """The requeued job, PENDING (held ~121 s), starts at once."""
    slurm.wait_job(job, ("PENDING",), timeout=30)
    time.sleep(1.5)  # not within the second of the requeue: slurmd would refuse the revoked credential
    result = slurm.command("scontrol", "update", f"jobid={job}", "StartTime=now")
    assert result.returncode == 0, result.stderr


def _statuses(run: dict) -> list[str]:
    events = map(json.loads, (Path(run["run_dir"]) / "events.jsonl").read_text().splitlines())
    return [e["status"] for e in events if e["event"] == "status"]


def _rows(run: dict) -> list[dict]:
    rows = []
    for f in sorted((Path(run["run_dir"]) / "tflaunch_logs").glob("rank-*.stdout")):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.startswith("{")]
    return sorted(rows, key=lambda r: (r.get("rank", 0), r["attempt"]))


def _leftovers(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines()[1:] if marker in line and "ps -eo" not in line]


def _no_orphans(slurm, *markers: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while any(_leftovers(m) for m in markers) or slurm.stepd_pids():
        assert time.monotonic() < deadline, [_leftovers(m) for m in markers]
        time.sleep(0.2)


def test_scontrol_requeue_continues_the_same_run_in_the_next_allocation(cluster, slurm):
    """`scontrol requeue` of a running job (as a preemption with PreemptMode=REQUEUE does): tflaunch in the job
    stops the processes and hands the run back (Queued, attempt 2); the job's next allocation goes on with the
    same run id and working directory: the script sees TFLAUNCH_ATTEMPT=2 and its checkpoint; no requeue is
    left, so the job is made non-requeueable."""
    project, env = cluster
    tfl = _runner(env, project)
    run_id = _submit(tfl, "--max-requeues", "1", "--nodes", "2", "--procs-per-node", "1", "ckpt.py")
    run = wait_status(tfl, run_id, {"Running"}, timeout=30)
    job = run["slurm"]["job_id"]
    assert "#SBATCH --requeue" in (Path(run["run_dir"]) / "slurm" / "job.sbatch").read_text()
    _wait_started(run, 2)
    assert slurm.command("scontrol", "requeue", job).returncode == 0
    run = wait_status(tfl, run_id, {"Queued", "Completed", "Failed", "Canceled"}, timeout=30)
    assert run["status"] == "Queued" and run["attempt"] == 2, run
    assert [r["reason"] for r in run["requeues"]] == ["requeued"]
    _start_now(slurm, job)
    run = wait_status(tfl, run_id, {"Completed", "Failed", "Canceled"}, timeout=60)
    assert run["status"] == "Completed", run
    assert run["attempt"] == 2 and len(run["requeues"]) == 1 and run["max_requeues"] == 1
    rows = _rows(run)
    assert [(r["rank"], r["attempt"], r["seen"]) for r in rows] == [
        (0, "1", None), (0, "2", "step 10 of attempt 1"), (1, "1", None), (1, "2", "step 10 of attempt 1")]
    assert {r["restart"] for r in rows if r["attempt"] == "2"} == {"1"}
    log = (Path(run["run_dir"]) / "tflaunch_logs" / "rank-0.stdout").read_text()
    assert "===== tflaunch: attempt 2 (requeued: Slurm requeued job" in log
    assert sorted(p.name for p in (Path(run["run_dir"]) / "outputs").iterdir()) == ["ckpt-0.txt", "ckpt-1.txt"]
    assert _statuses(run) == ["Preparing", "Queued", "Running", "Queued", "Running", "Finalizing", "Completed"]
    text = tfl("runs", "show", run_id, check=True).stdout
    assert "attempts:    2 (0 restart(s), 1 requeue(s) of max_requeues=1)" in text
    info = slurm.command("scontrol", "-o", "show", "job", job).stdout
    assert "JobState=COMPLETED" in info and "Restarts=1" in info and "Requeue=0" in info  # none left
    _no_orphans(slurm, str(project / "ckpt.py"), run_id)


def test_without_max_requeues_the_job_is_not_requeued(cluster, slurm):
    """Without --max-requeues the batch script says --no-requeue: Slurm refuses `scontrol requeue` (and would
    cancel the job on a preemption: PREEMPTED), the run goes on and ends with its own outcome."""
    project, env = cluster
    tfl = _runner(env, project)
    run_id = _submit(tfl, "--env", "SLEEP=3", "ckpt.py")
    run = wait_status(tfl, run_id, {"Running"}, timeout=30)
    job = run["slurm"]["job_id"]
    assert "#SBATCH --no-requeue" in (Path(run["run_dir"]) / "slurm" / "job.sbatch").read_text()
    _wait_started(run, 1)
    refused = slurm.command("scontrol", "requeue", job)
    assert refused.returncode != 0 and "disabled" in refused.stderr, refused.stderr
    run = wait_status(tfl, run_id, {"Completed", "Failed", "Canceled"}, timeout=30)
    assert run["status"] == "Completed" and "requeues" not in run, run
    assert _statuses(run) == ["Preparing", "Queued", "Running", "Finalizing", "Completed"]
    assert slurm.wait_job(job) == "COMPLETED"


def test_cancel_a_requeued_run_while_its_job_pends(cluster, slurm):
    """A requeued run is Queued, leased by its job (never declared lost meanwhile); `runs cancel` scancels it."""
    project, env = cluster
    tfl = _runner(env, project)
    run_id = _submit(tfl, "--max-requeues", "2", "ckpt.py")
    run = wait_status(tfl, run_id, {"Running"}, timeout=30)
    job = run["slurm"]["job_id"]
    _wait_started(run, 1)
    assert slurm.command("scontrol", "requeue", job).returncode == 0
    slurm.wait_job(job, ("PENDING",), timeout=30)
    run = show(tfl, run_id)
    assert run["status"] == "Queued" and run["attempt"] == 2 and run["slurm"]["state"] == "PENDING", run
    assert "BeginTime" in tfl("runs", "show", run_id, check=True).stdout
    done = tfl("runs", "cancel", "--wait", run_id, timeout=60)
    assert done.returncode == 0 and "Canceled" in done.stdout, done.stdout + done.stderr
    run = show(tfl, run_id)
    assert run["status"] == "Canceled" and run["attempt"] == 2
    assert slurm.job_state(job) == "CANCELLED"
    _no_orphans(slurm, str(project / "ckpt.py"), run_id)


def test_an_allocation_that_ended_without_handing_over_counts_as_a_requeue(cluster, slurm):
    """tflaunch in the job cannot hand the run over (the task SIGKILLs it on Slurm's SIGTERM, as if its node
    failed): the run stays Running and the job's next allocation (SLURM_RESTART_COUNT=1) goes on with
    attempt 2, the lost allocation counted as a requeue."""
    project, env = cluster
    tfl = _runner(env, project)
    run_id = _submit(tfl, "--max-requeues", "1", "--env", "KILL_SUPERVISOR=1", "ckpt.py")
    run = wait_status(tfl, run_id, {"Running"}, timeout=30)
    job = run["slurm"]["job_id"]
    _wait_started(run, 1)
    assert slurm.command("scontrol", "requeue", job).returncode == 0
    slurm.wait_job(job, ("PENDING",), timeout=30)
    assert show(tfl, run_id)["status"] == "Running"
    _start_now(slurm, job)
    run = wait_status(tfl, run_id, {"Completed", "Failed", "Canceled"}, timeout=60)
    assert run["status"] == "Completed" and run["attempt"] == 2, run
    assert "ended while the run was Running" in run["requeues"][0]["message"]
    assert [(r["attempt"], r["seen"]) for r in _rows(run)] == [("1", None), ("2", "step 10 of attempt 1")]
    assert _statuses(run) == ["Preparing", "Queued", "Running", "Finalizing", "Completed"]


@pytest.mark.slow  # ~40 s: Slurm's smallest time limit is a minute
def test_time_limit_warning_requeues_the_job_after_the_checkpoint_signal(cluster, slurm, tmp_path):
    """--time 1 --signal USR2@50 --max-requeues 1: the task gets SIGUSR2 50 s before the limit and saves a
    checkpoint; 25 s before it tflaunch stops the run and has Slurm requeue the job; the next allocation's
    attempt 2 finds the checkpoint and completes. The working copy is on --scratch (node-local, as far as
    tflaunch knows): the outputs go into the record at the requeue and back into the next copy."""
    project, env = cluster
    tfl = _runner(env, project)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    run_id = _submit(tfl, "--max-requeues", "1", "--time", "1", "--signal", "USR2@50", "--scratch", str(scratch),
                     "limited.py")
    run = wait_status(tfl, run_id, {"Running"}, timeout=30)
    job = run["slurm"]["job_id"]
    deadline = time.monotonic() + 75
    while not show(tfl, run_id).get("requeues"):
        assert time.monotonic() < deadline, show(tfl, run_id)
        time.sleep(0.5)
    run = show(tfl, run_id)
    assert run["status"] == "Queued" and run["attempt"] == 2, run
    assert "reaches its time limit" in run["requeues"][0]["message"]
    assert (Path(run["run_dir"]) / "outputs" / "ckpt.txt").exists() and not (scratch / run_id).exists()
    _start_now(slurm, job)
    run = wait_status(tfl, run_id, {"Completed", "Failed", "Canceled"}, timeout=60)
    assert run["status"] == "Completed", run
    assert [(r["attempt"], r["seen"]) for r in _rows(run)] == [("1", None), ("2", "saved on SIGUSR2")]
    assert (Path(run["run_dir"]) / "outputs" / "ckpt.txt").exists() and not (scratch / run_id).exists()
    assert _statuses(run) == ["Preparing", "Queued", "Running", "Queued", "Running", "Finalizing", "Completed"]
    _no_orphans(slurm, str(project / "limited.py"), run_id)


# -- without Slurm -------------------------------------------------------------------------------------------
def test_batch_script_requeue_lines_and_time_helpers():
    from tflaunch import slurm as S

    def script(requeue):
        return S.batch_script(run_id="r", experiment="e", record_dir="/rec", options=S.SlurmOptions(), nodes=1,
                              ntasks_per_node=1, ntasks=None, gpus_per_node=None, command=["x"], requeue=requeue)
    assert "#SBATCH --requeue\n" in script(True) and "--no-requeue" not in script(True)
    assert "#SBATCH --no-requeue\n" in script(False) and "#SBATCH --open-mode=append" in script(False)
    assert [S.signal_seconds(v) for v in ("USR2@60", "B:USR2@5", "USR2", None)] == [60, 5, 60, None]
    assert S.end_time({"EndTime": "Unknown"}) is None and S.end_time({}) is None
    assert S.end_time({"EndTime": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(1e9))}) == 1e9
    assert S.restarts({"Restarts": "2"}) == 2 and S.restarts(None) == 0


def test_runs_show_lists_requeues_with_restarts():
    from tflaunch.cli import _attempt_lines

    lines = _attempt_lines({"attempt": 3, "max_restarts": 2, "max_requeues": 1,
                            "restarts": [{"attempt": 3, "ranks": None, "message": "rank 0 exited with code 1"}],
                            "requeues": [{"attempt": 2, "reason": "requeued", "message": "Slurm requeued job 7"}]})
    assert lines == ["attempts:    3 (1 restart(s), 1 of max_restarts=2 used, 1 requeue(s) of max_requeues=1)",
                     "  attempt 2: in the job's next allocation, requeued after Slurm requeued job 7",
                     "  attempt 3: all processes started again after rank 0 exited with code 1"]


def test_a_requeued_jobs_stale_lease_is_not_declared_lost(tmp_path, monkeypatch):
    """The lease of an allocation that ended without handing over: while the job runs again (Restarts went up
    since the lease was written) the next allocation's tflaunch takes the run over; the run is not lost."""
    from tflaunch import fsio, slurm as S
    from tflaunch.history.store import Store

    record = Store(str(tmp_path / "home")).create_run("e", {"spec": {"entry_script": "x.py"}})
    record.write_status("Running")
    fsio.atomic_write_json(record.path("lease.json"), {
        "host": "elsewhere", "boot_id": "b", "pidns": "p", "pid": 1, "heartbeat": time.time() - 100, "interval": 2,
        "timeout": 30, "slurm_job_id": "7", "slurm_restarts": 0})
    monkeypatch.setattr(S, "job_info", lambda job: {"JobState": "RUNNING", "Restarts": "1"})
    assert record.read_status()["status"] == "Running"
    monkeypatch.setattr(S, "job_info", lambda job: {"JobState": "RUNNING", "Restarts": "0"})
    record._slurm_cache = None
    assert record.read_status()["error"]["reason"] == "launcher_lost"
