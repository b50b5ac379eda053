"""``tflaunch runs rerun RUN [overrides]``: a new run from a recorded run's snapshot, spec and arguments
(:mod:`tflaunch.rerun`), attached like ``run`` (its output streamed, its outcome the exit status) or
``--detach``-ed."""
from __future__ import annotations

import argparse
import logging
import sys

from ..errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Sequence

__all__ = ["add_command", "route", "cmd_rerun"]

log = logging.getLogger("tflaunch")

_VALUE_OPTIONS = ("--arg", "--drop-arg")

_EPILOG = """\
The new run has the recorded run's snapshot (the source directory is not read again), spec (interpreter,
hosts, backend, environment, data inputs), arguments, experiment and tags, changed by the options given.
Examples:
  tflaunch runs rerun 5f3a9c1e                                    # the same job again
  tflaunch runs rerun 5f3a9c1e --arg --lr=0.01 --arg epochs=20    # --lr / --epochs replaced or added
  tflaunch runs rerun 5f3a9c1e --drop-arg --verbose --arg --seed=3
  tflaunch runs rerun 5f3a9c1e --set process_count_per_node=4 --set max_run_duration_seconds=3600
  tflaunch runs rerun 5f3a9c1e --set environment_variables.TF_CPP_MIN_LOG_LEVEL=2 -e tuning --detach
  tflaunch runs rerun 5f3a9c1e --hosts node1:4,node2:4 --set node_count=2 --dry-run
--set keys: {keys}.
"""


