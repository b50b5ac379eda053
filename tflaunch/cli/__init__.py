"""Command line: ``python -m tflaunch run ...`` and
``python -m tflaunch runs list|show|logs|files|download|cancel|rerun|delete|restore|purge``.

Exit status: 0 success; for ``run`` attached, the run's outcome (0 Completed, the script's exit code,
128+N when killed by signal N, 124 timeout, 130 Canceled, 1 other failures); 2 bad input; 1 other
errors. Every error is one line on stderr.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from .. import __version__, textfmt
from .job import add_job_options, estimator_from_args
from .job import store_from_args as _store
from .job import key_value as _key_value
from .job import positive_float as _positive_float
from ..errors import SpecError, TflaunchError
from .console import (ConsoleHandler, follow_submitted, placement_lines, plain_progress, print_json, print_plan,
                      report_end)

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, NoReturn, Sequence

log = logging.getLogger("tflaunch")

_RUN_EPILOG = """\
Everything after ENTRY goes to the script unchanged (a "--" right after ENTRY is dropped).
Examples:
  python -m tflaunch run --source-dir ./proj train.py -- --batch-size 50 --learning-rate 0.01
  python -m tflaunch run --detach --timeout 3600 train.py --epochs 10
  python -m tflaunch run --dry-run --json train.py
  python -m tflaunch run --nodes 1 --procs-per-node 8 train.py
  python -m tflaunch run --hosts node1:4,node2:4 train.py
  python -m tflaunch run --hostfile hosts.txt --nodes 2 --procs-per-node 2 train.py
  python -m tflaunch run --backend multiworker train.py          # inside sbatch/salloc: one srun step
  python -m tflaunch run --slurm --partition gpu --time 02:00:00 --nodes 2 --procs-per-node 4 --detach train.py
  python -m tflaunch run --pip keras --pip 'scikit-learn>=1.3' train.py      # in an environment built once
  python -m tflaunch run --backend mpi --framework-version 2.15 --pip horovod --hosts a,b train_hvd.py
  python -m tflaunch run --no-index --find-links /srv/wheelhouse --requirements requirements.txt train.py
  python -m tflaunch run --hosts a,b --setup 'module load cuda/12.4' --data mnist=/shared/mnist:download \\
      train.py -- --data-folder '{data:mnist}'
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS, metavar="DIR",
                        help="run store (default: $TFLAUNCH_HOME, else ~/.tflaunch)")
    common.add_argument("--log-level", default=argparse.SUPPRESS, metavar="LEVEL",
                        choices=["debug", "info", "warning", "error"], help="tflaunch's own messages (default: info)")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(prog="tflaunch", parents=[common],
                     description="Run TensorFlow/Keras training locally with a file-based run history.")
    parser.add_argument("--version", action="version", version=f"tflaunch {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    run = commands.add_parser("run", parents=[common], help="run a training script and record it",
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_RUN_EPILOG)
    add_job_options(run)
    run.set_defaults(func=cmd_run)

    runs = commands.add_parser("runs", parents=[common], help="inspect and manage recorded runs")
    sub = runs.add_subparsers(dest="runs_command", metavar="SUBCOMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("list", parents=[common], help="list runs, newest first")
    p.add_argument("--experiment", "-e", metavar="NAME", help="only this experiment")
    p.add_argument("--status", action="append", metavar="STATUS", help="only runs in this status (repeatable)")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="at most N runs (default: all)")
    p.add_argument("--metric", action="append", default=[], metavar="NAME",
                   help="show the latest value of this metric (repeatable)")
    p.add_argument("--parent", metavar="SWEEP", help="only the trials of this sweep")
    p.add_argument("--json", action="store_true", help="print a JSON array of run objects")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", parents=[common], help="show one run")
    p.add_argument("run", metavar="RUN", help="run id (or a unique prefix or suffix of one)")
    p.add_argument("--json", action="store_true", help="print the run object as JSON")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("logs", parents=[common], help="print a run's output (stdout and stderr)")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the run ends")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("files", parents=[common], help="list a run's files (outputs/, logs/, tflaunch_logs/)")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--json", action="store_true", help="print a JSON array of {name, size}")
    p.set_defaults(func=cmd_files)

    p = sub.add_parser("download", parents=[common], help="copy a run's file or directory")
    p.add_argument("run", metavar="RUN")
    p.add_argument("name", metavar="NAME", help="file name as `runs files` prints it, e.g. outputs/model.keras")
    p.add_argument("dest", nargs="?", metavar="DEST", help="destination file or directory (default: ./BASENAME)")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("cancel", parents=[common], help="cancel a run (SIGTERM, then SIGKILL after its grace)")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--wait", action="store_true", help="wait until the run has ended")
    p.set_defaults(func=cmd_cancel)

    from .rerun import add_command as add_rerun
    add_rerun(sub, common, _key_value)  # runs rerun
    from .tracking import add_commands, add_runs_commands
    add_runs_commands(sub, common)
    from .trash import add_runs_commands as add_trash_commands
    add_trash_commands(sub, common)  # runs delete|restore|purge
    from .archive import add_runs_commands as add_archive_commands
    add_archive_commands(sub, common)  # runs export|import
    add_commands(commands, common, _key_value, _Parser)
    from . import doctor as cli_doctor, env as cli_env
    cli_env.add_commands(commands, common, _Parser)  # env list|show|build|rm
    cli_doctor.add_command(commands, common, _positive_float)  # doctor
    from . import sweep as cli_sweep
    cli_sweep.add_commands(commands, common, _Parser)  # sweep [start]|show|cancel|resume
    from . import gc as cli_gc
    cli_gc.add_command(commands, common)  # gc
    from . import ui as cli_ui
    cli_ui.add_command(commands, common)  # ui
    return parser


