"""tflaunch against a real Slurm 22.05 (two nodes, h1 and h2, in network namespaces; tests/infra/slurm.py):
inside an allocation (one srun step) and submitted from the "login node" with ``run --slurm``."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_env, show, wait_status

SCRIPT = """\
import json, os, socket, sys, time
tf = json.loads(os.environ["TF_CONFIG"])["task"] if "TF_CONFIG" in os.environ else None
print(json.dumps({"rank": int(os.environ["TFLAUNCH_RANK"]), "world": int(os.environ["TFLAUNCH_WORLD_SIZE"]),
                  "host": socket.gethostname(), "step": os.environ.get("SLURM_STEP_ID"), "tf": tf,
                  "cluster": json.loads(os.environ["TF_CONFIG"])["cluster"] if tf else None}), flush=True)
os.makedirs("outputs", exist_ok=True)
open("outputs/rank-%s.txt" % os.environ["TFLAUNCH_RANK"], "w").write(socket.gethostname())
if tf and tf["type"] == "chief":  # a ps job ends when its chief does: let every task start and report first
    deadline = time.time() + 30
    while len(os.listdir("outputs")) < int(os.environ["TFLAUNCH_WORLD_SIZE"]) and time.time() < deadline:
        time.sleep(0.05)
code = int(os.environ.get("FAIL_RANK_" + os.environ["TFLAUNCH_RANK"], "0"))
if code:
    print("rank %s fails" % os.environ["TFLAUNCH_RANK"], file=sys.stderr, flush=True)
sys.exit(code)
"""

SLOW = """\
import os, signal, time
signal.signal(signal.SIGUSR2, lambda *a: print("checkpoint on", os.environ["TFLAUNCH_CHECKPOINT_SIGNAL"], flush=True))
print("started", flush=True)
open("started", "w").close()
time.sleep(float(os.environ.get("SLEEP", "300")))
"""


@pytest.fixture
def cluster(slurm_clean, home, tmp_path):
    """(project dir, env for the CLI) with the Slurm client pointed at the test cluster."""
    project = tmp_path / "proj"
    project.mkdir()
    (project / "train.py").write_text(SCRIPT)
    (project / "slow.py").write_text(SLOW)
    env = {k: v for k, v in cli_env(home).items() if not k.startswith("SLURM_")}
    env.update(slurm_clean.env)
    return project, env


def _tfl(env, *args, cwd, timeout=120):
    return subprocess.run([sys.executable, "-m", "tflaunch", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, errors="replace", timeout=timeout)


def _runner(env, cwd):
    """A ``cli`` as conftest's show/wait_status take it, for this cluster's environment."""
    def run(*args, check=False, timeout=120):
        result = _tfl(env, *args, cwd=cwd, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"tflaunch {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result
    return run


def _ranks(run_dir: Path) -> list[dict]:
    rows = []
    for f in sorted((run_dir / "tflaunch_logs").glob("rank-*.stdout")):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.startswith("{")]
    return sorted(rows, key=lambda r: r["rank"])


def _sbatch(slurm, env, cwd, script: str, *options: str) -> str:
    path = Path(cwd) / "job.sh"
    path.write_text("#!/bin/sh\n" + script + "\n")
    result = subprocess.run(["sbatch", "--parsable", f"--output={cwd}/slurm-%j.out", *options, str(path)],
                            cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _fill_cluster(slurm, env, cwd) -> str:
    """A job holding every CPU: what is submitted next stays PENDING (Resources)."""
    job = _sbatch(slurm, env, cwd, "sleep 120", "--nodes=2", "--ntasks-per-node=2")
    slurm.wait_job(job, ("RUNNING",))
    return job


def _python_procs(marker: str) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()[1:] if marker in line and "ps -eo" not in line]


def test_inside_sbatch_multiworker_is_one_srun_step_over_both_nodes(cluster, slurm, home):
    """The sbatch use case: hosts and slots from the allocation, four processes started as one srun step
    (one SLURM_STEP_ID), TF_CONFIG with the nodes' addresses, outputs and the job id in the record."""
    project, env = cluster
    tfl = f"{sys.executable} -m tflaunch run --backend multiworker train.py"
    job = _sbatch(slurm, env, project, f"cd {project} && exec {tfl}", "--nodes=2", "--ntasks-per-node=2")
    assert slurm.wait_job(job) == "COMPLETED", (project / f"slurm-{job}.out").read_text()
    run_id = json.loads(_tfl(env, "runs", "list", "--json", cwd=project).stdout)[0]["id"]
    run = show(_runner(env, project), run_id)
    assert run["status"] == "Completed", run
    assert run["slurm"]["job_id"] == job and run["slurm"]["launcher"] == "srun"
    ranks = _ranks(Path(run["run_dir"]))
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    assert [r["host"] for r in ranks] == ["h1", "h1", "h2", "h2"]
    assert {r["step"] for r in ranks} == {"0"}  # one step for every process
    assert [r["tf"] for r in ranks] == [{"type": "worker", "index": i} for i in range(4)]
    workers = ranks[0]["cluster"]["worker"]
    assert [w.rsplit(":", 1)[0] for w in workers] == [slurm_addr(slurm, n) for n in ("h1", "h1", "h2", "h2")]
    assert len(set(workers)) == 4
    outputs = sorted(p.name for p in (Path(run["run_dir"]) / "outputs").iterdir())
    assert outputs == [f"rank-{i}.txt" for i in range(4)]
    argv = json.loads((Path(run["run_dir"]) / "mpi" / "launch.json").read_text())["argv"]
    assert argv[0] == "srun" and "--kill-on-bad-exit=1" in argv
    assert not slurm.stepd_pids() or slurm.wait_job(job) == "COMPLETED"


