"""``tflaunch env list|show|build|rm``: the job environments under the home (see :mod:`tflaunch.envs`).

The package options are shared with ``run``: :func:`add_package_options` adds them to a parser and
:func:`package_options` turns the parsed arguments into :func:`tflaunch.envs.request_environment`'s
keyword arguments, with the index defaults of the home's ``config.json``.
"""
from __future__ import annotations

import json
import os
import sys

from .. import textfmt

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    import argparse
    from typing import Any

__all__ = ["add_commands", "add_package_options", "package_options"]


def add_package_options(parser: argparse.ArgumentParser) -> None:
    """The options that say what the job's environment holds (``run`` already has ``--python`` and
    ``--framework-version``; ``env build`` adds them itself)."""
    group = parser.add_argument_group("job environment (built once per key under <home>/envs)")
    group.add_argument("--pip", action="append", default=[], metavar="SPEC",
                       help="a package for the job's environment, e.g. --pip keras --pip 'numpy<2' (repeatable)")
    group.add_argument("--requirements", metavar="FILE", help="a pip requirements file for the job's environment")
    group.add_argument("--conda", action="append", default=[], metavar="PKG",
                       help="a conda package (needs conda, mamba or micromamba on PATH; repeatable)")
    group.add_argument("--find-links", action="append", default=[], metavar="DIR",
                       help="a wheelhouse directory (or URL) to install from (repeatable; default: the home's "
                            "config.json find_links)")
    group.add_argument("--index-url", metavar="URL", help="the package index (default: config.json, else PyPI)")
    group.add_argument("--no-index", action="store_true", default=None,
                       help="never ask an index: only the wheelhouses (--find-links)")
    group.add_argument("--no-inherit-packages", action="store_true",
                       help="the environment does not see the interpreter's own packages")
    group.add_argument("--builder", dest="env_builder", choices=("auto", "uv", "pip"), default="auto",
                       help="the tool that installs (default auto: uv when installed, else pip)")


def package_options(args: argparse.Namespace, home: str | None = None) -> dict[str, Any]:
    """``request_environment`` keyword arguments from parsed options: ``index`` is the explicit options
    over the home's config.json (without ``home``: the explicit options alone, for a caller that layers
    the config files itself)."""
    from ..config import index_defaults
    from ..envs import IndexOptions

    explicit: dict[str, Any] = {}
    if args.find_links:
        explicit["find_links"] = [x if "://" in x else os.path.abspath(x) for x in args.find_links]
    if args.index_url is not None:
        explicit["index_url"] = args.index_url
    if args.no_index:
        explicit["no_index"] = True
    requirements = os.path.abspath(args.requirements) if args.requirements else None
    return {
        "pip_packages": list(args.pip), "requirements_file": requirements, "conda_packages": list(args.conda),
        "framework_version": getattr(args, "framework_version", None), "use_gpu": bool(getattr(args, "gpu", False)),
        "index": IndexOptions.layered(index_defaults(home) if home else {}, explicit),
        "inherit": not args.no_inherit_packages,
    }


