"""Slurm: running inside an allocation (one ``srun`` step) and submitting from the login node (``sbatch``).

Pure parts (tested without Slurm): :func:`step_argv` (the ``srun`` that starts every process of a
run as one step), :func:`step_ports`, :func:`gpus_per_node`, :func:`batch_script`,
:func:`parse_record` (``scontrol -o`` output) and :data:`ENDED` (what each Slurm end state means for
the run). The rest runs Slurm's client commands: :func:`submit` (``sbatch``), :func:`job_info`
(``scontrol show job``; no ``sacct``: it needs slurmdbd), :func:`cancel` (``scancel``),
:func:`node_addresses` (``scontrol show node``).

A run submitted with ``--slurm`` is *leased* by its Slurm job: ``lease.json`` holds the job id, so
whoever looks at the run (``runs show``, an attached launcher, another login node) can ask Slurm
whether the job still exists and, when it ended without tflaunch inside it recording the end (time
limit, node failure, preemption, ``scancel`` while pending, a batch script that never started
Python), record the end with Slurm's reason (:func:`final_fields`).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import asdict, dataclass, field

from .errors import SpecError, TflaunchError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Mapping, Sequence

__all__ = ["SlurmError", "SlurmOptions", "batch_script", "submit", "require", "job_info", "cancel", "parse_record",
           "step_argv", "step_ports", "gpus_per_node", "node_addresses", "final_fields", "ENDED", "ACTIVE",
           "in_allocation", "DEFAULT_SIGNAL", "CHECKPOINT_SIGNAL_VAR", "requeue", "set_requeue", "signal_seconds",
           "end_time", "restarts"]

SCRIPT = "slurm/job.sbatch"  # in the run record
OUTPUT = "tflaunch_logs/slurm-%j.out"  # the batch script's own output (tflaunch's messages inside the job)
ARRAY_OUTPUT = "tflaunch_logs/slurm-%A_%a.out"  # a sweep's job array, until a task's prelude redirects it
DEFAULT_SIGNAL = "USR2@60"  # sbatch --signal: SIGUSR2 to every task 60 s before the time limit
CHECKPOINT_SIGNAL_VAR = "TFLAUNCH_CHECKPOINT_SIGNAL"  # tells the script which signal means "checkpoint now"
TIMEOUT = 30.0  # for one Slurm client command

# Job states (scontrol's JobState) in which the job may still run: the run is not over.
ACTIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                    "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD",
                    "POWER_UP_NODE", "UPDATE_DB"})
# End states: (run status, error reason, what happened). A run whose tflaunch recorded its own end
# keeps that; these apply when it could not (killed by Slurm, or never started).
ENDED: dict[str, tuple[str, str, str]] = {
    "TIMEOUT": ("Failed", "time_limit", "Slurm stopped the job at its time limit"),
    "DEADLINE": ("Failed", "time_limit", "Slurm stopped the job at its deadline"),
    "PREEMPTED": ("Failed", "preempted", "Slurm preempted the job"),
    "NODE_FAIL": ("Failed", "node_failure", "a node of the job failed"),
    "BOOT_FAIL": ("Failed", "node_failure", "a node of the job failed to boot"),
    "OUT_OF_MEMORY": ("Failed", "out_of_memory", "Slurm stopped the job: out of memory"),
    "FAILED": ("Failed", "slurm_failed", "the Slurm job failed"),
    "SPECIAL_EXIT": ("Failed", "slurm_failed", "the Slurm job failed (special exit)"),
    "REVOKED": ("Failed", "slurm_failed", "the Slurm job was revoked"),
    "CANCELLED": ("Canceled", "canceled", "the Slurm job was canceled (scancel)"),
    "COMPLETED": ("Failed", "slurm_job_ended", "the Slurm job ended but tflaunch inside it recorded no end"),
}
# While a job is being stopped scontrol shows JobState=COMPLETING; its Reason tells why.
REASON_STATES = {"TimeLimit": "TIMEOUT", "Deadline": "DEADLINE", "NodeDown": "NODE_FAIL", "NodeFail": "NODE_FAIL",
                 "Preempted": "PREEMPTED", "Preemption": "PREEMPTED", "OutOfMemory": "OUT_OF_MEMORY"}
_SIGNAL_RE = re.compile(r"^(?:[RB]{1,2}:)?(?:SIG)?([A-Z0-9]+)(?:@(\d+))?$")
_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


class SlurmError(TflaunchError):
    """A Slurm command failed or is missing (sbatch, scontrol, scancel, srun)."""


def in_allocation(target: Mapping[str, Any] | None) -> bool:
    """Whether a recorded compute target is (or will be) a Slurm allocation."""
    target = target or {}
    return target.get("kind") == "slurm" or target.get("source") == "SLURM_JOB_NODELIST"


def require(name: str) -> str:
    """The path of Slurm client ``name``; SlurmError saying where to get it when it is not on PATH."""
    path = shutil.which(name)
    if path is None:
        raise SlurmError(f"{name} not found on PATH: run this where Slurm's client commands are installed "
                         "(a login node of the cluster; Debian/Ubuntu: apt-get install slurm-client)")
    return path


def _run(argv: list[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{os.path.basename(argv[0])} did not answer within {timeout:g} s "
                         "(is slurmctld reachable?)") from None
    except OSError as exc:
        raise SlurmError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None


def _first_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["(no message)"])[0][:400]


# -- options and the batch script ----------------------------------------------------------------
def check_time(text: str) -> str:
    """A Slurm time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``, or
    ``UNLIMITED``); SpecError otherwise."""
    value = str(text).strip()
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return value
    if not _TIME_RE.match(value):
        raise SpecError(f"--time: {text!r} is not a Slurm time limit (e.g. 30, 02:00:00 or 1-12:00:00)")
    return value


def check_signal(text: str | None) -> str | None:
    """``--signal`` as sbatch takes it (``[B:]SIG[@SECONDS]``); ``none`` for no signal."""
    if text is None or str(text).lower() == "none":
        return None
    value = str(text).strip().upper()
    match = _SIGNAL_RE.match(value)
    if not match:
        raise SpecError(f"--signal: {text!r}: expected [B:]SIGNAL[@SECONDS], e.g. USR2@60, or none")
    import signal as _signal
    name = match.group(1)
    if not name.isdigit() and not hasattr(_signal, "SIG" + name):
        raise SpecError(f"--signal: unknown signal {name!r}")
    if name in ("USR1", "10"):
        raise SpecError("--signal: SIGUSR1 is taken by NCCL; use USR2 (the default) or another signal")
    return value


@dataclass
class SlurmOptions:
    """How to submit a run with ``sbatch`` (``run --slurm``): each field is the sbatch option of that
    name; ``sbatch_args`` go into the script as they are; ``signal`` is sent to every task before the
    time limit (default ``USR2@60``: checkpoint then)."""

    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    job_name: str | None = None
    signal: str | None = DEFAULT_SIGNAL
    sbatch_args: list[str] = field(default_factory=list)
    launcher: str = "srun"  # how tflaunch starts the processes inside the job (srun, or ssh)

    def __post_init__(self) -> None:
        for name in ("partition", "account", "qos", "job_name"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip() or "\n" in value):
                raise SpecError(f"--{name.replace('_', '-')}: expected a name, got {value!r}")
        if self.time is not None:
            self.time = check_time(self.time)
        self.signal = check_signal(self.signal)
        for arg in self.sbatch_args:
            if not isinstance(arg, str) or not arg.startswith("-") or "\n" in arg:
                raise SpecError(f"--sbatch-arg: expected an sbatch option such as --constraint=a100, got {arg!r}")
        if self.launcher not in ("srun", "ssh"):
            raise SpecError(f"--launcher: expected srun or ssh, got {self.launcher!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SlurmOptions:
        return cls(**dict(data or {}))


def signal_name(value: str | None) -> str | None:
    """``SIGUSR2`` for ``--signal USR2@60`` (what the script is told to handle)."""
    if not value:
        return None
    match = _SIGNAL_RE.match(value)
    name = match.group(1) if match else value
    if name.isdigit():
        import signal as _signal
        try:
            return _signal.Signals(int(name)).name
        except ValueError:
            return name
    return "SIG" + name


def batch_script(*, run_id: str, experiment: str, record_dir: str, options: SlurmOptions, nodes: int,
                 ntasks_per_node: int | None, ntasks: int | None, gpus_per_node: int | None,
                 command: Sequence[str], array: str | None = None, prelude: Sequence[str] = (),
                 command_tail: str = "", requeue: bool = False) -> str:
    """The batch script for a run: ``#SBATCH`` lines, then ``exec`` of tflaunch's in-job supervisor.

    ``array``: ``sbatch --array`` (a sweep's trials, one run per task: ``prelude`` shell lines pick the
    task's run and redirect the output into its record; ``command_tail`` is appended to the command
    unquoted, e.g. ``"$RUN"``); the output then goes where the prelude sends it. ``requeue``: the run
    continues in the job's next allocation (``--max-requeues``): ``--requeue``, else ``--no-requeue`` (the
    job's end is the run's: Slurm neither requeues it on a node failure nor lets ``scontrol requeue`` it)."""
    lines = ["#!/bin/sh",
             f"#SBATCH --job-name={options.job_name or 'tflaunch-' + experiment}",
             f"#SBATCH --nodes={nodes}"]
    if ntasks_per_node is not None:
        lines.append(f"#SBATCH --ntasks-per-node={ntasks_per_node}")
    if ntasks is not None:
        lines.append(f"#SBATCH --ntasks={ntasks}")
    for name in ("partition", "time", "account", "qos"):
        value = getattr(options, name)
        if value is not None:
            lines.append(f"#SBATCH --{name}={value}")
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if options.signal:
        lines.append(f"#SBATCH --signal={options.signal}")
    if array is not None:
        lines += [f"#SBATCH --array={array}", f"#SBATCH --output={os.path.join(record_dir, ARRAY_OUTPUT)}"]
    else:
        lines.append(f"#SBATCH --output={os.path.join(record_dir, OUTPUT)}")
    lines.append("#SBATCH --open-mode=append")  # a requeued job's next allocation appends to the same file
    lines.append("#SBATCH --requeue" if requeue else "#SBATCH --no-requeue")
    lines += [f"#SBATCH {arg}" for arg in options.sbatch_args]
    lines += ["",
              f"# Written by tflaunch for {'the trials of sweep' if array is not None else 'run'} {run_id} "
              f"(experiment {experiment}); submitted with",
              f"#   sbatch --parsable {os.path.join(record_dir, SCRIPT)}",
              "# tflaunch's supervisor starts the processes (one srun step) and records the run.",
              *prelude,
              "exec " + shlex.join(command) + (" " + command_tail if command_tail else ""), ""]
    return "\n".join(lines)


def submit(script_path: str) -> str:
    """``sbatch --parsable SCRIPT``; the job id, or SlurmError with sbatch's own message."""
    result = _run([require("sbatch"), "--parsable", script_path], timeout=60)
    if result.returncode != 0:
        raise SlurmError(f"sbatch refused the job: {_first_error(result.stderr or result.stdout)}")
    job = result.stdout.strip().split(";")[0].strip()
    if not job.isdigit():
        raise SlurmError(f"sbatch printed no job id: {result.stdout.strip()[:200]!r}")
    return job


