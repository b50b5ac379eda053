"""``tflaunch doctor`` through Slurm: every node's report from ONE ``srun`` step, one task per node, no ssh.

Each task runs the agent's :func:`~tflaunch.remote.agent.host_report` in the job's Python (:data:`SLURM_TASK`:
the agent's source and the request come in the environment) and prints one line starting with
:data:`MARK`; a node that does not report fails with what srun said about it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import select
import signal
import subprocess
import time

from .doctor_report import HostCheck
from .launch import agent_source

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Mapping, Sequence

__all__ = ["check_slurm", "SLURM_TIMEOUT", "SLURM_TASK", "MARK"]

log = logging.getLogger("tflaunch.doctor")

SLURM_TIMEOUT = 120.0  # for the srun step (outside an allocation: its wait in the queue included)
MARK = "TFLAUNCH-DOCTOR "  # how a Slurm task's report line starts

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


def check_slurm(request: Mapping[str, Any], *, python: str, nodes: int, partition: str | None = None,
                expected: Sequence[str] | None = None, timeout: float | None = None,
                env: Mapping[str, str] | None = None) -> list[HostCheck]:
    """The report of ``nodes`` Slurm nodes, from ONE ``srun`` step with one task per node running the agent's
    :func:`~tflaunch.remote.agent.host_report` in the job's ``python`` (no ssh). ``expected``: the allocation's
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
    full_env["TFLAUNCH_DOCTOR_AGENT"] = agent_source()
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