# --------------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from ..launch.local import discard_agent
    from ..history.snapshot import SnapshotLimits
    from ..history.store import exit_code_for
    from ..submit import SubmitOptions, create_run, dry_run, prepare
    from ..supervise import Supervisor, prestart_agents, spawn_detached

    if args.json and not args.dry_run:
        raise SpecError("--json goes with --dry-run (use `runs show --json` for a run's record)")
    if args.detach and args.dry_run:
        raise SpecError("--detach and --dry-run exclude each other")
    estimator = estimator_from_args(args)
    limits = None
    if args.snapshot_max_mb is not None or args.snapshot_max_files is not None:
        limits = SnapshotLimits.from_env(args.snapshot_max_mb, args.snapshot_max_files)
    options = SubmitOptions(experiment=args.experiment, home=getattr(args, "home", None), tags=dict(args.tag),
                            limits=limits, grace=args.grace, scratch=args.scratch)
    agents = {}
    if not (args.dry_run or args.detach or args.slurm):  # their start-up (an ssh login) overlaps the snapshot
        agents = prestart_agents(estimator.resolved_target(), args.python or sys.executable)
    if args.detach:
        plain_progress()  # the run goes on elsewhere: plain lines (tflaunch.progress)
    try:
        prepared = prepare(estimator, options)
        if args.dry_run:
            from ..progress import clear_line
            clear_line()  # "snapshot: N files to store": a dry run stores nothing
            plan = dry_run(prepared)
            if args.json:
                print_json(plan)
            else:
                print_plan(plan)
            return 0
        if args.slurm:
            from ..submit import submit_slurm
            record = submit_slurm(prepared)
            job = (record.read_status(check_lease=False) or {}).get("slurm", {}).get("job_id")
            if args.detach:
                sys.stdout.write(record.id + "\n")
                log.info("run %s: Slurm job %s, Queued (follow it with `tflaunch runs show %s`)", record.id, job,
                         record.id)
                return 0
            log.info("run %s (experiment %s): submitted as Slurm job %s, record %s", record.id, args.experiment,
                     job, record.dir)
            final = follow_submitted(record)
            report_end(final)
            return exit_code_for(final)
        record = create_run(prepared)
        if args.detach:
            spawn_detached(record)
            sys.stdout.write(record.id + "\n")
            return 0
        log.info("run %s (experiment %s), record %s", record.id, args.experiment, record.dir)
        supervisor, agents = Supervisor(record, stream=True, agents=agents), {}
    finally:
        for conn in agents.values():
            discard_agent(conn.popen)
    final = supervisor.run()
    report_end(final)
    return exit_code_for(final)