def cancel(job_id: str) -> None:
    """``scancel JOB`` (SIGTERM to every task, SIGKILL after Slurm's KillWait)."""
    result = _run([require("scancel"), str(job_id)])
    if result.returncode != 0:
        raise SlurmError(f"scancel {job_id}: {_first_error(result.stderr or result.stdout)}")


def requeue(job_id: str) -> None:
    """``scontrol requeue JOB``: Slurm stops the job (SIGTERM to its steps and batch script, SIGKILL after
    KillWait) and puts it back in the queue, ``Restarts`` + 1 (eligible ~2 minutes later); SlurmError with
    Slurm's message when it refuses (a ``--no-requeue`` job: "Requested operation is presently disabled")."""
    result = _run([require("scontrol"), "requeue", str(job_id)])
    if result.returncode != 0:
        raise SlurmError(f"scontrol requeue {job_id}: {_first_error(result.stderr or result.stdout)}")


def set_requeue(job_id: str, allowed: bool) -> None:
    """``scontrol update JobId=JOB Requeue=0|1`` (a running job's too); SlurmError when refused."""
    result = _run([require("scontrol"), "update", f"JobId={job_id}", f"Requeue={int(allowed)}"])
    if result.returncode != 0:
        raise SlurmError(f"scontrol update JobId={job_id} Requeue={int(allowed)}: "
                         f"{_first_error(result.stderr or result.stdout)}")


