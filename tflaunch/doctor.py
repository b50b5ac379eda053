"""``tflaunch doctor``: is every host ready for a run? Asked of each host's own tflaunch agent, in parallel.

Each host's agent is started exactly as a run starts it (this machine: :func:`~tflaunch.launch.local.spawn_agent`;
others: :func:`~tflaunch.launch.ssh.spawn_ssh_agent`, ssh in BatchMode with the job's Python; inside or through
Slurm: one ``srun`` step, one task per node, no ssh) and given a setup with a ``report`` request
(:func:`report_request`). Its hello carries the report (:func:`tflaunch.agent.host_report`): the job's
interpreter and the versions of TensorFlow, Keras, Horovod and mpi4py in it (from package metadata, in a
subprocess: nothing is imported), the raw ``mpirun --version`` text (parsed here with
:func:`tflaunch.mpirun.parse_version`), the GPUs, the free disk in the home and the scratch root, and the
host's clock. :func:`differences` (pure; also the multi-host run's preflight) says which package versions
differ between hosts; :func:`summarize` adds the hosts that failed and the warnings (:data:`SKEW_WARN_SECONDS`,
:data:`DISK_WARN_BYTES`, :data:`DISK_WARN_FRACTION`).
"""
from __future__ import annotations

import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from .errors import SpecError
from .hosts import is_local
from .launch import AgentConnection
from .launch.ssh import SshOptions, spawn_ssh_agent
from .mpirun import FLAVOURS, parse_version

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Mapping, Sequence

__all__ = ["report_request", "differences", "check_hosts", "check_slurm", "summarize", "table", "HostCheck",
           "DEFAULT_PACKAGES", "COMPARED", "SKEW_WARN_SECONDS", "DISK_WARN_BYTES", "DISK_WARN_FRACTION",
           "HELLO_MARGIN", "SLURM_TIMEOUT", "MAX_PARALLEL"]

log = logging.getLogger("tflaunch.doctor")

DEFAULT_PACKAGES = ("tensorflow", "keras", "horovod", "mpi4py")
COMPARED = ("python",) + DEFAULT_PACKAGES + ("mpi",)  # what doctor requires to be the same on every host
SKEW_WARN_SECONDS = 2.0  # a host's clock further off than this is a warning (log times, TF/Horovod timeouts)
DISK_WARN_BYTES = 1 << 30  # free space below 1 GiB ...
DISK_WARN_FRACTION = 0.05  # ... or below 5 % of the filesystem is "nearly full" (a warning)
HELLO_MARGIN = 20.0  # beyond ssh's connect timeout: login, interpreter start, the metadata probe
SLURM_TIMEOUT = 120.0  # for the srun step (outside an allocation: its wait in the queue included)
MAX_PARALLEL = 128  # hosts asked at once (each holds 4 file descriptors; select() takes fds < 1024)
PING_TIMEOUT = 2.0  # for the round trip after the hello (it only refines the clock skew)
MARK = "TFLAUNCH-DOCTOR "  # how a Slurm task's report line starts
_LABELS = {"python": "Python", "mpi": "MPI"}

# Run by each Slurm task as `PYTHON -I -S -c SLURM_TASK`: the agent's source and the request come in the
# environment (srun --export=ALL), so that nothing needs to be on the nodes but the job's Python.
SLURM_TASK = (
    "import json,os,sys\n"
    "src=os.environ.pop('TFLAUNCH_DOCTOR_AGENT');req=json.loads(os.environ.pop('TFLAUNCH_DOCTOR_REQUEST'))\n"
    "g={'__name__':'tflaunch_agent'};exec(compile(src,'tflaunch-agent','exec'),g)\n"
    "r=g['host_report'](req)\n"
    "sys.stdout.write('" + MARK + "'+json.dumps({'node':os.environ.get('SLURMD_NODENAME') or os.uname().nodename,"
    "'hostname':os.uname().nodename,'python':sys.version.split()[0],'report':r})+'\\n')\n"
)


