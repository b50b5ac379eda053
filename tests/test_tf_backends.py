"""--backend ps / multiworker, for real: processes that read TF_CONFIG, bind their cluster ports and
talk to each other, started locally and over ssh; the run's outcome is the chief's.

The job here is a stand-in for TensorFlow (``tasks.py``): every cluster task listens on the port its
TF_CONFIG gives it, as ``tf.distribute.Server`` would, and the chief connects to every one of them
before it ends, so a wrong address or a port clash fails the run. Real TensorFlow jobs are in
tests/test_example_tf_distributed.py.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (cli_env, last_run, last_run_when, pids_with_token, process_exits, run_cli, show,
                      wait_for_file, wait_no_processes)

TASKS = """\
import json, os, signal, socket, sys, time
cfg = json.loads(os.environ["TF_CONFIG"])
role, index = cfg["task"]["type"], cfg["task"]["index"]
mode = sys.argv[1]
print(f"{role} {index} up on {os.uname().nodename} cuda={os.environ.get('CUDA_VISIBLE_DEVICES')!r}", flush=True)
if mode == "all-write":
    os.makedirs("outputs", exist_ok=True)
    open("outputs/who.txt", "w").write(f"{role} {index}")
if role != "evaluator":  # a cluster task listens on its port, as tf.distribute.Server does
    port = int(cfg["cluster"][role][index].rsplit(":", 1)[1])
    server = socket.socket()
    server.bind(("", port))
    server.listen(64)

def reach_everyone():
    for addresses in cfg["cluster"].values():
        for address in addresses:
            host, port = address.rsplit(":", 1)
            deadline = time.time() + 30
            while True:
                try:
                    socket.create_connection((host, int(port)), timeout=2).close()
                    break
                except OSError:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.05)

lead = role == "chief" or (role == "worker" and index == 0 and "chief" not in cfg["cluster"])
if lead:
    reach_everyone()
    marks = os.environ.get("MARK_DIR")
    if marks:
        open(os.path.join(marks, f"cluster-{os.environ['TFLAUNCH_RUN_ID']}"), "w").write(json.dumps(cfg["cluster"]))
        while mode == "hold" and not os.path.exists(os.path.join(marks, "release")):
            time.sleep(0.05)
    time.sleep(float(os.environ.get("LEAD_SECONDS", "0.3")))
    os.makedirs("outputs", exist_ok=True)
    open("outputs/model.txt", "w").write("trained")
    print(f"{role} {index} done", flush=True)
    sys.exit(1 if mode == "chief-fails" else 0)
