"""Runs as one file: ``runs export RUN... -o runs.tar[.gz]`` (here) and ``runs import`` (its reader and checks:
:mod:`tflaunch.history.archive_import`).

An archive is a plain tar file (gzip-compressed when its name ends in ``.gz`` or ``.tgz``), self-describing::

    tflaunch-archive.json                      first member: the manifest (below)
    runs/<id>/...                              each run's record as it is on disk: run.json, status.json,
                                               events.jsonl, snapshot.json, outputs/, logs/, metrics/,
                                               tflaunch_logs/, git.patch, ...
    trees/<sha256>.json                        the listing of each snapshot tree the runs use
    objects/ab/cdef...[.x]                     the snapshot file contents they need, once each
    models/<name>/<version>/model.json, files/ with --models: the registered versions made from the runs
                                               (a file that is a hard link to a run's file travels as a
                                               tar hard link to that run's member)

Left out of a run: ``snapshot`` (a link into the home's ``trees/``, made again by the importing home from
``snapshot.json``), ``work/`` (the working copy of a running job), ``lease.json`` (the supervisor's
heartbeat: an imported run must never look alive), ``.reserve``, ``metrics/.cache-*`` (a rebuildable
cache) and the store's temporary files. A symbolic link of a run that leads out of the run (absolute, or
through ``..``) is left out with a warning: an importer refuses such links.

The manifest: ``format`` (1), ``kind`` (``tflaunch-runs-archive``), ``tflaunch_version``, ``created``,
``runs`` (``[{"id", "experiment", "status"}]``), ``trees`` (ids), ``objects`` (count), ``models``
(``[{"name", "version", "source_run"}]``), ``includes`` (what kinds of files travel), ``skipped`` (links
left out), ``members`` (how many members follow the manifest) and ``bytes`` (the size of their file
data): an archive cut short at a member boundary is still found out.

Only finished runs (Completed, Failed, Canceled) are exported: a run still being recorded is refused.
"""
from __future__ import annotations

import logging
import os
import posixpath
import re
import stat
import tarfile
import time

from .. import fsio
from .._version import __version__
from ..errors import TflaunchError
from .layout import TERMINAL, now_iso
from .snapshot import MANIFEST as SNAPSHOT_MANIFEST
from .snapshot import object_path

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

    from .store import RunRecord, Store

__all__ = ["ArchiveError", "export_runs", "walk_run", "link_stays_inside", "compression_of",
           "ARCHIVE_FORMAT", "ARCHIVE_KIND", "MANIFEST_NAME"]

log = logging.getLogger(__name__)

ARCHIVE_FORMAT = 1
ARCHIVE_KIND = "tflaunch-runs-archive"
MANIFEST_NAME = "tflaunch-archive.json"
SKIPPED_TOP = frozenset({"snapshot", "work", "lease.json", ".reserve",  # never in an archive's run
                         "start-secrets.json"})  # (tflaunch.history.withheld.START_FILE: secret values)
TREE_RE = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20


class ArchiveError(TflaunchError):
    """An archive cannot be written or read: a run that is not finished, a truncated or unsafe archive,
    a conflict with what the importing home holds. Nothing was written."""

    exit_code = 2


def compression_of(path: str) -> str:
    """``"gz"`` for ``*.tar.gz`` / ``*.tgz``, ``""`` for ``*.tar``; anything else is an error."""
    name = os.path.basename(path).lower()
    if name.endswith((".tar.gz", ".tgz")):
        return "gz"
    if name.endswith(".tar"):
        return ""
    raise ArchiveError(f"{path}: name the archive *.tar, *.tar.gz or *.tgz")


def included(parts: list[str]) -> bool:
    """Whether a run file (path relative to the run, split on ``/``) travels in an archive."""
    if parts[0] in SKIPPED_TOP:
        return False
    name = parts[-1]
    if parts[0] == "metrics" and len(parts) == 2 and name.startswith(".cache-"):
        return False
    return not (name.startswith(".") and name.endswith(".tmp"))  # fsio's temporary files


def link_stays_inside(rel: str, target: str) -> bool:
    """Whether symbolic link ``rel`` (relative to a root) -> ``target`` names a path inside that root."""
    if not target or target.startswith("/") or "\x00" in target:
        return False
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
    return resolved != ".." and not resolved.startswith("../") and not resolved.startswith("/")


def walk_run(run_dir: str) -> tuple[list[tuple[str, str, os.stat_result, str]], list[str]]:
    """The entries of a run that travel: ``(rel, kind, lstat, link target)`` with kind ``dir``, ``file``,
    ``link``, sorted, parents first; and the links left out because they lead out of the run."""
    entries: list[tuple[str, str, os.stat_result, str]] = []
    skipped: list[str] = []
    real_root = os.path.realpath(run_dir)

    def walk(abs_dir: str, rel_dir: str) -> None:
        with os.scandir(abs_dir) as it:
            children = sorted(it, key=lambda e: e.name)
        for entry in children:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            parts = rel.split("/")
            if not included(parts):
                continue
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(entry.path)
                real = os.path.realpath(entry.path)
                if link_stays_inside(rel, target) and (real == real_root or real.startswith(real_root + os.sep)):
                    entries.append((rel, "link", st, target))
                else:
                    skipped.append(rel)
            elif stat.S_ISDIR(st.st_mode):
                entries.append((rel, "dir", st, ""))
                walk(entry.path, rel)
            elif stat.S_ISREG(st.st_mode):
                entries.append((rel, "file", st, ""))
            else:
                skipped.append(rel)

    walk(run_dir, "")
    return entries, skipped


