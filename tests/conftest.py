"""Shared fixtures: a private TFLAUNCH_HOME, a project directory, and the real CLI in a subprocess."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def project(tmp_path: Path) -> Callable[..., Path]:
    """``project(name=source, ...)`` writes files (dedented) into tmp_path/proj and returns the dir."""
    root = tmp_path / "proj"
    root.mkdir()

    def write(**files: str) -> Path:
        for name, content in files.items():
            path = root / name.replace("__", "/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(content))
        return root
    return write


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["TFLAUNCH_HOME"] = str(home)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@pytest.fixture
def cli(home: Path, tmp_path: Path):
    """Run ``python -m tflaunch ARGS`` to completion; returns CompletedProcess with text output."""
    def run(*args: str, timeout: float = 120, cwd: Path | None = None, env: dict | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "tflaunch", *args], cwd=cwd or tmp_path,
                                env=env or cli_env(home), capture_output=True, text=True,
                                errors="replace", timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"tflaunch {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result
    return run


@pytest.fixture
def cli_popen(home: Path, tmp_path: Path):
    """Start ``python -m tflaunch ARGS`` in the background (own process group); killed at teardown."""
    started: list[subprocess.Popen] = []

    def start(*args: str, cwd: Path | None = None, **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "tflaunch", *args], cwd=cwd or tmp_path,
                                env=cli_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, **kwargs)
        started.append(proc)
        return proc
    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def run_cli(env: dict, *args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m tflaunch run ARGS`` to completion with ``env``: (result with text output, seconds)."""
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "tflaunch", "run", *args], env=env, capture_output=True,
                            text=True, timeout=timeout)
    return result, time.monotonic() - start


def last_run(home: Path) -> str:
    """The id of the newest run in ``home``."""
    return sorted(p.name for p in (home / "runs").iterdir() if not p.name.startswith("."))[-1]


def last_run_when(home: Path, timeout: float = 30) -> str:
    """The newest run's id, waiting for a run to appear."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (home / "runs").is_dir():
            runs = [p.name for p in (home / "runs").iterdir() if not p.name.startswith(".")]
            if runs:
                return sorted(runs)[-1]
        time.sleep(0.05)
    raise AssertionError("no run appeared")


def show(cli, run_id: str) -> dict:
    result = cli("runs", "show", run_id, "--json", check=True)
    return json.loads(result.stdout)


def wait_status(cli, run_id: str, statuses: set[str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = show(cli, run_id)
        if run["status"] in statuses:
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} still {run['status']} after {timeout} s")
        time.sleep(0.1)


def process_exits(run: dict | Path) -> dict[int, int]:
    """{rank: returncode} of a run's processes (``run``: a ``runs show --json`` object or the record's
    directory), in the order the launcher saw them end (its events.jsonl). A negative returncode is the
    signal that ended it: -15 (SIGTERM) or -9 (SIGKILL, after the grace) for a process tflaunch stopped;
    rank -1 is an MPI job's mpirun."""
    record = Path(run["run_dir"]) if isinstance(run, dict) else Path(run)
    events = [json.loads(line) for line in (record / "events.jsonl").read_text().splitlines()]
    return {e["index"]: e["returncode"] for e in events if e.get("event") == "process_exited"}


def pids_with_token(token: str) -> list[int]:
    """Processes whose environment carries TFLAUNCH_RUN_ID=token (how tflaunch finds a run's processes)."""
    sys.path.insert(0, str(REPO))
    from tflaunch.remote.agent import run_pids
    return sorted(run_pids(token))


def wait_no_processes(token: str, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while pids_with_token(token):
        if time.monotonic() - start > timeout:
            raise AssertionError(f"processes of run {token} still alive after {timeout} s: {pids_with_token(token)}")
        time.sleep(0.05)
    return time.monotonic() - start


def wait_for_file(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    os.killpg(proc.pid, sig)


# --- Real SSH test hosts (tests/infra/hosts.py; tests/infra/setup.sh installs sshd/ip in CI) --------------
# Workdirs live under /var/tmp/tflaunch-infra-<pid>, outside pytest's base temp dir (which netns host h3
# hides behind a private tmpfs) and removed at the end of the session.

import shutil  # noqa: E402

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from tests.infra import hosts as infra_hosts  # noqa: E402
from tests.infra import slurm as infra_slurm  # noqa: E402

INFRA_ROOT = Path(f"/var/tmp/tflaunch-infra-{os.getpid()}")


def _infra_workdir(name: str) -> Path:
    """A fresh INFRA_ROOT/name; also removes the infra dirs of sessions whose process is gone."""
    for old in Path("/var/tmp").glob("tflaunch-infra-*"):
        pid = old.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    workdir = INFRA_ROOT / name
    shutil.rmtree(workdir, ignore_errors=True)
    return workdir


def _remove_infra_workdir(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
    try:
        INFRA_ROOT.rmdir()
    except OSError:
        pass


def _skip_or_fail(reason: str) -> None:
    """Skip a test that needs real hosts here; under .ci/run (TFLAUNCH_TEST_REQUIRE_HOSTS=1) fail instead."""
    if os.environ.get("TFLAUNCH_TEST_REQUIRE_HOSTS") == "1":
        pytest.fail(f"real test hosts are required here: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def ssh_loopback():
    """sshd on 127.0.0.1: ``ssh -F ssh_loopback.config loop1 CMD`` (aliases loop1, loop2)."""
    reason = infra_hosts.missing_requirements()
    if reason:
        _skip_or_fail(reason)
    workdir = _infra_workdir("loop")
    hosts = infra_hosts.start_loopback(str(workdir))
    try:
        yield hosts
    finally:
        hosts.stop()
        _remove_infra_workdir(workdir)


@pytest.fixture(scope="session")
def netns_hosts(tmp_path_factory):
    """Hosts h1, h2, h3 in their own network namespaces (own address and hostname, sshd on port 22).
    h1 and h2 share the filesystem with the launcher; h3 has an empty tmpfs over pytest's base temp
    dir, so it cannot see any test's tmp_path (a host without a shared filesystem)."""
    reason = infra_hosts.missing_requirements(netns=True)
    if reason:
        _skip_or_fail(reason)
    workdir = _infra_workdir("netns")
    hosts = infra_hosts.start_netns(str(workdir), names=("h1", "h2", "h3"),
                                    private_dirs={"h3": [str(tmp_path_factory.getbasetemp())]})
    try:
        yield hosts
    finally:
        hosts.stop()
        _remove_infra_workdir(workdir)


@pytest.fixture(scope="session")
def slurm(netns_hosts):
    """A real Slurm cluster (tests/infra/slurm.py): slurmctld in the root namespace, slurmd on netns hosts
    h1 and h2 (2 CPUs each, partition "debug").  Merge ``slurm.env`` (SLURM_CONF) into a subprocess's
    environment, or run clients with ``slurm.command("srun", ...)``.  Stopped before netns_hosts."""
    reason = infra_slurm.missing_requirements()
    if reason:
        _skip_or_fail(reason)
    workdir = _infra_workdir("slurm")
    cluster = infra_slurm.start_cluster(str(workdir), netns_hosts, names=("h1", "h2"))
    try:
        yield cluster
    finally:
        cluster.stop()
        _remove_infra_workdir(workdir)


@pytest.fixture
def slurm_clean(slurm):
    """The session's Slurm cluster; every job still queued or running is cancelled after the test."""
    try:
        yield slurm
    finally:
        slurm.cancel_all()
