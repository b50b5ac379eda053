"""What ``run`` and ``runs rerun`` print: the dry run's plan, the JSON of a run, the end of a run, and
following a run submitted to a scheduler until it ends."""
from __future__ import annotations

import json
import logging
import sys

from ..textfmt import table


TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["print_json", "follow_submitted", "report_end", "print_plan", "placement_lines", "ConsoleHandler"]

log = logging.getLogger("tflaunch")


class ConsoleHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """tflaunch's messages on stderr, each on a line of its own (after a rank's progress bar in place, or a
    stage's status line), and the run's stages (:mod:`tflaunch.progress`): on a terminal a status line per
    stage rewriting itself, elsewhere (``terminal`` False: a pipe, CI, ``--detach``) a line when a stage
    begins and one when it ends."""

    def __init__(self, stream: Any, terminal: bool | None = None) -> None:
        super().__init__(stream)
        self.terminal = _is_terminal(stream) if terminal is None else terminal
        from ..progress import PlainStages

        self._plain = PlainStages()  # not a terminal: a stage's first and last lines

    def emit(self, record: logging.LogRecord) -> None:
        from .. import progress
        from ..tail import end_open_line

        stage, done = progress.stage_of(record)
        end_open_line()
        if stage is None:
            progress.end_line()
            super().emit(record)
        elif self.terminal:
            try:
                progress.draw(self.stream, stage, self.format(record), done)
            except Exception:  # noqa: BLE001 - logging's own rule: a handler never raises
                self.handleError(record)
        elif self._plain.filter(record):
            super().emit(record)


def _is_terminal(stream: Any) -> bool:
    import os

    try:
        return bool(stream.isatty()) and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError, OSError):
        return False


def plain_progress() -> None:
    """Stages as plain lines from now on, even on a terminal (``--detach``: the run goes on elsewhere)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ConsoleHandler):
            handler.terminal = False

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


def _shown(value: str) -> str:
    """A variable's value as the plan prints it (a withheld secret's placeholder as it is)."""
    import shlex

    return value if value == "<withheld>" else shlex.quote(value)


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
        lines += [f"    {k}={_shown(v)}" for k, v in launcher["env"].items()]
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
        lines += [f"    {k}={_shown(v)}" for k, v in p["env"].items()]
    sys.stdout.write("\n".join(lines) + "\n")


_ROLE_NAMES = {"chief": ("chief", "chief"), "worker": ("worker", "workers"), "ps": ("ps", "ps"),
               "evaluator": ("evaluator", "evaluators")}


def _ranks_text(ranks: list[int]) -> str:
    """``rank 3``, ``ranks 0-3``, ``ranks 0, 2, 5``."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    ordered = sorted(ranks)
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"ranks {ordered[0]}-{ordered[-1]}"
    return "ranks " + ", ".join(map(str, ordered))


def placement_lines(run: dict[str, Any]) -> list[str]:
    """``runs show``: the backend with its tasks, the hosts with their ranks, one line per process."""
    processes = run.get("processes") or []
    hosts = run.get("hosts") or []
    backend = run.get("backend") or "plain"
    if backend in ("ps", "multiworker"):
        counts: dict[str, int] = {}
        for p in processes:
            counts[p.get("role") or "?"] = counts.get(p.get("role") or "?", 0) + 1
        order = [r for r in _ROLE_NAMES if r in counts] + sorted(r for r in counts if r not in _ROLE_NAMES)
        what = ", ".join(f"{_ROLE_NAMES.get(r, (r, r))[counts[r] != 1]} {counts[r]}" for r in order)
    else:
        what = f"{len(processes)} process{'es' if len(processes) != 1 else ''}"
    lines = [f"backend:     {backend}" + (f" ({what})" if processes else "")]
    if hosts:
        lines.append("hosts:       " + ", ".join(
            f"{h.get('name')}" + (f" [{h['address']}]" if h.get("address") not in (None, h.get("name")) else "")
            + (f" ({_ranks_text(h['ranks'])})" if h.get("ranks") else "") for h in hosts))
    if processes:
        tasks = backend in ("ps", "multiworker")
        rows = [["rank", "role", "host", "port", "GPUs"] if tasks else ["rank", "host", "GPUs"]]
        for p in processes:
            gpus = p.get("cuda_visible_devices")
            gpus = "-" if gpus in (None, "") else str(gpus)
            where = [str(p.get("host")), str(p.get("port") or "-")] if tasks else [str(p.get("host"))]
            rows.append([str(p.get("rank")), *([f"{p.get('role')} {p.get('index')}"] if tasks else []), *where, gpus])
        lines.append("processes:")
        lines += ["  " + line for line in table(rows).splitlines()]
    return lines
