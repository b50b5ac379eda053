"""``tflaunch gc``: remove from a home what nothing uses any more, safely while other hosts create runs in it.

What goes, per kind (:data:`KINDS`, the fields of the report):

* ``trees``: ``trees/<key>/`` and ``trees/<key>.json`` that no run names (its ``snapshot.json``, or its
  ``snapshot`` link): runs in ``runs/`` (``.new-*`` too), in the trash ``trash/`` (they stay restorable)
  and in a ``runs import`` being checked (``.import-*/runs/``).
* ``objects``: ``objects/ab/cdef...`` that no tree listing left names and no tree links.
* ``leftovers``: what interrupted writers left: ``runs/.new-<id>/`` (a Ctrl-C while a run was created; not
  while the process in its lease lives), ``.import-*/`` (a killed ``runs import``), ``trees/.new-*`` and
  ``objects/tmp/*`` (a killed snapshot; not while their pid lives here), ``lib/.new-*``, ``envs/.build-*``
  (not while a build holds the key's lock), ``envs/.trash-*``, ``trash/.purge-*``, temporary files, and a
  killed gc's claims (put back when the original is missing).
* ``lib``: package copies ``lib/<key>/`` (their mtime: when a run last put one on its PYTHONPATH) unused
  for ``unused_for`` and since before every run that has not ended was created.
* ``environments``: ``envs/<key>/`` whose ``.last-used`` is older than ``unused_for``, that no run that has
  not ended uses and no build holds.
* ``caches``: ``cache/stat/`` files (the snapshot stat cache) of source directories that are gone, as this
  host sees them, and ``cache/envprobe/`` files of interpreters that changed or are gone; either when
  older than ``unused_for``. (Rebuildable: removing one costs a re-read.)

Nothing younger than the grace (by mtime; and, whatever the grace, nothing changed in the last 2 s, for
coarse timestamps) is removed. The protocol with the snapshot writer (:mod:`tflaunch.history.snapshot`):

1. The gc lists the candidates with their stat (mtime, link count) first, and only then reads the
   references (which trees the runs name; for objects: every tree listing left).
2. It claims each unreferenced candidate by renaming it within its directory (nothing else about it
   changes), stats it again and removes it only when its mtime and link count are as listed: otherwise
   it puts it back. A tree it removes is renamed to ``.rm-*`` first, so no one recovers half of it.
3. The writer touches an object it finds stored already, and the tree's directory and listing before it
   writes the run's manifest and again after; what is missing then is made again; a tree build links
   objects (their link count changes) and stores again those that are gone.

So a gc that read the references before a manifest was written either claims the tree after the touch
that follows it (it sees the new mtime and puts it back) or before (the touch fails and the writer
builds the tree again); every later gc sees the manifest. The same holds for an object linked into a
new tree after the gc listed it, and for a package copy or environment a run resolves meanwhile (their
marks are touched, and checked after the touch: missing means made again).
"""
from __future__ import annotations

import logging
import os
import re
import stat
import time

from .. import fsio
from ..errors import SpecError, StoreError
from .layout import RUN_ID_RE, STORE_FORMAT, TERMINAL, TRASH_DIR, parse_iso, resolve_home
from . import gc_fs as fs
from .snapshot import MANIFEST

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["collect_garbage", "parse_age", "DEFAULT_GRACE", "DEFAULT_UNUSED_FOR", "KINDS"]

log = logging.getLogger(__name__)

DEFAULT_GRACE = 3600.0
DEFAULT_UNUSED_FOR = 30 * 86400.0
RACY_SECONDS = 2.0  # whatever the grace, no tree or object changed this recently (coarse timestamps)
BUSY_SECONDS = 2.0  # whatever the grace, no leftover whose writer is unknown changed this recently
KINDS = ("objects", "trees", "leftovers", "lib", "environments", "caches")
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_OBJECT_RE = re.compile(r"^[0-9a-f]{62}(\.x)?$")
_HEX2_RE = re.compile(r"^[0-9a-f]{2}$")
_LIB_RE = re.compile(r"^[0-9a-f]{16}$")
_ENV_RE = re.compile(r"^[0-9a-f]{20}$")
_CLAIM_RE = re.compile(r"^\.gc-(.+)-(\d+)-[0-9a-f]{8}$")     # .gc-<name>-<pid>-<hex>: claimed, undecided
_DOOMED_RE = re.compile(r"^\.rm-.+-(\d+)-[0-9a-f]{8}$")      # .rm-<name>-<pid>-<hex>: being removed
_TMP_RE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")      # tflaunch.fsio's temporary files
_TREE_STAGING_RE = re.compile(r"^\.new-[0-9a-f]{64}-(\d+)-")  # snapshot (pid) and runs import (pid) builds
_OBJECT_TMP_RE = re.compile(r"^(\d+)-\d+-\d+\.tmp$")          # snapshot's object writer


