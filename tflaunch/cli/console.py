"""What ``run`` and ``runs rerun`` print: the dry run's plan, the JSON of a run, the end of a run, and
following a run submitted to a scheduler until it ends."""
from __future__ import annotations

import json
import logging
import sys


TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["print_json", "follow_submitted", "report_end", "print_plan"]

log = logging.getLogger("tflaunch")

def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def follow_submitted(record: Any) -> dict[str, Any]:
    """An attached ``run --slurm``: report the run's states, stream its output once it runs, return its
    final run object. Ctrl-C cancels the job (scancel); a second Ctrl-C leaves without waiting."""
    from ..history.store import TERMINAL
    from ..submit import cancel_run
    from ..tail import follow_files

    shown: list[Any] = [None]
    interrupts = 0

    def state() -> dict[str, Any]:
        status = record.read_status() or {}
        info = status.get("slurm") or {}
        queued = status.get("status") == "Queued"
        key = (status.get("status"), info.get("reason") if queued else None)
        if key != shown[0]:
            shown[0] = key
            detail = f" (Slurm job {info.get('job_id')}: {info.get('state')}, {info['reason']})" \
                if queued and info.get("state") and info.get("reason") else ""
            log.info("run %s: %s%s", record.id, status.get("status"), detail)
        return status

    def finished() -> bool:
        return state().get("status") in TERMINAL

    def files():
        return [(path, sys.stdout if kind == "stdout" else sys.stderr, prefix)
                for path, kind, prefix in record.process_log_streams()]

    while True:
        try:
            follow_files(files, finished, interval=0.5)
            return record.read_status() or {}
        except KeyboardInterrupt:
            interrupts += 1
            if interrupts > 1:
                raise
            log.info("canceling run %s (scancel); Ctrl-C again to stop waiting", record.id)
            cancel_run(record, "interrupted (Ctrl-C)")


def report_end(run: dict[str, Any]) -> None:
    from ..history.store import with_duration
    duration = with_duration(run).get("duration_seconds")
    took = f" after {duration:.1f} s" if isinstance(duration, (int, float)) else ""
    error = run.get("error") or {}
    detail = f": {error.get('message')}" if error else (f": {run['cancel_reason']}" if run.get("cancel_reason") else "")
    if error.get("exception"):
        detail += f" ({error['exception']})"
    log.info("run %s %s%s%s", run.get("id"), run.get("status"), took, detail)


def print_plan(plan: dict[str, Any]) -> None:
    import shlex
    snap = plan["snapshot"]
    lines = ["dry run: nothing started, nothing written",
             f"experiment: {plan['experiment']}   home: {plan['home']}",
             f"snapshot:   {snap['source_directory']} ({snap['file_count']} files, {snap['total_bytes']} bytes)"]
    lines += [f"  note: {n}" for n in snap["notes"]]
    lines.append("hosts:      " + ", ".join(f"{h['name']} ({h['slots']} slots{', this machine' if h['local'] else ''})"
                                          for h in plan["hosts"]))
    recovery = plan.get("recovery")
    if recovery:
        lines.append("recovery:   " + ", ".join(f"{k}={v}" for k, v in recovery.items() if v not in (None, [], 0)))
    if plan.get("slurm"):
        lines.append(f"slurm:      submitted with: {shlex.join(plan['slurm']['sbatch'])} "
                     f"({plan['slurm']['note']}); the batch script:")
        lines += [f"  | {line}" for line in plan["slurm"]["script"].rstrip("\n").splitlines()]
    env = plan.get("environment")
    if env:
        lines.append(f"environment: {env['key']} ({env['status']}) under {env['root']}"
                     + (f", interpreter {env['python']}" if env.get("python") else ""))
        request = env.get("request") or {}
        if request.get("requirements"):
            lines.append("  packages: " + " ".join(request["requirements"]))
    for line in plan.get("setup_commands") or ():
        lines.append(f"setup:      {line}")
    for item in plan.get("inputs") or ():
        lines.append(f"input:      {item['name']} = {', '.join(item['paths'])} ({item['mode']})")
    launcher = plan.get("launcher")
    if launcher:
        mpi = launcher["mpi"]
        lines.append(f"launcher:   {mpi['flavour']} {mpi['version']} ({mpi['path']}), every rank through the "
                     "rank wrapper (TFLAUNCH_RANK etc. from the MPI variables):")
        lines.append(f"  argv: {shlex.join(launcher['argv'])}")
        lines.append("  env forwarded to the ranks:")
        lines += [f"    {k}={shlex.quote(v)}" for k, v in launcher["env"].items()]
        lines += [f"  writes: {name}" for name in launcher["files"]]
        lines += [f"rank {p['rank']} on {p['host']}" for p in plan["processes"]]
        sys.stdout.write("\n".join(lines) + "\n")
        return
    for p in plan["processes"]:
        role = f" ({p['role']} {p['index']})" if "TF_CONFIG" in p["env"] else ""
        lines.append(f"process rank {p['rank']}{role} on {p['host']}:")
        lines.append(f"  argv: {shlex.join(p['argv'])}")
        lines.append(f"  cwd:  {p['cwd']}")
        lines.append("  env added:")
        lines += [f"    {k}={shlex.quote(v)}" for k, v in p["env"].items()]
    sys.stdout.write("\n".join(lines) + "\n")