def signal_seconds(value: str | None) -> int | None:
    """How long before the time limit ``--signal`` is sent (``USR2@60``: 60; sbatch's default 60 without
    ``@``), None for no signal."""
    if not value:
        return None
    match = _SIGNAL_RE.match(value)
    return int(match.group(2)) if match and match.group(2) else 60


def end_time(info: Mapping[str, str] | None) -> float | None:
    """The job's ``EndTime`` (the time limit of a running job) as a Unix time, None when it has none."""
    import time as _time

    text = (info or {}).get("EndTime") or ""
    try:
        return _time.mktime(_time.strptime(text, "%Y-%m-%dT%H:%M:%S"))  # scontrol prints local time
    except ValueError:  # Unknown, None, an unlimited job
        return None


def restarts(info: Mapping[str, str] | None) -> int:
    """How often Slurm requeued the job (``Restarts``; ``SLURM_RESTART_COUNT`` inside it)."""
    value = (info or {}).get("Restarts") or "0"
    return int(value) if value.isdigit() else 0


# -- asking Slurm --------------------------------------------------------------------------------
_KEY_RE = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=")


def parse_record(line: str) -> dict[str, str]:
    """One ``scontrol -o show ...`` line as a dict (values may contain spaces: a key starts a field)."""
    out: dict[str, str] = {}
    matches = list(_KEY_RE.finditer(line))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        out[m.group(1)] = line[m.end():end].strip()
    return out


