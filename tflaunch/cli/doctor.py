"""``tflaunch doctor``: the command line of :mod:`tflaunch.doctor` (added to :func:`tflaunch.cli.build_parser`'s
parser by :func:`add_command`).

Exit status: 0 every host is fine (warnings allowed); 1 a host failed or differs from the others (each
one named on stderr); 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["add_command", "cmd_doctor"]

_EPILOG = """\
Checks every host in parallel, through the tflaunch agent a run would start there: ssh (BatchMode), the
job's Python and its TensorFlow/Keras/Horovod/mpi4py (package metadata; nothing is imported), the MPI a
run would use, GPUs, free disk in the home and the scratch root, clock skew. Exit status 1 names every host
that fails or whose versions differ from the others'; warnings (clock off by more than 2 s, less than
1 GiB or 5 % free) do not change it.
Examples:
  python -m tflaunch doctor --hosts node1,node2,node3
  python -m tflaunch doctor --hostfile hosts.txt --python /shared/venv/bin/python --json
  python -m tflaunch doctor --slurm --nodes 4 --partition gpu      # a short Slurm job; inside one: its nodes
"""


def add_command(commands: Any, common: argparse.ArgumentParser, seconds: Any) -> None:
    """Add ``doctor`` to the subcommands ``commands`` of the main parser (``seconds``: the argparse type of a
    number of seconds > 0, as ``run`` has it)."""
    p = commands.add_parser("doctor", parents=[common], help="check the hosts a run would use: ssh, Python, "
                                                            "TensorFlow, MPI, GPUs, disk, clocks",
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    hosts = p.add_mutually_exclusive_group()
    hosts.add_argument("--hosts", metavar="H[:SLOTS],...",
                       help="hosts reached over ssh, e.g. node1:4,node2:4 (default: as `run`: this machine, or "
                            "the Slurm/PBS allocation tflaunch runs in)")
    hosts.add_argument("--hostfile", metavar="FILE", help="hosts from a file of 'HOST slots=N' lines")
    hosts.add_argument("--slurm", action="store_true",
                       help="the nodes Slurm gives: inside an allocation its nodes, else a short job "
                            "(srun --nodes N); one srun step, one task per node, no ssh")
    p.add_argument("--nodes", type=int, metavar="N",
                   help="with --slurm: nodes to check (default: every node of the allocation; outside one, 1)")
    p.add_argument("--partition", "-p", metavar="NAME", help="with --slurm outside an allocation: srun --partition")
    p.add_argument("--python", metavar="PATH",
                   help="the job's interpreter, the same path on every host (default: the one running tflaunch)")
    p.add_argument("--mpirun", metavar="PATH",
                   help="the mpirun to check (default: the one a run would use: next to the job's Python, "
                        "else on PATH)")
    p.add_argument("--remote-scratch", metavar="DIR",
                   help="the scratch root to check (default: each host's $TMPDIR or /tmp)")
    from .job import add_ssh_options
    add_ssh_options(p)
    p.add_argument("--timeout", type=seconds, metavar="SECONDS",
                   help="how long a host may take to answer (default: the connect timeout + 20; with Slurm 120, "
                        "the wait in the queue included)")
    p.add_argument("--json", action="store_true",
                   help='print {"hosts": [one object per host], "summary": {"ok", "problems", "warnings", ...}}')
    p.set_defaults(func=cmd_doctor)


def _targets(args: argparse.Namespace) -> tuple[str, list[str], Any]:
    """("ssh", hosts, SshOptions) or ("srun", nodes of the allocation or [], None)."""
    from ..spec.hosts import discover
    from ..spec.target import SSHTarget

    ssh_kwargs = dict(ssh_port=args.ssh_port, ssh_options=args.ssh_option, ssh_config=args.ssh_config,
                      connect_timeout=args.connect_timeout)
    slurm_only = [flag for flag, value in (("--nodes", args.nodes), ("--partition", args.partition))
                  if value is not None]
    if args.nodes is not None and args.nodes < 1:
        raise SpecError(f"--nodes {args.nodes}: must be >= 1")
    found, source = discover() if args.slurm or not (args.hosts or args.hostfile) else (None, "")
    in_slurm = source == "SLURM_JOB_NODELIST"
    if args.slurm or (in_slurm and not (args.hosts or args.hostfile) and _which("srun")):
        if in_slurm:
            if args.partition is not None:
                raise SpecError("--partition: only outside a Slurm allocation (inside one, its nodes are checked)")
            names = [h.name for h in found]
            if args.nodes is not None and args.nodes > len(names):
                raise SpecError(f"--nodes {args.nodes}: the allocation has {len(names)} node(s)")
            return "srun", names[:args.nodes or len(names)], None
        if not args.slurm:
            raise SpecError(f"{', '.join(slurm_only)}: only with --slurm")
        return "srun", [], None
    if slurm_only:
        raise SpecError(f"{', '.join(slurm_only)}: only with --slurm")
    if args.hostfile:
        target = SSHTarget.from_hostfile(args.hostfile, **ssh_kwargs)
    elif args.hosts:
        target = SSHTarget(args.hosts, source="--hosts", **ssh_kwargs)
    elif found:
        target = SSHTarget(found, source=source, **ssh_kwargs)
    else:
        target = SSHTarget(["localhost"], source="local", **ssh_kwargs)
    return "ssh", [h.name for h in target.hosts], target.ssh


def _which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


def cmd_doctor(args: argparse.Namespace) -> int:
    from .. import doctor
    from ..history.store import resolve_home

    python = doctor.resolve_request_python(args.python)
    kind, hosts, ssh = _targets(args)
    home = resolve_home(getattr(args, "home", None))
    request = doctor.report_request(python, home=home if os.path.isdir(home) else None,  # none yet: not asked
                                    scratch=args.remote_scratch, mpirun=args.mpirun or "mpirun", gpus=True)
    if kind == "srun":
        checks = doctor.check_slurm(request, python=python, nodes=len(hosts) or args.nodes or 1,
                                    partition=args.partition, expected=hosts or None, timeout=args.timeout)
    else:
        checks = doctor.check_hosts(hosts, request, python=python, ssh=ssh, timeout=args.timeout)
    summary = doctor.summarize(checks, home_needed=kind == "srun" and os.path.isdir(home))
    if args.json:
        sys.stdout.write(json.dumps({"hosts": [c.result for c in checks], "summary": summary}, indent=2) + "\n")
    else:
        sys.stdout.write(doctor.table(checks))
    for message in summary["warnings"]:
        sys.stderr.write(f"tflaunch: warning: {message}\n")
    for message in summary["problems"]:
        sys.stderr.write(f"tflaunch: error: {message}\n")
    if not args.json:
        n = summary["hosts"]
        verdict = "all agree, no problems" if summary["ok"] else f"{len(summary['problems'])} problem(s)"
        sys.stdout.write(f"{n} host{'s' if n != 1 else ''} checked: {verdict}"
                         + (f", {len(summary['warnings'])} warning(s)" if summary["warnings"] else "") + "\n")
    return 0 if summary["ok"] else 1