def parse_age(text: Any, option: str = "--grace") -> float:
    """Seconds in ``3600``, ``0``, ``30d``, ``12h``, ``90m``, ``45s`` or ``2w``; SpecError naming ``option``."""
    from .trash import parse_duration

    value = str(text).strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parse_duration(value)
        except SpecError:
            raise SpecError(f"{option}: {text!r} is not an age: give seconds (3600) or a number and a unit "
                            "(30d, 12h, 90m, 45s, 2w)") from None
    if not 0 <= seconds < float("inf"):
        raise SpecError(f"{option}: must be 0 or more seconds, got {text!r}")
    return seconds


def collect_garbage(home: str | os.PathLike | None = None, *, grace: float = DEFAULT_GRACE,
                    unused_for: float = DEFAULT_UNUSED_FOR, dry_run: bool = False) -> dict[str, Any]:
    """Remove what nothing uses from the home (``dry_run``: nothing; the report says what would go) and
    return the report: ``home``, ``dry_run``, ``grace_seconds``, ``unused_for_seconds``, ``removed`` (per
    kind of :data:`KINDS`: ``count``, ``bytes``, ``paths`` relative to the home), ``count``, ``bytes``,
    ``kept`` (``young``: younger than the grace; ``in_use``: used meanwhile, or by a run that has not
    ended; ``writer_alive``: an interrupted-looking write whose writer lives) and ``referenced``
    (``runs``, ``deleted_runs``, ``trees``)."""
    for value, option in ((grace, "grace"), (unused_for, "unused_for")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise SpecError(f"{option}: must be 0 or more seconds, got {value!r}")
    gc = _Gc(resolve_home(home), float(grace), float(unused_for), bool(dry_run))
    gc.run()
    return gc.report()


class _Gc:
    """One collection: its options, the time it started, what it found and what it removed."""

    def __init__(self, home: str, grace: float, unused_for: float, dry_run: bool) -> None:
        _check_home(home)
        self.home, self.grace, self.unused_for, self.dry_run = home, grace, unused_for, dry_run
        self.start = time.time()
        self.age_cutoff = self.start - max(grace, RACY_SECONDS)
        self.busy_cutoff = self.start - max(grace, BUSY_SECONDS)
        self.unused_cutoff = min(self.start - unused_for, self.age_cutoff)
        self.removed = {kind: {"count": 0, "bytes": 0, "paths": []} for kind in KINDS}
        self.kept = {"young": 0, "in_use": 0, "writer_alive": 0}
        self.referenced = {"runs": 0, "deleted_runs": 0, "trees": 0}
        self.uncertain: list[str] = []      # records that do not read: no tree or object is removed then
        self.oldest_active = float("inf")   # creation time of the oldest run that has not ended
        self.active_envs: set[str] = set()  # environment keys (20 hex) of runs that have not ended
        self.dropped_trees: set[str] = set()

    def run(self) -> None:
        try:
            _recover_claims(self)
            _trees(self)
            _objects(self)
            _leftovers(self)
            _lib(self)
            _environments(self)
            _caches(self)
        except OSError as exc:
            raise StoreError(f"gc of {self.home}: {exc.strerror or exc}"
                             + (f" ({exc.filename})" if exc.filename else "")) from None

    def path(self, *parts: str) -> str:
        return os.path.join(self.home, *parts)

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.home).replace(os.sep, "/")

    def gone(self, kind: str, path: str, nbytes: int) -> None:
        entry = self.removed[kind]
        entry["count"] += 1
        entry["bytes"] += int(nbytes)
        entry["paths"].append(self.rel(path))
        log.debug("gc: %s %s (%d bytes)", "would remove" if self.dry_run else "removed", self.rel(path), nbytes)

    def old(self, mtime: float) -> bool:
        return mtime < self.age_cutoff

    def idle(self, path: str, renamed: bool = False) -> bool:
        """Whether nothing at or under ``path`` changed within the grace (a leftover's writer is gone)."""
        return fs.newest(path, renamed) < self.busy_cutoff

    def report(self) -> dict[str, Any]:
        for entry in self.removed.values():
            entry["paths"].sort()
        return {"home": self.home, "dry_run": self.dry_run, "grace_seconds": self.grace,
                "unused_for_seconds": self.unused_for, "removed": self.removed,
                "count": sum(e["count"] for e in self.removed.values()),
                "bytes": sum(e["bytes"] for e in self.removed.values()),
                "kept": dict(self.kept), "referenced": dict(self.referenced)}

    def remove_dir(self, kind: str, path: str, *, only_single: bool = False) -> None:
        """Remove a directory (a leftover, a package copy): renamed to ``.rm-*`` first."""
        nbytes = fs.size(path, only_single)
        if self.dry_run:
            self.gone(kind, path, nbytes)
        elif fs.discard(path):
            self.gone(kind, path, nbytes)

    def remove_file(self, kind: str, path: str, nbytes: int) -> None:
        if not self.dry_run:
            try:
                os.unlink(path)
            except FileNotFoundError:
                return
        self.gone(kind, path, nbytes)