def report_request(python: str, *, home: str | None = None, scratch: str | None = None, mpirun: str | None = None,
                   packages: Sequence[str] = DEFAULT_PACKAGES, gpus: bool = False, timeout: float | None = None,
                   ) -> dict[str, Any]:
    """What goes in an agent setup's ``"report"`` (the agent answers with ``hello["report"]``, see
    :func:`tflaunch.agent.host_report`). Pure.

    ``python``: the job's interpreter (its path on every host); ``packages``: distributions whose version
    to read from its metadata (one subprocess, nothing imported); ``home``/``scratch``: directories whose
    free space to report (scratch: None = the host's $TMPDIR or /tmp); ``mpirun``: None = do not look for
    MPI, a path, or a bare name (``"mpirun"``: the one a run would use, next to the job's Python, else on
    PATH) whose ``--version`` text to return; ``gpus``: also report :func:`tflaunch.agent.find_gpus`;
    ``timeout``: for the interpreter (default 60 s)."""
    request: dict[str, Any] = {"python": python, "packages": list(packages), "home": home, "scratch": scratch,
                               "mpirun": mpirun, "gpus": bool(gpus)}
    if timeout is not None:
        request["timeout"] = float(timeout)
    return request


# -- what differs --------------------------------------------------------------------------------------
def _mpi_label(mpirun: Mapping[str, Any]) -> str:
    if not mpirun.get("path"):
        return "not found"
    found = parse_version(mpirun.get("output") or "")
    if found is None:
        return "unknown"
    flavour, version = found
    return f"{FLAVOURS[flavour]['name']} {version}".strip()


def _value(report: Mapping[str, Any], key: str) -> str | None:
    """``key``'s value on a host, as messages show it; None when the report was not asked for it."""
    if key == "python":
        return (report.get("python") or {}).get("version") or "unknown"
    if key == "mpi":
        mpirun = report.get("mpirun")
        return None if mpirun is None else _mpi_label(mpirun)
    packages = report.get("packages")
    if packages is None:
        return "unknown"  # the interpreter could not be asked
    if key not in packages:
        return None
    item = packages[key]
    return "not installed" if item is None else str(item.get("version") or "unknown")


def _groups(reports: Mapping[str, Mapping[str, Any] | None], key: str) -> list[tuple[str, list[str]]]:
    """(value, hosts) for ``key``, biggest group first (ties: in the order of the hosts)."""
    groups: dict[str, list[str]] = {}
    for host, report in reports.items():
        if report is None:
            continue
        value = _value(report, key)
        if value is not None:
            groups.setdefault(value, []).append(host)
    return sorted(groups.items(), key=lambda item: -len(item[1]))


def _names(hosts: Sequence[str], limit: int = 8) -> str:
    if len(hosts) <= limit:
        return ", ".join(hosts)
    return ", ".join(hosts[:limit - 2]) + f" and {len(hosts) - limit + 2} more"


def _odd(groups: list[tuple[str, list[str]]]) -> list[str]:
    """The hosts that differ from the rest: outside the one biggest group (every host when there is no
    single biggest group)."""
    if len(groups) < 2:
        return []
    if len(groups[0][1]) == len(groups[1][1]):
        return [h for _, hosts in groups for h in hosts]
    return [h for _, hosts in groups[1:] for h in hosts]


def differences(reports: Mapping[str, Mapping[str, Any] | None],
                keys: Sequence[str] = ("tensorflow",)) -> list[str]:
    """One message per key whose value differs between the hosts (empty when all agree). Pure.

    ``reports``: host -> the ``report`` of its hello (None: no report; left out). ``keys``: package names
    asked for in :func:`report_request`, ``"python"`` (the job interpreter's version) or ``"mpi"`` (the
    mpirun found, as ``"Open MPI 4.1.4"``). A host whose interpreter lacks a package has it ``not installed``;
    one whose interpreter could not be asked, ``unknown``. The message names the odd hosts and both values,
    e.g. ``h3: tensorflow 2.99.0, the others (h1, h2) 2.21.0``; without a majority, ``tensorflow differs
    between the hosts: h1 2.21.0; h2 2.99.0``."""
    messages = []
    for key in keys:
        groups = _groups(reports, key)
        if len(groups) < 2:
            continue
        label = _LABELS.get(key, key)
        if len(groups[0][1]) == len(groups[1][1]):
            messages.append(f"{label} differs between the hosts: "
                            + "; ".join(f"{_names(hosts)} {value}" for value, hosts in groups))
            continue
        (common, others), rest = groups[0], groups[1:]
        odd = "; ".join(f"{', '.join(hosts)}: {label} {value}" for value, hosts in rest)
        messages.append(f"{odd}, the others ({_names(others)}) {common}")
    return messages


