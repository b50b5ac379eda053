"""``runs import ARCHIVE``: the runs (and model versions) of an archive written by
:func:`tflaunch.history.archive.export_runs`, added to a home.

Rules:

* **Every member is checked before anything is visible.** The archive is read once, as a stream (never
  held in memory), into a staging directory inside the target home (``.import-<random>/``); a name that
  is absolute, holds ``..`` or an empty part, or is not one an export writes, a device, FIFO or other
  special file, a symbolic link that is absolute or leads out of its run (or model), a member under a
  link, a duplicate, a hard link that is not a model file naming a run file of the archive, more data
  than the manifest declares, a truncated or corrupt archive, a wrong or missing manifest, a run that is
  not finished, an object whose content does not match its SHA-256, a snapshot listing whose id is not
  its hash: any of them is one error, the staging directory is removed, and the home is as it was (a
  home that did not exist is not left behind).
* **Content-addressed.** Snapshot objects and trees the home already has are not written again; new
  ones are added as :mod:`tflaunch.history.snapshot` adds them (objects read-only, never replaced; a
  tree built under a temporary name and renamed).
* **All or nothing per run.** A run's directory is staged complete, then renamed into ``runs/``.
* **Idempotent.** A run already in the home with the same content (compared file by file, as the
  archive streams by, without writing) is "already present"; with other content it is a conflict: an
  error, and nothing is imported. Model versions keep their numbers: a version already taken by an
  identical model is already present, by another one a conflict.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import tarfile
import zlib

from .. import fsio
from ..errors import StoreError
from .archive import MANIFEST_NAME, SKIPPED_TOP, TREE_RE, ArchiveError, included, link_stays_inside, walk_run
from .archive_check import (Refused, build_tree, check_manifest, check_model, check_run, check_tree, chunks, copy_plain,
                            parse_json, read_all, same_content, valid_name)
from .layout import STORE_FORMAT
from .snapshot import _hold, _link_or_copy, object_path

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

    from .store import Store

__all__ = ["import_archive"]

log = logging.getLogger(__name__)

_OBJECT_RE = re.compile(r"^[0-9a-f]{62}(\.x)?$")
_HEX2_RE = re.compile(r"^[0-9a-f]{2}$")
_PARSED = frozenset({"run.json", "status.json", "snapshot.json"})  # run files the import reads


class _Importer:
    """One import: read and check the archive into ``staging``, then move what is new into the home."""

    def __init__(self, store: Store, archive: str) -> None:
        self.store, self.home, self.archive = store, store.home, archive
        self.staging = os.path.join(self.home, f".import-{os.urandom(6).hex()}")
        self.manifest: dict[str, Any] = {}
        self.run_ids: set[str] = set()
        self.present: set[str] = set()          # runs the home has already: compared, not written
        self.conflicts: dict[str, str] = {}     # run id -> the first difference found
        self.seen: dict[str, str] = {}          # member name -> kind
        self.run_json: dict[tuple[str, str], Any] = {}
        self.trees: dict[str, bytes] = {}       # tree id -> its listing as archived
        self.objects: dict[str, str] = {}       # objects/<...> name -> staged path (a link to the home's own)
        self.models: dict[tuple[str, int], dict[str, Any]] = {}  # (name, version) -> model.json, hashes, links
        self.staged_links: list[tuple[str, str]] = []  # (staged link, the root it must stay in)
        self.count = self.bytes = 0
        self.plain_fd: int | None = None

    # -- reading -----------------------------------------------------------------------------------------
    def read(self) -> None:
        with open(self.archive, "rb") as raw:
            try:
                tar = tarfile.open(fileobj=raw, mode="r:*")
            except tarfile.ReadError:
                raise Refused("it is not a tar archive (plain, or compressed with gzip, bzip2 or xz)") from None
            with tar:
                self.plain_fd = raw.fileno() if tar.fileobj is raw else None  # uncompressed: copied by offset
                first = tar.next()
                if first is None or first.name != MANIFEST_NAME or not first.isreg():
                    raise Refused(f"its first member is not {MANIFEST_NAME} (not a tflaunch archive)")
                self.manifest = check_manifest(parse_json(read_all(tar, first), MANIFEST_NAME))
                self.run_ids = {r["id"] for r in self.manifest["runs"]}
                self.present = {i for i in self.run_ids if os.path.lexists(os.path.join(self.store.runs_dir, i))}
                for run_id in sorted(self.run_ids - self.present):
                    if os.path.lexists(os.path.join(self.home, "trash", run_id)):  # deleted: `runs restore` it
                        raise ArchiveError(f"run {run_id} is in the trash of {self.home} (`tflaunch runs restore "
                                           f"{run_id}`, or purge it, first); nothing imported")
                self._check_space()
                while True:
                    info = tar.next()
                    if info is None:
                        break
                    self._member(tar, info)
        if (self.count, self.bytes) != (self.manifest["members"], self.manifest["bytes"]):
            raise Refused(f"it holds {self.count} members ({self.bytes} bytes of files) but its manifest says "
                          f"{self.manifest['members']} ({self.manifest['bytes']} bytes): it was truncated or altered")

    def _check_space(self) -> None:
        try:
            st = os.statvfs(self.staging)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        if self.manifest["bytes"] > free:
            raise Refused(f"it holds {self.manifest['bytes'] >> 20} MB of files; {self.home} has {free >> 20} MB free")

    def _member(self, tar: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        name = info.name
        if not valid_name(name):
            raise Refused(f"member {name!r} has an absolute path, '..' or an empty part")
        if name in self.seen:
            raise Refused(f"member {name} appears twice")
        for i in range(len(name)):
            if name[i] == "/" and self.seen.get(name[:i]) == "link":
                raise Refused(f"member {name} lies under the symbolic link {name[:i]}")
        kind = ("file" if info.isreg() else "dir" if info.isdir() else "link" if info.issym()
                else "hardlink" if info.islnk() else None)
        if kind is None:
            raise Refused(f"member {name} is a device, FIFO or other special file")
        self.count += 1
        if kind == "file":
            self.bytes += info.size
            if info.size < 0 or self.bytes > self.manifest["bytes"]:
                raise Refused(f"member {name} brings more data than the manifest declares")
        self.seen[name] = kind
        try:
            self._dispatch(tar, info, kind, name.split("/"))
        except (FileExistsError, IsADirectoryError, NotADirectoryError):
            raise Refused(f"member {name} clashes with another member") from None

    def _dispatch(self, tar: tarfile.TarFile, info: tarfile.TarInfo, kind: str, parts: list[str]) -> None:
        name, top = info.name, parts[0]
        if top == "runs" and len(parts) >= 3 and parts[1] in self.run_ids and included(parts[2:]) \
                and parts[2] not in SKIPPED_TOP:
            self._run_member(tar, info, kind, parts[1], "/".join(parts[2:]))
        elif top == "trees" and len(parts) == 2 and kind == "file" and name.endswith(".json") \
                and TREE_RE.match(parts[1][:-5]):
            self.trees[parts[1][:-5]] = read_all(tar, info)
        elif top == "objects" and len(parts) == 3 and kind == "file" and _HEX2_RE.match(parts[1]) \
                and _OBJECT_RE.match(parts[2]):
            self._object(tar, info, parts[1] + parts[2][:62])
        elif top == "models" and len(parts) >= 4 and parts[2].isdigit() and parts[2].isascii() \
                and (parts[1], int(parts[2])) in self._declared_models() and parts[2][0] != "0" \
                and ((parts[3] == "model.json" and len(parts) == 4 and kind == "file") or parts[3] == "files"):
            self._model_member(tar, info, kind, (parts[1], int(parts[2])), "/".join(parts[3:]))
        else:
            raise Refused(f"member {name} is not part of a tflaunch archive (or of a run it declares)")

    def _declared_models(self) -> set[tuple[str, int]]:
        return {(m["name"], m["version"]) for m in self.manifest.get("models", [])}

    def _write_file(self, tar: tarfile.TarFile, info: tarfile.TarInfo, dest: str, digest: Any = None) -> None:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if digest is None and self.plain_fd is not None and info.type in (tarfile.REGTYPE, tarfile.AREGTYPE) \
                    and info.sparse is None:
                copy_plain(self.plain_fd, info, fd)
            else:
                for chunk in chunks(tar, info):
                    if digest is not None:
                        digest.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            os.fchmod(fd, (info.mode & 0o777) | 0o400)
        finally:
            os.close(fd)
        os.utime(dest, (info.mtime, info.mtime), follow_symlinks=False)

    def _place(self, tar: tarfile.TarFile, info: tarfile.TarInfo, kind: str, dest: str, rel: str, root: str,
               data: bytes | None = None, digest: Any = None) -> None:
        """Write one member below ``root`` (a staged run or model): a file, directory or link."""
        if kind == "dir":
            os.makedirs(dest, exist_ok=True)
        elif kind == "link":
            if not link_stays_inside(rel, info.linkname):
                raise Refused(f"member {info.name} is a symbolic link to {info.linkname!r}, outside its run or model")
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.symlink(info.linkname, dest)
            self.staged_links.append((dest, root))
        elif data is not None:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            fsio.atomic_write_bytes(dest, data, fsync=False, mode=(info.mode & 0o777) | 0o400)
            if digest is not None:
                digest.update(data)
        else:
            self._write_file(tar, info, dest, digest)

    def _run_member(self, tar: tarfile.TarFile, info: tarfile.TarInfo, kind: str, run_id: str, rel: str) -> None:
        if kind == "hardlink":
            raise Refused(f"member {info.name} is a hard link (a run's files are never exported as links)")
        data = read_all(tar, info) if kind == "file" and rel in _PARSED else None
        if data is not None:
            self.run_json[(run_id, rel)] = parse_json(data, info.name)
        if run_id in self.present:
            if kind == "link" and not link_stays_inside(rel, info.linkname):
                raise Refused(f"member {info.name} is a symbolic link to {info.linkname!r}, outside its run")
            self._compare(tar, info, kind, run_id, rel, data)
            return
        root = os.path.join(self.staging, "runs", run_id)
        self._place(tar, info, kind, os.path.join(root, *rel.split("/")), rel, root, data)

    def _compare(self, tar: tarfile.TarFile, info: tarfile.TarInfo, kind: str, run_id: str, rel: str,
                 data: bytes | None) -> None:
        """Compare a member with the run the home has (reading the archive on when it differs)."""
        if run_id in self.conflicts:
            return
        path = os.path.join(self.store.runs_dir, run_id, *rel.split("/"))
        try:
            st = os.lstat(path)
        except OSError:
            self.conflicts[run_id] = f"{rel} is not in the home's copy"
            return
        same = same_content(tar, info, kind, path, st, data)
        if not same:
            self.conflicts[run_id] = f"{rel} differs"

    def _object(self, tar: tarfile.TarFile, info: tarfile.TarInfo, digest_hex: str) -> None:
        executable = info.name.endswith(".x")
        digest = hashlib.sha256()
        staged = os.path.join(self.staging, *info.name.split("/"))
        if _link_held(object_path(self.home, digest_hex, executable), staged):  # have it: checked, not written
            for chunk in chunks(tar, info):
                digest.update(chunk)
        else:
            self._write_file(tar, info, staged, digest)
            os.chmod(staged, 0o555 if executable else 0o444)
        if digest.hexdigest() != digest_hex:
            raise Refused(f"member {info.name} does not match its SHA-256 (a corrupt archive)")
        self.objects[info.name] = staged

    def _model_member(self, tar: tarfile.TarFile, info: tarfile.TarInfo, kind: str, key: tuple[str, int],
                      rel: str) -> None:
        entry = self.models.setdefault(key, {"json": None, "hashes": {}, "links": {}, "hardlinks": {}})
        root = os.path.join(self.staging, "models", key[0], str(key[1]))
        dest = os.path.join(root, *rel.split("/"))
        if rel == "model.json":
            data = read_all(tar, info)
            entry["json"] = parse_json(data, info.name)
            self._place(tar, info, kind, dest, rel, root, data)
            return
        inner = rel[len("files/"):]
        if kind == "hardlink":
            target = info.linkname
            parts = target.split("/")
            if not (valid_name(target) and self.seen.get(target) == "file" and parts[0] == "runs" and len(parts) > 2):
                raise Refused(f"member {info.name} is a hard link to {target!r}, not to a run file of the archive")
            entry["hardlinks"][inner] = target
            if parts[1] not in self.present:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                _link_or_copy(os.path.join(self.staging, *parts), dest)
            elif os.path.isfile(os.path.join(self.store.runs_dir, *parts[1:])):  # the home's copy of the run
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                _link_or_copy(os.path.join(self.store.runs_dir, *parts[1:]), dest)
            return
        digest = hashlib.sha256() if kind == "file" else None
        self._place(tar, info, kind, dest, rel, root, None, digest)
        if digest is not None:
            entry["hashes"][inner] = digest.hexdigest()
        elif kind == "link":
            entry["links"][inner] = info.linkname

    # -- checking what was read ----------------------------------------------------------------------------
    def check(self) -> None:
        archived_objects = set()
        for key, data in self.trees.items():
            for digest, executable in check_tree(key, parse_json(data, f"trees/{key}.json")):
                archived_objects.add((digest, executable))
        have = {(n[8:10] + n[11:11 + 62], n.endswith(".x")) for n in self.objects}
        for digest, executable in archived_objects - have:
            if not os.path.isfile(object_path(self.home, digest, executable)):
                raise Refused(f"snapshot object {digest[:12]} is neither in the archive nor in {self.home}")
        for run in self.manifest["runs"]:
            check_run(run["id"], self.run_json, self.trees, self.home)
        for run_id in sorted(self.present):
            if run_id not in self.conflicts:
                self._check_no_extra(run_id)
            if run_id in self.conflicts:
                raise ArchiveError(f"run {run_id} is already in {self.home} with other content "
                                   f"({self.conflicts[run_id]}); nothing imported")
        for key in self._declared_models():
            entry = self.models.get(key) or {}
            entry["present"] = check_model(key, entry, self.staging, self.run_ids, self.home)
            self.models[key] = entry
        for link, root in self.staged_links:
            real, real_root = os.path.realpath(link), os.path.realpath(root)
            if real != real_root and not real.startswith(real_root + os.sep):
                raise Refused(f"the symbolic link {os.path.relpath(link, self.staging)} leads out of its run or model")

    def _check_no_extra(self, run_id: str) -> None:
        entries, _ = walk_run(os.path.join(self.store.runs_dir, run_id))
        extra = [rel for rel, *_ in entries if f"runs/{run_id}/{rel}" not in self.seen]
        if extra:
            self.conflicts[run_id] = f"the home's copy has {extra[0]}, the archive has not"

    # -- committing --------------------------------------------------------------------------------------
    def commit(self) -> dict[str, Any]:
        self.store.ensure()
        new_objects = 0
        for name, staged in sorted(self.objects.items()):
            final = os.path.join(self.home, *name.split("/"))
            os.makedirs(os.path.dirname(final), exist_ok=True)
            try:
                os.link(staged, final)  # never replace: runs may link the existing object
                new_objects += 1
            except FileExistsError:
                pass
        new_trees = sum(build_tree(self.home, key, data) for key, data in sorted(self.trees.items()))
        imported = []
        for run in self.manifest["runs"]:
            run_id = run["id"]
            if run_id in self.present:
                continue
            self.store.ensure_experiment(self.run_json[(run_id, "status.json")]["experiment"])
            staged = os.path.join(self.staging, "runs", run_id)
            snapshot = self.run_json.get((run_id, "snapshot.json"))
            if snapshot is not None:
                os.symlink(os.path.join("..", "..", "trees", snapshot["tree"]), os.path.join(staged, "snapshot"))
                hold_tree(self.home, snapshot["tree"], self.trees.get(snapshot["tree"]))
            self._rename(staged, os.path.join(self.store.runs_dir, run_id), f"run {run_id}")
            if snapshot is not None:  # a gc that missed the run between .import-* and runs/ (snapshot._hold)
                hold_tree(self.home, snapshot["tree"], self.trees.get(snapshot["tree"]))
            imported.append(run_id)
        models_new, models_present = [], []
        for name, version in sorted(self._declared_models()):
            if self.models[(name, version)].get("present"):
                models_present.append(f"{name}:{version}")
                continue
            name_dir = os.path.join(self.home, "models", name)
            os.makedirs(name_dir, exist_ok=True)
            self._rename(os.path.join(self.staging, "models", name, str(version)), os.path.join(name_dir, str(version)),
                         f"model {name}:{version}")
            models_new.append(f"{name}:{version}")
        return {"home": self.home, "imported": imported, "present": sorted(self.present),
                "models_imported": models_new, "models_present": models_present,
                "objects_added": new_objects, "trees_added": new_trees}

    def _rename(self, src: str, dst: str, what: str) -> None:
        try:
            os.rename(src, dst)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise ArchiveError(f"{what} appeared in {self.home} while it was imported (another import?); "
                                   "run the import again") from None
            raise


def _link_held(have: str, staged: str) -> bool:
    """Hard-link the home's object ``have`` at ``staged`` (True), so that it stays, whatever a ``tflaunch gc``
    does meanwhile (it keeps what more than one name links), until the commit; False if the home lacks it."""
    os.makedirs(os.path.dirname(staged), exist_ok=True)
    try:
        os.link(have, staged)
        return True
    except OSError:  # not there (or taken by a gc just now): the archive's copy is written instead
        return False


def hold_tree(home: str, key: str, listing: bytes | None) -> None:
    """Touch the snapshot tree ``key`` (in use now) and build it again if a gc took it, from ``listing`` (the
    archive's) or the home's own listing (the protocol of :func:`tflaunch.history.snapshot._hold`)."""
    def rebuild() -> None:
        data = listing
        if data is None:
            with open(os.path.join(home, "trees", key + ".json"), "rb") as fh:
                data = fh.read()
        build_tree(home, key, data)

    _hold(home, key, rebuild)


def _home_format(home: str) -> None:
    try:
        fmt = fsio.read_json(os.path.join(home, "store.json")).get("format")
    except FileNotFoundError:
        return
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt != STORE_FORMAT:
        raise StoreError(f"{home} holds store format {fmt}; this tflaunch reads format {STORE_FORMAT}")


def import_archive(store: Store, archive: str) -> dict[str, Any]:
    """Add the runs (and model versions) of ``archive`` to ``store``; return what was imported and what
    was there already. Raises :class:`~tflaunch.history.archive.ArchiveError` (nothing written) for an
    unsafe, truncated or conflicting archive."""
    if not os.path.isfile(archive):
        raise ArchiveError(f"{archive}: no such archive file")
    _home_format(store.home)
    created = []  # the home's directories this import creates (removed again if it fails)
    path = store.home
    while not os.path.isdir(path):
        created.append(path)
        path = os.path.dirname(path)
    importer = _Importer(store, archive)
    try:
        for path in reversed(created):
            os.mkdir(path)
        os.mkdir(importer.staging)
        try:
            importer.read()
            importer.check()
        except Refused as exc:
            raise ArchiveError(f"{archive}: refused: {exc}; nothing imported") from None
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise ArchiveError(f"{archive}: not a complete tar archive (truncated or corrupt: {' '.join(str(exc).split())}); "
                               "nothing imported") from None
        result = importer.commit()
    except BaseException as exc:
        shutil.rmtree(importer.staging, ignore_errors=True)
        if created and not store.run_ids():  # a home made for this import, holding no run: removed again
            shutil.rmtree(store.home, ignore_errors=True)
            for path in created[1:]:
                _rmdir(path)
        if isinstance(exc, OSError):
            hint = " (the disk is full)" if fsio.is_disk_full(exc) else ""
            where = f" ({exc.filename})" if exc.filename else ""
            raise StoreError(f"cannot import {archive} into {store.home}: {exc.strerror or exc}{where}{hint}") from None
        raise
    shutil.rmtree(importer.staging, ignore_errors=True)
    log.debug("imported %s from %s: %d objects, %d trees added", result["imported"], archive,
              result["objects_added"], result["trees_added"])
    return result


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass
