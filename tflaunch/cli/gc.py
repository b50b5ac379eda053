"""``tflaunch gc [--dry-run] [--json] [--grace AGE] [--unused-for AGE]``: remove from the home what nothing
uses (the work: :mod:`tflaunch.history.gc`; the parser is added to :func:`tflaunch.cli.build_parser`'s)."""
from __future__ import annotations

import json
import sys

from .. import textfmt

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    import argparse
    from typing import Any

__all__ = ["add_command", "cmd_gc"]

_LABELS = {"objects": "objects", "trees": "trees", "leftovers": "leftovers", "lib": "lib copies",
           "environments": "environments", "caches": "caches"}


def add_command(commands: Any, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("gc", parents=[common],
                            help="remove snapshot objects and trees no run uses (the trash's runs count), package "
                                 "copies and environments unused for long, stale caches and interrupted writes")
    p.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")
    p.add_argument("--grace", default="1h", metavar="AGE",
                   help="never remove what changed less than AGE ago: seconds, or 90m, 1h, 2d (default 1h; 0 only "
                        "for a home no one else uses meanwhile)")
    p.add_argument("--unused-for", default="30d", metavar="AGE",
                   help="remove package copies (lib/), environments (envs/) and caches unused for AGE (default 30d)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: {home, dry_run, grace_seconds, unused_for_seconds, removed: {objects, "
                        "trees, leftovers, lib, environments, caches: {count, bytes, paths}}, count, bytes, kept: "
                        "{young, in_use, writer_alive}, referenced: {runs, deleted_runs, trees}}")
    p.set_defaults(func=cmd_gc)


def cmd_gc(args: argparse.Namespace) -> int:
    from ..history.gc import KINDS, collect_garbage, parse_age

    grace = parse_age(args.grace, "--grace")
    unused_for = parse_age(args.unused_for, "--unused-for")
    report = collect_garbage(getattr(args, "home", None), grace=grace, unused_for=unused_for, dry_run=args.dry_run)
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        return 0
    removed = report["removed"]
    lines = []
    if args.dry_run:
        lines += [f"  {path}" for kind in KINDS if kind != "objects" for path in removed[kind]["paths"]]
        lines.insert(0, f"would remove from {report['home']} (dry run: nothing removed):")
    else:
        lines.append(f"removed from {report['home']}:")
    rows = [(_LABELS[kind], removed[kind]["count"], removed[kind]["bytes"]) for kind in KINDS]
    rows.append(("total", report["count"], report["bytes"]))
    lines += [f"  {label:<13}{count:>8}  {textfmt.size_text(nbytes):>10}" for label, count, nbytes in rows]
    kept, refs = report["kept"], report["referenced"]
    lines.append(f"kept: {kept['young']} younger than the grace ({args.grace}), {kept['in_use']} in use "
                 f"(used meanwhile, or by a run that has not ended), {kept['writer_alive']} whose writer is alive")
    lines.append(f"referenced: {refs['trees']} snapshot tree(s), by {refs['runs']} run(s) and {refs['deleted_runs']} "
                 "deleted run(s) (in the trash)")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
