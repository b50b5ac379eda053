"""Bring each host's ``./outputs`` and ``./logs`` together into one tree before it enters the record.

Hosts that share the launcher's filesystem wrote into the one working directory already; the others
sent theirs back (:mod:`tflaunch.remote.agent` ``collect``). When two hosts wrote the same path, the file of
the host with the lowest rank wins and every other copy is kept under ``hosts/<host>/`` in the record,
with a warning: nothing is silently dropped.
"""
from __future__ import annotations

import os
import shutil

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Sequence

__all__ = ["merge_outputs", "COLLECTED", "ASIDE_DIR"]

COLLECTED = ("outputs", "logs")
ASIDE_DIR = "hosts"


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