def cmd_list(args: argparse.Namespace) -> int:
    store = _store(args)
    limit = args.limit if args.limit and args.limit > 0 else None
    parent = store.run(args.parent).id if args.parent else None
    if args.json and parent is None:
        sys.stdout.write(store.list_runs_json(args.experiment, args.status, limit) + "\n")
        return 0
    runs = store.list_runs(args.experiment, args.status, None if parent else limit)
    if parent is not None:
        runs = [r for r in runs if r.get("parent") == parent][:limit]
        if args.json:
            print_json(runs)
            return 0
    sweeps = any(r.get("kind") == "sweep" or r.get("parent") for r in runs)
    rows = [("ID", "EXPERIMENT", "STATUS", "CREATED (UTC)", "DURATION", "EXIT", *(("SWEEP",) if sweeps else ()),
             *[m.upper() for m in args.metric])]
    for r in runs:
        code = r.get("exit_code")
        latest = r.get("metrics") or {}
        where = ()
        if sweeps:  # a sweep is "sweep (N trials)", a trial "PARENT#N"
            where = (f"sweep ({(r.get('sweep') or {}).get('trials', '?')} trials)" if r.get("kind") == "sweep"
                     else f"{r['parent'][-8:]}#{r.get('trial')}" if r.get("parent") else "",)
        rows.append((r["id"], r.get("experiment", ""), r.get("status", ""), textfmt.timestamp(r.get("created")),
                     textfmt.duration(r.get("duration_seconds")),
                     str(code) if code is not None else (r.get("signal") or "-"), *where,
                     *[textfmt.value(latest.get(m)) for m in args.metric]))
    sys.stdout.write(textfmt.table(rows))
    return 0


def _attempt_lines(run: dict[str, Any]) -> list[str]:
    """``runs show``: the attempts of a run that restarts or is requeued (each restart: what started
    again, and why; each requeue: why the run went on in the Slurm job's next allocation)."""
    restarts = run.get("restarts") or []
    requeues = run.get("requeues") or []
    if not run.get("attempt") and not restarts and not requeues:
        return []
    budget = run.get("max_restarts")
    used = sum(1 for r in restarts if r.get("counted", True))
    queued = f", {len(requeues)} requeue(s)" + (f" of max_requeues={run['max_requeues']}"
                                                 if run.get("max_requeues") else "") if requeues else ""
    lines = [f"attempts:    {run.get('attempt') or 1} ({len(restarts)} restart(s)"
             + (f", {used} of max_restarts={budget} used" if budget else "") + queued + ")"]
    for r in sorted(restarts + requeues, key=lambda r: (r.get("attempt") or 0, "ranks" in r)):
        if "ranks" not in r:  # a requeue
            lines.append(f"  attempt {r.get('attempt')}: in the job's next allocation, requeued after "
                         f"{r.get('message')}")
            continue
        what = "all processes" if r.get("ranks") is None else "rank(s) " + ", ".join(map(str, r["ranks"]))
        lines.append(f"  attempt {r.get('attempt')}: {what} started again after {r.get('message')}"
                     + ("" if r.get("counted", True) else " (a restart exit code: not counted)"))
    return lines


