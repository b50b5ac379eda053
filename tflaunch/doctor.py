"""``tflaunch doctor``: is every host ready for a run? Asked of each host's own tflaunch agent, in parallel.

Each host's agent is started exactly as a run starts it (this machine: :func:`~tflaunch.launch.local.spawn_agent`;
others: :func:`~tflaunch.launch.ssh.spawn_ssh_agent`, ssh in BatchMode with the job's Python; inside or through
Slurm: one ``srun`` step, one task per node, no ssh, see :mod:`tflaunch.doctor_slurm`) and given a setup with a
``report`` request (:func:`report_request`). Its hello carries the report (:func:`tflaunch.remote.agent.host_report`):
the job's interpreter and the versions of TensorFlow, Keras, Horovod and mpi4py in it (from package metadata,
in a subprocess: nothing is imported), the raw ``mpirun --version`` text (parsed with
:func:`tflaunch.plan.mpirun.parse_version`), the GPUs, the free disk in the home and the scratch root, and the
host's clock. What the reports say is :mod:`tflaunch.doctor_report`'s: :func:`differences` (pure; also the
multi-host run's preflight) says which package versions differ between hosts; :func:`summarize` adds the hosts
that failed and the warnings (:data:`SKEW_WARN_SECONDS`, :data:`DISK_WARN_BYTES`, :data:`DISK_WARN_FRACTION`).
"""
from __future__ import annotations

import os
import select
import subprocess
import sys
import time

from .doctor_report import (COMPARED, DEFAULT_PACKAGES, DISK_WARN_BYTES, DISK_WARN_FRACTION, SKEW_WARN_SECONDS,
                            HostCheck, differences, summarize, table)
from .doctor_slurm import SLURM_TIMEOUT, check_slurm
from .errors import SpecError
from .spec.hosts import is_local
from .launch import AgentConnection
from .launch.ssh import SshOptions, spawn_ssh_agent

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Mapping, Sequence

# differences, summarize, table, HostCheck and their limits live in .doctor_report, check_slurm in
# .doctor_slurm; they are named here too, where tflaunch doctor's callers have always found them
__all__ = ["report_request", "differences", "check_hosts", "check_slurm", "summarize", "table", "HostCheck",
           "DEFAULT_PACKAGES", "COMPARED", "SKEW_WARN_SECONDS", "DISK_WARN_BYTES", "DISK_WARN_FRACTION",
           "HELLO_MARGIN", "SLURM_TIMEOUT", "MAX_PARALLEL"]

HELLO_MARGIN = 20.0  # beyond ssh's connect timeout: login, interpreter start, the metadata probe
MAX_PARALLEL = 128  # hosts asked at once (each holds 4 file descriptors; select() takes fds < 1024)
PING_TIMEOUT = 2.0  # for the round trip after the hello (it only refines the clock skew)


def report_request(python: str, *, home: str | None = None, scratch: str | None = None, mpirun: str | None = None,
                   packages: Sequence[str] = DEFAULT_PACKAGES, gpus: bool = False, timeout: float | None = None,
                   ) -> dict[str, Any]:
    """What goes in an agent setup's ``"report"`` (the agent answers with ``hello["report"]``, see
    :func:`tflaunch.remote.agent.host_report`). Pure.

    ``python``: the job's interpreter (its path on every host); ``packages``: distributions whose version
    to read from its metadata (one subprocess, nothing imported); ``home``/``scratch``: directories whose
    free space to report (scratch: None = the host's $TMPDIR or /tmp); ``mpirun``: None = do not look for
    MPI, a path, or a bare name (``"mpirun"``: the one a run would use, next to the job's Python, else on
    PATH) whose ``--version`` text to return; ``gpus``: also report :func:`tflaunch.remote.agent.find_gpus`;
    ``timeout``: for the interpreter (default 60 s)."""
    request: dict[str, Any] = {"python": python, "packages": list(packages), "home": home, "scratch": scratch,
                               "mpirun": mpirun, "gpus": bool(gpus)}
    if timeout is not None:
        request["timeout"] = float(timeout)
    return request



# -- the checks ----------------------------------------------------------------------------------------
def _spawn(host: str, python: str, ssh: SshOptions) -> tuple[AgentConnection, str]:
    """The host's agent, started as a run starts it."""
    if is_local(host):
        import tempfile

        from .launch.local import spawn_agent

        diagnostics = tempfile.TemporaryFile()
        return AgentConnection(spawn_agent(diagnostics), host, local=True, diagnostics=diagnostics), "local"
    return spawn_ssh_agent(host, python, ssh), "ssh"


def _exit_status(conn: AgentConnection) -> int | None:
    try:
        return conn.popen.wait(2)
    except subprocess.TimeoutExpired:
        return None


def _no_agent(check: HostCheck, conn: AgentConnection, python: str) -> None:
    """Say why a host's agent ended without a hello: ssh, the interpreter, or the agent itself."""
    code = _exit_status(conn)
    lines = [line.strip() for line in conn.stderr_tail().splitlines() if line.strip()]
    last = lines[-1] if lines else f"exit status {code}"
    if check.via == "ssh" and code == 255:
        hint = ""
        if "Permission denied" in last or "Host key verification failed" in last:
            hint = " (ssh runs in BatchMode: no password or host key prompt; install a key and a known_hosts entry)"
        check.fail("ssh", f"ssh: {last[5:] if last.startswith('ssh: ') else last}{hint}")
    elif code in (126, 127) or (check.via == "ssh" and python in last and
                                ("not found" in last or "No such file" in last)):
        check.fail("interpreter", f"the job's Python {python} cannot be started there: {last}")
    else:
        check.fail("agent", f"the tflaunch agent did not start: {last}")