# -- the checks ----------------------------------------------------------------------------------------
@dataclass
class HostCheck:
    """One host's outcome: ``result`` is its JSON object (see README, ``tflaunch doctor``); ``report`` the raw
    report of its agent (None when it gave none)."""

    host: str
    via: str  # "local", "ssh" or "srun"
    result: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.result:
            self.result = {"host": self.host, "via": self.via, "ok": False, "failure": None, "error": None,
                           "differs": [], "hostname": None, "python": None, "packages": None, "mpi": None,
                           "gpus": None, "disk": None, "clock_skew_seconds": None, "round_trip_seconds": None,
                           "seconds": None, "warnings": [], "agent_python": None}

    def fail(self, failure: str, error: str) -> None:
        if self.result["failure"] is None:
            self.result.update(failure=failure, error=error)

    def fill(self, hostname: str | None, report: Mapping[str, Any], host_time_at_arrival: float,
             round_trip: float | None) -> None:
        """Take a host's report; ``host_time_at_arrival``: the launcher's clock when the report left the host."""
        self.report = dict(report)
        r = self.result
        python = report.get("python") or {}
        r["hostname"] = hostname
        r["python"] = {"path": python.get("path"), "version": python.get("version"), "error": python.get("error")}
        r["packages"] = report.get("packages")
        r["mpi"] = _mpi(report.get("mpirun"))
        r["gpus"] = _gpus(report.get("gpus"))
        r["disk"] = report.get("disk") or None
        if isinstance(report.get("time"), (int, float)):
            r["clock_skew_seconds"] = round(report["time"] - host_time_at_arrival, 4)
        r["round_trip_seconds"] = None if round_trip is None else round(round_trip, 5)
        if report.get("error"):
            self.fail("report", f"the tflaunch agent could not report: {report['error']}")
        elif python.get("error"):
            self.fail("interpreter", f"the job's Python: {python['error']}")