def _check_home(home: str) -> None:
    if not os.path.isdir(home):
        raise SpecError(f"--home: {home} does not exist (give the home with --home or TFLAUNCH_HOME)")
    marker = os.path.join(home, "store.json")
    if not os.path.isfile(marker):
        raise SpecError(f"--home: {home} is not a tflaunch home (it has no store.json); nothing removed")
    try:
        fmt = fsio.read_json(marker).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt != STORE_FORMAT:
        raise StoreError(f"{home} holds store format {fmt}; this tflaunch reads format {STORE_FORMAT}; nothing removed")


# -- snapshot trees and objects -------------------------------------------------------------------------------
def _tree_refs(run_dir: str, gc: _Gc) -> set[str]:
    """The trees a run's directory names: its manifest's and its ``snapshot`` link's."""
    keys = set()
    try:
        manifest = fsio.read_json(os.path.join(run_dir, MANIFEST))
        key = manifest.get("tree") if isinstance(manifest, dict) else None
        if isinstance(key, str) and _KEY_RE.match(key):
            keys.add(key)
        else:
            gc.uncertain.append(gc.rel(os.path.join(run_dir, MANIFEST)))
    except (FileNotFoundError, NotADirectoryError):
        pass
    except (OSError, ValueError):
        gc.uncertain.append(gc.rel(os.path.join(run_dir, MANIFEST)))
    try:
        name = os.path.basename(os.readlink(os.path.join(run_dir, "snapshot")))
        if _KEY_RE.match(name):
            keys.add(name)
    except OSError:
        pass
    return keys


def _note_active(gc: _Gc, run_dir: str) -> None:
    """Remember a run that has not ended: when it was created and which environment it uses."""
    from .record import RunRecord
    from .store import Store

    status = _read(os.path.join(run_dir, "status.json"))
    record = RunRecord(Store(gc.home), os.path.basename(run_dir), run_dir)
    if status is not None and status.get("status") in TERMINAL:
        return
    lease = record.lease() or {}
    if not lease.get("slurm_job_id") and record.launcher_state() == "dead":
        return
    created = parse_iso((status or {}).get("created"))
    gc.oldest_active = min(gc.oldest_active, created if created is not None else fs.newest(run_dir) - 86400)
    spec_env = ((_read(os.path.join(run_dir, "run.json")) or {}).get("spec") or {}).get("environment")
    for env in (spec_env, (status or {}).get("environment")):
        if isinstance(env, dict) and isinstance(env.get("key"), str):
            gc.active_envs.add(env["key"][:20])


