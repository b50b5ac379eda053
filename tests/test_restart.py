"""Restarts (tflaunch.supervise.restart) with real processes: the budget, restart exit codes, the attempt
counter and its environment, checkpoints kept across attempts, the parameter-server rules per role
(plain Python tasks reading TF_CONFIG: the mechanism; tests/test_restart_tf.py runs real TensorFlow),
whole-group restarts, Recovering and cancel, a host without a shared filesystem, and bad input."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_env, run_cli, show, wait_no_processes, wait_status

CHECKPOINTED = """
import os, sys
attempt = int(os.environ["TFLAUNCH_ATTEMPT"])
path = os.path.join("outputs", "ckpt.txt")
before = open(path).read() if os.path.exists(path) else "none"
print(f"attempt {attempt} resumes from {before}", flush=True)
os.makedirs("outputs", exist_ok=True)
open(path, "w").write(f"step-{attempt * 100}")
codes = [int(c) for c in os.environ.get("EXIT_CODES", "3").split(",")]
code = codes[attempt - 1] if attempt <= len(codes) else 0
if code:
    print(f"failing with {code}", file=sys.stderr, flush=True)
sys.exit(code)
"""

# A parameter-server job's tasks, without TensorFlow: each prints its task, attempt, port and pid; the
# chief ends the job after CHIEF_SECONDS; KILL=role:index makes that task SIGKILL itself at attempt 1.
PS_TASK = """
import json, os, sys, time
config = json.loads(os.environ["TF_CONFIG"])
role, index = config["task"]["type"], config["task"]["index"]
attempt = os.environ["TFLAUNCH_ATTEMPT"]
address = config["cluster"][role][index]
print(f"task {role}:{index} attempt {attempt} address {address} pid {os.getpid()}", flush=True)
if os.environ.get("KILL") == f"{role}:{index}" and attempt == "1":
    time.sleep(0.5)
    os.kill(os.getpid(), 9)
if role == "chief":
    time.sleep(float(os.environ.get("CHIEF_SECONDS", "3")))
    sys.exit(0)
if role == "evaluator" and os.environ.get("EVALUATOR_FAILS"):
    sys.exit(5)
while True:
    time.sleep(0.1)