def _mpi(mpirun: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if mpirun is None:
        return None
    out = {"path": mpirun.get("path"), "flavour": None, "name": None, "version": None, "error": mpirun.get("error")}
    if out["path"] and not out["error"]:
        found = parse_version(mpirun.get("output") or "")
        if found is None:
            first = (mpirun.get("output") or "").strip().splitlines()[:1] or [f"exit status {mpirun.get('returncode')}"]
            out["error"] = f"{out['path']} is not Open MPI, MPICH or Intel MPI ('--version' said: {first[0][:200]})"
        else:
            out["flavour"], out["version"] = found
            out["name"] = FLAVOURS[found[0]]["name"]
    return out


def _gpus(report: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if report is None:
        return None
    visible = report.get("visible")
    if visible is not None:
        ids = [item.strip() for item in visible.split(",") if item.strip()]
        return {"count": len(ids), "ids": ids, "source": "CUDA_VISIBLE_DEVICES", "error": None}
    found = report.get("found")
    if found:
        return {"count": len(found), "ids": [str(g) for g in found], "source": "nvidia-smi", "error": report.get("error")}
    return {"count": 0, "ids": [], "source": None, "error": report.get("error")}


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


# -- Slurm ---------------------------------------------------------------------------------------------
def _agent_source() -> str:
    from . import agent

    source = agent.__loader__.get_source(agent.__name__)  # type: ignore[union-attr]
    if source is None:
        raise RuntimeError("the source of tflaunch/agent.py is not available")
    return source


def check_slurm(request: Mapping[str, Any], *, python: str, nodes: int, partition: str | None = None,
                expected: Sequence[str] | None = None, timeout: float | None = None,
                env: Mapping[str, str] | None = None) -> list[HostCheck]:
    """The report of ``nodes`` Slurm nodes, from ONE ``srun`` step with one task per node running the agent's
    :func:`~tflaunch.agent.host_report` in the job's ``python`` (no ssh). ``expected``: the allocation's
    node names when inside one (a node that does not report fails, with what srun said about it); else
    the step makes a short job (``--time=5``, ``partition``). ``env``: the environment for srun (default
    ours). The clock skew is the node's clock when its line left minus ours when it arrived (srun relays
    at once). Raises :class:`~tflaunch.slurm.SlurmError` when srun fails before any node reported."""
    import tempfile

    from .slurm import SlurmError, require

    srun = require("srun")
    limit = SLURM_TIMEOUT if timeout is None else timeout
    name = "tflaunch-doctor-" + os.urandom(4).hex()
    argv = [srun, f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=0",
            "--export=ALL", f"--job-name={name}"]
    if expected is None:
        argv.append("--time=5")
        if partition:
            argv.append(f"--partition={partition}")
    else:
        argv.append("--nodelist=" + ",".join(expected))
    argv += [python, "-I", "-S", "-c", SLURM_TASK]
    full_env = dict(os.environ if env is None else env)
    full_env["TFLAUNCH_DOCTOR_AGENT"] = _agent_source()
    full_env["TFLAUNCH_DOCTOR_REQUEST"] = json.dumps(dict(request))
    log.debug("doctor: %s", " ".join(argv[:-1]))
    started = time.monotonic()
    errors = tempfile.TemporaryFile()
    try:
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors,
                                 env=full_env, start_new_session=True, close_fds=True)
    except OSError as exc:
        errors.close()
        raise SlurmError(f"cannot run {srun}: {exc.strerror or exc}") from None
    lines: list[tuple[float, str]] = []
    buf = b""
    timed_out = False
    fd = popen.stdout.fileno()
    deadline = started + limit
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            if not select.select([fd], [], [], left)[0]:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            buf += chunk
            *complete, buf = buf.split(b"\n")
            now = time.time()
            lines += [(now, line.decode("utf-8", "replace")) for line in complete]
    finally:
        if timed_out:
            _stop_srun(popen, name if expected is None else None)
        popen.stdout.close()
        try:
            code = popen.wait(10)
        except subprocess.TimeoutExpired:
            popen.kill()
            code = popen.wait()
        errors.seek(0)
        said = [line.strip() for line in errors.read().decode("utf-8", "replace").splitlines() if line.strip()]
        errors.close()
    checks: dict[str, HostCheck] = {}
    for arrived, line in lines:
        if not line.startswith(MARK):
            continue
        try:
            answer = json.loads(line[len(MARK):])
            node = str(answer["node"])
            report = answer["report"]
        except (ValueError, KeyError, TypeError):
            continue
        check = checks[node] = HostCheck(node, "srun")
        check.fill(answer.get("hostname"), report, arrived, None)
        check.result["agent_python"] = answer.get("python")
        check.result["seconds"] = round(time.monotonic() - started, 3)
    queued = [line for line in said if "queued" in line or "waiting" in line]
    if not checks and not expected and (code != 0 or timed_out):
        why = _srun_said(queued if timed_out and queued else said) or f"exit status {code}"
        if timed_out:
            raise SlurmError(f"srun: no node reported within {limit:g} s ({why})")
        raise SlurmError(f"srun failed: {why}")
    missing = [n for n in (expected or ()) if n not in checks]
    if expected is None:
        named = [m.group(1) for m in (re.match(r"srun: error: ([^:\s]+): task", line) for line in said) if m]
        missing = [n for n in dict.fromkeys(named) if n not in checks]
        missing += [f"(node {i + 1} of {nodes})" for i in range(len(checks) + len(missing), nodes)]
    for node in missing:
        check = checks[node] = HostCheck(node, "srun")
        about = [line for line in said if node in line]
        why = _srun_said(about or said) or f"srun exit status {code}"
        if timed_out:
            check.fail("timeout", f"no report within {limit:g} s ({why})")
        elif any(python in line and ("No such file" in line or "Permission denied" in line) for line in said):
            check.fail("interpreter", f"the job's Python {python} cannot be started there: {why}")
        else:
            check.fail("agent", f"no report from this node: {why}")
        check.result["seconds"] = round(time.monotonic() - started, 3)
    order = list(expected or ()) + sorted(n for n in checks if n not in (expected or ()))
    return [checks[n] for n in order if n in checks]


def _srun_said(lines: Sequence[str]) -> str:
    """srun's most telling message: an error line, else the last line."""
    errors = [line for line in lines if "error" in line.lower()]
    return ((errors or list(lines)) or [""])[-1][:400] if lines else ""


def _stop_srun(popen: subprocess.Popen, job_name: str | None) -> None:
    """Stop an srun that ran out of time (SIGTERM: it cancels its step, and the job it made); scancel
    the job it made, by its unique name, in case srun could not."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(popen.pid, sig)
        except OSError:
            pass
        try:
            popen.wait(3)
            break
        except subprocess.TimeoutExpired:
            continue
    if job_name:
        import shutil

        scancel = shutil.which("scancel")
        if scancel:
            subprocess.run([scancel, f"--name={job_name}"], stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=30, check=False)


# -- the verdict ---------------------------------------------------------------------------------------
def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return f"{n}B"


def summarize(checks: Sequence[HostCheck], keys: Sequence[str] = COMPARED, *,
              home_needed: bool = False) -> dict[str, Any]:
    """The summary of a doctor run, ``{"ok", "hosts", "failed", "differing", "problems", "warnings"}``; marks
    each host's result (``ok``, ``differs``, ``warnings``). Problems: every host that failed (one message
    each) and every key of ``keys`` that differs between the hosts that answered (:func:`differences`).
    Warnings: a clock off by more than :data:`SKEW_WARN_SECONDS`, a disk with less than
    :data:`DISK_WARN_BYTES` free or :data:`DISK_WARN_FRACTION` of its size, and with ``home_needed`` (a
    Slurm run needs the home on every node) a node where the home is not visible."""
    answered = {c.host: c.report for c in checks if c.result["failure"] is None and c.report is not None}
    problems = [f"{c.host}: {c.result['error']}" for c in checks if c.result["failure"] is not None]
    differing: dict[str, list[str]] = {}
    for key in keys:
        odd = _odd(_groups(answered, key))
        if odd:
            differing[key] = odd
    problems += differences(answered, keys)
    warnings: list[str] = []
    for c in checks:
        r = c.result
        r["differs"] = [key for key, hosts in differing.items() if c.host in hosts]
        r["ok"] = r["failure"] is None and not r["differs"]
        mine: list[str] = []
        skew = r.get("clock_skew_seconds")
        if isinstance(skew, (int, float)) and abs(skew) > SKEW_WARN_SECONDS:
            mine.append(f"{c.host}: its clock is {abs(skew):.1f} s {'ahead of' if skew > 0 else 'behind'} this "
                        f"machine's (more than {SKEW_WARN_SECONDS:g} s: timestamps in logs and metrics disagree; "
                        "run NTP/chrony there)")
        for label, entry in sorted((r.get("disk") or {}).items()):
            if not entry:
                continue
            if not entry.get("visible"):
                if label == "home" and home_needed:
                    mine.append(f"{c.host}: the home {entry.get('path')} is not visible there (a run inside Slurm "
                                "keeps its record there: put the home on a filesystem every node sees)")
                continue
            free, total = entry.get("free_bytes"), entry.get("total_bytes")
            if isinstance(free, int) and isinstance(total, int) and total > 0 and (
                    free < DISK_WARN_BYTES or free < DISK_WARN_FRACTION * total):
                mine.append(f"{c.host}: disk nearly full: {_bytes(free)} free of {_bytes(total)} "
                            f"({100 * free / total:.1f} %) in the {label} {entry.get('path')}")
        r["warnings"] = mine
        warnings += mine
    return {"ok": not problems, "hosts": len(checks),
            "failed": [c.host for c in checks if c.result["failure"] is not None],
            "differing": differing, "problems": problems, "warnings": warnings}


def _package_cell(result: Mapping[str, Any], name: str) -> str:
    packages = result.get("packages")
    if packages is None or name not in packages:
        return "-" if packages is None else "?"
    item = packages[name]
    return "-" if item is None else str(item.get("version") or "?")


def _gpu_cell(gpus: Mapping[str, Any] | None) -> str:
    if gpus is None:
        return "-"
    if gpus.get("source") == "CUDA_VISIBLE_DEVICES":
        return f"{gpus['count']} (CUDA_VISIBLE_DEVICES)" if gpus["count"] else "hidden (CUDA_VISIBLE_DEVICES='')"
    return str(gpus["count"]) if gpus.get("count") else "none"


def _disk_cell(disk: Mapping[str, Any] | None) -> str:
    if not disk:
        return "-"
    cells = []
    for key in ("home", "scratch"):
        entry = disk.get(key)
        if entry is None:
            cells.append("-")
        elif not entry.get("visible"):
            cells.append("not visible")
        else:
            cells.append(_bytes(entry.get("free_bytes")))
    return "/".join(cells)


def table(checks: Sequence[HostCheck], packages: Sequence[str] = DEFAULT_PACKAGES) -> str:
    """One row per host (call :func:`summarize` first: it sets ok / FAIL)."""
    rows = [["HOST", "STATUS", "PYTHON"] + [p.upper() for p in packages] + ["MPI", "GPUS", "FREE HOME/SCRATCH",
                                                                           "SKEW"]]
    for c in checks:
        r = c.result
        python = r.get("python") or {}
        mpi = r.get("mpi")
        if mpi is None:
            mpi_cell = "-"
        elif mpi.get("name"):
            mpi_cell = f"{mpi['name']} {mpi['version']}".strip()
        else:
            mpi_cell = "not found" if not mpi.get("path") else "unknown"
        skew = r.get("clock_skew_seconds")
        rows.append([c.host, "ok" if r.get("ok") else "FAIL", python.get("version") or "-"]
                    + [_package_cell(r, p) for p in packages]
                    + [mpi_cell, _gpu_cell(r.get("gpus")), _disk_cell(r.get("disk")),
                       "-" if skew is None else f"{skew:+.2f}s"])
    from .textfmt import table as text_table

    return text_table(rows)


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