def cmd_show(args: argparse.Namespace) -> int:
    import shlex
    from ..history.store import describe
    from .ui import portal_url
    record = _store(args).run(args.run)
    run = describe(record)
    url = portal_url(record)  # the run's page while `tflaunch ui` serves the home
    if url:
        run["portal_url"] = url
    if args.json:
        print_json(run)
        return 0
    error = run.get("error") or {}
    lines = [
        f"id:          {run['id']}",
        f"experiment:  {run.get('experiment')}",
        f"status:      {run.get('status')}" + (f" ({error.get('reason')})" if error else ""),
        f"created:     {textfmt.timestamp(run.get('created'))}",
        f"started:     {textfmt.timestamp(run.get('started'))}",
        f"ended:       {textfmt.timestamp(run.get('ended'))}",
        f"duration:    {textfmt.duration(run.get('duration_seconds'))}",
        f"exit code:   {run.get('exit_code') if run.get('exit_code') is not None else (run.get('signal') or '-')}",
        f"command:     {shlex.join([run.get('entry_script') or '?', *run.get('arguments', [])])}",
        f"source:      {run.get('source_directory')}",
        f"record:      {run.get('run_dir')}",
        *([f"portal:      {url}"] if url else []),
    ]
    lines += placement_lines(run)
    if run.get("kind") == "sweep":
        summary = run.get("sweep") or {}
        best = summary.get("best") or {}
        lines.append(f"sweep:       {summary.get('trials', 0)} trials ("
                     + ", ".join(f"{n} {st}" for st, n in sorted((summary.get("counts") or {}).items())) + ")"
                     + (f", best {summary.get('primary_metric_name')} {textfmt.value(best.get('value'))} in trial "
                        f"{best.get('index')} ({best.get('run_id')})" if best else "")
                     + f"; see `tflaunch sweep show {run['id']}`")
    elif run.get("parent"):
        lines.append(f"sweep:       trial {run.get('trial')} of {run['parent']}: "
                     + " ".join(f"{k}={v}" for k, v in (run.get("hyperparameters") or {}).items()))
    lines += _attempt_lines(run)
    slurm = run.get("slurm") or {}
    if slurm.get("job_id"):
        state = ", ".join(str(slurm[k]) for k in ("state", "reason") if slurm.get(k))
        how = "submitted by tflaunch" if slurm.get("submitted") else "run inside it"
        lines.append(f"slurm job:   {slurm['job_id']} ({how}{'; ' + state if state else ''})"
                     + (f"   script: {slurm['script']}" if slurm.get("script") else ""))
    git = run.get("git") or {}
    if git.get("status") == "ok":
        lines.append(f"git:         {git.get('commit') or '(no commit)'}"
                     + (f" ({git['branch']})" if git.get("branch") else " (detached)")
                     + (f", uncommitted changes in {git['patch']}" if git.get("patch")
                        else ", uncommitted changes" if git.get("dirty") else "")
                     + (f"   remote: {git['remote']}" if git.get("remote") else ""))
    elif git.get("status") == "unknown":
        lines.append(f"git:         unknown ({git.get('reason')})")
    env = run.get("environment") or {}
    if env.get("key"):
        lines.append(f"environment: {env['key'][:20]} ({'built for this run' if env.get('built') else 'reused'}"
                     f"{', ' + str(env['builder']) if env.get('builder') else ''}, {env.get('packages', 0)} packages "
                     f"of its own)   python: {env.get('python')}")
        if env.get("freeze"):
            frozen = env["freeze"]
            lines.append("packages:    " + ", ".join(frozen[:12]) + (f" (+{len(frozen) - 12} more: `runs show "
                                                                      f"--json`)" if len(frozen) > 12 else ""))
    if run.get("withheld_environment"):
        lines.append("withheld:    " + ", ".join(run["withheld_environment"])
                     + " (secret variables: the script got their values, the record keeps only their names)")
    for item in run.get("inputs") or ():
        counted = f", {item['files']} files, {item['bytes']} bytes" if item.get("files") is not None else ""
        lines.append(f"input:       {item['name']} = {item['path']} ({item['mode']}{counted})")
    if run.get("metrics"):
        shown = list(run["metrics"].items())
        lines.append("metrics:     " + ", ".join(f"{k}={textfmt.value(v)}" for k, v in shown[:8])
                     + (f" (+{len(shown) - 8} more: `tflaunch runs metrics {run['id'][-8:]}`)" if len(shown) > 8 else ""))
    if run.get("rerun_of"):
        lines.append(f"rerun of:    {run['rerun_of']}" + _overrides_text(run.get("rerun_overrides") or {}))
    if run.get("reruns"):
        lines.append("reruns:      " + ", ".join(run["reruns"]))
    if run.get("cancel_reason"):
        lines.append(f"canceled:    {run['cancel_reason']}")
    if error:
        lines.append(f"error:       {error.get('message')}")
        if error.get("exception"):
            lines.append(f"exception:   {error['exception']}")
        if error.get("stderr_tail"):
            lines.append("stderr tail:")
            lines += [f"  {line}" for line in error["stderr_tail"].splitlines()]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _overrides_text(overrides: dict[str, Any]) -> str:
    """`` (--arg --lr=0.01, --set node_count=2)``: what a rerun changed (empty: nothing)."""
    parts = [f"--drop-arg {k}" if v is None else f"--arg {k}" + (f"={v}" if v != "" else "")
             for k, v in (overrides.get("arguments") or {}).items()]
    parts += [f"--set {k}={v}" for k, v in (overrides.get("settings") or {}).items()]
    if overrides.get("compute_target"):
        parts.append(f"compute target {overrides['compute_target']}")
    return f" ({', '.join(parts)})" if parts else ""


