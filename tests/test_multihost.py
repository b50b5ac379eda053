"""Many processes on many hosts: placement, fail fast, no orphans anywhere, files across hosts.

Remote hosts are real: sshd in network namespaces (``netns_hosts``: h1 and h2 share the filesystem
with the launcher, h3 does not) and on loopback (``ssh_loopback``), see tests/infra/hosts.py.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_env, last_run, last_run_when, pids_with_token, process_exits, run_cli, show, wait_no_processes

RANKED = """\
import os, sys, time
rank = int(os.environ["TFLAUNCH_RANK"])
mode = sys.argv[1]
marks = os.environ.get("MARK_DIR")
if marks:
    open(os.path.join(marks, f"up-{rank}"), "w").write(os.environ["TFLAUNCH_RUN_ID"])
print(f"rank {rank} of {os.environ['TFLAUNCH_WORLD_SIZE']} up", flush=True)
if mode == "fail" and rank == 2:
    time.sleep(1)
    print("rank 2 gives up", file=sys.stderr, flush=True)
    sys.exit(3)
if mode == "stubborn":
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(os.path.join(marks, f"ignoring-{rank}"), "w").close()
    if rank == 1:  # fails once every rank ignores SIGTERM, however slowly they started
        while len([n for n in os.listdir(marks) if n.startswith("ignoring-")]) < int(os.environ["TFLAUNCH_WORLD_SIZE"]):
            time.sleep(0.05)
        time.sleep(1)
        sys.exit(5)
if mode == "ok":
    os.makedirs("outputs", exist_ok=True)
    with open("outputs/shared.txt", "w") as fh:
        fh.write(f"rank {rank}")
    with open(f"outputs/rank-{rank}.txt", "w") as fh:
        fh.write(os.uname().nodename)
    from tflaunch import Run
    Run.get_context().log("host", os.uname().nodename)
    sys.exit(0)
