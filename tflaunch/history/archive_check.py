"""The checks of ``runs import`` (:mod:`tflaunch.history.archive_import`): member names, the manifest, snapshot
listings, a run's records; reading a member's data as a stream; building an imported snapshot tree."""
from __future__ import annotations

import hashlib
import os
import stat
import tarfile

from .. import fsio
from .archive import ARCHIVE_FORMAT, ARCHIVE_KIND, CHUNK, MANIFEST_NAME, TREE_RE, ArchiveError
from .layout import EXPERIMENT_RE, RUN_ID_RE, TERMINAL
from .snapshot import _build_tree, _tree_key

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Iterator

__all__ = ["Refused", "valid_name", "read_all", "chunks", "parse_json", "check_manifest", "check_tree", "check_run",
           "check_model", "same_content", "copy_plain", "build_tree", "sha256_file", "MAX_JSON_BYTES"]

MAX_JSON_BYTES = 64 << 20


class Refused(Exception):
    """A member (or the archive) is refused; the message says why."""


def valid_name(name: str) -> bool:
    """A relative ``/``-separated name without ``..``, ``.`` or empty parts."""
    parts = name.split("/")
    return (0 < len(name) <= 4096 and not name.startswith("/") and "\x00" not in name
            and all(p not in ("", ".", "..") for p in parts))


def chunks(tar: tarfile.TarFile, info: tarfile.TarInfo) -> Iterator[bytes]:
    """A regular member's data, 1 MB at a time; a short read (a truncated archive) raises ReadError."""
    src = tar.extractfile(info)
    left = info.size
    while left > 0:
        chunk = src.read(min(CHUNK, left)) if src is not None else b""
        if not chunk:
            raise tarfile.ReadError("unexpected end of data")
        left -= len(chunk)
        yield chunk


def copy_plain(src_fd: int, info: tarfile.TarInfo, dst_fd: int) -> None:
    """Copy a regular member of an uncompressed archive straight from its offset (in the kernel where the
    system can: ``copy_file_range``, else ``pread``); a short archive raises ReadError."""
    offset, left = info.offset_data, info.size
    fast = hasattr(os, "copy_file_range")
    while left > 0:
        n = 0
        if fast:
            try:
                n = os.copy_file_range(src_fd, dst_fd, min(left, 1 << 30), offset)
            except OSError:  # another filesystem, an old kernel: plain reads
                fast = False
                continue
        else:
            chunk = os.pread(src_fd, min(left, CHUNK), offset)
            n = len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst_fd, view):]
        if n <= 0:
            raise tarfile.ReadError("unexpected end of data")
        offset += n
        left -= n


def same_content(tar: tarfile.TarFile, info: tarfile.TarInfo, kind: str, path: str, st: os.stat_result,
                 data: bytes | None) -> bool:
    """Whether a member equals the file ``path`` (lstat ``st``) the home has: type, link target, bytes."""
    if kind == "dir":
        return stat.S_ISDIR(st.st_mode)
    if kind == "link":
        return stat.S_ISLNK(st.st_mode) and os.readlink(path) == info.linkname
    if not stat.S_ISREG(st.st_mode) or st.st_size != info.size:
        return False
    with open(path, "rb") as mine:
        if data is not None:
            return mine.read() == data
        for chunk in chunks(tar, info):
            if mine.read(len(chunk)) != chunk:
                return False
    return True


def read_all(tar: tarfile.TarFile, info: tarfile.TarInfo, limit: int = MAX_JSON_BYTES) -> bytes:
    """A small member's whole data (a manifest, a record, a listing)."""
    if info.size > limit:
        raise Refused(f"{info.name} is {info.size} bytes, too big for what it is")
    fh = tar.extractfile(info)
    data = fh.read() if fh is not None else b""
    if len(data) != info.size:
        raise tarfile.ReadError("unexpected end of data")
    return data


def parse_json(data: bytes, what: str) -> Any:
    """``data`` as JSON, or Refused naming ``what``."""
    import json

    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Refused(f"{what} is not valid JSON") from None


def check_manifest(manifest: Any) -> dict[str, Any]:
    """The archive's manifest, if it is one this tflaunch reads."""
    if not isinstance(manifest, dict) or manifest.get("kind") != ARCHIVE_KIND:
        raise Refused(f"{MANIFEST_NAME} is not a tflaunch archive manifest")
    fmt = manifest.get("format")
    if not isinstance(fmt, int) or fmt < 1:
        raise Refused(f"{MANIFEST_NAME} has no valid format number")
    if fmt > ARCHIVE_FORMAT:
        raise Refused(f"archive format {fmt} was written by a newer tflaunch ({manifest.get('tflaunch_version')}); "
                   f"this one reads format {ARCHIVE_FORMAT}")
    runs, models = manifest.get("runs"), manifest.get("models", [])
    if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) and isinstance(r.get("id"), str)
                                                         and RUN_ID_RE.match(r["id"]) for r in runs):
        raise Refused(f"{MANIFEST_NAME} lists no valid run ids")
    if len({r["id"] for r in runs}) != len(runs):
        raise Refused(f"{MANIFEST_NAME} lists a run twice")
    if not isinstance(models, list) or not all(
            isinstance(m, dict) and isinstance(m.get("name"), str) and EXPERIMENT_RE.match(m["name"])
            and type(m.get("version")) is int and m["version"] >= 1 for m in models):
        raise Refused(f"{MANIFEST_NAME} lists invalid model versions")
    for key in ("members", "bytes"):
        if type(manifest.get(key)) is not int or manifest[key] < 0:
            raise Refused(f"{MANIFEST_NAME} has no valid {key!r} count")
    return manifest