def cmd_logs(args: argparse.Namespace) -> int:
    from ..history.store import TERMINAL
    from ..tail import follow_files
    record = _store(args).run(args.run)

    def files():
        return [(path, sys.stdout if kind == "stdout" else sys.stderr, prefix)
                for path, kind, prefix in record.process_log_streams()]

    if args.follow:
        follow_files(files, lambda: (record.read_status() or {}).get("status") in TERMINAL)
    else:
        follow_files(files, lambda: True)
    return 0


def cmd_files(args: argparse.Namespace) -> int:
    files = _store(args).run(args.run).file_names()
    if args.json:
        print_json([{"name": name, "size": size} for name, size in files])
    else:
        for name, size in files:
            sys.stdout.write(f"{size:>12}  {name}\n")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from ..history.store import download
    target = download(_store(args).run(args.run), args.name, args.dest)
    sys.stdout.write(target + "\n")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from ..history.store import TERMINAL
    from ..submit import cancel_run
    record = _store(args).run(args.run)
    status = cancel_run(record, "canceled with `tflaunch runs cancel`")
    if status.get("status") in TERMINAL:
        sys.stdout.write(f"run {record.id} is already {status['status']}; nothing to cancel\n")
        return 0
    if not args.wait:
        sys.stdout.write(f"cancel requested for run {record.id} (status: {status.get('status')})\n")
        return 0
    while True:
        status = record.read_status() or {}
        if status.get("status") in TERMINAL:
            sys.stdout.write(f"run {record.id} {status['status']}\n")
            return 0
        time.sleep(0.2)


# --------------------------------------------------------------------------------------------------
def _setup_logging(level: str) -> None:
    handler = ConsoleHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("tflaunch: %(message)s" if level != "debug"
                                           else "tflaunch: %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="replace")  # type: ignore[attr-defined]
        except (AttributeError, ValueError):
            pass
    parser = build_parser()
    from .rerun import route as rerun_route
    from .sweep import route
    args = parser.parse_args(rerun_route(route(sys.argv[1:] if argv is None else argv)))
    _setup_logging(getattr(args, "log_level", "info"))
    from ..progress import end_line
    try:
        return _run_command(args)
    finally:
        end_line()  # a stage's status line left on the terminal


def _error(text: str) -> None:
    from ..progress import end_line
    end_line()  # a stage's status line on the terminal keeps its line: the error goes below it
    sys.stderr.write(text + "\n")


def _run_command(args: argparse.Namespace) -> int:
    """``args.func(args)``, its errors as one line and an exit status."""
    try:
        return int(args.func(args) or 0)
    except TflaunchError as exc:
        _error(f"tflaunch: error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        _error("tflaunch: interrupted")
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")  # silence the flush at exit when the reader went away
        except OSError:
            pass
        return 0
    except OSError as exc:
        _error(f"tflaunch: error: {exc}")
        return 1
    except Exception as exc:  # a bug: one line, the traceback on request
        if os.environ.get("TFLAUNCH_DEBUG"):
            raise
        _error(f"tflaunch: internal error: {exc!r} (set TFLAUNCH_DEBUG=1 for the traceback)")
        return 70