"""


def events(run: dict) -> list[dict]:
    return [json.loads(line) for line in (Path(run["run_dir"]) / "events.jsonl").read_text().splitlines()]


def starts(run: dict) -> dict[int, int]:
    """rank -> how many times a process of it started."""
    counts: dict[int, int] = {}
    for e in events(run):
        if e["event"] == "process_started":
            counts[e["index"]] = counts.get(e["index"], 0) + 1
    return counts


def restart_events(run: dict) -> list[dict]:
    return [e for e in events(run) if e["event"] == "restart"]


@pytest.fixture
def checkpointed(project):
    return project(**{"train.py": CHECKPOINTED})


@pytest.fixture
def ps_tasks(project):
    return project(**{"task.py": PS_TASK})


def test_failed_attempt_restarts_and_resumes_from_its_checkpoint(checkpointed, home, cli):
    result, _ = run_cli(cli_env(home), "--source-dir", str(checkpointed), "--max-restarts", "2",
                        "--restart-delay", "0.2", "train.py")
    assert result.returncode == 0, result.stderr
    assert "attempt 1 resumes from none" in result.stdout
    assert "attempt 2 resumes from step-100" in result.stdout  # the same working directory: its checkpoint
    run = show(cli, json.loads(cli("runs", "list", "--json").stdout)[0]["id"])
    assert run["status"] == "Completed" and run["attempt"] == 2 and run["exit_code"] == 0
    [restart] = run["restarts"]
    assert restart["attempt"] == 2 and restart["ranks"] is None and restart["returncode"] == 3
    assert restart["counted"] is True and "exited with code 3" in restart["message"]
    assert [e["status"] for e in events(run) if e["event"] == "status"] == [
        "Preparing", "Running", "Recovering", "Running", "Finalizing", "Completed"]
    stdout = (Path(run["run_dir"]) / "tflaunch_logs" / "rank-0.stdout").read_text()
    assert stdout.index("attempt 1") < stdout.index("===== tflaunch: attempt 2") < stdout.index("attempt 2 resumes")
    assert (Path(run["run_dir"]) / "outputs" / "ckpt.txt").read_text() == "step-200"
    text = cli("runs", "show", run["id"]).stdout
    assert "attempts:    2 (1 restart(s), 1 of max_restarts=2 used)" in text
    assert "attempt 2: all processes started again after train.py exited with code 3" in text


def test_budget_used_up_fails_with_the_last_cause(checkpointed, home, cli):
    env = cli_env(home, EXIT_CODES="3,4,6")
    result, _ = run_cli(env, "--source-dir", str(checkpointed), "--max-restarts", "2", "--restart-delay", "0",
                        "train.py")
    assert result.returncode == 6
    run = show(cli, json.loads(cli("runs", "list", "--json").stdout)[0]["id"])
    assert run["status"] == "Failed" and run["attempt"] == 3 and run["exit_code"] == 6
    assert run["error"]["reason"] == "exit_code"
    assert run["error"]["message"] == "train.py exited with code 6 (attempt 3; max_restarts=2 used up)"
    assert "failing with 6" in run["error"]["stderr_tail"]
    assert [r["returncode"] for r in run["restarts"]] == [3, 4]
    wait_no_processes(run["id"])


def test_restart_exit_code_does_not_use_the_budget(checkpointed, home, cli):
    env = cli_env(home, EXIT_CODES="75,75,75")
    result, _ = run_cli(env, "--source-dir", str(checkpointed), "--restart-on-exit-codes", "75",
                        "--max-restarts", "1", "--restart-delay", "0", "train.py")
    assert result.returncode == 0, result.stderr
    run = show(cli, json.loads(cli("runs", "list", "--json").stdout)[0]["id"])
    assert run["status"] == "Completed" and run["attempt"] == 4
    assert [r["counted"] for r in run["restarts"]] == [False, False, False]
    assert "(a restart exit code: not counted)" in cli("runs", "show", run["id"]).stdout


def test_without_a_recovery_the_first_failure_ends_the_run(checkpointed, home, cli):
    result, _ = run_cli(cli_env(home), "--source-dir", str(checkpointed), "train.py")
    assert result.returncode == 3
    run = show(cli, json.loads(cli("runs", "list", "--json").stdout)[0]["id"])
    assert run["status"] == "Failed" and "attempt" not in run and "restarts" not in run


def test_ps_worker_restarts_alone_on_its_task_and_port(ps_tasks, home, cli):
    env = cli_env(home, KILL="worker:1", CHIEF_SECONDS="3")
    result, _ = run_cli(env, "--source-dir", str(ps_tasks), "--backend", "ps", "--workers", "2", "--ps", "1",
                        "--chief", "--max-restarts", "1", "--restart-delay", "0", "task.py")
    assert result.returncode == 0, result.stderr
    run = show(cli, json.loads(cli("runs", "list", "--json").stdout)[0]["id"])
    processes = {p["rank"]: p for p in json.loads((Path(run["run_dir"]) / "processes.json").read_text())}
    worker1 = next(r for r, p in processes.items() if p["role"] == "worker" and p["index"] == 1)
    assert run["status"] == "Completed" and run["attempt"] == 2
    [restart] = restart_events(run)
    assert restart["ranks"] == [worker1] and restart["role"] == "worker" and restart["task_index"] == 1
    assert starts(run) == {r: (2 if r == worker1 else 1) for r in processes}  # the others never restarted
    lines = [line for line in (Path(run["run_dir"]) / processes[worker1]["stdout"]).read_text().splitlines()
             if line.startswith("task ")]
    assert len(lines) == 2 and "attempt 1" in lines[0] and "attempt 2" in lines[1]
    assert lines[0].split("address ")[1].split()[0] == lines[1].split("address ")[1].split()[0]  # same port
    wait_no_processes(run["id"])


def test_ps_failure_restarts_the_ps_and_the_chief(ps_tasks, home, cli):
    env = cli_env(home, KILL="ps:0", CHIEF_SECONDS="2")
    result, _ = run_cli(env, "--source-dir", str(ps_tasks), "--backend", "ps", "--workers", "1", "--ps", "1",
                        "--chief", "--max-restarts", "1", "--restart-delay", "0", "--grace", "2", "task.py")
    assert result.returncode == 0, result.stderr
    run = show(cli, json.loads(cli("runs", "list", "--json").stdout)[0]["id"])
    roles = {p["rank"]: p["role"] for p in json.loads((Path(run["run_dir"]) / "processes.json").read_text())}
    [restart] = restart_events(run)
    assert sorted(roles[r] for r in restart["ranks"]) == ["chief", "ps"] and restart["role"] == "ps"
    assert starts(run) == {r: (1 if role == "worker" else 2) for r, role in roles.items()}
    assert run["status"] == "Completed"
    wait_no_processes(run["id"])


def test_evaluator_failure_never_fails_the_run(ps_tasks, home, cli):
    env = cli_env(home, EVALUATOR_FAILS="1", CHIEF_SECONDS="1.5")
    result, _ = run_cli(env, "--source-dir", str(ps_tasks), "--backend", "ps", "--workers", "1", "--ps", "1",
                        "--chief", "--evaluator", "--max-restarts", "1", "task.py")
    assert result.returncode == 0, result.stderr
    run = show(cli, json.loads(cli("runs", "list", "--json").stdout)[0]["id"])
    assert run["status"] == "Completed" and run["restarts"] == []
    assert any("evaluator 0" in w and "went on without it" in w for w in run["warnings"])


def test_a_failed_rank_restarts_the_whole_group(project, home, cli):
    src = project(**{"group.py": """
        import os, sys, time
        rank, attempt = os.environ["TFLAUNCH_RANK"], os.environ["TFLAUNCH_ATTEMPT"]
        print(f"rank {rank} attempt {attempt}", flush=True)
        if rank == "1" and attempt == "1":
            sys.exit(9)
        time.sleep(0.5 if attempt != "1" else 30)
    """})
    result, _ = run_cli(cli_env(home), "--source-dir", str(src), "--procs-per-node", "2", "--max-restarts", "1",
                        "--restart-delay", "0", "--grace", "2", "group.py")
    assert result.returncode == 0, result.stderr
    run = show(cli, json.loads(cli("runs", "list", "--json").stdout)[0]["id"])
    assert run["status"] == "Completed" and run["attempt"] == 2
    assert [r["ranks"] for r in run["restarts"]] == [None] and starts(run) == {0: 2, 1: 2}
    wait_no_processes(run["id"])


def test_cancel_while_recovering_ends_canceled(checkpointed, home, cli, cli_popen):
    proc = cli_popen("run", "--source-dir", str(checkpointed), "--max-restarts", "3", "--restart-delay", "60",
                     "train.py")
    deadline = time.monotonic() + 30
    while not (home / "runs").is_dir() or not [p for p in (home / "runs").iterdir() if not p.name.startswith(".")]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    run_id = json.loads(cli("runs", "list", "--json").stdout)[0]["id"]
    wait_status(cli, run_id, {"Recovering"}, timeout=30)
    started = time.monotonic()
    assert cli("runs", "cancel", run_id).returncode == 0
    proc.wait(30)
    assert time.monotonic() - started < 20  # not the 60 s delay
    run = show(cli, run_id)
    assert run["status"] == "Canceled" and run["attempt"] == 2
    assert starts(run) == {0: 1}  # attempt 2 never started
    wait_no_processes(run_id)


def test_ctrl_c_while_recovering_ends_canceled(checkpointed, home, cli):
    proc = subprocess.Popen([sys.executable, "-m", "tflaunch", "run", "--source-dir", str(checkpointed),
                             "--max-restarts", "3", "--restart-delay", "60", "train.py"], env=cli_env(home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            listed = json.loads(cli("runs", "list", "--json").stdout or "[]") if (home / "runs").is_dir() else []
            if listed and listed[0]["status"] == "Recovering":
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        import os
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(20) == 130
        run = show(cli, listed[0]["id"])
        assert run["status"] == "Canceled" and "Ctrl-C" in run["cancel_reason"]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_restart_on_a_host_without_a_shared_filesystem_keeps_its_checkpoint(netns_hosts, checkpointed, home, cli):
    result, _ = run_cli(cli_env(home), "--source-dir", str(checkpointed), "--ssh-config", netns_hosts.config,
                        "--hosts", "h3:1", "--max-restarts", "1", "--restart-delay", "0", "train.py", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "attempt 2 resumes from step-100" in result.stdout  # brought home, then copied to h3 again
    run = show(cli, json.loads(cli("runs", "list", "--json").stdout)[0]["id"])
    hosts = json.loads((Path(run["run_dir"]) / "hosts.json").read_text())
    assert hosts[0]["shared_filesystem"] is False
    assert run["status"] == "Completed" and run["attempt"] == 2
    leftovers = subprocess.run(["ssh", "-F", netns_hosts.config, "h3", f"ls /tmp/tflaunch-0 2>/dev/null | "
                                f"grep {run['id']} || true"], capture_output=True, text=True, timeout=30)
    assert leftovers.stdout.strip() == ""


@pytest.mark.parametrize("args, message", [
    (["--max-restarts", "-1"], "max_restarts (--max-restarts): must be an integer >= 0, got -1"),
    (["--restart-on-exit-codes", "0"], "restart_on_exit_codes (--restart-on-exit-codes): exit codes are 1-255"),
    (["--restart-delay", "5"], "restart_delay (--restart-delay): only meaningful with max_restarts"),
    (["--hang-grace", "5"], "hang_grace (--hang-grace): only meaningful with hang_timeout"),
    (["--restart-on-exit-codes", "x"], "expected exit codes such as 75,76"),
])
def test_bad_recovery_options_are_one_line_errors(args, message, checkpointed, home):
    result, _ = run_cli(cli_env(home), "--source-dir", str(checkpointed), *args, "train.py")
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 3


def test_api_recovery_arguments(checkpointed):
    from tflaunch import Estimator, SpecError

    spec = Estimator(str(checkpointed), entry_script="train.py", max_restarts=2, restart_on_exit_codes=[75],
                     restart_delay=0.5).job_spec()
    assert spec.recovery["max_restarts"] == 2 and spec.recovery["restart_on_exit_codes"] == [75]
    assert Estimator(str(checkpointed), entry_script="train.py").job_spec().recovery is None
    with pytest.raises(SpecError, match="max_restarts .* must be an integer >= 0"):
        Estimator(str(checkpointed), entry_script="train.py", max_restarts="3")


def test_mpi_job_restarts_as_a_whole(project, home, cli, tmp_path):
    if not Path("/usr/bin/mpirun").exists():
        pytest.skip("/usr/bin/mpirun missing (apt-get install openmpi-bin)")
    # rank 1 fails only once rank 0 has printed: on a busy machine rank 0's Python may not yet have reached its
    # print when mpirun stops it for rank 1's exit (what was printed must be in the log; what was not, cannot)
    printed = tmp_path / "rank-0-printed"
    src = project(**{"ranks.py": f"""
        import os, sys, time
        rank, attempt = os.environ["TFLAUNCH_RANK"], os.environ["TFLAUNCH_ATTEMPT"]
        print(f"rank {{rank}} attempt {{attempt}}", flush=True)
        if rank == "0" and attempt == "1":
            open({str(printed)!r}, "w").close()
        if rank == "1" and attempt == "1":
            deadline = time.monotonic() + 60
            while not os.path.exists({str(printed)!r}) and time.monotonic() < deadline:
                time.sleep(0.05)
            sys.exit(7)
        time.sleep(0.3 if attempt != "1" else 30)
    """})
    result, _ = run_cli(cli_env(home), "--source-dir", str(src), "--backend", "mpi", "--mpirun", "/usr/bin/mpirun",
                        "--procs-per-node", "2", "--max-restarts", "1", "--restart-delay", "0", "ranks.py",
                        timeout=120)
    assert result.returncode == 0, result.stderr
    run = show(cli, json.loads(cli("runs", "list", "--json").stdout)[0]["id"])
    assert run["status"] == "Completed" and run["attempt"] == 2
    [restart] = run["restarts"]
    assert restart["ranks"] is None and restart["rank"] == 1 and restart["returncode"] == 7
    assert starts(run) == {-1: 2, 0: 2, 1: 2}  # mpirun and both ranks, once per attempt
    for rank in (0, 1):
        log = (Path(run["run_dir"]) / "tflaunch_logs" / f"rank-{rank}.stdout").read_text()
        assert f"rank {rank} attempt 1" in log and f"rank {rank} attempt 2" in log
    wait_no_processes(run["id"])