def add_commands(commands: Any, common: argparse.ArgumentParser, parser_class: type) -> None:
    env = commands.add_parser("env", parents=[common], help="job environments: list, show, build, remove")
    sub = env.add_subparsers(dest="env_command", metavar="SUBCOMMAND", parser_class=parser_class)
    sub.required = True

    p = sub.add_parser("list", parents=[common], help="environments under the home: status, python, packages, size")
    p.add_argument("--root", metavar="DIR", help="another environments root (default: <home>/envs)")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", parents=[common], help="one environment: all its metadata and its pip freeze")
    p.add_argument("key", metavar="KEY", help="a unique prefix of the key")
    p.add_argument("--root", metavar="DIR", help="another environments root (default: <home>/envs)")
    p.add_argument("--json", action="store_true", help="print its env.json plus status")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("build", parents=[common], help="build (or reuse) the environment these options describe")
    add_package_options(p)
    p.add_argument("--python", metavar="PATH", help="the job's interpreter (default: the one running tflaunch)")
    p.add_argument("--framework-version", metavar="VERSION",
                   help="TensorFlow series (e.g. 2.15) when the interpreter has no matching one")
    p.add_argument("--gpu", action="store_true", help="with --framework-version: tensorflow instead of tensorflow-cpu")
    p.add_argument("--mpirun", metavar="PATH",
                   help="with --pip horovod: the MPI to build Horovod against (default: next to --python, then PATH)")
    p.add_argument("--root", metavar="DIR", help="build under DIR instead of <home>/envs")
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON (the tools' output goes to stderr on a terminal or with "
                        "--log-level debug, and to the environment's build.log)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("rm", parents=[common], help="remove environments (refused while one is being built)")
    p.add_argument("keys", nargs="+", metavar="KEY")
    p.add_argument("--root", metavar="DIR", help="another environments root (default: <home>/envs)")
    p.add_argument("--json", action="store_true", help="print what was removed as a JSON array")
    p.set_defaults(func=cmd_rm)


def _home(args: argparse.Namespace) -> str:
    from ..history.store import resolve_home

    return resolve_home(getattr(args, "home", None))


def _root(args: argparse.Namespace) -> str:
    from ..envs import home_envs_root

    return os.path.abspath(args.root) if getattr(args, "root", None) else home_envs_root(_home(args))


def _dump(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _size(n: Any) -> str:
    if not isinstance(n, int):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return "-"


def _short_packages(packages: list[str], width: int = 48) -> str:
    text = " ".join(packages) or "-"
    return text if len(text) <= width else text[:width - 3] + "..."


def _status(entry: dict[str, Any]) -> str:
    if entry["status"] == "building":
        by = entry.get("building_by") or {}
        return f"building (pid {by.get('pid')} on {by.get('host')})"
    return entry["status"]


def cmd_list(args: argparse.Namespace) -> int:
    from ..envs import list_environments

    entries = list_environments(_root(args))
    if args.json:
        _dump([{k: v for k, v in e.items() if k != "record"} for e in entries])
        return 0
    if not entries:
        sys.stdout.write(f"no environments in {_root(args)}\n")
        return 0
    rows = [("KEY", "STATUS", "PYTHON", "PACKAGES", "SIZE", "CREATED", "LAST USED")]
    for e in entries:
        rows.append((e["short"], _status(e), e.get("python_version") or "-", _short_packages(e.get("packages") or []),
                     _size(e.get("size")), textfmt.timestamp(e.get("created")), textfmt.timestamp(e.get("last_used"))))
    sys.stdout.write(textfmt.table(rows))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from ..envs import find_environment

    entry = find_environment(_root(args), args.key)
    record = entry.get("record") or {}
    if args.json:
        _dump({**record, **{k: v for k, v in entry.items() if k != "record"}})
        return 0
    request = record.get("request") or {}
    lines = [
        f"key:          {entry['key']}",
        f"status:       {_status(entry)}",
        f"path:         {entry.get('path') or '-'}",
        f"python:       {entry.get('python') or '-'} ({entry.get('python_version') or '?'})",
        f"built from:   {request.get('python', '-')}",
        f"builder:      {entry.get('builder') or '-'}",
        f"created:      {textfmt.timestamp(entry.get('created'))} on {record.get('host', '-')}"
        f" ({textfmt.duration(record.get('seconds'))})",
        f"last used:    {textfmt.timestamp(entry.get('last_used'))}",
        f"size:         {_size(entry.get('size'))}",
        f"packages:     {' '.join(entry.get('packages') or []) or '-'}",
        f"inherits:     {', '.join(request.get('parent_site') or []) if request.get('inherit') else 'no'}",
    ]
    index = request.get("index") or {}
    lines.append("index:        " + ("--no-index" if index.get("no_index") else (index.get("index_url") or "PyPI"))
                 + "".join(f" --find-links {x}" for x in index.get("find_links") or []))
    horovod = record.get("horovod")
    if horovod:
        lines.append(f"horovod:      {horovod.get('wheel')} ({'compiled' if horovod.get('compiled') else 'cached wheel'})")
    freeze = record.get("freeze") or []
    lines.append(f"freeze ({len(freeze)}):")
    lines += [f"  {line}" for line in freeze]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from ..envs import ensure_environment, request_environment

    home = _home(args)
    options = package_options(args, home)
    python = args.python or sys.executable
    mpi = None
    if args.mpirun:
        from ..plan.mpirun import detect

        install = detect(args.mpirun)
        mpi = {"flavour": install.flavour, "version": install.version, "path": install.path}
    request = request_environment(python, mpi=mpi, home=home, root=_root(args), **options)
    if request is None:
        message = f"nothing to build: {python} already has what was asked for (give --pip, --requirements, --conda or " \
                  "a --framework-version it lacks)"
        if args.json:
            _dump({"built": False, "environment": None, "python": python, "message": message})
        else:
            sys.stdout.write(message + "\n")
        return 0
    # The tools' output: live on a terminal; else in the log at debug level (and in <env>/build.log).
    log = getattr(sys.stderr, "buffer", None) if sys.stderr.isatty() else None
    result = ensure_environment(request, _root(args), log=log, builder=args.env_builder)
    if args.json:
        _dump({**result.to_dict(), "request": request.to_dict()})
    else:
        how = f"built in {textfmt.duration(result.seconds)} with {result.builder}" if result.built else "already built"
        sys.stdout.write(f"environment {result.key[:20]} ({how}): {result.python}\n")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from ..envs import remove_environment

    root = _root(args)
    removed = []
    for ref in args.keys:
        entry = remove_environment(root, ref)
        removed.append({k: entry.get(k) for k in ("key", "short", "path", "status")})
        if not args.json:
            sys.stdout.write(f"removed environment {entry['short']} ({entry.get('path') or '-'})\n")
    if args.json:
        _dump(removed)
    return 0
