"""The hang watchdog (--hang-timeout) with real processes: a quiet job is stopped as hung with its ranks'
Python stacks in the record; output or metrics keep it alive; the stack dump hook chains to the
sitecustomize it shadows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, cli_env, last_run, run_cli, show, wait_no_processes

HANGS = """\
import os, sys, time
rank = int(os.environ.get("TFLAUNCH_RANK", "0"))
print(f"rank {rank}: step 1", flush=True)
print(f"rank {rank}: step 2", flush=True)

def wait_for_the_peer_forever():
    while True:
        time.sleep(0.05)  # the hung line

def wait_in_the_collective():
    while True:
        time.sleep(0.05)  # rank 0 waits for rank 1

if rank == 0 and len(sys.argv) > 1 and sys.argv[1] == "rank1-hangs":
    wait_in_the_collective()
wait_for_the_peer_forever()
"""

BUSY = """\
import sys, time
from tflaunch import Run
run = Run.get_context()
end = time.monotonic() + float(sys.argv[2])
step = 0
while time.monotonic() < end:
    if sys.argv[1] == "print":
        print("working", step, flush=True)
    else:
        run.log("loss", 1.0 / (step + 1))
    step += 1
    time.sleep(0.3)
"""

HUNG_LINE = HANGS.splitlines().index("        time.sleep(0.05)  # the hung line") + 1
COLLECTIVE_LINE = HANGS.splitlines().index("        time.sleep(0.05)  # rank 0 waits for rank 1") + 1
FAST = ["--hang-timeout", "2", "--hang-grace", "0", "--grace", "2"]


def _hung_run(home: Path, cli) -> tuple[dict, str]:
    run = show(cli, last_run(home))
    assert run["status"] == "Failed", run
    assert run["error"]["reason"] == "hung" and "hang_timeout" in run["error"]["message"]
    assert "tflaunch_logs/hang-1.txt" in run["error"]["message"]
    text = (Path(run["run_dir"]) / "tflaunch_logs" / "hang-1.txt").read_text()
    wait_no_processes(run["id"], 5)
    return run, text


def test_a_quiet_job_is_stopped_as_hung_with_its_stack(project, cli, home):
    src = project(**{"hangs.py": HANGS})
    result, _ = run_cli(cli_env(home), "--source-dir", str(src), *FAST, "hangs.py")
    assert result.returncode != 0
    assert "rank 0: step 2" in result.stdout
    run, text = _hung_run(home, cli)
    assert f'hangs.py", line {HUNG_LINE} in wait_for_the_peer_forever' in text
    assert "== rank 0, host localhost ==" in text
    assert "wait_for_the_peer_forever" in run["error"].get("stderr_tail", "")  # the dump is in its stderr too
    events = [json.loads(line) for line in (Path(run["run_dir"]) / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "hung" and e["stacks"] == "tflaunch_logs/hang-1.txt" for e in events)


def test_two_ranks_both_stacks_are_recorded(project, cli, home):
    src = project(**{"hangs.py": HANGS})
    result, _ = run_cli(cli_env(home), "--source-dir", str(src), *FAST, "--nodes", "1", "--procs-per-node", "2",
                        "hangs.py", "rank1-hangs")
    assert result.returncode != 0
    _, text = _hung_run(home, cli)
    rank0, _, rank1 = text.partition("== rank 1, host localhost ==")
    assert "== rank 0, host localhost ==" in rank0
    assert f'hangs.py", line {COLLECTIVE_LINE} in wait_in_the_collective' in rank0
    assert f'hangs.py", line {HUNG_LINE} in wait_for_the_peer_forever' in rank1


def test_mpirun_ranks_are_signalled_by_the_hosts_agent(project, cli, home):
    from tests.test_mpi_backend import system_mpirun

    src = project(**{"hangs.py": HANGS})
    result, _ = run_cli(cli_env(home), "--source-dir", str(src), *FAST, "--backend", "mpi", "--mpirun",
                        system_mpirun(), "--procs-per-node", "2", "hangs.py", "rank1-hangs")
    assert result.returncode != 0
    _, text = _hung_run(home, cli)
    rank0, _, rank1 = text.partition("== rank 1, host localhost ==")
    assert f'hangs.py", line {COLLECTIVE_LINE} in wait_in_the_collective' in rank0
    assert f'hangs.py", line {HUNG_LINE} in wait_for_the_peer_forever' in rank1


def test_a_rank_without_the_hook_is_named(project, cli, home):
    # a sitecustomize of the user's own comes first on the PYTHONPATH: tflaunch's is not run, no stack
    src = project(**{"hangs.py": HANGS, "own__sitecustomize.py": "OWN = True\n"})
    result, _ = run_cli(cli_env(home), "--source-dir", str(src), *FAST, "--env", f"PYTHONPATH={src / 'own'}",
                        "hangs.py")
    assert result.returncode != 0
    _, text = _hung_run(home, cli)
    assert "== rank 0, host localhost: no stack: it does not catch SIGURG" in text


def test_output_keeps_a_job_alive(project, cli, home):
    src = project(**{"busy.py": BUSY})
    result, _ = run_cli(cli_env(home), "--source-dir", str(src), *FAST, "busy.py", "print", "3.5")
    assert result.returncode == 0, result.stderr
    run = show(cli, last_run(home))
    assert run["status"] == "Completed"
    assert not list((Path(run["run_dir"]) / "tflaunch_logs").glob("hang-*"))


def test_metrics_keep_a_job_alive(project, cli, home):
    src = project(**{"busy.py": BUSY})
    result, _ = run_cli(cli_env(home), "--source-dir", str(src), *FAST, "busy.py", "metrics", "3.5")
    assert result.returncode == 0, result.stderr
    run = show(cli, last_run(home))
    assert run["status"] == "Completed"
    assert (Path(run["run_dir"]) / "tflaunch_logs" / "rank-0.stdout").read_text() == ""  # metrics only
    assert not list((Path(run["run_dir"]) / "tflaunch_logs").glob("hang-*"))


def test_hung_over_ssh(ssh_loopback, project, cli, home):
    src = project(**{"hangs.py": HANGS})
    result, _ = run_cli(cli_env(home), "--source-dir", str(src), *FAST, "--ssh-config", ssh_loopback.config,
                        "--hosts", "loop1:1", "hangs.py")
    assert result.returncode != 0
    _, text = _hung_run(home, cli)
    assert "== rank 0, host loop1 ==" in text  # relayed over the connection
    assert f'hangs.py", line {HUNG_LINE} in wait_for_the_peer_forever' in text


def test_hung_on_a_host_without_the_shared_filesystem(netns_hosts, project, cli, home):
    # h3 gets the job's files with tflaunch's copy (.tflaunch-lib): the hook is in that copy
    src = project(**{"hangs.py": HANGS})
    result, _ = run_cli(cli_env(home), "--source-dir", str(src), *FAST, "--ssh-config", netns_hosts.config,
                        "--hosts", "h3:1", "hangs.py")
    assert result.returncode != 0
    _, text = _hung_run(home, cli)
    assert "== rank 0, host h3 ==" in text
    assert f'hangs.py", line {HUNG_LINE} in wait_for_the_peer_forever' in text


def test_the_hook_registers_and_chains_to_the_shadowed_sitecustomize(tmp_path):
    other = tmp_path / "venv-site"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import sys\nsys.CHAINED = getattr(sys, 'CHAINED', 0) + 1\n")
    hook = REPO / "tflaunch" / "remote" / "stacks"
    code = ("import signal, sys, sitecustomize\n"
            "cgt = [l for l in open('/proc/self/status') if l.startswith('SigCgt:')][0].split()[1]\n"
            "print(sitecustomize.__file__, getattr(sys, 'CHAINED', 0), int(cgt, 16) >> (signal.SIGURG - 1) & 1)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook), str(other), str(hook)]),
               TFLAUNCH_STACKS_SIGNAL="SIGURG")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(other / "sitecustomize.py"), "1", "1"], out.stderr
    env.pop("TFLAUNCH_STACKS_SIGNAL")  # the hook does nothing but chain
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(other / "sitecustomize.py"), "1", "0"], out.stderr


def test_only_runs_with_a_hang_timeout_get_the_hook(project, cli):
    src = project(**{"hangs.py": HANGS})
    with_it = cli("run", "--dry-run", "--source-dir", str(src), "--hang-timeout", "30", "hangs.py", check=True)
    assert "TFLAUNCH_STACKS_SIGNAL=SIGURG" in with_it.stdout
    without = cli("run", "--dry-run", "--source-dir", str(src), "--max-restarts", "1", "hangs.py", check=True)
    assert "TFLAUNCH_STACKS_SIGNAL" not in without.stdout
    from tflaunch.remote import agent_host, rank, stacks

    env = {"TFLAUNCH_PYTHONPATH": str(REPO), "PYTHONPATH": "/mine"}
    for add in (agent_host.add_pythonpath, rank.add_pythonpath):
        plain = dict(env)
        add(plain, "/")
        assert plain["PYTHONPATH"] == f"/mine:{REPO}"
        hooked = dict(env, **{stacks.STACKS_VAR: stacks.STACKS_SIGNAL})
        add(hooked, "/")
        assert hooked["PYTHONPATH"] == f"/mine:{REPO}:{REPO / stacks.STACKS_DIR}"