def route(argv: Sequence[str]) -> list[str]:
    """In ``runs rerun``, ``--arg --lr=0.1`` is ``--arg=--lr=0.1`` (argparse would take ``--lr=0.1`` for an
    option of its own)."""
    argv = list(argv)
    i, words = 0, []
    while i < len(argv) and len(words) < 2:  # the command words, past the global options
        if argv[i] in ("--home", "--log-level"):
            i += 2
            continue
        if not argv[i].startswith("-"):
            words.append(argv[i])
        i += 1
    if words != ["runs", "rerun"]:
        return argv
    out = argv[:i]
    while i < len(argv):
        if argv[i] in _VALUE_OPTIONS and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _param(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE or NAME, got {text!r}")
    return name, value if sep else ""


def _drop(text: str) -> tuple[str, None]:
    if not text or "=" in text:
        raise argparse.ArgumentTypeError(f"expected a parameter name such as --verbose, got {text!r}")
    return text, None


def add_command(sub: Any, common: argparse.ArgumentParser, key_value: Any) -> None:
    from ..spec.fields import SETTABLE

    p = sub.add_parser("rerun", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="a new run from a recorded run's snapshot, spec and arguments, with overrides",
                       epilog=_EPILOG.format(keys=", ".join(SETTABLE)))
    p.add_argument("run", metavar="RUN", help="the recorded run (id, or a unique prefix or suffix of one)")
    p.add_argument("--arg", dest="params", action="append", type=_param, metavar="NAME[=VALUE]",
                   help="script parameter NAME (--lr, -l, or lr for --lr): its recorded value replaced where it "
                        "is (--lr 0.1 or --lr=0.1), else added at the end; without =VALUE a bare flag "
                        "(repeatable; --arg --lr=0.1 and --arg lr=0.1 are the same)")
    p.add_argument("--drop-arg", dest="params", action="append", type=_drop, metavar="NAME",
                   help="leave script parameter NAME (and its value) out (repeatable)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a spec field (repeatable): " + ", ".join(SETTABLE))
    p.add_argument("--env", action="append", type=key_value("NAME"), default=[], metavar="NAME=VALUE",
                   help="environment variable for the script, as --set environment_variables.NAME=VALUE")
    p.add_argument("--experiment", "-e", metavar="NAME", help="experiment (default: the recorded run's)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--hosts", metavar="H[:SLOTS],...",
                       help="run on these hosts over ssh (the recorded ssh options kept) instead of the recorded ones")
    where.add_argument("--hostfile", metavar="FILE", help="run on the hosts of this file instead")
    where.add_argument("--local", action="store_true", help="run on this machine (or the allocation tflaunch runs "
                                                            "in) instead")
    p.add_argument("--tag", action="append", type=key_value("KEY"), default=[], metavar="KEY=VALUE",
                   help="tag, added to the recorded run's (repeatable)")
    p.add_argument("--grace", type=float, metavar="SECONDS",
                   help="time between SIGTERM and SIGKILL when stopping (default: the recorded run's)")
    p.add_argument("--scratch", metavar="DIR", help="build the working directory under DIR (default: the recorded "
                                                    "run's choice)")
    p.add_argument("--detach", "-d", action="store_true", help="print the new run's id and return; the run goes on")
    p.add_argument("--dry-run", action="store_true", help="print what would run; start nothing, write nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    p.set_defaults(func=cmd_rerun, params=[])


def _target(args: argparse.Namespace, record: Any) -> Any:
    """The compute target the options name (None: the recorded one)."""
    if args.local:
        return "local"
    if not (args.hosts or args.hostfile):
        return None
    from ..spec.target import SSHTarget

    recorded = (record.definition().get("spec") or {}).get("compute_target") or {}
    ssh = recorded.get("ssh") or {}
    options = dict(ssh_port=ssh.get("port"), ssh_options=list(ssh.get("options") or ()),
                   ssh_config=ssh.get("config"), connect_timeout=float(ssh.get("connect_timeout") or 10.0),
                   oversubscribe=bool(recorded.get("oversubscribe")), keep_remote=bool(recorded.get("keep_remote")),
                   remote_scratch=recorded.get("remote_scratch"))
    if args.hostfile:
        return SSHTarget.from_hostfile(args.hostfile, **options)
    return SSHTarget(args.hosts, source="--hosts", **options)


def cmd_rerun(args: argparse.Namespace) -> int:
    from .console import follow_submitted, print_json, print_plan, report_end
    from .job import store_from_args
    from ..history.store import exit_code_for
    from ..rerun import create_rerun, parse_setting, prepare_rerun, rerun_dry_run
    from ..schedule import submission

    if args.json and not args.dry_run:
        raise SpecError("--json goes with --dry-run (use `runs show --json` for a run's record)")
    if args.detach and args.dry_run:
        raise SpecError("--detach and --dry-run exclude each other")
    settings: dict[str, Any] = dict(parse_setting(text) for text in args.settings)
    settings.update((f"environment_variables.{name}", value) for name, value in args.env)
    record = store_from_args(args).run(args.run)
    prepared = prepare_rerun(record, script_params=dict(args.params), settings=settings,
                             compute_target=_target(args, record), experiment=args.experiment, tags=dict(args.tag),
                             grace=args.grace, scratch=args.scratch)
    if args.dry_run:
        plan = rerun_dry_run(prepared)
        if args.json:
            print_json(plan)
        else:
            sys.stdout.write(f"rerun of run {record.id}, with its snapshot ({plan['snapshot']['tree'][:12]})\n")
            print_plan(plan)
        return 0
    experiment = prepared.options.experiment
    new = create_rerun(prepared)
    if submission(prepared.spec.compute_target) is not None:
        from ..submit import sbatch_run
        new = sbatch_run(new, prepared.spec, experiment)
        if args.detach:
            sys.stdout.write(new.id + "\n")
            return 0
        log.info("run %s (experiment %s): rerun of %s, submitted to Slurm, record %s", new.id, experiment,
                 record.id, new.dir)
        final = follow_submitted(new)
        report_end(final)
        return exit_code_for(final)
    if args.detach:
        from ..supervise import spawn_detached
        spawn_detached(new)
        sys.stdout.write(new.id + "\n")
        return 0
    from ..supervise import Supervisor
    log.info("run %s (experiment %s): rerun of %s, record %s", new.id, experiment, record.id, new.dir)
    final = Supervisor(new, stream=True).run()
    report_end(final)
    return exit_code_for(final)
