"""Sanity checks of the real SSH test hosts (tests/infra/hosts.py) and the Slurm cluster on them
(tests/infra/slurm.py) that the launcher tests use."""
from __future__ import annotations

import os
import socket
import subprocess
import shutil
import time
from pathlib import Path

import pytest

from conftest import INFRA_ROOT
from tests.infra import hosts as infra_hosts
from tests.infra import slurm as infra_slurm


def ssh(hosts, name: str, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ssh", "-F", hosts.config, name, command], capture_output=True, text=True,
                          timeout=30)


def test_loopback_aliases_answer(ssh_loopback):
    assert ssh_loopback.names == ["loop1", "loop2"]
    for name in ssh_loopback.names:
        result = ssh(ssh_loopback, name, "echo ok")
        assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr


def test_netns_hosts_have_own_hostname_and_address(netns_hosts):
    assert netns_hosts.names == ["h1", "h2", "h3"]
    assert len(set(netns_hosts.addresses.values())) == 3
    for name in netns_hosts.names:
        result = ssh(netns_hosts, name, "hostname; ip -4 -o addr show dev eth0")
        assert result.returncode == 0, result.stderr
        hostname, addr_line = result.stdout.splitlines()[:2]
        assert hostname == name
        assert f" {netns_hosts.addresses[name]}/24 " in addr_line


def test_netns_h3_does_not_share_tmp_path(netns_hosts, tmp_path: Path):
    path = tmp_path / "shared.txt"
    path.write_text("seen\n")
    for name in ("h1", "h2"):
        result = ssh(netns_hosts, name, f"cat {path}")
        assert (result.returncode, result.stdout) == (0, "seen\n"), result.stderr
    result = ssh(netns_hosts, "h3", f"cat {path}")
    assert result.returncode != 0 and result.stdout == ""
    # and what h3 writes there stays on h3
    assert ssh(netns_hosts, "h3", f"mkdir -p {tmp_path} && echo h3 > {tmp_path}/h3.txt").returncode == 0
    assert not (tmp_path / "h3.txt").exists()


def _connectable(addr: str, port: int) -> bool:
    try:
        socket.create_connection((addr, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_stop_removes_everything():
    if infra_hosts.missing_requirements(netns=True):
        pytest.skip(infra_hosts.missing_requirements(netns=True))
    workdir = INFRA_ROOT / "stoptest"
    shutil.rmtree(workdir, ignore_errors=True)
    try:
        loop = infra_hosts.start_loopback(str(workdir / "loop"), names=("l1",))
        net = infra_hosts.start_netns(str(workdir / "net"), names=("s1",))
        ns, bridge, links = net.namespaces["s1"], net.bridge, list(net.links)
        pids = [p.pid for p in loop.procs.values()] + [p.pid for p in net.procs.values()]
        assert os.path.exists(f"/run/netns/{ns}")
        assert ssh(net, "s1", "hostname").stdout == "s1\n"
        port = loop.ports["l1"]
        loop.stop()
        net.stop()
        net.stop()          # idempotent
        assert not os.path.exists(f"/run/netns/{ns}")
        for link in [bridge, *links]:
            assert subprocess.run(["ip", "link", "show", link], capture_output=True).returncode != 0, link
        for pid in pids:
            assert not os.path.exists(f"/proc/{pid}"), pid
        assert not _connectable("127.0.0.1", port)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        try:
            INFRA_ROOT.rmdir()
        except OSError:
            pass


# --- Slurm (tests/infra/slurm.py) -------------------------------------------------------------------------

def test_slurm_srun_runs_tasks_on_both_nodes(slurm_clean):
    assert slurm_clean.nodes == ["h1", "h2"] and slurm_clean.partition == "debug"
    result = slurm_clean.command("srun", "-N2", "-n4", "hostname")
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == ["h1", "h1", "h2", "h2"]


def test_slurm_sbatch_job_completes(slurm_clean, tmp_path: Path):
    result = slurm_clean.command("sbatch", "--parsable", f"--chdir={tmp_path}", f"--output={tmp_path}/out-%j.txt",
                                 "--wrap", "hostname")
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().split(";")[0]
    assert job_id.isdigit(), result.stdout
    state = slurm_clean.wait_job(job_id, timeout=30)      # polls scontrol show job until a final state
    record = slurm_clean.command("scontrol", "show", "job", job_id).stdout
    assert state == "COMPLETED", record
    assert "JobState=COMPLETED" in record and "ExitCode=0:0" in record
    assert (tmp_path / f"out-{job_id}.txt").read_text() in ("h1\n", "h2\n")
    assert job_id not in slurm_clean.jobs()                # squeue lists only unfinished jobs


def test_slurm_task_environment(slurm_clean):
    result = slurm_clean.command("srun", "-N2", "--ntasks-per-node=2", "env")
    assert result.returncode == 0, result.stderr
    values: dict = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("SLURM"):
            values.setdefault(key, []).append(value)
    assert values["SLURM_JOB_NODELIST"] == ["h[1-2]"] * 4
    assert values["SLURM_TASKS_PER_NODE"] == ["2(x2)"] * 4
    assert values["SLURM_NTASKS"] == ["4"] * 4
    assert sorted(values["SLURM_PROCID"]) == ["0", "1", "2", "3"]
    assert sorted(values["SLURM_LOCALID"]) == ["0", "0", "1", "1"]
    assert sorted(values["SLURMD_NODENAME"]) == ["h1", "h1", "h2", "h2"]


def test_slurm_cluster_stop_kills_daemons_and_jobs(slurm):
    """A second cluster (own hosts, ports and workdir) beside the session's: stop() with a job running
    leaves no slurmctld, slurmd or slurmstepd of it, and the session's cluster keeps working."""
    workdir = INFRA_ROOT / "slurmstop"
    shutil.rmtree(workdir, ignore_errors=True)
    hosts = infra_hosts.start_netns(str(workdir / "net"), names=("s1", "s2"))
    try:
        cluster = infra_slurm.start_cluster(str(workdir / "slurm"), hosts, names=("s1", "s2"), cpus=1)
        assert cluster.ctld_port != slurm.ctld_port
        result = cluster.command("sbatch", "--parsable", f"--chdir={workdir}", "--output=/dev/null",
                                 "--wrap", "sleep 300")
        assert result.returncode == 0, result.stderr
        job_id = result.stdout.strip()
        assert cluster.wait_job(job_id, states=("RUNNING",), timeout=30) == "RUNNING"
        deadline = time.monotonic() + 15    # RUNNING comes before slurmstepd has started the batch script
        while True:
            stepds = cluster.stepd_pids()
            tasks = [pid for stepd in stepds for pid in infra_hosts._descendants(stepd)]
            if (stepds and tasks) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert stepds
        assert tasks                        # the batch script and its sleep
        daemons = [p.pid for p in cluster.procs.values()]
        cluster.stop()
        cluster.stop()       # idempotent
        for pid in daemons + stepds + tasks:
            assert not infra_hosts._alive(pid), pid
        assert not cluster.stepd_pids()
        assert sorted(slurm.command("srun", "-N2", "hostname").stdout.split()) == ["h1", "h2"]
    finally:
        hosts.stop()
        shutil.rmtree(workdir, ignore_errors=True)