if mode == "kill-ps" and role == "ps":
    time.sleep(1)
    print("ps going down", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "peers" and role == "worker":
    reach_everyone()
    time.sleep(3)  # still listening while the others reach it
    print(f"{role} {index} done", flush=True)
    sys.exit(0)
if role == "evaluator" and os.environ.get("EVAL_IGNORES_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(600)  # server.join(): never returns
"""


@pytest.fixture
def tasks(project, tmp_path, home):
    src = project(**{"tasks.py": TASKS})
    marks = tmp_path / "marks"
    marks.mkdir()
    return src, marks, cli_env(home, MARK_DIR=str(marks))


PS = ["--backend", "ps", "--workers", "2", "--ps", "1", "--chief"]


def test_chief_exits_0_servers_are_stopped_and_the_run_completes(tasks, cli, home):
    src, marks, env = tasks
    result, _ = run_cli(env, "--source-dir", str(src), *PS, "tasks.py", "ok")
    assert result.returncode == 0, result.stderr
    run = show(cli, last_run(home))
    assert run["status"] == "Completed" and run["exit_code"] == 0
    # not hung on the servers' join() (a 600 s sleep; run_cli's timeout is 60 s): the chief ended, then
    # tflaunch stopped the workers and the ps
    exits = process_exits(run)
    assert next(iter(exits)) == 0 and exits == {0: 0, 1: -15, 2: -15, 3: -15}, exits
    wait_no_processes(run["id"], timeout=2)
    for line in ("[chief 0] chief 0 done", "[ps 0] ps 0 up", "[worker 1] worker 1 up"):
        assert line in result.stdout
    record = Path(run["run_dir"])
    cluster = json.loads((record / "tf_cluster.json").read_text())
    assert {k: len(v) for k, v in cluster.items()} == {"chief": 1, "worker": 2, "ps": 1}
    rows = json.loads((record / "processes.json").read_text())
    assert [(r["role"], r["index"]) for r in rows] == [("chief", 0), ("worker", 0), ("worker", 1), ("ps", 0)]
    assert len({r["port"] for r in rows}) == 4
    assert (record / "outputs" / "model.txt").read_text() == "trained"
    assert "ps 0 up" in (record / "tflaunch_logs" / f"rank-{rows[3]['rank']}.stdout").read_text()
    logs = cli("runs", "logs", run["id"]).stdout
    assert "[worker 0] worker 0 up" in logs


def test_chief_fails_with_ps_alive(tasks, cli, home):
    src, marks, env = tasks
    result, took = run_cli(env, "--source-dir", str(src), *PS, "tasks.py", "chief-fails")
    assert result.returncode == 1
    run = show(cli, last_run(home))
    assert run["status"] == "Failed"
    error = run["error"]
    assert (error["reason"], error["role"], error["task_index"], error["rank"]) == ("exit_code", "chief", 0, 0)
    assert "tasks.py (chief 0, rank 0 on host localhost) exited with code 1" in error["message"]
    wait_no_processes(run["id"], timeout=2)


def test_ps_killed_mid_training_fails_the_run_naming_it(tasks, cli, home):
    src, marks, env = tasks
    env["LEAD_SECONDS"] = "60"
    result, _ = run_cli(env, "--source-dir", str(src), *PS, "tasks.py", "kill-ps")
    assert result.returncode != 0
    run = show(cli, last_run(home))
    # the ps's death ended the run at once: the chief was stopped in its 60 s of work, before its model
    exits = process_exits(run)
    assert next(iter(exits)) == 3 and exits == {3: -9, 0: -15, 1: -15, 2: -15}, exits
    assert not (Path(run["run_dir"]) / "outputs" / "model.txt").exists()
    error = run["error"]
    assert (run["status"], error["reason"], error["role"], error["rank"]) == ("Failed", "signal", "ps", 3)
    assert "(ps 0, rank 3 on host localhost) was killed by SIGKILL" in error["message"]
    assert "ps going down" in error["stderr_tail"]
    wait_no_processes(run["id"], timeout=2)


def test_evaluator_that_never_ends_is_stopped_after_its_grace(tasks, cli, home):
    src, marks, env = tasks
    result, _ = run_cli(env, "--source-dir", str(src), "--backend", "ps", "--workers", "1", "--ps", "1", "--chief",
                        "--evaluator", "--evaluator-grace", "2", "tasks.py", "ok")
    assert result.returncode == 0, result.stderr
    run = show(cli, last_run(home))
    assert run["status"] == "Completed"
    # stopped by tflaunch (not at the end of its 600 s sleep), once its grace of 2 s had passed (a later
    # wake-up on a busy machine says more: the count is a lower bound)
    stopped = re.compile(r"the evaluator 0 was still running (\d+) s after the chief 0 ended and was stopped")
    counts = [int(m.group(1)) for m in map(stopped.fullmatch, run["warnings"]) if m]
    assert len(counts) == 1 and counts[0] >= 2, run["warnings"]
    exits = process_exits(run)
    assert next(iter(exits)) == 0 and set(exits.values()) == {0, -15} and len(exits) == 4, exits
    assert "[evaluator 0] evaluator 0 up" in result.stdout
    cluster = json.loads((Path(run["run_dir"]) / "tf_cluster.json").read_text())
    assert "evaluator" not in cluster
    wait_no_processes(run["id"], timeout=2)


def test_two_ps_jobs_at_once_get_distinct_ports(tasks, cli, home):
    """Both jobs hold their servers up until both have reached every task: a clash would fail a bind."""
    src, marks, env = tasks
    procs = [subprocess.Popen([sys.executable, "-m", "tflaunch", "run", "--source-dir", str(src), *PS,
                               "tasks.py", "hold"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for _ in range(2)]
    try:
        deadline = time.monotonic() + 60
        while len(list(marks.glob("cluster-*"))) < 2:
            assert time.monotonic() < deadline, [p.poll() for p in procs]
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.1)
        (marks / "release").write_text("")
        for p in procs:
            assert p.wait(timeout=60) == 0, p.communicate()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    ports = [{a for addresses in json.loads(f.read_text()).values() for a in addresses}
             for f in marks.glob("cluster-*")]
    assert len(ports[0]) == len(ports[1]) == 4 and not ports[0] & ports[1]


@pytest.mark.parametrize("args,fragment", [
    (["--backend", "ps", "--workers", "0"], "worker_count (--workers): must be an integer >= 1, got 0"),
    (["--backend", "ps", "--ps", "-1"], "parameter_server_count (--ps): must be an integer >= 0, got -1"),
    (["--backend", "ps", "--workers", "3", "--chief", "--hosts", "a:1,b:1"],
     "1 chief, 3 workers, 1 ps need 4 slots (ps tasks take none) but 2 hosts (a:1, b:1) have 2"),
    (["--workers", "2"], "--workers: only with --backend ps"),
    (["--backend", "ps", "--procs-per-node", "2"], "--procs-per-node does not apply to --backend ps"),
    (["--evaluator"], "--evaluator: only with --backend ps or multiworker"),
    (["--backend", "multiworker", "--procs-per-node", "2", "--hosts", "a:2", "--evaluator"],
     "the evaluator needs a free slot"),
    (["--gpus-per-node", "2"], "gpus_per_node (--gpus-per-node): only meaningful with use_gpu=True (--gpu)"),
    (["--backend", "ps", "--port-base", "65535", "--workers", "2"], "a host needs ports up to 65537"),
])
def test_bad_backend_options_are_one_line_errors(project, cli, home, args, fragment):
    src = project(**{"t.py": ""})
    result = cli("run", "--source-dir", str(src), *args, "t.py")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())


def test_dry_run_json_shows_every_tf_config(project, cli):
    src = project(**{"t.py": ""})
    result = cli("run", "--source-dir", str(src), "--dry-run", "--json", "--backend", "ps", "--workers", "2",
                 "--ps", "1", "--chief", "--evaluator", "--port-base", "2222", "t.py", check=True)
    plan = json.loads(result.stdout)
    configs = [json.loads(p["env"]["TF_CONFIG"]) for p in plan["processes"]]
    assert [c["task"]["type"] for c in configs] == ["chief", "worker", "worker", "ps", "evaluator"]
    assert configs[0]["cluster"] == {"chief": ["localhost:2222"], "worker": ["localhost:2223", "localhost:2224"],
                                     "ps": ["localhost:2225"]}
    assert all(c["environment"] == "cloud" for c in configs)


def test_gpu_without_gpus_is_a_clear_error_and_gpus_per_node_splits(project, cli, home, tmp_path):
    src = project(**{"t.py": "import os; print('cuda=' + os.environ['CUDA_VISIBLE_DEVICES'])"})
    env = cli_env(home, PATH="/usr/bin:/bin")  # no nvidia-smi on CI machines
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if subprocess.run(["sh", "-c", "command -v nvidia-smi"], env=env, capture_output=True).returncode != 0:
        result = cli("run", "--source-dir", str(src), "--gpu", "t.py", env=env)
        assert result.returncode == 2 and "--gpu: no GPU found on host localhost" in result.stderr, result.stderr
    result = cli("run", "--source-dir", str(src), "--gpu", "--gpus-per-node", "4", "--procs-per-node", "2", "t.py",
                 env=env, check=True)
    assert {"[rank 0] cuda=0,1", "[rank 1] cuda=2,3"} <= set(result.stdout.splitlines())
    result = cli("run", "--source-dir", str(src), "--gpu", "--gpus-per-node", "4", "--procs-per-node", "2", "t.py",
                 env=dict(env, CUDA_VISIBLE_DEVICES="5,6,7"))
    assert result.returncode == 2 and "never widens" in result.stderr
    result = cli("run", "--source-dir", str(src), "--gpu", "--procs-per-node", "3", "t.py",
                 env=dict(env, CUDA_VISIBLE_DEVICES="5,6"))
    assert result.returncode == 2 and "--gpus-shared" in result.stderr
    result = cli("run", "--source-dir", str(src), "--gpu", "--gpus-shared", "--procs-per-node", "3", "t.py",
                 env=dict(env, CUDA_VISIBLE_DEVICES="5,6"), check=True)
    assert {"[rank 0] cuda=5", "[rank 1] cuda=6", "[rank 2] cuda=5"} <= set(result.stdout.splitlines())


def test_python_api_submits_a_ps_job(tasks, home, monkeypatch):
    from tflaunch import Experiment, TensorFlow, TensorflowConfiguration

    src, marks, env = tasks
    monkeypatch.setenv("MARK_DIR", str(marks))
    est = TensorFlow(src, entry_script="tasks.py", arguments=["ok"],
                     distributed_training=TensorflowConfiguration(worker_count=2, parameter_server_count=1, chief=True))
    run = Experiment("tf-ps", home=str(home)).submit(est)
    run.wait_for_completion(timeout=60)
    assert run.get_status() == "Completed"
    assert "outputs/model.txt" in run.get_file_names()
    wait_no_processes(run.id, timeout=2)


# -- over ssh --------------------------------------------------------------------------------------------
def test_multiworker_over_ssh_aliases_uses_the_addresses_ssh_resolves(ssh_loopback, tasks, cli, home):
    """loop1/loop2 are ssh aliases (HostName 127.0.0.1) no resolver knows: TF_CONFIG must carry what
    ``ssh -G`` resolves, or the workers could not reach each other."""
    src, marks, env = tasks
    result, took = run_cli(env, "--source-dir", str(src), "--ssh-config", ssh_loopback.config, "--hosts",
                        "loop1:2,loop2:2", "--backend", "multiworker", "tasks.py", "peers")
    assert result.returncode == 0, result.stderr
    run = show(cli, last_run(home))
    cluster = json.loads((Path(run["run_dir"]) / "tf_cluster.json").read_text())
    assert list(cluster) == ["worker"] and len(cluster["worker"]) == 4
    assert all(a.startswith("127.0.0.1:") for a in cluster["worker"])
    hosts = json.loads((Path(run["run_dir"]) / "hosts.json").read_text())
    assert [(h["name"], h["address"]) for h in hosts] == [("loop1", "127.0.0.1"), ("loop2", "127.0.0.1")]
    assert "[worker 3] worker 3 done" in result.stdout  # peers end on their own, within the grace
    wait_no_processes(run["id"], timeout=2)


def test_ps_across_netns_hosts_spreads_roles_and_stops_servers(netns_hosts, tasks, cli, home):
    src, marks, env = tasks
    result, took = run_cli(env, "--source-dir", str(src), "--ssh-config", netns_hosts.config, "--hosts",
                        "h1:2,h2:2", *PS, "tasks.py", "ok")
    assert result.returncode == 0, result.stderr
    run = show(cli, last_run(home))
    rows = json.loads((Path(run["run_dir"]) / "processes.json").read_text())
    assert {(r["role"], r["index"]): r["host"] for r in rows} == {  # the ps shares the last host, slot-free
        ("chief", 0): "h1", ("worker", 0): "h2", ("worker", 1): "h1", ("ps", 0): "h2"}
    assert "[ps 0] ps 0 up on h2" in result.stdout
    assert pids_with_token(run["id"]) == []


def test_timeout_while_the_evaluator_winds_down_keeps_the_chiefs_outcome(tasks, cli, home):
    src, marks, env = tasks
    # the evaluator's grace (600 s) is far beyond run_cli's 60 s timeout: only --timeout can end this run
    result, _ = run_cli(env, "--source-dir", str(src), "--backend", "ps", "--workers", "1", "--ps", "1", "--chief",
                        "--evaluator", "--evaluator-grace", "600", "--timeout", "3", "tasks.py", "ok")
    assert result.returncode == 0, result.stderr
    run = show(cli, last_run(home))
    assert run["status"] == "Completed" and run["error"] is None
    exits = process_exits(run)
    assert next(iter(exits)) == 0 and set(exits.values()) == {0, -15} and len(exits) == 4, exits
    wait_no_processes(run["id"], timeout=2)


def test_one_machine_listed_twice_shares_its_gpus_and_port_base(project, cli, home):
    src = project(**{"t.py": ""})
    env = cli_env(home, CUDA_VISIBLE_DEVICES="0,1")
    result = cli("run", "--source-dir", str(src), "--dry-run", "--json", "--backend", "ps", "--hosts",
                 "localhost,127.0.0.1", "--port-base", "40000", "--gpu", "t.py", env=env, check=True)
    procs = json.loads(result.stdout)["processes"]
    assert sorted(p["port"] for p in procs) == [40000, 40001]
    assert sorted(p["env"]["CUDA_VISIBLE_DEVICES"] for p in procs) == ["", "0,1"]  # the ps gets none
    result = cli("run", "--source-dir", str(src), "--dry-run", "--json", "--backend", "multiworker", "--hosts",
                 "localhost:1,127.0.0.1:1", "--gpu", "t.py", env=env, check=True)
    assert [p["env"]["CUDA_VISIBLE_DEVICES"] for p in json.loads(result.stdout)["processes"]] == ["0", "1"]


def test_fixed_ports_on_this_machine_still_record_roles(tasks, cli, home):
    """--port-base on this machine alone takes the one-round-trip start: the record is the same."""
    src, marks, env = tasks
    result, took = run_cli(env, "--source-dir", str(src), *PS, "--port-base", "41234", "tasks.py", "ok")
    assert result.returncode == 0, result.stderr
    run = show(cli, last_run(home))
    record = Path(run["run_dir"])
    assert [r["port"] for r in json.loads((record / "processes.json").read_text())] == [41234, 41235, 41236, 41237]
    assert json.loads((record / "tf_cluster.json").read_text())["chief"] == ["localhost:41234"]
    assert "[ps 0] ps 0 up" in cli("runs", "logs", run["id"]).stdout


def test_cancel_while_the_evaluator_winds_down_does_not_spin(tasks, cli, home):
    import resource

    src, marks, env = tasks
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen([sys.executable, "-m", "tflaunch", "run", "--source-dir", str(src), "--backend", "ps",
                             "--workers", "1", "--ps", "1", "--chief", "--evaluator", "--evaluator-grace", "2",
                             "--grace", "6", "tasks.py", "ok"], env=dict(env, EVAL_IGNORES_TERM="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        chief_log = home / "runs" / last_run_when(home) / "tflaunch_logs" / "rank-0.stdout"
        wait_for_file(chief_log)
        deadline = time.monotonic() + 30
        while "chief 0 done" not in chief_log.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # canceled within the evaluator's 2 s: it ignores SIGTERM and is killed 6 s later; the evaluator's
        # own deadline, passing meanwhile, must not make the launcher spin
        cli("runs", "cancel", last_run(home), check=True)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (used.ru_utime - before.ru_utime) + (used.ru_stime - before.ru_stime)
    assert cpu < 2.5, cpu  # a spinning launcher burns ~4 s of CPU here
    wait_no_processes(last_run(home), timeout=2)


def test_lead_worker_on_a_host_without_shared_filesystem_wins_output_conflicts(netns_hosts, tasks, cli, home):
    """A ps job without chief: worker 0 (rank 0, the lead) lands on h3, a host with its own copy of the job;
    its outputs/who.txt must win over the one written on h1 (which shares the record) by higher ranks."""
    src, marks, env = tasks
    env.pop("MARK_DIR")  # h3 cannot see it
    result, took = run_cli(env, "--source-dir", str(src), "--ssh-config", netns_hosts.config, "--hosts", "h3:2,h1:2",
                        "--backend", "ps", "--workers", "2", "--ps", "1", "tasks.py", "all-write")
    assert result.returncode == 0, result.stderr
    run = show(cli, last_run(home))
    rows = {(r["role"], r["index"]): r["host"] for r in json.loads((Path(run["run_dir"]) / "processes.json").read_text())}
    assert rows[("worker", 0)] == "h3" and rows[("ps", 0)] == "h1"
    assert (Path(run["run_dir"]) / "outputs" / "who.txt").read_text() == "worker 0"
