"""Pure parts of tflaunch.slurm (no Slurm needed) and the CLI's checks of the Slurm options."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tflaunch.remote import rank
from tflaunch import slurm
from tflaunch.errors import SpecError
from tflaunch.launch.srun_step import step_launch
from tflaunch.plan.processes import RunContext, plan
from tflaunch.spec import Estimator, MultiWorkerConfiguration, TensorflowConfiguration
from tflaunch.spec.target import SlurmTarget, SSHTarget, allocation_target

REPO = Path(__file__).resolve().parents[1]


def test_parse_record_keeps_values_with_spaces():
    line = ("JobId=12 JobName=tflaunch-x UserId=root(0) JobState=TIMEOUT Reason=TimeLimit Dependency=(null) "
            "Command=/tmp/a b/job.sbatch WorkDir=/tmp/a b TimeLimit=00:01:00 NodeList=h[1-2]")
    rec = slurm.parse_record(line)
    assert rec["JobState"] == "TIMEOUT"
    assert rec["Command"] == "/tmp/a b/job.sbatch"
    assert rec["WorkDir"] == "/tmp/a b"
    assert rec["NodeList"] == "h[1-2]"
    assert slurm.job_state(rec) == "TIMEOUT"
    assert slurm.job_state({"JobState": "CANCELLED by 0"}) == "CANCELLED"


@pytest.mark.parametrize("state, status, reason", [
    ("TIMEOUT", "Failed", "time_limit"), ("PREEMPTED", "Failed", "preempted"),
    ("NODE_FAIL", "Failed", "node_failure"), ("OUT_OF_MEMORY", "Failed", "out_of_memory"),
    ("FAILED", "Failed", "slurm_failed"), ("COMPLETED", "Failed", "slurm_job_ended"),
    ("CANCELLED", "Canceled", None), ("WEIRD_NEW_STATE", "Failed", "slurm_failed"),
])
def test_final_fields_for_every_end_state(state, status, reason):
    fields = slurm.final_fields({"JobState": state, "Reason": "X", "TimeLimit": "00:01:00"}, "7", None, "tail")
    assert fields["status"] == status
    if reason:
        assert fields["error"]["reason"] == reason
        assert "job 7" in fields["error"]["message"] and "TimeLimit=00:01:00" in fields["error"]["message"]
        assert fields["error"]["stderr_tail"] == "tail"
    else:
        assert "canceled" in fields["cancel_reason"]


def test_final_fields_active_and_lost():
    for state in ("PENDING", "RUNNING", "COMPLETING", "SUSPENDED", "CONFIGURING"):
        assert slurm.final_fields({"JobState": state}, "7", None) is None
    lost = slurm.final_fields(None, "7", None)
    assert lost["status"] == "Failed" and lost["error"]["reason"] == "slurm_job_lost"
    canceled = slurm.final_fields({"JobState": "CANCELLED"}, "7", {"reason": "canceled with `tflaunch runs cancel`"})
    assert canceled == {"status": "Canceled", "cancel_reason": "canceled with `tflaunch runs cancel`"}


@pytest.mark.parametrize("text", ["30", "02:00:00", "1-12", "1-12:00", "1-12:00:00", "5:30", "UNLIMITED"])
def test_check_time_accepts_slurm_forms(text):
    assert slurm.check_time(text) == text


@pytest.mark.parametrize("text", ["", "2h", "1:2:3:4", "-5", "1-", "abc"])
def test_check_time_refuses(text):
    with pytest.raises(SpecError, match="--time"):
        slurm.check_time(text)


def test_check_signal():
    assert slurm.check_signal("usr2@60") == "USR2@60"
    assert slurm.check_signal("B:TERM@120") == "B:TERM@120"
    assert slurm.check_signal("SIGUSR2") == "SIGUSR2"
    assert slurm.check_signal("none") is None
    assert slurm.signal_name("B:USR2@60") == "SIGUSR2"
    assert slurm.signal_name("12@60") == "SIGUSR2"
    with pytest.raises(SpecError, match="NCCL"):
        slurm.check_signal("USR1@60")
    with pytest.raises(SpecError, match="unknown signal"):
        slurm.check_signal("NOPE@5")
    with pytest.raises(SpecError, match="SIGNAL"):
        slurm.check_signal("USR2@soon")


def test_options_are_checked():
    with pytest.raises(SpecError, match="--partition"):
        slurm.SlurmOptions(partition="a\nb")
    with pytest.raises(SpecError, match="--sbatch-arg"):
        slurm.SlurmOptions(sbatch_args=["constraint=a100"])
    with pytest.raises(SpecError, match="--launcher"):
        slurm.SlurmOptions(launcher="pdsh")
    with pytest.raises(SpecError, match="SlurmTarget"):
        SlurmTarget(partitoin="gpu")


def test_gpus_per_node_from_allocation_variables():
    assert slurm.gpus_per_node({"SLURM_GPUS_ON_NODE": "4"}) == 4
    assert slurm.gpus_per_node({"SLURM_GPUS_PER_NODE": "a100:2"}) == 2
    assert slurm.gpus_per_node({"SLURM_GPUS_PER_NODE": "gpu:a100:2,gpu:v100:1"}) == 3
    assert slurm.gpus_per_node({"SLURM_GPUS_PER_NODE": "8"}) == 8
    assert slurm.gpus_per_node({}) is None


def test_step_ports_are_stable_per_job_and_distinct_per_host():
    ports = slurm.step_ports("12345", {"a": 3, "b": 1})
    assert ports == slurm.step_ports("12345", {"a": 3, "b": 1})
    assert len(set(ports["a"])) == 3 and all(1024 < p < 65536 for p in ports["a"] + ports["b"])
    assert slurm.step_ports("1", {"a": 2}, port_base=7000) == {"a": [7000, 7001]}
    assert slurm.step_ports("12345", {"a": 1}) != slurm.step_ports("12346", {"a": 1})


def test_step_argv_block_and_arbitrary():
    argv = slurm.step_argv([("n1", 4), ("n2", 4)], ["python", "x.py"], job_name="tflaunch-R")
    assert argv[:1] == ["srun"] and argv[-2:] == ["python", "x.py"]
    for flag in ("--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--kill-on-bad-exit=1", "--export=ALL",
                 "--nodelist=n1,n2", "--distribution=block", "--job-name=tflaunch-R"):
        assert flag in argv
    uneven = slurm.step_argv([("n1", 3), ("n2", 1)], ["p"], hostfile="/x/hostfile")
    assert "--distribution=arbitrary" in uneven and not any(a.startswith("--ntasks-per-node") for a in uneven)
    assert slurm.hostfile_text([("n1", 3), ("n2", 1)]) == "n1\nn1\nn1\nn2\n"
    with pytest.raises(SpecError):
        slurm.step_argv([("n1", 3), ("n2", 1)], ["p"])


def test_batch_script_has_the_options_and_runs_the_supervisor():
    options = slurm.SlurmOptions(partition="gpu", time="02:00:00", account="proj", sbatch_args=["--constraint=a100"])
    text = slurm.batch_script(run_id="R1", experiment="exp", record_dir="/home/u/.tflaunch/runs/R1", options=options,
                              nodes=2, ntasks_per_node=4, ntasks=None, gpus_per_node=4,
                              command=["/usr/bin/python3", "-c", "x; y", "--slurm", "R1"])
    lines = text.splitlines()
    assert lines[0] == "#!/bin/sh"
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --partition=gpu",
                 "#SBATCH --time=02:00:00", "#SBATCH --account=proj", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --signal=USR2@60", "#SBATCH --constraint=a100", "#SBATCH --job-name=tflaunch-exp",
                 "#SBATCH --output=/home/u/.tflaunch/runs/R1/tflaunch_logs/slurm-%j.out"):
        assert line in lines
    assert lines[-1].startswith("exec ") and shlex.split(lines[-1])[1:] == ["/usr/bin/python3", "-c", "x; y",
                                                                            "--slurm", "R1"]
    # every #SBATCH line comes before the first command: sbatch stops reading them there
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))


ALLOCATION = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_TASKS_PER_NODE": "2(x2)"}


def test_allocation_target_and_local_default_launcher():
    target = Estimator(".", entry_script="t.py", compute_target=SlurmTarget(time="10"), node_count=2,
                       process_count_per_node=2).resolved_target()
    assert target["kind"] == "slurm" and target["launcher"] == "srun"
    resolved = allocation_target(target, 2, 2, ALLOCATION)
    assert resolved["hosts"] == [["gpu01", 2], ["gpu02", 2]] and resolved["source"] == "SLURM_JOB_NODELIST"
    assert resolved["slurm"]["time"] == "10"
    with pytest.raises(SpecError, match="not inside a Slurm allocation"):
        allocation_target(target, 2, 2, {})
    with pytest.raises(SpecError, match="--nodes 3"):
        allocation_target(target, 3, 2, ALLOCATION)
    with pytest.raises(SpecError, match="launcher"):
        SSHTarget("a:2", launcher="srun")


def _step(distributed=None, nodes=2, ppn=2, hosts=(("gpu01", 2), ("gpu02", 2)), **kw):
    est = Estimator(".", entry_script="t.py", node_count=nodes, process_count_per_node=ppn,
                    distributed_training=distributed, compute_target=SSHTarget(
                        [f"{h}:{n}" for h, n in hosts], source="SLURM_JOB_NODELIST", launcher="srun"), **kw)
    spec = est.job_spec()
    ctx = RunContext(run_id="R", experiment="e", run_dir="/r", work_dir="/r/work", home="/h")
    host_list = [h for h in spec.compute_target["hosts"]]
    from tflaunch.spec.hosts import Host
    hs = [Host(n, s) for n, s in host_list]
    from tflaunch.plan.processes import ports_needed
    ports = slurm.step_ports("77", ports_needed(spec, hs))
    processes = plan(spec, ctx, hs, ports=ports, addresses={h.name: f"10.0.0.{i}" for i, h in enumerate(hs)},
                     machines={h.name: h.name for h in hs})
    return spec, processes, step_launch(spec, processes, "R", "/r/launch")


def test_step_launch_multiworker_table_rebuilds_every_tf_config():
    import json
    spec, processes, launch = _step(MultiWorkerConfiguration())
    assert launch.argv[0] == "srun" and "--ntasks=4" in launch.argv
    assert launch.argv[-2:] == [spec.python, "t.py"]
    assert "TF_CONFIG" not in launch.env and "TFLAUNCH_RANK" not in launch.env
    assert launch.env["TFLAUNCH_WORLD_SIZE"] == "4"
    table = json.loads(launch.files["ranks.json"][0])
    for p in processes:
        env = {}
        assert rank.apply_table(env, p.rank, _write(table)) is None
        assert json.loads(env["TF_CONFIG"]) == json.loads(p.environment()["TF_CONFIG"])
        assert env["TFLAUNCH_RANK"] == str(p.rank) and env["TFLAUNCH_NODE_RANK"] == p.environment()["TFLAUNCH_NODE_RANK"]
    assert launch.files["cwd"][0] == "/r/work"


def test_step_launch_uneven_ps_job_uses_a_hostfile():
    spec, processes, launch = _step(TensorflowConfiguration(worker_count=2, parameter_server_count=1, chief=True),
                                    ppn=1, hosts=(("gpu01", 3), ("gpu02", 1)))
    counts = {}
    for p in processes:
        counts[p.host] = counts.get(p.host, 0) + 1
    assert counts == {"gpu01": 2, "gpu02": 2}  # chief, worker 1 | worker 0, ps 0 (a ps takes no slot)
    assert [p.host for p in processes] == ["gpu01", "gpu02", "gpu01", "gpu02"]  # rank order comes back to a node
    assert "--distribution=arbitrary" in launch.argv
    assert "--nodes=2" in launch.argv and "--ntasks=4" in launch.argv
    assert "--nodelist=gpu01,gpu02,gpu01,gpu02" in launch.argv  # arbitrary: a node per task, in rank order
    assert launch.env["SLURM_HOSTFILE"] == "/r/launch/hostfile"
    assert launch.files["hostfile"][0] == "".join(f"{p.host}\n" for p in processes)


TABLE_DIR: list = []  # the running test's tmp_path


@pytest.fixture(autouse=True)
def _table_dir(tmp_path):
    TABLE_DIR[:] = [tmp_path]
    yield
    TABLE_DIR.clear()


def _write(table):
    import json
    import uuid
    path = TABLE_DIR[0] / f"ranks-{uuid.uuid4().hex}.json"
    path.write_text(json.dumps(table))
    return str(path)


def test_apply_table_gpu_positions_map_onto_slurms_devices(monkeypatch):
    table = {"cluster": None, "gpu_positions": True, "ranks": {"1": {"env": {"CUDA_VISIBLE_DEVICES": "1"}}}}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    env = {}
    assert rank.apply_table(env, 1, _write(table)) is None
    assert env["CUDA_VISIBLE_DEVICES"] == "6"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    env = {}
    rank.apply_table(env, 1, _write(table))
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert "not in the launcher's plan" in rank.apply_table({}, 5, _write(table))
    assert rank.apply_table({}, 0, "/nonexistent/ranks.json") is None


def test_apply_table_reports_a_port_in_use():
    import socket
    busy = socket.socket()
    busy.bind(("", 0))
    busy.listen()
    port = busy.getsockname()[1]
    table = {"cluster": '{"worker":["a:1"]}', "ranks": {"0": {"env": {}, "role": "worker", "index": 0,
                                                               "ports": [port]}}}
    try:
        assert f"port {port} is in use" in rank.apply_table({}, 0, _write(table))
    finally:
        busy.close()


def _cli(home, *args, env=None, cwd=None):
    return subprocess.run([sys.executable, str(REPO / "tflaunch.py"), "--home", str(home), *args],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


@pytest.mark.parametrize("args, message", [
    (["--partition", "gpu"], "--partition: only with --slurm"),
    (["--sbatch-arg=--exclusive"], "--sbatch-arg: only with --slurm"),
    (["--launcher", "srun"], "--launcher: only inside a Slurm allocation"),
    (["--launcher", "ssh", "--hosts", "a:1"], "--launcher: only for the hosts of a Slurm allocation"),
    (["--slurm", "--hosts", "a:1"], "--slurm: Slurm chooses the hosts"),
    (["--slurm", "--time", "2h"], "--time: '2h' is not a Slurm time limit"),
    (["--slurm", "--signal", "USR1@30"], "NCCL"),
    (["--slurm", "--gpu"], "--gpus-per-node"),
])
def test_cli_refuses_bad_slurm_options(tmp_path, args, message):
    (tmp_path / "t.py").write_text("print(1)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = _cli(tmp_path / "home", "run", *args, "t.py", env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "home" / "runs").exists() or not os.listdir(tmp_path / "home" / "runs")


def test_cli_slurm_without_sbatch_is_one_clear_line(tmp_path):
    (tmp_path / "t.py").write_text("print(1)\n")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = str(bindir)
    result = _cli(tmp_path / "home", "run", "--slurm", "t.py", env=env, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "sbatch not found on PATH" in result.stderr and "slurm-client" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "home" / "runs").exists() or not os.listdir(tmp_path / "home" / "runs")


def test_cli_dry_run_shows_the_batch_script(tmp_path):
    (tmp_path / "t.py").write_text("print(1)\n")
    if not shutil_which("sbatch"):
        pytest.skip("needs sbatch on PATH (tests/infra/setup.sh installs slurm-client)")
    import json
    result = _cli(tmp_path / "home", "run", "--slurm", "--partition", "gpu", "--nodes", "2", "--procs-per-node", "4",
                  "--backend", "multiworker", "--dry-run", "--json", "t.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert "#SBATCH --partition=gpu" in out["slurm"]["script"]
    assert "#SBATCH --ntasks-per-node=4" in out["slurm"]["script"]
    assert len(out["processes"]) == 8
    assert out["processes"][0]["env"]["TFLAUNCH_CHECKPOINT_SIGNAL"] == "SIGUSR2"
    assert not (tmp_path / "home" / "runs").exists() or not os.listdir(tmp_path / "home" / "runs")


def shutil_which(name):
    import shutil
    return shutil.which(name)


def test_cli_inside_allocation_takes_gpus_from_slurm(tmp_path):
    """--gpu in an allocation: SLURM_GPUS_ON_NODE GPUs per node, split between the node's processes
    (positions in the devices Slurm gives the step); no GPU here, so only planned (--dry-run)."""
    if not shutil_which("srun"):
        pytest.skip("needs srun on PATH (tests/infra/setup.sh installs slurm-client)")
    import json
    (tmp_path / "t.py").write_text("print(1)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(ALLOCATION, SLURM_GPUS_ON_NODE="2")
    result = _cli(tmp_path / "home", "run", "--gpu", "--dry-run", "--json", "t.py", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["compute_target"]["launcher"] == "srun"
    assert [(p["host"], p["env"]["CUDA_VISIBLE_DEVICES"]) for p in out["processes"]] == [
        ("gpu01", "0"), ("gpu01", "1"), ("gpu02", "0"), ("gpu02", "1")]
