"""The CLI of run archives: ``runs export RUN... -o FILE [--models]`` and ``runs import FILE`` (added to the
``runs`` parser by :func:`add_runs_commands`; the work: :mod:`tflaunch.history.archive`,
:mod:`tflaunch.history.archive_import`)."""
from __future__ import annotations

import json
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    import argparse
    from typing import Any

__all__ = ["add_runs_commands"]


def add_runs_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("export", parents=[common], help="write finished runs (records, snapshots, outputs, logs, "
                                                        "metrics) to one .tar or .tar.gz file")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the archive: *.tar, *.tar.gz or *.tgz")
    p.add_argument("--models", action="store_true", help="also the model versions registered from these runs")
    p.add_argument("--json", action="store_true", help="print the archive's manifest (and its path) as JSON")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", parents=[common], help="add the runs (and models) of an archive to this home; "
                                                        "checked first, idempotent")
    p.add_argument("archive", metavar="FILE")
    p.add_argument("--json", action="store_true",
                   help="print {home, imported, present, models_imported, models_present, objects_added, "
                        "trees_added}")
    p.set_defaults(func=cmd_import)


def _store(args: argparse.Namespace) -> Any:
    from ..history.store import Store
    return Store(getattr(args, "home", None))


def cmd_export(args: argparse.Namespace) -> int:
    from ..history.archive import export_runs

    manifest = export_runs(_store(args), args.runs, args.output, models=args.models)
    if args.json:
        sys.stdout.write(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        return 0
    models = f", {len(manifest['models'])} model version(s)" if args.models else ""
    sys.stdout.write(f"wrote {manifest['path']}: {len(manifest['runs'])} run(s){models}, "
                     f"{manifest['bytes']} bytes of files\n")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from ..history.archive_import import import_archive

    result = import_archive(_store(args), args.archive)
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        return 0
    lines = [f"imported run {i}" for i in result["imported"]]
    lines += [f"run {i} is already present" for i in result["present"]]
    lines += [f"imported model {m}" for m in result["models_imported"]]
    lines += [f"model {m} is already present" for m in result["models_present"]]
    if not result["imported"] and not result["models_imported"]:
        lines.append(f"nothing to import: everything in {args.archive} is already in {result['home']}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