def job_info(job_id: str) -> dict[str, str] | None:
    """``scontrol show job`` as a dict, None when Slurm no longer knows the job; SlurmError when Slurm
    cannot be asked (no scontrol here, slurmctld down)."""
    result = _run([require("scontrol"), "-o", "show", "job", str(job_id)])
    text = (result.stdout or "").strip()
    if result.returncode != 0 or not text:
        message = (result.stderr or result.stdout or "").strip() or f"exit status {result.returncode}"
        if "Invalid job id" in message or "not found" in message:  # "Job 12_3 not found": a canceled pending task
            return None
        raise SlurmError(f"scontrol show job {job_id}: {_first_error(message)}")
    return parse_record(text.splitlines()[0])


def job_state(info: Mapping[str, str] | None) -> str | None:
    """The base JobState (``RUNNING``, ``TIMEOUT``, ...) of a :func:`job_info` dict."""
    if not info:
        return None
    return (info.get("JobState") or "").split()[0].split("+")[0] or None


def node_addresses(names: Sequence[str]) -> dict[str, str]:
    """Each node's NodeAddr (how the other nodes reach it), from ``scontrol show node``."""
    if not names:
        return {}
    result = _run([require("scontrol"), "-o", "show", "node", ",".join(names)])
    if result.returncode != 0:
        raise SlurmError(f"scontrol show node: {_first_error(result.stderr or result.stdout)}")
    found = {}
    for line in result.stdout.splitlines():
        rec = parse_record(line)
        name = rec.get("NodeName", "").split()[0] if rec.get("NodeName") else ""
        if name:
            found[name] = rec.get("NodeAddr") or name
    return {n: found.get(n, n) for n in names}


