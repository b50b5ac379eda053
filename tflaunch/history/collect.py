"""Bring each host's ``./outputs`` and ``./logs`` together into one tree before it enters the record.

Hosts that share the launcher's filesystem wrote into the one working directory already; the others
sent theirs back (:mod:`tflaunch.remote.agent` ``collect``). When two hosts wrote the same path, the file of
the host with the lowest rank wins and every other copy is kept under ``hosts/<host>/`` in the record,
with a warning: nothing is silently dropped.
"""
from __future__ import annotations

import os
import shutil

from ..textfmt import size_text

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Container, Mapping, Sequence

__all__ = ["merge_outputs", "discarded_files", "discarded_warning", "COLLECTED", "ASIDE_DIR"]

COLLECTED = ("outputs", "logs")
ASIDE_DIR = "hosts"
NOT_COUNTED = ("__pycache__",)  # written by Python's imports, not by the script
LARGEST_SHOWN = 3


def _files(root: str) -> list[str]:
    """Relative paths of the files (and links) under ``root``, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in dirnames:  # links to directories are kept as links, not walked
            if os.path.islink(os.path.join(dirpath, name)):
                filenames.append(name)
        for name in sorted(filenames):
            found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return found


def _move(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.move(src, dst)


def merge_outputs(work_dir: str, work_rank: int, work_host: str, incoming: Sequence[tuple[str, int, str]],
                  record_dir: str) -> list[str]:
    """Move each incoming tree's files into ``work_dir``; return one warning per conflicting path.

    ``work_dir`` holds what the launcher's host (and hosts sharing its filesystem; the lowest of their
    ranks is ``work_rank``, that host ``work_host``) wrote; ``incoming`` is ``(host, rank, dir)`` per
    other host, ``dir`` holding that host's ``outputs``/``logs``. Losers of a conflict go to
    ``record_dir/hosts/<host>/<path>``.
    """
    owner: dict[str, tuple[int, str]] = {}
    warnings = []
    for host, rank, root in sorted(incoming, key=lambda item: item[1]):
        for top in COLLECTED:
            if not os.path.isdir(os.path.join(root, top)):
                continue
            for rel in _files(os.path.join(root, top)):
                name = os.path.join(top, rel)
                src, dst = os.path.join(root, name), os.path.join(work_dir, name)
                if not os.path.lexists(dst):
                    _move(src, dst)
                    owner[name] = (rank, host)
                    continue
                held_rank, held_host = owner.get(name, (work_rank, work_host))
                if held_rank < rank:
                    _move(src, os.path.join(record_dir, ASIDE_DIR, host, name))
                    kept, aside = held_host, host
                else:  # this host has the lower rank: its file takes the place
                    _move(dst, os.path.join(record_dir, ASIDE_DIR, held_host, name))
                    _move(src, dst)
                    owner[name] = (rank, host)
                    kept, aside = host, held_host
                warnings.append(f"{name} was written on several hosts: kept the copy from {kept} (lowest rank); "
                                f"the one from {aside} is in {ASIDE_DIR}/{aside}/{name}")
    return warnings


def discarded_files(work_dir: str, snapshot: Mapping[str, int], skip: Container[str] = ()) -> dict[str, Any]:
    """What the script left in ``work_dir`` outside ``./outputs`` and ``./logs``, which is discarded with
    it: ``{"files", "bytes", "largest": [[path, size], ...]}`` (the :data:`LARGEST_SHOWN` biggest).

    A file counts unless it is the snapshot's own (its path in ``snapshot``, path -> size, with that size:
    a snapshot file rewritten to the same size is not seen) or lies in ``__pycache__``; the relative paths
    in ``skip`` (a data input copied there) and ``outputs``, ``logs`` are not looked into. Symbolic links
    are not followed.
    """
    count = total = 0
    found: list[tuple[int, str]] = []
    for dirpath, dirnames, filenames in os.walk(work_dir):
        rel_dir = os.path.relpath(dirpath, work_dir)
        top = rel_dir == "."

        def rel(name: str) -> str:
            return name if top else os.path.join(rel_dir, name)

        dirnames[:] = [d for d in dirnames if d not in NOT_COUNTED and not (top and d in COLLECTED)
                       and rel(d) not in skip and not os.path.islink(os.path.join(dirpath, d))]
        for name in filenames:
            if (top and name in COLLECTED) or rel(name) in skip:
                continue
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if snapshot.get(rel(name)) == st.st_size:
                continue
            count += 1
            total += st.st_size
            found.append((st.st_size, rel(name)))
    found.sort(key=lambda item: (-item[0], item[1]))
    return {"files": count, "bytes": total, "largest": [[path, size] for size, path in found[:LARGEST_SHOWN]]}




def discarded_warning(found: Mapping[str, Any], where: str = "") -> str | None:
    """The warning about ``found`` (:func:`discarded_files`; ``where``: `` on host node2``), None if nothing."""
    if not found.get("files"):
        return None
    largest = ", ".join(f"{rel} ({size_text(size)})" for rel, size in found.get("largest") or ())
    more = f", ... ({found['files'] - len(found.get('largest') or ())} more)" if found["files"] > LARGEST_SHOWN else ""
    return (f"{found['files']} file{'s' if found['files'] != 1 else ''} ({size_text(found['bytes'])}) the script "
            f"wrote outside ./outputs and ./logs{where} were discarded with the working directory: {largest}{more}; "
            "write what should be kept under ./outputs")
