"""Writing a model version of :mod:`tflaunch.history.models`: its files copied into a staging directory with
their manifest, then published as the next version number, without locks.

Rules:

* Files are copied into the home: hard-linked when source and home share a filesystem (a hard link is
  not a pointer: deleting the run leaves the model intact), copied otherwise. A file rewritten *in
  place* afterwards through its other link changes the model too;
  :meth:`~tflaunch.history.models.Model.verify` detects that.
* Symbolic links inside a registered tree are kept when they are relative and stay inside the tree;
  any other link (absolute, or leading out of the tree) is refused with an error naming it, never
  followed, so a model can not pull in files from outside what was registered. A link given as the
  source itself (``outputs/model -> model-v3``) is followed.
* Versions are allocated without locks: the complete version (files and ``model.json``) is staged in
  ``.new-<random>``, then renamed to ``<highest version + 1>``; when another registration took that
  number first (``EEXIST``/``ENOTEMPTY``) ``model.json`` is rewritten with the next number and the rename
  retried. A version directory is never empty (it holds ``model.json``), so a rename can never land on
  one. Staging directories older than an hour (a killed registration) are removed by the next
  registration of the same name.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import posixpath
import shutil
import stat
import time

from .. import fsio
from ..errors import SpecError, StoreError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["Stager", "publish", "remove_stale_staging", "version_numbers", "STAGING_PREFIX", "CHUNK"]

log = logging.getLogger(__name__)

STAGING_PREFIX = ".new-"
STALE_STAGING_SECONDS = 3600.0
_TOUCH_INTERVAL = 60.0  # a long copy keeps its staging directory's mtime fresh (so it never looks stale)
CHUNK = 1 << 20
_MAX_ATTEMPTS = 100_000


def version_numbers(name_dir: str) -> list[int]:
    """Version numbers present under ``models/<name>`` (directory names that are canonical integers)."""
    try:
        names = os.listdir(name_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(n) for n in names if n.isdigit() and n.isascii() and n[0] != "0")


# -- staging -------------------------------------------------------------------------------------------
class Stager:
    """Fills ``files/`` of a staging directory from a source file or tree and builds the manifest."""

    def __init__(self, staging: str, source_root: str) -> None:
        self.staging = staging
        self.files_dir = os.path.join(staging, "files")
        self.source_root = source_root
        self.real_root = os.path.realpath(source_root)
        self.files: list[dict[str, Any]] = []
        self.links: list[dict[str, str]] = []
        self.hard_links = 0
        self.copies = 0
        self._touched = time.monotonic()

    def _touch(self) -> None:
        now = time.monotonic()
        if now - self._touched > _TOUCH_INTERVAL:
            self._touched = now
            os.utime(self.staging)

    def add_file(self, src: str, rel: str) -> None:
        dst = os.path.join(self.files_dir, *rel.split("/"))
        digest = hashlib.sha256()
        size = 0
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError as exc:  # EXDEV (other filesystem), EPERM (protected_hardlinks), EMLINK, ENOTSUP...
            log.debug("cannot hard-link %s (%s): copying", src, exc.strerror or exc)
            size = self._copy(src, dst, digest)
            self.copies += 1
        else:
            with open(dst, "rb") as fh:
                while True:
                    chunk = fh.read(CHUNK)
                    if not chunk:
                        break
                    digest.update(chunk)
                    size += len(chunk)
                    self._touch()
            self.hard_links += 1
        self.files.append({"path": rel, "size": size, "sha256": digest.hexdigest()})
        self._touch()

    def _copy(self, src: str, dst: str, digest: Any) -> int:
        size = 0
        with open(src, "rb") as fin:
            mode = stat.S_IMODE(os.fstat(fin.fileno()).st_mode)
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode | 0o200)
            try:
                while True:
                    chunk = fin.read(CHUNK)
                    if not chunk:
                        break
                    digest.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                    size += len(chunk)
                    self._touch()
                os.fsync(fd)  # the version must not appear with data still unwritten after a crash
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
        return size

    def add_link(self, src: str, rel: str) -> None:
        target = os.readlink(src)
        rel_dir = posixpath.dirname(rel)
        inside = posixpath.normpath(posixpath.join(rel_dir, target.replace(os.sep, "/")))
        real = os.path.realpath(src)
        base = rel.split("/", 1)[0]
        if os.path.isabs(target) or not (inside == base or inside.startswith(base + "/")) \
                or not (real == self.real_root or real.startswith(self.real_root + os.sep)):
            raise SpecError(f"cannot register {self.source_root}: {rel} is a symbolic link to {target!r}, "
                            "outside the registered tree (replace it by a copy of what it points to, or by a "
                            "relative link inside the tree)")
        os.symlink(target, os.path.join(self.files_dir, *rel.split("/")))
        self.links.append({"path": rel, "target": target})

    def add_tree(self, src: str, rel: str) -> None:
        os.mkdir(os.path.join(self.files_dir, *rel.split("/")))
        with os.scandir(src) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            child = f"{rel}/{entry.name}"
            if entry.is_symlink():
                self.add_link(entry.path, child)
            elif entry.is_dir(follow_symlinks=False):
                self.add_tree(entry.path, child)
            elif entry.is_file(follow_symlinks=False):
                self.add_file(entry.path, child)
            else:
                raise SpecError(f"cannot register {self.source_root}: {child} is not a regular file, "
                                "directory or symbolic link (a socket, FIFO or device)")


def remove_stale_staging(name_dir: str) -> None:
    """Remove staging directories of registrations killed more than an hour ago."""
    try:
        entries = [e for e in os.scandir(name_dir) if e.name.startswith(STAGING_PREFIX)]
    except OSError:
        return
    now = time.time()
    for entry in entries:
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime > STALE_STAGING_SECONDS:
                log.info("removing stale model staging directory %s", entry.path)
                shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            continue


def publish(staging: str, name_dir: str, metadata: dict[str, Any]) -> int:
    """Rename ``staging`` to the next free version number; return that number."""
    candidate = (max(version_numbers(name_dir), default=0)) + 1
    for _ in range(_MAX_ATTEMPTS):
        metadata["version"] = candidate
        fsio.atomic_write_json(os.path.join(staging, "model.json"), metadata)
        try:
            os.rename(staging, os.path.join(name_dir, str(candidate)))
            return candidate
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                raise
        log.debug("model %s version %d was taken; trying the next", metadata["name"], candidate)
        candidate = max(candidate + 1, max(version_numbers(name_dir), default=0) + 1)
    raise StoreError(f"cannot allocate a version of model {metadata['name']!r} in {name_dir}")