def _read(path: str) -> dict[str, Any] | None:
    try:
        data = fsio.read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _references(gc: _Gc) -> set[str]:
    """The trees runs name, read in an order that sees a run moving meanwhile: staged imports, runs being
    created, then ``runs/`` and the trash, again until no new run shows up (a run deleted or restored
    between two listings is in the next)."""
    keys: set[str] = set()
    for name in fs.listdir(gc.home):
        if name.startswith(".import-"):
            for run_id in fs.listdir(gc.path(name, "runs")):
                keys |= _tree_refs(gc.path(name, "runs", run_id), gc)
    for name in fs.listdir(gc.path("runs")):
        if name.startswith(".new-") and RUN_ID_RE.match(name[5:]):
            keys |= _tree_refs(gc.path("runs", name), gc)
            _note_active(gc, gc.path("runs", name))
    seen: dict[str, str] = {}
    for _ in range(10):
        new = [(name, where) for where in ("runs", TRASH_DIR) for name in fs.listdir(gc.path(where))
               if RUN_ID_RE.match(name) and name not in seen]
        if not new:
            break
        for name, where in new:
            seen[name] = where
            for place in ("runs", TRASH_DIR, "runs"):  # the run may move while it is read
                run_dir = gc.path(place, name)
                found = _tree_refs(run_dir, gc)
                if found or os.path.isdir(run_dir):
                    keys |= found
                    if place == "runs":
                        _note_active(gc, run_dir)
                    break
    gc.referenced["runs"] = sum(1 for where in seen.values() if where == "runs")
    gc.referenced["deleted_runs"] = len(seen) - gc.referenced["runs"]
    gc.referenced["trees"] = len(keys)
    return keys


def _trees(gc: _Gc) -> None:
    parts: dict[str, list[tuple[str, os.stat_result]]] = {}
    for name in fs.listdir(gc.path("trees")):
        key = name[:-5] if name.endswith(".json") else name
        st = fs.lstat(gc.path("trees", name)) if _KEY_RE.match(key) else None
        if st is not None:
            parts.setdefault(key, []).append((gc.path("trees", name), st))
    referenced = _references(gc)  # after the listing (see the module's notes)
    if gc.uncertain:
        log.warning("gc: %s cannot be read: no snapshot tree or object is removed (fix or remove the record)",
                    ", ".join(gc.uncertain[:3]))
        return
    for key in sorted(set(parts) - referenced):
        listed = sorted(parts[key], key=lambda p: not stat.S_ISDIR(p[1].st_mode))  # the directory first
        if not all(gc.old(st.st_mtime) for _, st in listed):
            gc.kept["young"] += 1
            continue
        if gc.dry_run:
            gc.dropped_trees.add(key)
            gc.gone("trees", gc.path("trees", key), sum(fs.size(p, True) for p, _ in listed))
            continue
        claimed = fs.claim_and_check(gc.kept, listed)
        if claimed is None:
            continue
        nbytes = sum(fs.size(p, True) for p in claimed)
        for path in claimed:
            fs.discard(path)
        gc.gone("trees", gc.path("trees", key), nbytes)


def _listed_objects(gc: _Gc) -> tuple[set[str], dict[str, int]] | None:
    """``ab/cdef...[.x]`` of every object a tree listing names (claimed listings too), and how often the
    trees a dry run would remove link each; None when a listing does not read (no object is removed)."""
    listed: set[str] = set()
    dropped: dict[str, int] = {}
    for name in fs.listdir(gc.path("trees")):
        claim = _CLAIM_RE.match(name)
        base = claim.group(1) if claim else name
        if not base.endswith(".json") or not _KEY_RE.match(base[:-5]):
            continue
        try:
            for _rel, digest, _size_, executable in fsio.read_json(gc.path("trees", name))["files"]:
                rel = f"{digest[:2]}/{digest[2:]}{'.x' if executable else ''}"
                if base[:-5] in gc.dropped_trees:
                    dropped[rel] = dropped.get(rel, 0) + 1
                else:
                    listed.add(rel)
        except FileNotFoundError:
            continue  # removed meanwhile (another gc): its objects are no one's
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("gc: trees/%s cannot be read (%s): no snapshot object is removed", name, exc)
            return None
    return listed, dropped


