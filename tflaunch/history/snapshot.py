"""Snapshot of the source directory: scan (ignore rules, limits), content-addressed store, working copy.

* :func:`scan` walks the source tree, applies the ignore rules (:mod:`tflaunch.history.ignore`) and the
  default excludes, checks the limits and that the entry script is part of the snapshot. It writes
  nothing, so ``run --dry-run`` can use it.
* :func:`store` copies file contents into ``$TFLAUNCH_HOME/objects`` (named by SHA-256, stored once,
  read-only), builds the snapshot's tree once as hard links to them under ``trees/`` (copying when a
  link is impossible), links the run's ``snapshot`` to it and writes ``snapshot.json``. A stat cache
  per source directory (size, mtime, ctime, inode) lets an unchanged tree be snapshotted again
  without reading a byte or creating a link per file.
* :func:`materialize` builds a run's private, writable working copy from the stored objects.

``tflaunch gc`` removes what no run references while other hosts create runs (the protocol:
:mod:`tflaunch.history.gc`): a writer touches an object it finds stored already, and the tree's directory
and listing before and after it writes the run's manifest (:func:`_hold`), making again what is gone;
readers (:func:`materialize`, :func:`tree_listing`) wait briefly for a tree a gc is checking.

Symbolic links are stored as links and never followed: a link pointing inside the tree keeps working
in the snapshot (absolute ones are rewritten relative); a link pointing outside (``data ->
/scratch/mnist``) is kept as it is but what it points to is not copied, so it resolves only where that
path exists. Sockets, FIFOs and devices are skipped.
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import os
import shutil
import time
from dataclasses import dataclass, field

from .. import fsio
from ..errors import SnapshotError
from .ignore import IGNORE_FILES, Rule, is_ignored, parse_rules

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["SnapshotLimits", "Scan", "scan", "store", "materialize", "MANIFEST"]

log = logging.getLogger(__name__)

MANIFEST = "snapshot.json"
MB = 1024 * 1024
DEFAULT_MAX_MB = 300
DEFAULT_MAX_FILES = 2000
EXCLUDED_NAMES = frozenset({".git", "__pycache__", ".ipynb_checkpoints", ".mypy_cache", ".pytest_cache",
                            ".ruff_cache", ".tox", ".nox"})
EXCLUDED_AT_ROOT = frozenset({"outputs", "logs"})
RACY_WINDOW_NS = 2_000_000_000  # files changed this recently are re-read next time (coarse mtimes)
_CHUNK = 1 << 20
_HOLD_TRIES = 10      # a tree taken by a gc while it is held is rebuilt; this many times at most
_TREE_WAIT = 1.0      # seconds a reader waits for a missing tree (a gc's check puts it back at once)


@dataclass(frozen=True)
class SnapshotLimits:
    """Snapshot size limits (defaults as in Azure ML: 300 MB and 2000 files)."""

    max_bytes: int = DEFAULT_MAX_MB * MB
    max_files: int = DEFAULT_MAX_FILES

    @classmethod
    def from_env(cls, max_mb: float | None = None, max_files: int | None = None) -> "SnapshotLimits":
        """Limits from arguments, else ``TFLAUNCH_SNAPSHOT_MAX_MB`` / ``TFLAUNCH_SNAPSHOT_MAX_FILES``."""
        try:
            if max_mb is None:
                max_mb = float(os.environ.get("TFLAUNCH_SNAPSHOT_MAX_MB", DEFAULT_MAX_MB))
            if max_files is None:
                max_files = int(os.environ.get("TFLAUNCH_SNAPSHOT_MAX_FILES", DEFAULT_MAX_FILES))
        except ValueError as exc:
            raise SnapshotError(f"snapshot limits: {exc}") from None
        if max_mb <= 0 or max_files <= 0:
            raise SnapshotError("snapshot limits must be > 0")
        return cls(max_bytes=int(max_mb * MB), max_files=int(max_files))


class _File:
    """A regular file to snapshot; ``key`` = (size, mtime_ns, ctime_ns, inode) for the stat cache."""

    __slots__ = ("rel", "path", "size", "executable", "key")

    def __init__(self, rel: str, path: str, size: int, executable: bool, key: tuple) -> None:
        self.rel, self.path, self.size, self.executable, self.key = rel, path, size, executable, key


@dataclass
class Scan:
    """What a snapshot of ``root`` will contain (result of :func:`scan`)."""

    root: str
    entry_script: str
    files: list[_File] = field(default_factory=list)
    symlinks: list[tuple[str, str]] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started_ns: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _human(n: float) -> str:
    return f"{n / MB:.1f} MB"


def _is_env_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "pyvenv.cfg")) or os.path.isdir(os.path.join(path, "conda-meta"))


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _walk(root: str, home: str | None, out: Scan) -> None:
    home_real = os.path.realpath(home) if home else None
    stack: list[tuple[str, str, list[Rule]]] = [("", root, [])]
    while stack:
        rel_dir, abs_dir, rules = stack.pop()
        try:
            entries = sorted(os.scandir(abs_dir), key=lambda e: e.name)
        except OSError as exc:
            raise SnapshotError(f"source_directory: cannot read {abs_dir}: {exc.strerror}") from None
        names = {e.name for e in entries}
        for ignore_name in IGNORE_FILES:
            if ignore_name in names:
                try:
                    with open(os.path.join(abs_dir, ignore_name), encoding="utf-8", errors="replace") as fh:
                        rules = rules + parse_rules(fh.read(), rel_dir)
                except OSError as exc:
                    raise SnapshotError(f"cannot read {os.path.join(abs_dir, ignore_name)}: {exc.strerror}") from None
                break
        subdirs = []
        for entry in entries:
            name = entry.name
            if name in EXCLUDED_NAMES or (not rel_dir and name in EXCLUDED_AT_ROOT):
                continue
            rel = f"{rel_dir}/{name}" if rel_dir else name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)  # from the directory entry: no system call
                if rules and is_ignored(rel, is_dir, rules):
                    continue
                if is_dir:
                    if _is_env_dir(entry.path) or (home_real and os.path.realpath(entry.path) == home_real):
                        continue
                    out.dirs.append(rel)
                    subdirs.append((rel, entry.path, rules))
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    out.files.append(_File(rel, entry.path, st.st_size, bool(st.st_mode & 0o111),
                                           (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)))
                elif entry.is_symlink():
                    out.symlinks.append((rel, _link_target(root, entry.path, rel, out)))
                else:
                    out.notes.append(f"skipped {rel}: not a regular file, directory or symbolic link")
            except OSError:
                out.notes.append(f"skipped {rel}: vanished while scanning")
        stack.extend(reversed(subdirs))


def _link_target(root: str, path: str, rel: str, out: Scan) -> str:
    target = os.readlink(path)
    resolved = os.path.realpath(path)
    if _within(resolved, root):
        if os.path.isabs(target):  # keep it pointing into the snapshot, not back at the source
            target = os.path.relpath(resolved, os.path.dirname(os.path.join(root, rel)))
        return target
    out.notes.append(f"symbolic link {rel} -> {target} points outside the source directory: kept, not followed")
    return target


def _check_limits(result: Scan, limits: SnapshotLimits) -> None:
    total, count = result.total_bytes, len(result.files) + len(result.symlinks)
    if total <= limits.max_bytes and count <= limits.max_files:
        return
    by_top: dict[str, list[int]] = {}
    for f in result.files:
        top = f.rel.split("/", 1)[0] + ("/" if "/" in f.rel else "")
        agg = by_top.setdefault(top, [0, 0])
        agg[0] += f.size
        agg[1] += 1
    over_size = total > limits.max_bytes
    ranked = sorted(by_top.items(), key=lambda kv: kv[1][0] if over_size else kv[1][1], reverse=True)[:3]
    parts = [f"{name} ({_human(size)} in {n} files)" if name.endswith("/") else f"{name} ({_human(size)})"
             for name, (size, n) in ranked]
    message = (f"snapshot of {result.root} is {_human(total)} in {count} files, over the limit of "
               f"{_human(limits.max_bytes)} / {limits.max_files} files; biggest: {', '.join(parts)}")
    if over_size:
        nested = sorted((f for f in result.files if "/" in f.rel), key=lambda f: f.size, reverse=True)[:3]
        if nested:
            message += "; largest files: " + ", ".join(f"{f.rel} ({_human(f.size)})" for f in nested)
    raise SnapshotError(message + ". Exclude them in .tflaunchignore (or keep data outside the source "
                        "directory) or raise --snapshot-max-mb / --snapshot-max-files")


def _resolve_entry(root: str, entry_script: str, result: Scan) -> str:
    candidate = entry_script
    if os.path.isabs(candidate):
        absolute = os.path.normpath(candidate)
    else:
        absolute = os.path.normpath(os.path.join(root, candidate))
        if not os.path.lexists(absolute):
            from_cwd = os.path.abspath(candidate)  # `run --source-dir proj proj/train.py`
            if os.path.lexists(from_cwd) and _within(from_cwd, root):
                absolute = from_cwd
    if not _within(absolute, root) or absolute == root:
        raise SnapshotError(f"entry_script: {entry_script!r} is outside source_directory {root}")
    rel = os.path.relpath(absolute, root).replace(os.sep, "/")
    if not os.path.lexists(absolute):
        raise SnapshotError(f"entry_script: {rel!r} not found in source_directory {root}")
    real = os.path.realpath(absolute)
    if not _within(real, root):
        raise SnapshotError(f"entry_script: {rel!r} is a link to {real}, outside source_directory {root}")
    real_rel = os.path.relpath(real, root).replace(os.sep, "/")
    if not os.path.isfile(real):
        raise SnapshotError(f"entry_script: {rel!r} is not a file")
    if real_rel not in {f.rel for f in result.files}:
        raise SnapshotError(f"entry_script: {rel!r} is excluded from the snapshot (by an ignore file or "
                            "the default excludes)")
    return rel


def scan(source_directory: str, entry_script: str, *, home: str | None = None,
         limits: SnapshotLimits | None = None) -> Scan:
    """Decide what the snapshot of ``source_directory`` contains; write nothing."""
    if not os.path.exists(source_directory):
        raise SnapshotError(f"source_directory: {source_directory} does not exist")
    if not os.path.isdir(source_directory):
        raise SnapshotError(f"source_directory: {source_directory} is not a directory")
    root = os.path.realpath(source_directory)
    result = Scan(root=root, entry_script="", started_ns=time.time_ns())
    _walk(root, home, result)
    result.entry_script = _resolve_entry(root, entry_script, result)
    _check_limits(result, limits or SnapshotLimits())
    return result


# ---------------------------------------------------------------------------------------------------
# content-addressed store

def object_path(home: str, digest: str, executable: bool) -> str:
    """Where the object with this SHA-256 lives (executable contents are kept apart: mode is per inode)."""
    return f"{home}/objects/{digest[:2]}/{digest[2:]}{'.x' if executable else ''}"


def _cache_path(home: str, root: str) -> str:
    return os.path.join(home, "cache", "stat", hashlib.sha256(root.encode("utf-8", "surrogateescape")).hexdigest()[:24] + ".json")


def _load_cache(path: str, root: str) -> dict[str, Any]:
    """The stat cache of one source directory: per-file stat data and digest, and the last tree."""
    try:
        data = fsio.read_json(path)
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or data.get("root") != root or not isinstance(data.get("entries"), dict):
        return {"root": root, "entries": {}, "tree": {}}
    if not isinstance(data.get("tree"), dict):
        data["tree"] = {}
    return data


def _parallel(items: list, fn: Any, threads: int) -> list:
    """``[fn(x) for x in items]``, spread over ``threads`` threads when that pays; the first error is raised.

    File copies, hashing (hashlib releases the GIL for large buffers) and link(2) all run outside the
    GIL, so a few threads use every core; ``cp -r`` uses one.
    """
    if threads <= 1 or len(items) < 64:
        return [fn(x) for x in items]
    import threading

    results: list = [None] * len(items)
    errors: list[BaseException] = []

    def work(start: int) -> None:
        try:
            for i in range(start, len(items), threads):
                if errors:
                    return
                results[i] = fn(items[i])
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if errors:
        raise errors[0]
    return results


class _ObjectWriter:
    """Adds files to the object store: read once, hashing and writing a temporary copy, then rename.

    The object's name is the hash of exactly the bytes written, so it is right even if the source file
    changes while it is read. Few system calls per file: this runs 10,000 times for a big tree.
    """

    def __init__(self, home: str) -> None:
        self.home = home
        tmp_dir = os.path.join(home, "objects", "tmp")
        os.makedirs(tmp_dir, exist_ok=True)
        self.prefix = f"{tmp_dir}/{os.getpid()}-{time.monotonic_ns()}-"
        self.made: set[str] = set()
        self._numbers = itertools.count()  # next() on a count is atomic: unique names across threads

    def add(self, f: _File) -> str:
        tmp = f"{self.prefix}{next(self._numbers)}.tmp"
        digest = hashlib.sha256()
        buf = bytearray(min(max(f.size, 4096), _CHUNK))
        view = memoryview(buf)
        try:
            src = os.open(f.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SnapshotError(f"{f.rel} vanished while the snapshot was taken") from None
        try:
            dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o555 if f.executable else 0o444)
            try:
                while True:
                    n = os.readv(src, [buf])
                    if not n:
                        break
                    chunk = view[:n]
                    digest.update(chunk)
                    while chunk:
                        chunk = chunk[os.write(dst, chunk):]
            finally:
                os.close(dst)
            hexdigest = digest.hexdigest()
            final = object_path(self.home, hexdigest, f.executable)
            parent = final[:final.rindex("/")]
            if parent not in self.made:
                os.makedirs(parent, exist_ok=True)
                self.made.add(parent)
            try:
                os.link(tmp, final)  # never replace: runs already link the existing object
            except FileExistsError:
                _touch(final)  # reused: fresh for `tflaunch gc` (see the module's notes)
            return hexdigest
        finally:
            os.close(src)
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM, errno.ENOTSUP, errno.EACCES):
            raise
        shutil.copyfile(src, dst)
        shutil.copymode(src, dst)


def _touch(path: str) -> bool:
    """Mark ``path`` as in use now (its mtime), for ``tflaunch gc``; False when it is not there. What this
    user may not touch (another user's, in a group's home) counts as there when it is."""
    try:
        os.utime(path)
        return True
    except FileNotFoundError:
        return False
    except OSError:
        return os.path.lexists(path)


def _link(job: tuple[str, str, Any]) -> tuple[str, str, Any] | None:
    """Link one (object, target); return the job if its object is missing (the store was cleaned)."""
    try:
        _link_or_copy(job[0], job[1])
        return None
    except FileNotFoundError:
        return job


def _tree_key(tree: dict[str, Any]) -> str:
    return hashlib.sha256(fsio.json_dumps([tree["dirs"], tree["files"], tree["symlinks"]]).encode()).hexdigest()


def _build_tree(home: str, key: str, tree: dict[str, Any], sources: dict[str, _File], threads: int) -> str:
    """Create ``trees/<key>`` (hard links into objects/) and its listing unless they exist; return its path.
    An object gone from the store is stored again from ``sources`` (rel -> the file scanned)."""
    trees = os.path.join(home, "trees")
    final = os.path.join(trees, key)
    listing = final + ".json"
    if not os.path.exists(listing):  # first: a tree whose listing went missing gets it back
        os.makedirs(trees, exist_ok=True)
        fsio.atomic_write_json(listing, tree, compact=True)
    if os.path.isdir(final):
        return final
    staging = os.path.join(trees, f".new-{key}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.mkdir(staging)
        for d in tree["dirs"]:
            os.mkdir(f"{staging}/{d}")
        jobs = [(object_path(home, digest, executable), f"{staging}/{rel}", (rel, digest, executable))
                for rel, digest, _size, executable in tree["files"]]
        for _, target, (rel, digest, executable) in (j for j in _parallel(jobs, _link, threads) if j is not None):
            _store_again(home, key, sources.get(rel), rel, digest, executable, target)
        for rel, link_target in tree["symlinks"]:
            os.symlink(link_target, f"{staging}/{rel}")
        try:
            os.rename(staging, final)
        except OSError as exc:  # another run built the same tree first
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _store_again(home: str, key: str, source: _File | None, rel: str, digest: str, executable: bool,
                 target: str) -> None:
    """Store an object that was gone (removed by ``tflaunch gc``) again from its source file and link it."""
    for _ in range(_HOLD_TRIES):
        if source is None:
            raise SnapshotError(f"snapshot tree {key[:12]}: the stored copy of {rel} is gone from {home}/objects "
                                "and there is no source file to store it from again")
        if _ObjectWriter(home).add(source) != digest:
            raise SnapshotError(f"{rel} changed while the snapshot was taken; run again")
        if _link((object_path(home, digest, executable), target, None)) is None:
            return
    raise SnapshotError(f"the stored copy of {rel} keeps disappearing from {home}/objects; run again")


def _hold(home: str, key: str, rebuild: Any) -> None:
    """Touch the tree's directory and listing (in use now), rebuilding what is missing: before the run's
    manifest is written (a gc looking later sees a fresh tree) and after (a gc that missed the manifest
    either sees the touch and puts the tree back, or took it before, and it is built again here)."""
    tree_dir = os.path.join(home, "trees", key)
    for _ in range(_HOLD_TRIES):
        held = _touch(tree_dir)
        if _touch(tree_dir + ".json") and held:
            return
        log.debug("snapshot tree %s was gone (tflaunch gc?): building it again", key[:12])
        rebuild()
    raise SnapshotError(f"snapshot tree {key[:12]} keeps disappearing from {home}/trees (a `tflaunch gc --grace 0` "
                        "running meanwhile?); run again")


def store(result: Scan, home: str, run_dir: str, threads: int | None = None, progress: Any = None) -> dict[str, Any]:
    """Store the snapshot under ``home`` and make it the run's ``snapshot/``; return the run's manifest
    (``progress(file)``: called, from any of the threads, for each file read and stored).

    File contents go to ``objects/`` once; a snapshot's tree (every directory, file and link) is
    built once as ``trees/<sha256 of its listing>/`` of hard links to the objects, and the run's
    ``snapshot`` is a relative link to it: re-running an unchanged tree stats the files and writes
    two small files, whatever the tree's size.
    """
    threads = threads or min(4, os.cpu_count() or 1)
    cache_file = _cache_path(home, result.root)
    cache = _load_cache(cache_file, result.root)
    entries, last = cache["entries"], cache["tree"]
    racy_after = result.started_ns - RACY_WINDOW_NS
    digests: list[str | None] = []
    misses = []
    for f in result.files:
        cached = entries.get(f.rel)
        if cached and tuple(cached[:4]) == f.key and cached[5] == f.executable:
            digests.append(cached[4])  # a cache hit reads nothing
        else:
            digests.append(None)
            misses.append(f)
    if misses:
        add = _ObjectWriter(home).add
        stored = iter(_parallel(misses, add if progress is None else lambda f: (add(f), progress(f))[0], threads))
        digests = [d if d is not None else next(stored) for d in digests]
    symlinks = [list(s) for s in result.symlinks]
    unchanged = (not misses and len(entries) == len(result.files) and isinstance(last.get("key"), str)
                 and last.get("dirs") == result.dirs and last.get("symlinks") == symlinks
                 and os.path.isdir(os.path.join(home, "trees", last["key"])))

    def listing() -> dict[str, Any]:
        return {"dirs": result.dirs, "files": [[f.rel, d, f.size, f.executable] for f, d in zip(result.files, digests)],
                "symlinks": symlinks}

    if unchanged:  # every file, directory and link as last time: the same tree, no listing to hash
        key = last["key"]
        tree_dir = os.path.join(home, "trees", key)
    else:
        tree = listing()
        key = _tree_key(tree)
        tree_dir = _build_tree(home, key, tree, {f.rel: f for f in result.files}, threads)

    def rebuild() -> None:  # the tree was removed meanwhile (tflaunch gc): the same one again
        tree = listing()
        if _tree_key(tree) != key:
            raise SnapshotError(f"snapshot tree {key[:12]} was removed meanwhile and the stat cache does not "
                                "describe it; run again")
        _build_tree(home, key, tree, {f.rel: f for f in result.files}, threads)

    _hold(home, key, rebuild)  # before the manifest: a gc looking from now on sees the tree fresh
    os.symlink(os.path.relpath(tree_dir, run_dir), os.path.join(run_dir, "snapshot"))
    manifest = {
        "format": 2,
        "tree": key,
        "source_directory": result.root,
        "entry_script": result.entry_script,
        "file_count": len(result.files),
        "total_bytes": result.total_bytes,
        "notes": result.notes,
    }
    fsio.atomic_write_json(os.path.join(run_dir, MANIFEST), manifest)
    _hold(home, key, rebuild)  # after it: what a gc that missed the manifest took is made again
    if not unchanged:
        new_entries = {f.rel: [*f.key, d, f.executable] for f, d in zip(result.files, digests)
                       if f.key[1] < racy_after and f.key[2] < racy_after}
        remember = {"key": key, "dirs": result.dirs, "symlinks": symlinks}
        try:
            os.makedirs(os.path.dirname(cache_file), exist_ok=True)
            fsio.atomic_write_json(cache_file, {"root": result.root, "entries": new_entries, "tree": remember},
                                   fsync=False, compact=True)
        except OSError as exc:  # only a cache: a failure costs time next run, nothing else
            log.debug("could not write snapshot stat cache %s: %s", cache_file, exc)
    for note in result.notes:
        log.warning("snapshot: %s", note)
    return manifest


def link(home: str, from_run_dir: str, run_dir: str) -> dict[str, Any]:
    """Give ``run_dir`` the snapshot of the run in ``from_run_dir`` (a sweep's trials: the sweep's
    snapshot, without reading the source directory again); return the manifest."""
    manifest = fsio.read_json(os.path.join(from_run_dir, MANIFEST))
    key = manifest["tree"]
    tree_dir = os.path.join(home, "trees", key)

    def rebuild() -> None:  # from the listing and the objects (there is no source directory to read)
        try:
            tree = tree_listing(home, manifest)
        except FileNotFoundError:
            raise SnapshotError(f"snapshot tree {key[:12]} of {from_run_dir} is gone from {home}/trees") from None
        _build_tree(home, key, tree, {}, 1)

    _hold(home, key, rebuild)
    os.symlink(os.path.relpath(tree_dir, run_dir), os.path.join(run_dir, "snapshot"))
    fsio.atomic_write_json(os.path.join(run_dir, MANIFEST), manifest)
    _hold(home, key, rebuild)
    return manifest


def _await_tree(home: str, key: str) -> None:
    """Wait a little for a tree that is missing: a gc checking it puts it back at once."""
    tree_dir = os.path.join(home, "trees", key)
    deadline = time.monotonic() + _TREE_WAIT
    while not (os.path.isdir(tree_dir) and os.path.isfile(tree_dir + ".json")) and time.monotonic() < deadline:
        time.sleep(0.01)


def tree_listing(home: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """The full listing (dirs, files with digests, symlinks) of a run's snapshot."""
    path = os.path.join(home, "trees", manifest["tree"] + ".json")
    try:
        return fsio.read_json(path)
    except FileNotFoundError:
        _await_tree(home, manifest["tree"])
        return fsio.read_json(path)


def materialize(manifest: dict[str, Any], home: str, dest: str) -> None:
    """Create a private, writable copy of the snapshot in ``dest`` (which must not exist)."""
    for attempt in range(3):
        try:
            _copy_out(manifest, home, dest)
            return
        except FileNotFoundError:
            if attempt == 2 or not os.path.isdir(dest):  # dest's parent is missing: not the tree
                raise
            shutil.rmtree(dest, ignore_errors=True)
            _await_tree(home, manifest["tree"])


def _copy_out(manifest: dict[str, Any], home: str, dest: str) -> None:
    tree = tree_listing(home, manifest)
    source = os.path.join(home, "trees", manifest["tree"])
    os.makedirs(dest)
    for d in tree["dirs"]:
        os.mkdir(os.path.join(dest, d))
    for rel, _digest, _size, executable in tree["files"]:
        target = os.path.join(dest, rel)
        shutil.copyfile(os.path.join(source, rel), target)
        if executable:
            os.chmod(target, 0o755)
    for rel, link in tree["symlinks"]:
        os.symlink(link, os.path.join(dest, rel))