def _info(name: str, kind: str, st: os.stat_result, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = int(st.st_mtime)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if kind == "file":
        info.size = st.st_size
    elif kind == "dir":
        info.type = tarfile.DIRTYPE
    elif kind == "link":
        info.type, info.linkname = tarfile.SYMTYPE, linkname
    else:  # a hard link to an earlier member
        info.type, info.linkname = tarfile.LNKTYPE, linkname
    return info


class _Plan:
    """What an export writes, member by member, decided before the first byte is written."""

    def __init__(self) -> None:
        self.members: list[tuple[tarfile.TarInfo, str | None]] = []  # (header, file to copy the data from)
        self.bytes = 0
        self.skipped: list[str] = []
        self.trees: list[str] = []
        self.objects: set[str] = set()
        self.inodes: dict[tuple[int, int], str] = {}  # a run file's (device, inode) -> its member name

    def add(self, name: str, kind: str, st: os.stat_result, path: str | None, linkname: str = "") -> None:
        self.members.append((_info(name, kind, st, linkname), path if kind == "file" else None))
        if kind == "file":
            self.bytes += st.st_size

    def add_run(self, record: RunRecord) -> None:
        entries, skipped = walk_run(record.dir)
        for rel, kind, st, target in entries:
            name = f"runs/{record.id}/{rel}"
            self.add(name, kind, st, os.path.join(record.dir, rel), target)
            if kind == "file":
                self.inodes.setdefault((st.st_dev, st.st_ino), name)
        for rel in skipped:
            log.warning("run %s: %s is a link leading out of the run (or not a file): left out of the archive",
                        record.id, rel)
            self.skipped.append(f"runs/{record.id}/{rel}")

    def add_snapshot(self, home: str, record: RunRecord) -> None:
        try:
            manifest = fsio.read_json(record.path(SNAPSHOT_MANIFEST))
        except FileNotFoundError:
            return  # the run ended before its snapshot was stored
        except (OSError, ValueError) as exc:
            raise ArchiveError(f"run {record.id}: cannot read {SNAPSHOT_MANIFEST}: {exc}") from None
        key = manifest.get("tree") if isinstance(manifest, dict) else None
        if not isinstance(key, str) or not TREE_RE.match(key):
            raise ArchiveError(f"run {record.id}: {SNAPSHOT_MANIFEST} names no snapshot tree")
        if key in self.trees:
            return
        listing_path = os.path.join(home, "trees", key + ".json")
        try:
            listing = fsio.read_json(listing_path)
            st = os.stat(listing_path)
            files = listing["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArchiveError(f"run {record.id}: its snapshot tree {key[:12]} cannot be read from {home} "
                               f"({exc})") from None
        self.trees.append(key)
        self.add(f"trees/{key}.json", "file", st, listing_path)
        for rel, digest, _size, executable in files:
            ident = digest + (".x" if executable else "")
            if ident in self.objects:
                continue
            path = object_path(home, digest, executable)
            if not os.path.isfile(path):  # the object was cleaned up: the tree still holds the content
                path = os.path.join(home, "trees", key, *rel.split("/"))
            try:
                st = os.stat(path)
            except OSError:
                raise ArchiveError(f"run {record.id}: snapshot file {rel} ({digest[:12]}) is missing from "
                                   f"{home}") from None
            self.objects.add(ident)
            self.add(f"objects/{digest[:2]}/{digest[2:]}{'.x' if executable else ''}", "file", st, path)

    def add_model(self, model: Any) -> None:
        prefix = f"models/{model.name}/{model.version}"
        entries, skipped = walk_run(model.dir)  # the same walk: model.json and files/
        if skipped:
            raise ArchiveError(f"model {model.id}: {skipped[0]} is not a file, directory or link inside it")
        for rel, kind, st, target in entries:
            run_member = self.inodes.get((st.st_dev, st.st_ino)) if kind == "file" else None
            if run_member is not None:  # registered as a hard link into the run: it travels as one
                self.add(f"{prefix}/{rel}", "hardlink", st, None, run_member)
            else:
                self.add(f"{prefix}/{rel}", kind, st, os.path.join(model.dir, rel), target)


def _records(store: Store, refs: list[str]) -> list[RunRecord]:
    records: list[RunRecord] = []
    for ref in refs:
        record = store.run(ref)
        if all(record.id != r.id for r in records):
            records.append(record)
    return records


def export_runs(store: Store, refs: list[str], output: str, *, models: bool = False) -> dict[str, Any]:
    """Write the runs ``refs`` (ids, prefixes or suffixes) of ``store`` to the archive ``output``; with
    ``models``, also the model versions registered from them. Returns the archive's manifest (plus
    ``path``). The archive appears complete or not at all (written under a temporary name, then renamed)."""
    compression = compression_of(output)
    records = _records(store, refs)
    runs = []
    for record in records:
        status = record.read_status()
        if status is None:
            raise ArchiveError(f"run {record.id}: status.json is missing or unreadable")
        if status.get("status") not in TERMINAL:
            raise ArchiveError(f"run {record.id} is {status.get('status')}: only finished runs can be exported "
                               "(wait for it to end, or cancel it)")
        runs.append({"id": record.id, "experiment": status.get("experiment"), "status": status.get("status")})
    plan = _Plan()
    try:
        for record in records:
            plan.add_run(record)
        for record in records:
            plan.add_snapshot(store.home, record)
        chosen = []
        if models:
            from .models import Model

            ids = {r.id for r in records}
            chosen = [m for m in Model.list(store.home) if m.run_id in ids]
            for model in chosen:
                plan.add_model(model)
    except OSError as exc:
        raise ArchiveError(f"cannot read {exc.filename or store.home}: {exc.strerror or exc}") from None
    manifest = {
        "format": ARCHIVE_FORMAT, "kind": ARCHIVE_KIND, "tflaunch_version": __version__, "created": now_iso(),
        "runs": runs, "trees": plan.trees, "objects": len(plan.objects),
        "models": [{"name": m.name, "version": m.version, "source_run": m.run_id} for m in chosen],
        "includes": {"records": True, "snapshots": True, "outputs": True, "logs": True, "metrics": True,
                     "models": bool(models)},
        "skipped": plan.skipped, "members": len(plan.members), "bytes": plan.bytes,
    }
    _write(output, compression, manifest, plan)
    log.info("exported %d run(s), %d snapshot tree(s), %d object(s), %d model version(s): %d bytes of files",
             len(runs), len(plan.trees), len(plan.objects), len(chosen), plan.bytes)
    return {**manifest, "path": os.path.abspath(output)}


def _write(output: str, compression: str, manifest: dict[str, Any], plan: _Plan) -> None:
    import io

    output = os.path.abspath(output)
    tmp = os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    data = fsio.json_dumps(manifest, indent=1).encode()
    try:
        head = tarfile.TarInfo(MANIFEST_NAME)
        head.size, head.mtime, head.mode = len(data), int(time.time()), 0o644
        if compression:
            with open(tmp, "xb") as raw:
                with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT, compresslevel=6) as tar:
                    tar.copybufsize = CHUNK
                    tar.addfile(head, io.BytesIO(data))
                    for info, path in plan.members:
                        if path is None:
                            tar.addfile(info)
                            continue
                        with open(path, "rb") as fh:
                            tar.addfile(info, fh)
                raw.flush()
                os.fsync(raw.fileno())
        else:
            _write_plain(tmp, head, data, plan)
        os.replace(tmp, output)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            hint = " (the disk is full)" if fsio.is_disk_full(exc) else ""
            raise ArchiveError(f"cannot write {output}: {exc.strerror or exc}"
                               f"{' (' + str(exc.filename) + ')' if exc.filename else ''}{hint}") from None
        raise


