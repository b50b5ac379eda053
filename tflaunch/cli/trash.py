"""``runs delete|restore|purge``: runs into the home's trash and back, and emptying it
(:mod:`tflaunch.history.trash`; the parsers are added to :func:`tflaunch.cli.build_parser`'s)."""
from __future__ import annotations

import json
import logging
import sys

from .. import textfmt
from ..errors import RunDeletedError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    import argparse
    from typing import Any

__all__ = ["add_runs_commands"]

log = logging.getLogger(__name__)


def _store(args: argparse.Namespace) -> Any:
    from ..history.store import Store
    return Store(getattr(args, "home", None))


def _dump(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _duration(text: str | None) -> float | None:
    from ..history.trash import parse_duration
    return None if text is None else parse_duration(text)


def add_runs_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("delete", parents=[common], help="move runs to the home's trash (`runs restore` brings "
                                                        "them back, `runs purge` empties it)")
    p.add_argument("runs", nargs="*", metavar="RUN", help="run ids (or unique prefixes or suffixes); or filters")
    p.add_argument("--experiment", "-e", metavar="NAME", help="runs of this experiment")
    p.add_argument("--status", action="append", metavar="STATUS", help="runs in this status (repeatable, or a,b)")
    p.add_argument("--older-than", metavar="AGE", help="runs created more than AGE ago: 30d, 12h, 90m")
    p.add_argument("--cancel", action="store_true", help="cancel runs that have not ended, then delete them")
    p.add_argument("--reason", default="", metavar="TEXT", help="recorded with the deletion")
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted; change nothing")
    p.add_argument("--json", action="store_true", help="print {dry_run, deleted: [{id, experiment, status, "
                                                       "created, sweep}], gone: [ids]}")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("restore", parents=[common], help="bring a deleted run back (a sweep: with its trials)")
    p.add_argument("run", metavar="RUN", help="the deleted run's id (or a unique prefix or suffix)")
    p.add_argument("--json", action="store_true", help="print {restored: [ids]}")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("purge", parents=[common], help="empty the trash (remove deleted runs for good)")
    p.add_argument("--older-than", metavar="AGE", help="only runs deleted more than AGE ago: 30d, 12h, 90m")
    p.add_argument("--dry-run", action="store_true", help="print what is in the trash and would be removed")
    p.add_argument("--json", action="store_true", help="print {dry_run, purged: [{id, deleted, experiment, "
                                                       "status, reason, by}]}")
    p.set_defaults(func=cmd_purge)


def cmd_delete(args: argparse.Namespace) -> int:
    from ..history import trash
    from ..submit import cancel_run

    store = _store(args)
    selection = trash.select(store, args.runs, experiment=args.experiment, statuses=args.status,
                             older_than=_duration(args.older_than))
    deleted, gone = trash.delete_runs(store, selection, reason=args.reason or "deleted with `tflaunch runs delete`",
                                      cancel=cancel_run if args.cancel else None, dry_run=args.dry_run)
    if gone and not deleted:
        raise RunDeletedError(f"run {gone[0]} is gone: it was deleted meanwhile" if len(gone) == 1
                              else f"{len(gone)} runs are gone: they were deleted meanwhile")
    for run_id in gone:
        log.warning("run %s is gone: it was deleted meanwhile", run_id)
    if args.json:
        _dump({"dry_run": args.dry_run, "deleted": deleted, "gone": gone})
        return 0
    if not deleted:
        sys.stdout.write("no run matches; nothing deleted\n")
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for row in deleted:
        sys.stdout.write(f"{verb} {row['id']}  {row.get('experiment') or ''}  {row.get('status')}  "
                         f"{textfmt.timestamp(row.get('created'))}"
                         + (f"  (trial of sweep {row['sweep']})" if row.get("sweep") else "") + "\n")
    if args.dry_run:
        sys.stdout.write(f"{len(deleted)} run(s) would be moved to the trash (nothing changed)\n")
    else:
        sys.stdout.write(f"{len(deleted)} run(s) moved to the trash of {store.home} (`tflaunch runs restore RUN` "
                         "brings one back, `tflaunch runs purge` empties the trash)\n")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from ..history import trash

    restored = trash.restore(_store(args), args.run)
    if args.json:
        _dump({"restored": restored})
        return 0
    sys.stdout.write(f"restored run {restored[0]}" + (f" with {len(restored) - 1} trial(s)" if len(restored) > 1
                                                       else "") + "\n")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    from ..history import trash

    purged = trash.purge(_store(args), _duration(args.older_than), dry_run=args.dry_run)
    if args.json:
        keys = ("id", "deleted", "experiment", "status", "reason", "by")
        _dump({"dry_run": args.dry_run, "purged": [{k: e.get(k) for k in keys} for e in purged]})
        return 0
    rows = [("ID", "EXPERIMENT", "STATUS", "DELETED (UTC)", "REASON")]
    rows += [(e["id"], e.get("experiment") or "", e.get("status") or "", textfmt.timestamp(e.get("deleted")),
              e.get("reason") or "") for e in purged]
    if purged:
        sys.stdout.write(textfmt.table(rows))
    what = "would be removed (nothing changed)" if args.dry_run else "removed"
    sys.stdout.write(f"{len(purged)} deleted run(s) {what}; snapshot objects and trees stay until `tflaunch gc` finds nothing uses them\n")
    return 0
