"""``tflaunch doctor``: every host checked in parallel through its own tflaunch agent.

Real parts: this machine, the netns ssh hosts h1, h2, h3 (h3 does not see pytest's temporary
directories: a job interpreter made there is a different installation at the same path), unreachable
and refusing addresses in the hosts' own subnet, and the real two-node Slurm cluster. No GPU exists
here: the GPU test simulates one with a fake ``nvidia-smi`` on PATH and with CUDA_VISIBLE_DEVICES.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, cli_env

sys.path.insert(0, str(REPO))
from tflaunch import doctor  # noqa: E402
from tflaunch.doctor import HostCheck, differences, report_request, summarize  # noqa: E402

# A job interpreter: a virtualenv whose TensorFlow is a real installed distribution (a dist-info written
# by hand) with a package that must never be imported. Run as `python - DIR VERSION` (locally or over ssh).
MAKE_ENV = r"""
import os, subprocess, sys
path, version = sys.argv[1], sys.argv[2]
subprocess.run([sys.executable, "-m", "venv", "--without-pip", path], check=True)
site = subprocess.run([os.path.join(path, "bin", "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                      check=True, capture_output=True, text=True).stdout.strip()
os.makedirs(os.path.join(site, "tensorflow"))
with open(os.path.join(site, "tensorflow", "__init__.py"), "w") as fh:
    fh.write("raise SystemExit('tflaunch doctor must never import TensorFlow')\n")
info = os.path.join(site, "tensorflow_cpu-%s.dist-info" % version)
os.makedirs(info)
with open(os.path.join(info, "METADATA"), "w") as fh:
    fh.write("Metadata-Version: 2.1\nName: tensorflow-cpu\nVersion: %s\n" % version)
with open(os.path.join(info, "top_level.txt"), "w") as fh:
    fh.write("tensorflow\n")
with open(os.path.join(info, "RECORD"), "w") as fh:
    fh.write("tensorflow/__init__.py,,\n")
"""


def make_env(path: Path, version: str, ssh: list[str] | None = None) -> str:
    """A job interpreter at ``path`` with tensorflow-cpu ``version``; ``ssh``: made on that host instead."""
    argv = (ssh or []) + [sys.executable, "-", str(path), version]
    subprocess.run(argv, input=MAKE_ENV, text=True, check=True, capture_output=True, timeout=120)
    return str(path / "bin" / "python")


def doctor_cli(home: Path, *args: str, env: dict | None = None, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "tflaunch", "doctor", *args], env=env or cli_env(home),
                            capture_output=True, text=True, errors="replace", timeout=timeout, cwd="/")
    return result, time.monotonic() - start


def as_json(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout)


def by_host(out: dict) -> dict[str, dict]:
    return {h["host"]: h for h in out["hosts"]}


def errors(result: subprocess.CompletedProcess) -> list[str]:
    return [line[len("tflaunch: error: "):] for line in result.stderr.splitlines() if line.startswith("tflaunch: error: ")]


HOST_FIELDS = {"host", "via", "ok", "failure", "error", "differs", "hostname", "python", "packages", "mpi", "gpus",
               "disk", "clock_skew_seconds", "round_trip_seconds", "seconds", "warnings", "agent_python"}


# -- pure: the request, the differences, the verdict -----------------------------------------------------
def test_report_request_is_plain_json():
    req = report_request("/opt/venv/bin/python", home="/shared/home", mpirun="mpirun")
    assert req == {"python": "/opt/venv/bin/python", "packages": ["tensorflow", "keras", "horovod", "mpi4py"],
                   "home": "/shared/home", "scratch": None, "mpirun": "mpirun", "gpus": False}
    assert json.loads(json.dumps(req)) == req
    cheap = report_request("/usr/bin/python3", packages=("tensorflow",))
    assert cheap["mpirun"] is None and cheap["gpus"] is False and cheap["packages"] == ["tensorflow"]


def _report(tf=None, keras="3.15.1", python="3.11.7", mpi="mpirun (Open MPI) 4.1.4\n"):
    pkgs = {"tensorflow": None if tf is None else {"version": tf, "distribution": "tensorflow"},
            "keras": None if keras is None else {"version": keras, "distribution": "keras"}}
    return {"python": {"path": "/p", "version": python, "error": None}, "packages": pkgs,
            "mpirun": {"path": "/usr/bin/mpirun", "output": mpi, "returncode": 0, "error": None} if mpi else None,
            "gpus": None, "disk": {}, "time": time.time(), "error": None}


def test_differences_names_the_odd_hosts_and_both_versions():
    same = {h: _report("2.21.0") for h in ("h1", "h2", "h3")}
    assert differences(same) == []
    odd = dict(same, h3=_report("2.99.0"))
    assert differences(odd) == ["h3: tensorflow 2.99.0, the others (h1, h2) 2.21.0"]
    odd["h4"] = _report(None)
    odd["h5"] = _report("2.21.0")
    assert differences(odd, ("tensorflow", "keras")) == [
        "h3: tensorflow 2.99.0; h4: tensorflow not installed, the others (h1, h2, h5) 2.21.0"]
    assert differences({"a": _report("2.21.0"), "b": _report("2.99.0")}) == [
        "tensorflow differs between the hosts: a 2.21.0; b 2.99.0"]
    mixed = {"h1": _report("2.21.0"), "h2": _report("2.21.0", python="3.10.12", mpi="HYDRA build details:\n"
                                                                                  "    Version:  4.2.0\n"),
             "h3": _report("2.21.0"), "h4": None}
    assert differences(mixed, ("python", "mpi", "tensorflow")) == [
        "h2: Python 3.10.12, the others (h1, h3) 3.11.7", "h2: MPI MPICH 4.2.0, the others (h1, h3) Open MPI 4.1.4"]
    broken = dict(same, h2=dict(_report("2.21.0"), packages=None))  # its interpreter could not be asked
    assert differences(broken) == ["h2: tensorflow unknown, the others (h1, h3) 2.21.0"]
    not_asked = dict(same, h2=dict(_report("2.21.0"), mpirun=None))
    assert differences(not_asked, ("mpi",)) == []


def test_thresholds_for_clock_skew_and_disk():
    """The warnings' thresholds (2 s of clock skew; < 1 GiB or < 5 % free), on reports as agents send them."""
    def check(host, skew, free, total):
        c = HostCheck(host, "ssh")
        report = _report("2.21.0")
        report["disk"] = {"scratch": {"path": "/tmp", "visible": True, "free_bytes": free, "total_bytes": total},
                          "home": {"path": "/home/u/.tflaunch", "visible": False, "free_bytes": None,
                                   "total_bytes": None}}
        c.fill(host, report, report["time"] - skew, 0.001)
        return c
    gib = 1 << 30
    checks = [check("fine", 1.9, 100 * gib, 200 * gib), check("ahead", 2.5, 100 * gib, 200 * gib),
              check("behind", -3.0, 100 * gib, 200 * gib), check("small", 0.0, gib // 2, 2 * gib),
              check("fraction", 0.0, 40 * gib, 1000 * gib)]
    summary = summarize(checks, home_needed=True)
    assert summary["ok"] and summary["problems"] == []  # warnings only
    warned = {w.split(":")[0] for w in summary["warnings"] if "clock" in w}
    assert warned == {"ahead", "behind"}
    assert any(w.startswith("ahead: its clock is 2.5 s ahead of") for w in summary["warnings"])
    assert any(w.startswith("behind: its clock is 3.0 s behind") for w in summary["warnings"])
    full = {w.split(":")[0] for w in summary["warnings"] if "nearly full" in w}
    assert full == {"small", "fraction"}
    assert sum("home /home/u/.tflaunch is not visible" in w for w in summary["warnings"]) == 5
    assert all(c.result["ok"] for c in checks)


# -- this machine ----------------------------------------------------------------------------------------
def test_the_agent_reports_only_when_asked(tmp_path):
    """Through a real local agent: the setup's "report" comes back in the hello; without it, no report."""
    from tflaunch.launch import AgentConnection
    from tflaunch.launch.local import spawn_agent

    hellos = []
    for extra in ({}, {"report": report_request(sys.executable, home=str(tmp_path), mpirun="mpirun")}):
        conn = AgentConnection(spawn_agent())
        conn.start({"token": "doctor-test", **extra})
        deadline = time.monotonic() + 30
        hello = None
        while hello is None and time.monotonic() < deadline:
            hello = next((e for e in conn.read_events() if e.get("event") == "hello"), None)
            time.sleep(0.01)
        conn.close()
        hellos.append(hello)
    plain, asked = hellos
    assert "report" not in plain
    report = asked["report"]
    assert report["python"]["version"] == "%d.%d.%d" % sys.version_info[:3] and report["error"] is None
    assert set(report["packages"]) == {"tensorflow", "keras", "horovod", "mpi4py"}
    assert report["disk"]["home"]["visible"] and report["disk"]["home"]["free_bytes"] > 0
    assert report["disk"]["scratch"]["path"] == (os.environ.get("TMPDIR") or "/tmp")
    assert report["gpus"] is None  # not asked
    assert abs(report["time"] - time.time()) < 60


def test_this_machine_table_and_json(home, tmp_path):
    result, _ = doctor_cli(home)
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()[:2]
    assert header.split()[:5] == ["HOST", "STATUS", "PYTHON", "TENSORFLOW", "KERAS"]
    assert row.split()[:3] == ["localhost", "ok", "%d.%d.%d" % sys.version_info[:3]]
    assert result.stdout.splitlines()[-1] == "1 host checked: all agree, no problems"

    home.mkdir()
    result, _ = doctor_cli(home, "--json", "--remote-scratch", str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = as_json(result)
    assert set(out) == {"hosts", "summary"}
    assert set(out["summary"]) == {"ok", "hosts", "failed", "differing", "problems", "warnings"}
    assert out["summary"]["ok"] is True and out["summary"]["problems"] == [] and out["summary"]["hosts"] == 1
    (h,) = out["hosts"]
    assert set(h) == HOST_FIELDS
    assert (h["host"], h["via"], h["ok"], h["failure"], h["error"]) == ("localhost", "local", True, None, None)
    assert h["hostname"] == os.uname().nodename and h["python"]["path"] == sys.executable
    assert set(h["packages"]) == {"tensorflow", "keras", "horovod", "mpi4py"}
    assert set(h["disk"]) == {"home", "scratch"}
    assert h["disk"]["home"] == {"path": str(home), "visible": True, "free_bytes": h["disk"]["home"]["free_bytes"],
                                 "total_bytes": h["disk"]["home"]["total_bytes"]}
    assert h["disk"]["scratch"]["path"] == str(tmp_path)
    assert abs(h["clock_skew_seconds"]) < SKEW and h["round_trip_seconds"] > 0
    assert h["gpus"]["count"] == 0  # no GPU on this machine (nor nvidia-smi)
    mpi = h["mpi"]
    assert set(mpi) == {"path", "flavour", "name", "version", "error"}


SKEW = 1.0  # the same clock: well under the 2 s warning


def test_simulated_gpus(home, tmp_path):
    """No GPU here: a fake nvidia-smi on PATH (what the agent asks) stands for two, then CUDA_VISIBLE_DEVICES."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: Fake GPU (UUID: GPU-0)'\necho 'GPU 1: Fake GPU (UUID: GPU-1)'\n")
    fake.chmod(0o755)
    env = cli_env(home, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result, _ = doctor_cli(home, "--json", env=env)
    (h,) = as_json(result)["hosts"]
    assert h["gpus"] == {"count": 2, "ids": ["0", "1"], "source": "nvidia-smi", "error": None}
    env["CUDA_VISIBLE_DEVICES"] = "1"
    result, _ = doctor_cli(home, env=env)
    assert "1 (CUDA_VISIBLE_DEVICES)" in result.stdout.splitlines()[1]


# -- real ssh hosts --------------------------------------------------------------------------------------
def _ssh(netns_hosts) -> list[str]:
    return ["--ssh-config", netns_hosts.config]


def test_ssh_hosts_that_agree(netns_hosts, home):
    result, _ = doctor_cli(home, "--hosts", "h1,h2:4,h3", *_ssh(netns_hosts), "--json")
    assert result.returncode == 0, result.stderr
    out = as_json(result)
    hosts = by_host(out)
    assert list(hosts) == ["h1", "h2", "h3"] and out["summary"]["ok"]
    for name, h in hosts.items():
        assert (h["via"], h["ok"], h["hostname"]) == ("ssh", True, name)
        assert h["python"]["path"] == sys.executable and abs(h["clock_skew_seconds"]) < SKEW
        assert h["round_trip_seconds"] is not None


def test_the_host_with_another_tensorflow_is_named_with_both_versions(netns_hosts, home, tmp_path):
    """localhost, h1 and h2 share the filesystem and so the job's interpreter (TensorFlow 2.21.0); h3 does not
    see tmp_path, and at that same path it gets an interpreter of its own with TensorFlow 2.99.0."""
    env_dir = tmp_path / "jobenv"
    python = make_env(env_dir, "2.21.0")
    assert make_env(env_dir, "2.99.0", netns_hosts.ssh_command("h3", "")[:-1]) == python
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("localhost slots=2\nh1 slots=2\nh2\nh3 slots=2\n")
    # one mpirun for all (this process's PATH may differ from the ssh logins'): only TensorFlow differs
    mpirun = ["--mpirun", shutil.which("mpirun")] if shutil.which("mpirun") else []
    args = ["--hostfile", str(hostfile), "--python", python, *mpirun, *_ssh(netns_hosts)]
    result, _ = doctor_cli(home, *args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert errors(result) == ["h3: tensorflow 2.99.0, the others (localhost, h1, h2) 2.21.0"]
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:5]}
    assert rows["h3"][1:4] == ["FAIL", "%d.%d.%d" % sys.version_info[:3], "2.99.0"]
    assert [rows[h][1] for h in ("localhost", "h1", "h2")] == ["ok", "ok", "ok"]
    assert rows["h1"][3] == "2.21.0" and rows["h1"][4] == "-"  # keras: not installed in that interpreter

    result, _ = doctor_cli(home, *args, "--json")
    out = as_json(result)
    assert out["summary"]["ok"] is False and out["summary"]["failed"] == []
    assert out["summary"]["differing"] == {"tensorflow": ["h3"]}
    assert out["summary"]["problems"] == ["h3: tensorflow 2.99.0, the others (localhost, h1, h2) 2.21.0"]
    h3 = by_host(out)["h3"]
    assert (h3["ok"], h3["failure"], h3["differs"]) == (False, None, ["tensorflow"])
    assert h3["packages"]["tensorflow"] == {"version": "2.99.0", "distribution": "tensorflow-cpu"}
    assert h3["disk"]["scratch"]["visible"]


def test_unreachable_and_refusing_hosts_fail_within_the_connect_timeout(netns_hosts, home, tmp_path):
    """``dead``: an address in the hosts' subnet where no machine is; ``refused``: h1's address, a port nothing
    listens on. Both are named, the good host still reports, and it ends within the connect timeout."""
    subnet = netns_hosts.addresses["h1"].rsplit(".", 1)[0]
    config = tmp_path / "ssh_config"
    config.write_text(f"Host dead\n    HostName {subnet}.250\n\nHost refused\n    HostName {subnet}.11\n    Port 1\n\n"
                      + Path(netns_hosts.config).read_text())
    result, _ = doctor_cli(home, "--hosts", "h1,dead,refused", "--ssh-config", str(config),
                           "--connect-timeout", "2", "--json")
    assert result.returncode == 1, result.stderr
    hosts = by_host(as_json(result))  # failure "ssh" with ssh's own message: not tflaunch's 22 s answer deadline
    assert hosts["h1"]["ok"]
    for name in ("dead", "refused"):
        assert (hosts[name]["ok"], hosts[name]["failure"]) == (False, "ssh")
        assert hosts[name]["error"].startswith("ssh: connect to host")
    assert "Connection refused" in hosts["refused"]["error"]
    assert "timed out" in hosts["dead"]["error"] or "No route to host" in hosts["dead"]["error"]
    assert [e.split(":")[0] for e in errors(result)] == ["dead", "refused"]
    assert as_json(result)["summary"]["failed"] == ["dead", "refused"]


def test_missing_interpreter_and_an_agent_that_does_not_start(netns_hosts, home, tmp_path):
    """The job's Python exists here and on h1 (shared filesystem) but not on h3 (it does not see tmp_path);
    /bin/true is an executable everywhere that is not a Python: no agent starts, no metadata is read."""
    python = make_env(tmp_path / "jobenv", "2.21.0")
    mpirun = ["--mpirun", shutil.which("mpirun")] if shutil.which("mpirun") else []  # as above: one for all
    result, _ = doctor_cli(home, "--hosts", "localhost,h1,h3", "--python", python, *mpirun, *_ssh(netns_hosts),
                           "--json")
    assert result.returncode == 1
    hosts = by_host(as_json(result))
    assert hosts["localhost"]["ok"] and hosts["h1"]["ok"]
    assert hosts["h3"]["failure"] == "interpreter" and python in hosts["h3"]["error"]
    assert errors(result) == [f"h3: {hosts['h3']['error']}"]

    result, _ = doctor_cli(home, "--hosts", "localhost,h1", "--python", "/bin/true", *_ssh(netns_hosts), "--json")
    assert result.returncode == 1
    hosts = by_host(as_json(result))
    assert hosts["h1"]["failure"] == "agent" and "did not start" in hosts["h1"]["error"]
    assert hosts["localhost"]["failure"] == "interpreter"  # its agent runs in tflaunch's Python; /bin/true answers nothing
    assert len(errors(result)) == 2


# -- Slurm -----------------------------------------------------------------------------------------------
@pytest.fixture
def slurm_env(slurm_clean, home):
    env = {k: v for k, v in cli_env(home).items() if not k.startswith("SLURM_")}
    env.update(slurm_clean.env)
    return env


def test_slurm_outside_an_allocation_is_one_short_job(slurm_clean, slurm_env, home):
    result, _ = doctor_cli(home, "--slurm", "--nodes", "2", "--json", env=slurm_env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = as_json(result)
    hosts = by_host(out)
    assert sorted(hosts) == ["h1", "h2"] and out["summary"]["ok"]
    for name, h in hosts.items():
        assert (h["via"], h["hostname"], h["ok"]) == ("srun", name, True)
        assert h["python"]["path"] == sys.executable and h["packages"]["tensorflow"] is not None
        assert abs(h["clock_skew_seconds"]) < SKEW and h["round_trip_seconds"] is None

    result, _ = doctor_cli(home, "--slurm", "--partition", "nosuch", env=slurm_env)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "srun failed" in result.stderr and "Traceback" not in result.stderr


def test_slurm_inside_an_allocation_checks_its_nodes_with_one_step(slurm_clean, slurm_env, home):
    tfl = [sys.executable, "-m", "tflaunch", "doctor", "--json"]
    result = subprocess.run(["salloc", "--nodes=2", *tfl], env=slurm_env, capture_output=True, text=True,
                            timeout=120, cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr
    out = as_json(result)
    assert [h["host"] for h in out["hosts"]] == ["h1", "h2"]  # the allocation's nodes, in its order
    assert all(h["via"] == "srun" and h["ok"] for h in out["hosts"])

    result = subprocess.run(["salloc", "--nodes=2", *tfl, "--slurm", "--nodes", "1"], env=slurm_env,
                            capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [h["host"] for h in as_json(result)["hosts"]] == ["h1"]


def test_slurm_job_that_cannot_start_is_cancelled_at_the_timeout(slurm_clean, slurm_env, home, tmp_path):
    """Every CPU is taken: the doctor's job waits in the queue; at --timeout it says so and cancels its job."""
    hold = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=2", f"--output={tmp_path}/hold.out",
                           "--wrap", "sleep 120"], env=slurm_env, capture_output=True, text=True, check=True)
    slurm_clean.wait_job(hold.stdout.strip(), ("RUNNING",))
    result, _ = doctor_cli(home, "--slurm", "--nodes", "2", "--timeout", "3", env=slurm_env)
    assert result.returncode == 1  # (doctor_cli's own 120 s limit catches a doctor that keeps waiting)
    assert "no node reported within 3 s" in result.stderr and result.stderr.count("\n") == 1
    names = slurm_clean.command("squeue", "-h", "-o", "%j").stdout.split()
    assert not [n for n in names if n.startswith("tflaunch-doctor-")]


# -- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--hosts", "h1,,h2"], "--hosts: empty item"),
    (["--hosts", "bad host"], "host name may contain only"),
    (["--hostfile", "/nonexistent/hosts.txt"], "hostfile /nonexistent/hosts.txt: cannot read"),
    (["--python", "/nonexistent/python"], "--python: '/nonexistent/python' is not an executable file"),
    (["--python", "__NOT_EXECUTABLE__"], "is not an executable file"),
    (["--nodes", "2"], "--nodes: only with --slurm"),
    (["--slurm", "--nodes", "0"], "--nodes 0: must be >= 1"),
    (["--slurm", "--hosts", "h1"], "not allowed with argument"),
    (["--connect-timeout", "0"], "must be > 0"),
    (["--ssh-port", "70000"], "ssh_port (--ssh-port)"),
])
def test_bad_input_is_one_line_and_exit_2(home, tmp_path, args, message):
    if "__NOT_EXECUTABLE__" in args:
        plain = tmp_path / "python"
        plain.write_text("not a program\n")
        args = [str(plain) if a == "__NOT_EXECUTABLE__" else a for a in args]
    env = {k: v for k, v in cli_env(home).items() if not k.startswith("SLURM_")}
    result, _ = doctor_cli(home, *args, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_report_that_breaks_still_answers():
    """host_report never raises: a request it cannot use comes back with ``error`` and the clock."""
    from tflaunch.remote.agent import host_report

    report = host_report({"python": sys.executable, "packages": 5})
    assert report["error"] and isinstance(report["time"], float)
    assert doctor  # the module imports without TensorFlow