def slurm_addr(slurm, node):
    out = slurm.command("scontrol", "-o", "show", "node", node).stdout
    return out.split("NodeAddr=")[1].split()[0]


MPI_RANK = """\
import json, os, socket
print(json.dumps({"rank": int(os.environ["TFLAUNCH_RANK"]), "ompi": os.environ.get("OMPI_COMM_WORLD_RANK"),
                  "host": socket.gethostname(), "step": None, "tf": None}), flush=True)
"""


def test_inside_sbatch_ps_mpi_and_ssh_launcher(cluster, slurm, netns_hosts, home):
    """Uneven layout (chief, 2 workers, 1 ps over 2 nodes: srun's arbitrary distribution); an MPI job
    whose mpirun starts its daemons with Slurm (no ssh: the rank wrapper is in the record); and the
    same allocation with --launcher ssh (processes over ssh, not Slurm tasks)."""
    project, env = cluster
    (project / "mpi_rank.py").write_text(MPI_RANK)
    ps = f"{sys.executable} -m tflaunch run --backend ps --workers 2 --ps 1 --chief --grace 2 train.py"
    mpi = f"{sys.executable} -m tflaunch run --backend mpi --mpirun /usr/bin/mpirun --procs-per-node 2 mpi_rank.py"
    ssh = (f"{sys.executable} -m tflaunch run --launcher ssh --ssh-config {netns_hosts.config} "
           f"--procs-per-node 1 train.py")
    job = _sbatch(slurm, env, project, f"cd {project} && {ps} && {mpi} && {ssh}", "--nodes=2", "--ntasks=4")
    assert slurm.wait_job(job, timeout=60) == "COMPLETED", (project / f"slurm-{job}.out").read_text()
    runs = json.loads(_tfl(env, "runs", "list", "--json", cwd=project).stdout)
    ssh_run, mpi_run, ps_run = (show(_runner(env, project), r["id"]) for r in runs[:3])
    assert mpi_run["status"] == "Completed"
    assert [(r["rank"], r["ompi"], r["host"]) for r in _ranks(Path(mpi_run["run_dir"]))] == [
        (0, "0", "h1"), (1, "1", "h1"), (2, "2", "h2"), (3, "3", "h2")]
    assert not (Path(mpi_run["run_dir"]) / "launch" / "ssh").exists()  # mpirun used Slurm, not ssh
    assert ps_run["status"] == "Completed" and ssh_run["status"] == "Completed"
    ranks = _ranks(Path(ps_run["run_dir"]))
    assert [(r["tf"]["type"], r["tf"]["index"]) for r in ranks] == [("chief", 0), ("worker", 0), ("worker", 1),
                                                                    ("ps", 0)]
    planned = [p["host"] for p in json.loads((Path(ps_run["run_dir"]) / "processes.json").read_text())]
    assert [r["host"] for r in ranks] == planned and {r["step"] for r in ranks} == {"0"}
    via_ssh = _ranks(Path(ssh_run["run_dir"]))
    assert [r["host"] for r in via_ssh] == ["h1", "h2"]
    assert via_ssh[1]["step"] is None  # started by tflaunch's agent over ssh, not by srun
    assert ssh_run["slurm"]["launcher"] == "ssh"


