"""The file operations of ``tflaunch gc`` (:mod:`tflaunch.history.gc`): listing, sizes, and claiming a
candidate by a rename beside it, checking it, putting it back or removing it for good."""
from __future__ import annotations

import errno
import os
import shutil
import stat

from .lease import process_start_time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Iterable

__all__ = ["listdir", "lstat", "alive_here", "size", "newest", "claim", "changed", "put_back", "discard",
           "remove_tree", "claim_and_check"]


def listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def alive_here(pid: str | int) -> bool:
    """Whether a process with this pid runs on this machine (a pid of another host may look alive: kept)."""
    try:
        return int(pid) > 0 and process_start_time(int(pid)) is not None
    except (ValueError, OverflowError):
        return False


def size(path: str, only_single: bool = False) -> int:
    """Bytes of the regular files at or under ``path``, each inode once; ``only_single``: only those no
    other link holds (a tree's files are links to its objects: they are counted with the objects)."""
    st = lstat(path)
    if st is None:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) and (not only_single or st.st_nlink <= 1) else 0
    seen, total = set(), 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            st = lstat(os.path.join(dirpath, name))
            if st is not None and stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen \
                    and (not only_single or st.st_nlink <= 1):
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def newest(path: str, renamed: bool = False) -> float:
    """The newest mtime at or under ``path`` (a writer still at work keeps changing something);
    ``renamed``: or its ctime, when newer (an entry claimed by a rename, whose mtimes are old)."""
    st = lstat(path)
    latest = (max(st.st_mtime, st.st_ctime) if renamed else st.st_mtime) if st is not None else 0.0
    if st is not None and stat.S_ISDIR(st.st_mode):
        for dirpath, dirs, files in os.walk(path):
            for name in dirs + files:
                st = lstat(os.path.join(dirpath, name))
                if st is not None:
                    latest = max(latest, st.st_mtime)
    return latest


def _rename_beside(path: str, prefix: str) -> str | None:
    """Rename ``path`` to ``<prefix>-<name>-<pid>-<hex>`` beside it; the new path, None when it is gone."""
    head, name = os.path.split(path)
    renamed = os.path.join(head, f"{prefix}-{name}-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        os.rename(path, renamed)
    except FileNotFoundError:
        return None
    return renamed


def claim(path: str) -> str | None:
    """Rename ``path`` to ``.gc-<name>-<pid>-<hex>`` beside it; None when it is gone."""
    return _rename_beside(path, ".gc")


def changed(before: os.stat_result, path: str) -> bool:
    """Whether ``path`` was touched or linked since ``before`` was taken (or is gone)."""
    st = lstat(path)
    return st is None or (st.st_mtime_ns, st.st_nlink) != (before.st_mtime_ns, before.st_nlink)


def put_back(claimed: str, path: str) -> None:
    """Undo :func:`claim`; a copy made again meanwhile wins (the same content) and the claim goes. A claim
    another gc dealt with meanwhile (one that took it for a killed gc's) is left to it."""
    st = lstat(claimed)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        try:
            os.rename(claimed, path)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            discard(claimed)
        return
    try:
        os.link(claimed, path)  # never replace what is there (a writer's copy)
    except FileExistsError:
        pass
    except FileNotFoundError:
        return
    except OSError:  # no hard links here: the rename replaces at worst an identical copy
        try:
            os.rename(claimed, path)
        except FileNotFoundError:
            pass
        return
    try:
        os.unlink(claimed)
    except FileNotFoundError:
        pass


def remove_tree(path: str) -> None:
    """Remove a directory, read-only parts too; what vanishes meanwhile (another remover) is no error."""
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        for dirpath, _dirs, _files in os.walk(path):
            try:
                os.chmod(dirpath, stat.S_IRWXU)
            except OSError:
                pass
        shutil.rmtree(path, ignore_errors=True)


def discard(path: str) -> bool:
    """Remove ``path`` for good: a directory is renamed to ``.rm-*`` first (never put back half removed)."""
    if not os.path.isdir(path) or os.path.islink(path):
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False
    doomed = _rename_beside(path, ".rm")
    if doomed is None:
        return False
    remove_tree(doomed)
    return True


def claim_and_check(kept: dict[str, int], parts: Iterable[tuple[str, os.stat_result]],
                    check: Any = None) -> list[str] | None:
    """Claim every path of ``parts`` (path, stat as listed); the claimed names when none changed meanwhile
    (``check(claimed)``: a further test, true when changed), else None, with everything put back and
    ``kept["in_use"]`` counted."""
    claims: list[tuple[str, str]] = []
    try:
        ok = True
        for path, before in parts:
            claimed = claim(path)
            if claimed is None:  # gone meanwhile (another gc)
                ok = False
                break
            claims.append((claimed, path))
            if changed(before, claimed):
                ok = False
                break
        if ok and check is not None and check([c for c, _ in claims]):
            ok = False
    except BaseException:
        for claimed, path in claims:
            put_back(claimed, path)
        raise
    if not ok:
        for claimed, path in claims:
            put_back(claimed, path)
        kept["in_use"] += 1
        return None
    return [c for c, _ in claims]