def _write_plain(tmp: str, head: tarfile.TarInfo, data: bytes, plan: _Plan) -> None:
    """An uncompressed archive, written as tar lays it out (PAX headers, data padded to 512 bytes, two zero
    blocks, the whole padded to 10 KiB records), each file's data copied in the kernel where it can be."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    written = 0

    def put(buf: bytes) -> None:
        nonlocal written
        view = memoryview(buf)
        while view:
            view = view[os.write(fd, view):]
        written += len(buf)

    def pad(size: int) -> None:
        if size % tarfile.BLOCKSIZE:
            put(tarfile.NUL * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))

    try:
        put(head.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + data)
        pad(len(data))
        for info, path in plan.members:
            put(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            if path is None:
                continue
            src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                written += _copy_fd(src, fd, info.size, path)
            finally:
                os.close(src)
            pad(info.size)
        put(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        if written % tarfile.RECORDSIZE:
            put(tarfile.NUL * (tarfile.RECORDSIZE - written % tarfile.RECORDSIZE))
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_fd(src: int, dst: int, size: int, path: str) -> int:
    """Copy ``size`` bytes from ``src`` to ``dst`` at their positions; a file that shrank is an error."""
    left = size
    fast = hasattr(os, "copy_file_range")
    while left > 0:
        if fast:
            try:
                n = os.copy_file_range(src, dst, min(left, 1 << 30))
            except OSError:  # another filesystem, an old kernel: plain reads
                fast = False
                continue
        else:
            chunk = os.read(src, min(left, CHUNK))
            n = len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst, view):]
        if n <= 0:
            raise ArchiveError(f"{path} shrank while it was exported")
        left -= n
    return size