def _objects(gc: _Gc) -> None:
    """Objects no tree listing names and no tree links (removing one a tree links would free nothing)."""
    if gc.uncertain:
        return
    found = []
    for sub in fs.listdir(gc.path("objects")):
        if _HEX2_RE.match(sub):
            for name in fs.listdir(gc.path("objects", sub)):
                st = fs.lstat(gc.path("objects", sub, name)) if _OBJECT_RE.match(name) else None
                if st is not None:
                    found.append((f"{sub}/{name}", st))
    named = _listed_objects(gc)  # after the listing (see the module's notes)
    if named is None:
        return
    listed, dropped = named
    for rel, st in found:
        if rel in listed:
            continue
        if not gc.old(st.st_mtime):
            gc.kept["young"] += 1
            continue
        if st.st_nlink - dropped.get(rel, 0) > 1:  # a tree (being built, or not listed) links it
            gc.kept["in_use"] += 1
            continue
        path = gc.path("objects", *rel.split("/"))
        if gc.dry_run:
            gc.gone("objects", path, st.st_size)
            continue
        claimed = fs.claim_and_check(gc.kept, [(path, st)])
        if claimed is not None and fs.discard(claimed[0]):
            gc.gone("objects", path, st.st_size)


# -- what interrupted writers left ------------------------------------------------------------------------------
def _recover_claims(gc: _Gc) -> None:
    """A killed gc's claims (``.gc-*``: put back when the original is missing, else removed) and removals
    (``.rm-*``: finished), unless their gc runs here still."""
    places = [("trees",), ("lib",), ("envs",), ("runs",), (TRASH_DIR,), ()]
    for parts in places + [("objects", s) for s in fs.listdir(gc.path("objects")) if _HEX2_RE.match(s)]:
        for name in fs.listdir(gc.path(*parts)):
            claim, doomed = _CLAIM_RE.match(name), _DOOMED_RE.match(name)
            if not (claim or doomed) or fs.alive_here((claim or doomed).group(2 if claim else 1)):
                continue
            path = gc.path(*parts, name)
            original = gc.path(*parts, claim.group(1)) if claim else None
            if original is not None and not os.path.lexists(original):
                if not gc.dry_run:
                    log.info("gc: putting back %s (claimed by a gc that was interrupted)", gc.rel(original))
                    fs.put_back(path, original)
                continue
            gc.remove_dir("leftovers", path, only_single=parts[0] in ("trees", "objects"))


def _leftovers(gc: _Gc) -> None:
    from .record import RunRecord
    from .store import Store

    store = Store(gc.home)
    for name in fs.listdir(gc.path("runs")):  # a run being created: runs/.new-<id>/ (lease.json: its creator)
        path = gc.path("runs", name)
        if not (name.startswith(".new-") and RUN_ID_RE.match(name[5:])):
            continue
        newest = fs.newest(path)
        state = RunRecord(store, name[5:], path).launcher_state() if newest < gc.busy_cutoff else None
        if state is None:
            gc.kept["young"] += 1
        elif state == "alive" or (state == "unknown" and newest > gc.start - 60):  # no lease yet: being written
            gc.kept["writer_alive"] += 1
        else:
            gc.remove_dir("leftovers", path)
    for name in fs.listdir(gc.home):  # a runs import being checked: .import-<random>/
        if name.startswith(".import-"):
            _stale_dir(gc, gc.path(name))
    for name in fs.listdir(gc.path("trees")):
        staging, tmp = _TREE_STAGING_RE.match(name), _TMP_RE.match(name)
        if staging or tmp:
            _stale_dir(gc, gc.path("trees", name), (staging or tmp).group(1), only_single=True)
    for name in fs.listdir(gc.path("objects", "tmp")):
        match = _OBJECT_TMP_RE.match(name)
        if match:
            _stale_dir(gc, gc.path("objects", "tmp", name), match.group(1))
    for name in fs.listdir(gc.path("lib")):
        if name.startswith(".new-"):
            _stale_dir(gc, gc.path("lib", name))
    for name in fs.listdir(gc.path(TRASH_DIR)):
        if name.startswith(".purge-"):  # renamed there by a purge, which then removes it
            _stale_dir(gc, gc.path(TRASH_DIR, name), renamed=True)
    _env_leftovers(gc)
    for parts in (("cache",), ("cache", "stat"), ("cache", "envprobe"), ("experiments",), ()):
        for name in fs.listdir(gc.path(*parts)):
            match = _TMP_RE.match(name)
            if match:
                _stale_dir(gc, gc.path(*parts, name), match.group(1))


def _stale_dir(gc: _Gc, path: str, pid: str | None = None, only_single: bool = False,
               renamed: bool = False) -> None:
    """Remove ``path`` when nothing in it changed within the grace and its writer (``pid``, when the name
    says) does not run here."""
    if not gc.idle(path, renamed):
        gc.kept["young"] += 1
    elif pid is not None and fs.alive_here(pid):
        gc.kept["writer_alive"] += 1
    else:
        gc.remove_dir("leftovers", path, only_single=only_single)