def test_submit_two_processes_attached(cluster, slurm):
    """run --slurm without --detach: sbatch, follow, the run's own outcome and output; the batch script
    is in the record."""
    project, env = cluster
    result = _tfl(env, "run", "--slurm", "--nodes", "2", "--procs-per-node", "1", "--time", "5",
                  "train.py", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "submitted as Slurm job" in result.stderr and "Completed" in result.stderr
    assert result.stdout.count('"rank"') == 2 and "[rank 1]" in result.stdout
    run_id = json.loads(_tfl(env, "runs", "list", "--json", cwd=project).stdout)[0]["id"]
    run = show(_runner(env, project), run_id)
    script = (Path(run["run_dir"]) / "slurm" / "job.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --time=5" in script and "#SBATCH --signal=USR2@60" in script
    assert slurm.job_state(run["slurm"]["job_id"]) == "COMPLETED"
    assert [r["host"] for r in _ranks(Path(run["run_dir"]))] == ["h1", "h2"]
    events = [e["status"] for e in map(json.loads, (Path(run["run_dir"]) / "events.jsonl").read_text().splitlines())
              if e["event"] == "status"]
    assert events == ["Preparing", "Queued", "Running", "Finalizing", "Completed"]


def test_queued_then_running_then_completed_and_launcher_killed_while_queued(cluster, slurm, home):
    """The run is Queued while its job pends; killing the attached launcher then loses nothing: the
    job id is the lease, runs show reports the real state, and the run completes once Slurm starts it."""
    project, env = cluster
    blocker = _fill_cluster(slurm, env, project)
    launcher = subprocess.Popen([sys.executable, "-m", "tflaunch", "run", "--slurm", "--nodes", "2",
                                 "--procs-per-node", "2", "--backend", "multiworker", "train.py"], cwd=project,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 30
    run_id = None
    while time.monotonic() < deadline and run_id is None:
        runs = json.loads(_tfl(env, "runs", "list", "--json", cwd=project).stdout)
        run_id = runs[0]["id"] if runs and runs[0]["status"] == "Queued" else None
        time.sleep(0.2)
    assert run_id, launcher.communicate(timeout=5)
    time.sleep(1.0)
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    run = show(_runner(env, project), run_id)
    assert run["status"] == "Queued" and run["slurm"]["state"] == "PENDING", run
    text = _tfl(env, "runs", "show", run_id, cwd=project).stdout
    assert "PENDING" in text and f"slurm job:   {run['slurm']['job_id']}" in text
    slurm.command("scancel", blocker)
    run = wait_status(_runner(env, project), run_id, {"Completed", "Failed", "Canceled"}, timeout=60)
    assert run["status"] == "Completed", run
    assert len(_ranks(Path(run["run_dir"]))) == 4


def test_failing_task_fails_the_run_with_the_root_cause(cluster, slurm):
    project, env = cluster
    result = _tfl({**env, "FAIL_RANK_1": "3"}, "run", "--slurm", "--nodes", "2", "--procs-per-node", "1",
                  "train.py", cwd=project)
    assert result.returncode == 3, result.stderr
    run_id = json.loads(_tfl(env, "runs", "list", "--json", cwd=project).stdout)[0]["id"]
    run = show(_runner(env, project), run_id)
    assert run["status"] == "Failed" and run["exit_code"] == 3
    assert "rank 1 on host h2" in run["error"]["message"] and "rank 1 fails" in run["error"]["stderr_tail"]
    assert slurm.job_state(run["slurm"]["job_id"]) == "FAILED"  # the job's exit status is the run's


def test_bad_partition_fails_the_run_with_slurms_message(cluster, slurm):
    project, env = cluster
    result = _tfl(env, "run", "--slurm", "--partition", "nosuch", "train.py", cwd=project)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == \
        "tflaunch: error: sbatch refused the job: sbatch: error: invalid partition specified: nosuch"
    run = json.loads(_tfl(env, "runs", "list", "--json", cwd=project).stdout)[0]
    assert run["status"] == "Failed" and run["error"]["reason"] == "slurm_rejected"
    assert "invalid partition" in run["error"]["message"]


def test_cancel_pending_and_running_jobs(cluster, slurm):
    project, env = cluster
    blocker = _fill_cluster(slurm, env, project)
    pending = _tfl(env, "run", "--slurm", "--detach", "slow.py", cwd=project).stdout.strip()
    assert show(_runner(env, project), pending)["status"] == "Queued"
    done = _tfl(env, "runs", "cancel", "--wait", pending, cwd=project, timeout=60)
    assert done.returncode == 0 and "Canceled" in done.stdout, done.stderr
    run = show(_runner(env, project), pending)
    assert run["status"] == "Canceled" and run["cancel_reason"] == "canceled with `tflaunch runs cancel`"
    assert run["started"] is None
    job = run["slurm"]["job_id"]
    assert slurm.job_state(job) == "CANCELLED"
    slurm.command("scancel", blocker)
    slurm.wait_job(blocker)

    running = _tfl(env, "run", "--slurm", "--detach", "--nodes", "2", "slow.py", cwd=project).stdout.strip()
    run = wait_status(_runner(env, project), running, {"Running"}, timeout=30)
    work = Path(run["run_dir"]) / "work"
    deadline = time.monotonic() + 20
    while not (work / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    done = _tfl(env, "runs", "cancel", "--wait", running, cwd=project, timeout=60)
    assert done.returncode == 0 and "Canceled" in done.stdout
    run = show(_runner(env, project), running)
    assert run["status"] == "Canceled"
    assert slurm.wait_job(run["slurm"]["job_id"]) == "CANCELLED"
    deadline = time.monotonic() + 15
    while _python_procs(str(project / "slow.py")) + _python_procs(running) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _python_procs(running), "processes of the canceled run are left"


def test_time_limit_fails_the_run_after_the_checkpoint_signal(cluster, slurm):
    """--time 1 (Slurm's smallest limit: a minute) with --signal USR2@50: the script gets SIGUSR2 first,
    then Slurm stops the job; the run is Failed with reason time_limit."""
    project, env = cluster
    result = _tfl(env, "run", "--slurm", "--time", "1", "--signal", "USR2@50", "slow.py", cwd=project, timeout=240)
    assert result.returncode != 0
    assert "checkpoint on SIGUSR2" in result.stdout, result.stdout + result.stderr
    run_id = json.loads(_tfl(env, "runs", "list", "--json", cwd=project).stdout)[0]["id"]
    run = show(_runner(env, project), run_id)
    assert run["status"] == "Failed" and run["error"]["reason"] == "time_limit", run["error"]
    assert "time limit" in run["error"]["message"] and "TimeLimit=00:01:00" in run["error"]["message"]


PREPARED = """\
import json, os, socket, sys
import tfl_beta
print(json.dumps({"rank": int(os.environ["TFLAUNCH_RANK"]), "host": socket.gethostname(), "python": sys.executable,
                  "stage": os.environ.get("STAGE"), "argv": sys.argv[1:],
                  "data": sorted(os.listdir(sys.argv[1])), "beta": tfl_beta.__version__}), flush=True)
"""


def test_submitted_with_an_environment_setup_lines_and_a_mounted_input(cluster, slurm, tmp_path):
    """run --slurm --pip ... --setup ... --data NAME=PATH: the environment is built on the login node before
    sbatch (the nodes need no index), each task runs the --setup lines itself (an srun step has no agents),
    and {data:NAME} is the input's path on every node."""
    from tests.infra.wheels import make_wheel

    project, env = cluster
    (project / "prepared.py").write_text(PREPARED)
    house = tmp_path / "wheels"
    make_wheel(house, "tfl-alpha", "1.0")
    make_wheel(house, "tfl-beta", "2.0", requires=["tfl-alpha"])
    data = tmp_path / "shared-data"
    data.mkdir()
    (data / "part-0").write_text("x")
    result = _tfl(env, "run", "--slurm", "--nodes", "2", "--procs-per-node", "1", "--time", "5", "--pip", "tfl-beta",
                  "--no-index", "--find-links", str(house), "--setup", 'export STAGE="$(hostname)-set"',
                  "--data", f"shards={data}", "prepared.py", "--", "{data:shards}", cwd=project, timeout=300)
    assert result.returncode == 0, result.stderr
    run_id = json.loads(_tfl(env, "runs", "list", "--json", cwd=project).stdout)[0]["id"]
    run = show(_runner(env, project), run_id)
    ranks = _ranks(Path(run["run_dir"]))
    assert [r["host"] for r in ranks] == ["h1", "h2"]
    for r in ranks:
        assert r["python"] == run["environment"]["python"] and r["beta"] == "2.0"
        assert r["stage"] == f"{r['host']}-set" and r["argv"] == [str(data)] and r["data"] == ["part-0"]
    events = [e["event"] for e in map(json.loads, (Path(run["run_dir"]) / "events.jsonl").read_text().splitlines())]
    assert events.index("environment") < events.index("slurm_submitted")
    bad = _tfl(env, "run", "--slurm", "--data", f"shards={data}:download", "prepared.py", cwd=project)
    assert bad.returncode == 2 and "as_download() (--data NAME=PATH:download) with Slurm's srun launcher" in bad.stderr


SCORE = ("import sys\nfrom tflaunch import Run\nx = float(sys.argv[sys.argv.index('--x') + 1])\n"
         "for i in range(3):\n    Run.get_context().log('score', x * (i + 1))\n")


def test_sweep_submits_one_job_per_trial(cluster, slurm):
    """A sweep with --slurm: each trial is its own Slurm job (submitted by the sweep's driver on the login
    node), at most --max-concurrent-runs at once; the trials' metrics come back through the shared home."""
    project, env = cluster
    (project / "score.py").write_text(SCORE)
    result = _tfl(env, "sweep", "--slurm", "--time", "5", "--param=--x=choice(1, 2, 3)", "--sampling", "grid",
                  "--primary-metric", "score", "--goal", "maximize", "--max-total-runs", "3",
                  "--max-concurrent-runs", "2", "--no-job-array", "score.py", cwd=project, timeout=240)
    assert result.returncode == 0, result.stderr
    sweep_id = [line for line in result.stderr.splitlines() if line.startswith("tflaunch: sweep ")][0].split()[2]
    state = json.loads(_tfl(env, "sweep", "show", sweep_id, "--json", cwd=project).stdout)
    assert [t["status"] for t in state["trials"]] == ["Completed"] * 3
    assert state["summary"]["best"]["value"] == 9 and state["summary"]["best"]["hyperparameters"] == {"--x": 3}
    jobs = set()
    for trial in state["trials"]:
        run = show(_runner(env, project), trial["run_id"])
        assert run["parent"] == sweep_id and run["slurm"]["submitted"] is True
        assert slurm.job_state(run["slurm"]["job_id"]) == "COMPLETED"
        jobs.add(run["slurm"]["job_id"])
    assert len(jobs) == 3


def test_sweep_submits_its_trials_as_one_job_array(cluster, slurm):
    """Grid trials known up front go as one sbatch --array=0-3%2: Slurm runs at most two at once; each
    task runs its own trial's record (output there too); a policy or cancel acts on JOBID_TASK."""
    project, env = cluster
    (project / "score.py").write_text(SCORE + "import time; time.sleep(1)\n")
    result = _tfl(env, "sweep", "--slurm", "--time", "5", "--param=--x=choice(1, 2, 3, 4)", "--sampling", "grid",
                  "--primary-metric", "score", "--goal", "maximize", "--max-total-runs", "4",
                  "--max-concurrent-runs", "2", "score.py", cwd=project, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "4 trials submitted as Slurm job array" in result.stdout
    sweep_id = [line for line in result.stderr.splitlines() if line.startswith("tflaunch: sweep ")][0].split()[2]
    state = json.loads(_tfl(env, "sweep", "show", sweep_id, "--json", cwd=project).stdout)
    assert [t["status"] for t in state["trials"]] == ["Completed"] * 4
    assert state["summary"]["best"]["hyperparameters"] == {"--x": 4}
    sweep = show(_runner(env, project), sweep_id)
    script = (Path(sweep["run_dir"]) / "slurm" / "job.sbatch").read_text()
    assert "#SBATCH --array=0-3%2" in script
    arrays, spans = set(), []
    for i, trial in enumerate(state["trials"]):
        run = show(_runner(env, project), trial["run_id"])
        assert run["slurm"]["array"] and run["status"] == "Completed"
        arrays.add(run["slurm"]["array"])
        assert slurm.job_state(run["slurm"]["job_id"]) == "COMPLETED"
        out = (Path(run["run_dir"]) / "tflaunch_logs" / f"slurm-{run['slurm']['array']}_{i}.out").read_text()
        assert trial["run_id"] in out  # the task's own output, in its trial's record
        spans.append((run["started"], run["ended"]))
    assert len(arrays) == 1
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    live = top = 0
    for _, delta in events:
        live += delta
        top = max(top, live)
    assert top <= 2


def test_cancel_a_sweep_whose_job_array_is_running_and_pending(cluster, slurm):
    project, env = cluster
    sweep_id = _tfl(env, "sweep", "-d", "--slurm", "--time", "5", "--param=--x=choice(1, 2, 3, 4)", "--sampling",
                    "grid", "--primary-metric", "score", "--goal", "maximize", "--max-total-runs", "4",
                    "--max-concurrent-runs", "2", "slow.py", cwd=project).stdout.strip()
    runner = _runner(env, project)
    deadline = time.monotonic() + 90
    while True:
        state = json.loads(_tfl(env, "sweep", "show", sweep_id, "--json", cwd=project).stdout)
        if [t["status"] for t in state["trials"]].count("Running") == 2:
            break
        assert time.monotonic() < deadline, state["trials"]
        time.sleep(0.5)
    assert sorted(t["status"] for t in state["trials"]) == ["Queued", "Queued", "Running", "Running"]
    result = _tfl(env, "sweep", "cancel", sweep_id, "--wait", cwd=project, timeout=120)
    assert result.returncode == 0, result.stderr
    for trial in state["trials"]:
        run = wait_status(runner, trial["run_id"], {"Canceled"}, timeout=60)
        assert slurm.job_state(run["slurm"]["job_id"]) not in ("PENDING", "RUNNING")  # gone, or ended
    assert show(runner, sweep_id)["status"] == "Canceled"