def check_tree(key: str, listing: Any) -> list[tuple[str, bool]]:
    """Validate a snapshot listing (paths, types, its id being its hash); return its objects."""
    try:
        dirs, files, links = listing["dirs"], listing["files"], listing["symlinks"]
        names = set()
        for rel in dirs:
            if not isinstance(rel, str) or not valid_name(rel) or ("/" in rel and rel.rsplit("/", 1)[0] not in names):
                raise ValueError(rel)
            names.add(rel)
        objects = []
        for rel, digest, size, executable in files:
            ok = isinstance(rel, str) and valid_name(rel) and isinstance(digest, str) and TREE_RE.match(digest)
            if not ok or type(size) is not int or not isinstance(executable, bool) or rel in names \
                    or ("/" in rel and rel.rsplit("/", 1)[0] not in names):
                raise ValueError(rel)
            names.add(rel)
            objects.append((digest, executable))
        for rel, target in links:  # a snapshot's links are part of its identity: made as recorded
            if not isinstance(rel, str) or not valid_name(rel) or not isinstance(target, str) or rel in names \
                    or ("/" in rel and rel.rsplit("/", 1)[0] not in names) or "\x00" in target:
                raise ValueError(rel)
            names.add(rel)
    except (KeyError, TypeError, ValueError):
        raise Refused(f"trees/{key}.json is not a valid snapshot listing") from None
    if _tree_key(listing) != key:
        raise Refused(f"trees/{key}.json does not match its id (the listing was altered)")
    return objects


def build_tree(home: str, key: str, data: bytes) -> int:
    """Add ``trees/<key>.json`` and ``trees/<key>/`` (links to the objects) unless the home has them, as a
    snapshot builds its tree (:func:`tflaunch.history.snapshot._build_tree`); 1 if built."""
    existed = os.path.isdir(os.path.join(home, "trees", key))
    _build_tree(home, key, parse_json(data, key), {}, 1)
    return 0 if existed else 1


def sha256_file(path: str) -> str:
    """The SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(CHUNK)
            if not chunk:
                return digest.hexdigest()
            digest.update(chunk)


def check_run(run_id: str, run_json: dict[tuple[str, str], Any], trees: dict[str, bytes], home: str) -> None:
    """Refuse a run whose records are missing, name another run, or say it is not finished."""
    status, definition = run_json.get((run_id, "status.json")), run_json.get((run_id, "run.json"))
    if not isinstance(status, dict) or not isinstance(definition, dict):
        raise Refused(f"run {run_id} has no valid status.json and run.json")
    if status.get("id") != run_id or definition.get("id") != run_id:
        raise Refused(f"run {run_id}: its records name another run")
    if status.get("status") not in TERMINAL:
        raise Refused(f"run {run_id} is {status.get('status')}: only finished runs can be imported")
    if not isinstance(status.get("experiment"), str) or not EXPERIMENT_RE.match(status["experiment"]):
        raise Refused(f"run {run_id} has an invalid experiment name")
    snapshot = run_json.get((run_id, "snapshot.json"))
    if snapshot is not None:
        key = snapshot.get("tree") if isinstance(snapshot, dict) else None
        if not isinstance(key, str) or not TREE_RE.match(key):
            raise Refused(f"run {run_id}: snapshot.json names no snapshot tree")
        if key not in trees and not os.path.isfile(os.path.join(home, "trees", key + ".json")):
            raise Refused(f"run {run_id}: its snapshot tree {key[:12]} is neither in the archive nor in {home}")


def check_model(key: tuple[str, int], entry: dict[str, Any], staging: str, run_ids: set[str], home: str) -> bool:
    """Refuse a model version whose model.json or files are wrong, or whose number the home gives another
    model; True when the home has this very version already."""
    name, version = key
    data = entry.get("json")
    shown = f"model {name}:{version}"
    if not isinstance(data, dict) or data.get("name") != name or data.get("version") != version:
        raise Refused(f"{shown} has no valid model.json")
    source = data.get("source_run") or {}
    if not isinstance(source, dict) or source.get("id") not in run_ids:
        raise Refused(f"{shown} was not registered from a run of the archive")
    try:
        expected = {f["path"]: f["sha256"] for f in data.get("files") or []}
        links = {lnk["path"]: lnk["target"] for lnk in data.get("links") or []}
    except (KeyError, TypeError):
        raise Refused(f"{shown}: model.json lists its files wrongly") from None
    root = os.path.join(staging, "models", name, str(version), "files")
    hashes = dict(entry["hashes"])
    for inner in entry["hardlinks"]:
        path = os.path.join(root, *inner.split("/"))
        hashes[inner] = sha256_file(path) if os.path.isfile(path) else None
    if hashes != expected or entry["links"] != links:
        raise Refused(f"{shown}: its files do not match its model.json")
    existing = os.path.join(home, "models", name, str(version), "model.json")
    if os.path.lexists(existing):
        try:
            same = fsio.read_json(existing) == data
        except (OSError, ValueError):
            same = False
        if not same:
            raise ArchiveError(f"model {name} version {version} is already in {home} as another model "
                               "(versions keep their numbers: import into another home, or remove it); "
                               "nothing imported")
        return True
    return False