time.sleep(120)
"""


@pytest.fixture
def ranked(project, tmp_path, home):
    src = project(**{"ranked.py": RANKED})
    marks = tmp_path / "marks"
    marks.mkdir()
    return src, marks, cli_env(home, MARK_DIR=str(marks))


def _ssh(hosts):
    return ["--ssh-config", hosts.config]


# -- local ---------------------------------------------------------------------------------------------
def test_eight_local_processes_prefix_and_log_files(ranked, cli, home):
    src, marks, env = ranked
    result, _ = run_cli(env, "--source-dir", str(src), "--nodes", "1", "--procs-per-node", "8", "ranked.py", "ok")
    assert result.returncode == 0, result.stderr
    for rank in range(8):
        assert f"[rank {rank}] rank {rank} of 8 up\n" in result.stdout
    run = show(cli, last_run(home))
    assert run["status"] == "Completed" and run["exit_code"] == 0
    logs = Path(run["run_dir"]) / "tflaunch_logs"
    assert (logs / "rank-5.stdout").read_text() == "rank 5 of 8 up\n"  # raw, no prefix, in the record
    assert len(list((Path(run["run_dir"]) / "outputs").glob("rank-*.txt"))) == 8


def test_fail_fast_names_the_failing_rank(ranked, cli, home):
    src, marks, env = ranked
    result, _ = run_cli(env, "--source-dir", str(src), "--procs-per-node", "4", "ranked.py", "fail")
    assert result.returncode == 3, result.stderr
    run = show(cli, last_run(home))
    # fail fast: rank 2 ended first, then tflaunch stopped the others (SIGTERM) in their 120 s sleep
    # (run_cli's 60 s timeout catches a launcher that waits for them)
    exits = process_exits(run)
    assert next(iter(exits)) == 2 and exits == {2: 3, 0: -15, 1: -15, 3: -15}, exits
    error = run["error"]
    assert run["status"] == "Failed" and run["exit_code"] == 3
    assert (error["reason"], error["rank"], error["host"]) == ("exit_code", 2, "localhost")
    assert "rank 2" in error["message"] and "rank 2 gives up" in error["stderr_tail"]
    assert "rank 2 on host localhost" in result.stderr
    wait_no_processes(run["id"], timeout=1)


def test_a_rank_that_ignores_sigterm_is_killed_after_the_grace(ranked, cli, home):
    src, marks, env = ranked
    result, _ = run_cli(env, "--source-dir", str(src), "--procs-per-node", "3", "--grace", "1",
                        "ranked.py", "stubborn")
    assert result.returncode == 5
    run = show(cli, last_run(home))
    assert run["error"]["rank"] == 1  # the ranks killed by the teardown are not the cause
    exits = process_exits(run)  # SIGTERM ignored: SIGKILLed after the grace, not at their 120 s sleep's end
    assert next(iter(exits)) == 1 and exits == {1: 5, 0: -9, 2: -9}, exits
    wait_no_processes(run["id"], timeout=1)


def test_dry_run_plans_a_thousand_hosts(project, cli, tmp_path):  # its speed: bench/dry_run_hosts.py
    src = project(**{"train.py": ""})
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("".join(f"node{i:04d} slots=8\n" for i in range(1000)))
    result = cli("run", "--source-dir", str(src), "--hostfile", str(hostfile), "--dry-run", "--json", "train.py",
                 check=True)
    plan = json.loads(result.stdout)
    procs = plan["processes"]
    assert len(procs) == 8000
    p = procs[8 * 517 + 3]
    assert (p["host"], p["rank"], p["local_rank"], p["role"], p["index"]) == ("node0517", 4139, 3, "worker", 4139)
    assert p["env"]["TFLAUNCH_WORLD_SIZE"] == "8000" and p["env"]["TFLAUNCH_COORDINATOR"] == "node0000:PORT"


def test_slot_check(project, cli, tmp_path):
    src = project(**{"train.py": ""})
    result = cli("run", "--source-dir", str(src), "--hosts", "a:2,b:2", "--procs-per-node", "4", "--dry-run", "train.py")
    assert result.returncode == 2 and "--oversubscribe" in result.stderr
    ok = cli("run", "--source-dir", str(src), "--hosts", "a:2,b:2", "--procs-per-node", "4", "--oversubscribe",
             "--dry-run", "--json", "train.py", check=True)
    assert len(json.loads(ok.stdout)["processes"]) == 8


# -- over ssh ------------------------------------------------------------------------------------------
def test_ssh_fail_fast_across_hosts(netns_hosts, ranked, cli, home):
    src, marks, env = ranked
    result, _ = run_cli(env, "--source-dir", str(src), *_ssh(netns_hosts), "--hosts", "h1:2,h2:2",
                        "ranked.py", "fail")
    assert result.returncode == 3, result.stderr
    run = show(cli, last_run(home))
    exits = process_exits(run)  # rank 2 first, then the others, stopped in their 120 s sleep
    assert next(iter(exits)) == 2 and exits == {2: 3, 0: -15, 1: -15, 3: -15}, exits
    assert (run["error"]["rank"], run["error"]["host"]) == (2, "h2")
    assert "rank 2 gives up" in run["error"]["stderr_tail"]
    wait_no_processes(run["id"], timeout=2)


def test_ssh_launcher_sigkill_leaves_nothing_on_any_host(netns_hosts, ranked, cli, home):
    src, marks, env = ranked
    env.pop("MARK_DIR")  # h3 cannot see it
    proc = subprocess.Popen([sys.executable, "-m", "tflaunch", "run", "--source-dir", str(src), *_ssh(netns_hosts),
                             "--hosts", "h1:2,h3:2,localhost:2", "ranked.py", "sleep"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        run_id = last_run_when(home)
        deadline = time.monotonic() + 30
        while len(pids_with_token(run_id)) < 6:  # every host shares this pid namespace: /proc sees all
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        proc.kill()
        proc.wait()
        wait_no_processes(run_id, timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert show(cli, run_id)["error"]["reason"] == "launcher_lost"
    kept = Path(f"/tmp/tflaunch-{os.getuid()}/{run_id}-1")  # h3's copy, kept for recovery (by design)
    assert (kept / "work" / "ranked.py").exists()
    shutil.rmtree(kept)


def _ssh_clients(parent: int) -> list[int]:
    """The ssh clients ``parent`` started (its children named ssh)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if name == "ssh" and int(fields[1]) == parent:
            found.append(int(entry))
    return found


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_ssh_host_cut_off_when_the_launcher_dies_stops_its_ranks_within_the_lease(netns_hosts, ranked, home):
    """h2's link is down when the launcher is SIGKILLed, so no end of the connection can reach h2: its agent,
    hearing no ping for TFLAUNCH_LEASE_TIMEOUT, stops the ranks there while the link is still down."""
    src, marks, env = ranked
    lease = 5
    env["TFLAUNCH_LEASE_TIMEOUT"] = str(lease)
    link = netns_hosts.links[netns_hosts.names.index("h2")]  # the outer end of h2's veth
    h2_net = os.stat(f"/run/netns/{netns_hosts.namespaces['h2']}").st_ino
    proc = subprocess.Popen([sys.executable, "-m", "tflaunch", "run", "--source-dir", str(src), *_ssh(netns_hosts),
                             "--hosts", "h2:2", "ranked.py", "sleep"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    down, clients = False, []
    try:
        run_id = last_run_when(home)
        deadline = time.monotonic() + 30
        while len(pids_with_token(run_id)) < 2:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        ranks = pids_with_token(run_id)
        assert [os.stat(f"/proc/{pid}/ns/net").st_ino for pid in ranks] == [h2_net] * 2  # they run on h2
        agent = json.loads((home / "runs" / run_id / "hosts.json").read_text())[0]["agent_pid"]
        clients = _ssh_clients(proc.pid)
        subprocess.run(["ip", "link", "set", link, "down"], check=True)
        down = True
        proc.kill()
        proc.wait()
        assert pids_with_token(run_id) == ranks  # no end of file reached h2: only its lease can stop them
        wait_no_processes(run_id, timeout=lease + 10)  # the lease, the orphan grace, a margin; the link is down
        deadline = time.monotonic() + 5
        while _running(agent):  # and h2's agent is gone too
            assert time.monotonic() < deadline, f"the agent on h2 ({agent}) is still running"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if down:
            subprocess.run(["ip", "link", "set", link, "up"], check=True)
        deadline = time.monotonic() + 30  # the ssh clients end once the link is back (or ssh gives up)
        while any(_running(pid) for pid in clients) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in clients:
            if _running(pid):
                os.kill(pid, 9)
    assert not [pid for pid in clients if _running(pid)]


def test_ssh_run_with_phases_longer_than_the_lease_completes(netns_hosts, project, cli, home):
    """The launcher keeps every agent's lease (1 s here) for the whole run: the copy of the job's files to h3,
    a --setup longer than the lease, processes that outlive it, the outputs brought back from h3."""
    src = project(**{"slow.py": """\
        import os, time
        time.sleep(2)
        os.makedirs("outputs", exist_ok=True)
        open(f"outputs/{os.environ['TFLAUNCH_RANK']}.txt", "w").write(os.uname().nodename)
        """})
    result, _ = run_cli(cli_env(home, TFLAUNCH_LEASE_TIMEOUT="1"), "--source-dir", str(src), *_ssh(netns_hosts),
                        "--hosts", "h1,h3", "--setup", "sleep 1.5", "slow.py")
    assert result.returncode == 0, result.stderr
    outputs = Path(show(cli, last_run(home))["run_dir"]) / "outputs"
    assert {p.name: p.read_text() for p in outputs.iterdir()} == {"0.txt": "h1", "1.txt": "h3"}


def test_ssh_two_runs_cancel_one(netns_hosts, ranked, cli, home, tmp_path):
    src, marks, env = ranked
    ids = []
    for _ in range(2):
        result = cli("run", "-d", "--source-dir", str(src), *_ssh(netns_hosts), "--hosts", "h1:1,h2:1",
                     "ranked.py", "sleep", env=env, check=True)
        ids.append(result.stdout.strip())
    deadline = time.monotonic() + 30
    while not all(len(pids_with_token(i)) >= 2 for i in ids):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    ports = [json.loads((Path(show(cli, i)["run_dir"]) / "hosts.json").read_text())[0]["ports"] for i in ids]
    assert ports[0] and ports[0] != ports[1]  # each run reserved its own
    cli("runs", "cancel", ids[0], "--wait", check=True)
    wait_no_processes(ids[0], timeout=5)
    assert show(cli, ids[0])["status"] == "Canceled"
    survivors = pids_with_token(ids[1])
    assert len(survivors) >= 2 and show(cli, ids[1])["status"] == "Running"
    cli("runs", "cancel", ids[1], "--wait", check=True)
    wait_no_processes(ids[1], timeout=5)


def test_ssh_unreachable_host(netns_hosts, project, cli, home):
    src = project(**{"train.py": "print('never')\n"})
    unreachable = netns_hosts.addresses["h1"].rsplit(".", 1)[0] + ".99"
    result = cli("run", "--source-dir", str(src), *_ssh(netns_hosts), "--connect-timeout", "2",
                 "--hosts", f"h1,{unreachable}", "train.py")
    assert result.returncode == 1, result.stderr
    assert unreachable in result.stderr.splitlines()[-1]
    run = show(cli, last_run(home))
    assert run["status"] == "Failed" and run["error"]["reason"] == "launch_failed"
    # ssh's own failure (its ConnectTimeout, or ARP's "no route" once the address is known dead), reported
    # as soon as ssh ended, not tflaunch's hello deadline ("did not answer within 22 s")
    host = re.escape(unreachable)
    assert re.fullmatch(rf"cannot start the tflaunch agent on host {host}: ssh: connect to host {host} port 22: "
                        r"(Connection timed out|No route to host)", run["error"]["message"]), run["error"]
    stray = subprocess.run(["pgrep", "-f", f"ssh .*{unreachable}"], capture_output=True, text=True).stdout
    assert not stray.strip()
    wait_no_processes(run["id"], timeout=2)


ECHO = """\
import json, os, sys
env = {k: v for k, v in os.environ.items() if k in ("A.B", "MULTI") or k.startswith("BIG")}
with open(f"args-{os.environ['TFLAUNCH_RANK']}.json", "w") as fh:
    json.dump({"argv": sys.argv[1:], "a.b": env.get("A.B"), "multi": env.get("MULTI"),
               "big": sum(len(v) for k, v in env.items() if k.startswith("BIG")), "host": os.uname().nodename}, fh)
os.makedirs("outputs", exist_ok=True)
os.replace(f"args-{os.environ['TFLAUNCH_RANK']}.json", f"outputs/args-{os.environ['TFLAUNCH_RANK']}.json")
"""


def test_ssh_arguments_and_environment_arrive_intact(ssh_loopback, project, cli, home, tmp_path):
    src = project(**{"echo.py": ECHO})
    pwned = tmp_path / "pwned"
    nasty = f"'; touch {pwned} #"
    env_args = ["--env", "A.B=1", "--env", "MULTI=line one\nline 'two' $HOME `id`"]
    for i in range(20):
        env_args += ["--env", f"BIG{i}=" + "v" * 10_000]
    result = cli("run", "--source-dir", str(src), *_ssh(ssh_loopback), "--hosts", "loop1:1,loop2:1", *env_args,
                 "echo.py", nasty, "$(touch x)", "a b", "", check=True)
    run = show(cli, last_run(home))
    for rank in (0, 1):
        got = json.loads((Path(run["run_dir"]) / "outputs" / f"args-{rank}.json").read_text())
        assert got["argv"] == [nasty, "$(touch x)", "a b", ""]
        assert got["a.b"] == "1" and got["multi"] == "line one\nline 'two' $HOME `id`" and got["big"] == 200_000
    assert not pwned.exists() and result.returncode == 0


def test_ssh_host_without_shared_filesystem(netns_hosts, ranked, cli, home, tmp_path):
    src, marks, env = ranked
    env.pop("MARK_DIR")  # h3 cannot see it
    result, _ = run_cli(env, "--source-dir", str(src), *_ssh(netns_hosts), "--hosts", "h3:2,h1:2", "ranked.py", "ok")
    assert result.returncode == 0, result.stderr
    run = show(cli, last_run(home))
    record = Path(run["run_dir"])
    hosts = {h["name"]: h for h in json.loads((record / "hosts.json").read_text())}
    assert hosts["h3"]["shared_filesystem"] is False and hosts["h1"]["shared_filesystem"] is True
    outputs = record / "outputs"
    assert {p.name for p in outputs.iterdir()} == {"shared.txt"} | {f"rank-{r}.txt" for r in range(4)}
    assert (outputs / "rank-0.txt").read_text() == "h3" and (outputs / "rank-3.txt").read_text() == "h1"
    # both hosts wrote outputs/shared.txt: rank 0's host wins, the other copy is kept aside with a warning
    assert (outputs / "shared.txt").read_text() in ("rank 0", "rank 1")
    assert (record / "hosts" / "h1" / "outputs" / "shared.txt").read_text() in ("rank 2", "rank 3")
    assert any("outputs/shared.txt" in w for w in run["warnings"])
    # metrics: h1 sees the record and writes into it, h3 keeps them with ./logs, which come back
    assert sorted(os.listdir(record / "logs" / ".tflaunch-metrics")) == sorted(
        n for n in os.listdir(record / "logs" / ".tflaunch-metrics") if n.startswith(("rank-0.", "rank-1.")))
    points = json.loads(cli("runs", "metrics", run["id"], "--json", check=True).stdout)["metrics"][0]["points"]
    assert sorted(zip(points["rank"], points["value"])) == [(0, "h3"), (1, "h3"), (2, "h1"), (3, "h1")]
    assert "[rank 1] rank 1 of 4 up" in result.stdout
    assert (record / "tflaunch_logs" / "rank-1.stdout").read_text() == "rank 1 of 4 up\n"  # relayed
    leftovers = subprocess.run(["ssh", "-F", netns_hosts.config, "h3", f"ls /tmp/tflaunch-{os.getuid()}"],
                               capture_output=True, text=True)
    assert run["id"] not in leftovers.stdout  # removed after collection


def test_hosts_come_from_a_slurm_allocation(project, cli, home):
    src = project(**{"train.py": ""})
    env = cli_env(home, SLURM_JOB_ID="42", SLURM_JOB_NODELIST="gpu-[09-10]", SLURM_TASKS_PER_NODE="2(x2)")
    result = cli("run", "--source-dir", str(src), "--dry-run", "--json", "train.py", env=env, check=True)
    plan = json.loads(result.stdout)
    assert [(p["host"], p["rank"]) for p in plan["processes"]] == [("gpu-09", 0), ("gpu-09", 1), ("gpu-10", 2),
                                                                   ("gpu-10", 3)]
    assert plan["compute_target"]["source"] == "SLURM_JOB_NODELIST"