def final_fields(info: Mapping[str, str] | None, job_id: str, cancel_request: Mapping[str, Any] | None,
                 output_tail: str = "") -> dict[str, Any] | None:
    """The run's end (``status`` plus fields) for a job that ended without tflaunch recording it;
    None while the job may still run."""
    state = job_state(info)
    if state in ACTIVE:
        return None
    info = info or {}
    if state is None and cancel_request:  # canceled while pending: an array's task leaves no record
        return {"status": "Canceled", "cancel_reason": str(cancel_request.get("reason") or "canceled")}
    if state is None:
        return {"status": "Failed", "error": {
            "reason": "slurm_job_lost",
            "message": f"Slurm no longer knows job {job_id} and the run recorded no end (it ended longer ago "
                       "than Slurm's MinJobAge; see the job's output file)"}}
    status, reason, what = ENDED.get(state, ("Failed", "slurm_failed", f"the Slurm job ended in state {state}"))
    details = [f"JobState={state}"]
    for key in ("Reason", "TimeLimit", "ExitCode", "NodeList"):
        value = info.get(key)
        if value and value not in ("None", "(null)"):
            details.append(f"{key}={value}")
    message = f"{what} (job {job_id}: {', '.join(details)})"
    if status == "Canceled":
        return {"status": status, "cancel_reason": str((cancel_request or {}).get("reason") or message)}
    error: dict[str, Any] = {"reason": reason, "message": message}
    if output_tail:
        error["stderr_tail"] = output_tail
    return {"status": status, "error": error}


# -- inside an allocation ------------------------------------------------------------------------
def gpus_per_node(env: Mapping[str, str]) -> int | None:
    """GPUs per node of the allocation: ``SLURM_GPUS_ON_NODE``, else ``SLURM_GPUS_PER_NODE``
    (``4``, ``gpu:4``, ``a100:4``), else None."""
    on_node = env.get("SLURM_GPUS_ON_NODE", "").strip()
    if on_node.isdigit():
        return int(on_node)
    per_node = env.get("SLURM_GPUS_PER_NODE", "").strip()
    if per_node:
        total = 0
        for part in per_node.split(","):
            count = part.rsplit(":", 1)[-1].split("(")[0]
            if not count.isdigit():
                return None
            total += int(count)
        return total
    return None


def step_ports(job_id: str | int | None, counts: Mapping[str, int], port_base: int | None = None) -> dict[str, list[int]]:
    """Ports for the processes of an srun step (no agent picks free ones on the other nodes): from
    ``port_base`` if given, else from a base derived from the job id (two jobs sharing a node rarely
    collide; the rank wrapper reports a port in use clearly)."""
    if port_base is None:
        job = int(job_id) if str(job_id or "").isdigit() else 0
        port_base = 20000 + (job % 1500) * 24
    return {host: [port_base + i for i in range(n)] for host, n in counts.items()}


def step_argv(hosts: Sequence[tuple[str, int]], program: Sequence[str], *, hostfile: str | None = None,
              job_name: str | None = None) -> list[str]:
    """The one ``srun`` that starts every process of a run in the allocation: ``hosts`` are (node,
    processes) in rank order. Equal counts use a block distribution (rank = node x count + local
    rank); uneven ones (parameter-server jobs) an arbitrary one from ``hostfile`` (one node per rank,
    written by the caller, passed as ``SLURM_HOSTFILE``)."""
    counts = {n for _, n in hosts}
    world = sum(n for _, n in hosts)
    nodes = list(dict.fromkeys(h for h, _ in hosts))  # a node may come back in rank order (a ps job's layout)
    block = len(counts) == 1 and len(nodes) == len(hosts)
    # an arbitrary distribution wants the node of every task, in rank order (as in SLURM_HOSTFILE)
    listed = nodes if block else [h for h, n in hosts for _ in range(n)]
    argv = ["srun", f"--nodes={len(nodes)}", f"--ntasks={world}", "--kill-on-bad-exit=1", "--export=ALL",
            f"--nodelist={','.join(listed)}"]
    if block:
        argv += [f"--ntasks-per-node={hosts[0][1]}", "--distribution=block"]
    else:
        if hostfile is None:
            raise SpecError("srun: uneven processes per node need a hostfile")
        argv += ["--distribution=arbitrary"]
    if job_name:
        argv.append(f"--job-name={job_name}")
    return argv + list(program)


def hostfile_text(hosts: Sequence[tuple[str, int]]) -> str:
    """SLURM_HOSTFILE for ``--distribution=arbitrary``: one node per rank."""
    return "".join(f"{h}\n" * n for h, n in hosts)