def check_hosts(hosts: Sequence[str], request: Mapping[str, Any], *, python: str,
                ssh: SshOptions | None = None, timeout: float | None = None) -> list[HostCheck]:
    """Ask every host's agent for its report, all at once (:data:`MAX_PARALLEL` at a time); one
    :class:`HostCheck` per host, in order.

    ``python``: the interpreter the agents run in over ssh (the job's, as in a run); this machine's agent
    runs in tflaunch's. ``timeout``: how long a host may take to answer (default: the connect timeout +
    :data:`HELLO_MARGIN`). The clock skew is the host's clock when its report left minus this machine's
    then (the arrival time less half the round trip of one more command)."""
    checks: list[HostCheck] = []
    for first in range(0, len(hosts), MAX_PARALLEL):
        checks += _check_some(hosts[first:first + MAX_PARALLEL], request, python=python, ssh=ssh or SshOptions(),
                              timeout=timeout)
    return checks


def _check_some(hosts: Sequence[str], request: Mapping[str, Any], *, python: str, ssh: SshOptions,
                timeout: float | None) -> list[HostCheck]:
    limit = timeout if timeout is not None else ssh.connect_timeout + HELLO_MARGIN
    token = "doctor-" + os.urandom(6).hex()
    checks = [HostCheck(host, "local" if is_local(host) else "ssh") for host in hosts]
    started = time.monotonic()
    state: dict[int, dict[str, Any]] = {}
    for i, check in enumerate(checks):
        try:
            conn, _ = _spawn(check.host, python, ssh)
        except OSError as exc:
            check.fail("agent", f"cannot start {'the tflaunch agent' if check.via == 'local' else 'ssh'}: "
                                f"{exc.strerror or exc}")
            continue
        setup = {"token": token, "agent_id": i, "grace": 1.0, "orphan_grace": 1.0, "ports": 0, "probe": None,
                 "scratch_root": request.get("scratch"), "gpus": False, "report": dict(request)}
        try:
            conn.start(setup)
        except OSError:
            pass  # gone already: its end of file says why
        state[i] = {"conn": conn, "hello": None, "arrived": None, "ping": None, "rtt": None, "done": None}
    deadline = started + limit
    try:
        while any(s["done"] is None for s in state.values()):
            now = time.monotonic()
            waiting = [i for i, s in state.items() if s["done"] is None]
            for i in waiting:  # past its deadline: the host did not answer (or, after the hello, the ping)
                s = state[i]
                if s["hello"] is None and now >= deadline:
                    s["conn"].popen.kill()
                    checks[i].fail("timeout", f"no answer within {limit:g} s")
                    s["done"] = now
                elif s["hello"] is not None and now >= s["ping"] + PING_TIMEOUT:
                    s["done"] = now
            fds = {state[i]["conn"].fileno(): i for i in waiting
                   if state[i]["done"] is None and not state[i]["conn"].eof}
            if not fds:
                continue
            ends = [deadline] + [s["ping"] + PING_TIMEOUT for s in state.values() if s["ping"] and s["done"] is None]
            ready = select.select(list(fds), [], [], max(0.0, min(ends) - time.monotonic()))[0]
            for fd in ready:
                i = fds[fd]
                s, conn = state[i], state[i]["conn"]
                for event in conn.read_events():
                    kind = event.get("event")
                    if kind == "hello" and s["hello"] is None:
                        s["arrived"] = time.time()
                        s["hello"] = event
                        s["ping"] = time.monotonic()
                        if not conn.send({"cmd": "cleanup"}):  # nothing to clean: answers "cleaned" at once
                            s["done"] = s["ping"]
                    elif kind == "cleaned" and s["ping"] is not None and s["rtt"] is None:
                        s["done"] = time.monotonic()
                        s["rtt"] = s["done"] - s["ping"]
                if conn.eof and s["done"] is None:
                    if s["hello"] is None:
                        _no_agent(checks[i], conn, python)
                    s["done"] = time.monotonic()
    finally:
        for s in state.values():  # every agent sees its end of file at once, then each is reaped
            try:
                s["conn"].popen.stdin.close()
            except OSError:
                pass
        for s in state.values():
            s["conn"].close(timeout=2.0)
    for i, check in enumerate(checks):
        s = state.get(i)
        if s is not None and s["hello"] is not None:
            hello = s["hello"]
            if not isinstance(hello.get("report"), dict):
                check.fail("agent", "the tflaunch agent there does not report (an older tflaunch?)")
            else:
                rtt = s["rtt"]
                check.fill(hello.get("hostname"), hello["report"], s["arrived"] - (rtt or 0.0) / 2, rtt)
            check.result["agent_python"] = hello.get("python")
        check.result["seconds"] = round(((s or {}).get("done") or time.monotonic()) - started, 3)
    return checks


def resolve_request_python(python: str | None) -> str:
    """The job's interpreter: ``--python`` (a bare name is looked up on PATH; SpecError if it is not an
    executable file here), else the one running tflaunch."""
    if python is None:
        return sys.executable
    import shutil

    path = python if os.sep in python else (shutil.which(python) or "")
    if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise SpecError(f"--python: {python!r} is not an executable file")
    return os.path.abspath(path)