def _env_lock(root: str, short: str) -> Any:
    from ..remote import envbuild_base

    timeout = float(os.environ.get("TFLAUNCH_ENV_LOCK_TIMEOUT") or envbuild_base.DEFAULT_LOCK_TIMEOUT)
    return envbuild_base.Lock(root, short, timeout)


def _env_leftovers(gc: _Gc) -> None:
    root = gc.path("envs")
    for name in fs.listdir(root):
        match = re.match(r"^\.(build|trash)-([0-9a-f]{20})-", name)
        if not match:
            continue
        if match.group(1) == "build" and _env_lock(root, match.group(2)).holder() is not None:
            gc.kept["writer_alive"] += 1
            continue
        _stale_dir(gc, os.path.join(root, name))


# -- package copies, environments, caches -----------------------------------------------------------------------
def _lib(gc: _Gc) -> None:
    """``lib/<key>/``: unused for ``unused_for`` and since before the oldest run that has not ended began
    (its processes may import from it)."""
    cutoff = min(gc.unused_cutoff, gc.oldest_active - 60)
    for name in fs.listdir(gc.path("lib")):
        path = gc.path("lib", name)
        st = fs.lstat(path) if _LIB_RE.match(name) else None
        if st is None or not stat.S_ISDIR(st.st_mode) or st.st_mtime >= cutoff:
            continue
        if gc.dry_run:
            gc.gone("lib", path, fs.size(path))
            continue
        claimed = fs.claim_and_check(gc.kept, [(path, st)])
        if claimed is not None:
            nbytes = fs.size(claimed[0])
            fs.discard(claimed[0])
            gc.gone("lib", path, nbytes)


def _environments(gc: _Gc) -> None:
    """``envs/<key>/``: its ``.last-used`` (else env.json, else itself) older than ``unused_for``, used
    by no run that has not ended, held by no build."""
    root = gc.path("envs")
    for name in fs.listdir(root):
        path = os.path.join(root, name)
        if not _ENV_RE.match(name) or not os.path.isdir(path) or os.path.islink(path):
            continue
        used = fs.lstat(os.path.join(path, ".last-used"))
        mark = used or fs.lstat(os.path.join(path, "env.json")) or fs.lstat(path)
        if mark is None or mark.st_mtime >= gc.unused_cutoff:
            continue
        if name in gc.active_envs:
            gc.kept["in_use"] += 1
            continue
        if _env_lock(root, name).holder() is not None:
            gc.kept["writer_alive"] += 1
            continue
        if gc.dry_run:
            gc.gone("environments", path, fs.size(path))
            continue

        def touched(claimed: list[str]) -> bool:  # a run resolved it meanwhile
            now = fs.lstat(os.path.join(claimed[0], ".last-used"))
            return (now is None) != (used is None) or (now is not None and now.st_mtime_ns != used.st_mtime_ns)

        before = fs.lstat(path)
        claimed = fs.claim_and_check(gc.kept, [(path, before)], touched) if before is not None else None
        if claimed is not None:
            nbytes = fs.size(claimed[0])
            fs.discard(claimed[0])
            gc.gone("environments", path, nbytes)


def _caches(gc: _Gc) -> None:
    """``cache/stat/*.json`` of a source directory that is gone, ``cache/envprobe/*.json`` of an
    interpreter that changed; either, when older than ``unused_for``."""
    from ..env_probe import _stamp

    for sub in ("stat", "envprobe"):
        for name in fs.listdir(gc.path("cache", sub)):
            path = gc.path("cache", sub, name)
            st = fs.lstat(path)
            if not name.endswith(".json") or name.startswith(".") or st is None or not gc.old(st.st_mtime):
                continue
            stale = st.st_mtime < gc.unused_cutoff
            if not stale:
                data = _read(path) or {}
                if sub == "stat":
                    stale = not isinstance(data.get("root"), str) or not os.path.isdir(data["root"])
                else:
                    try:
                        stale = data["stamp"] != _stamp(data["stamp_paths"])
                    except (KeyError, TypeError):
                        stale = True
            if stale:
                gc.remove_file("caches", path, st.st_size)
