"""File primitives the run store is built on: atomic replace, exclusive create, append-only JSON lines.

Rules that make the store correct on local disks and on NFS/Lustre without locks:

* a mutable file is replaced atomically: written to a temporary name in the same directory, fsynced,
  then renamed over the target, so a reader (or a crash) sees the old or the new content, never half;
* a file that must be created once (first writer wins) is written to a temporary name and hard-linked
  to its final name, which fails with ``EEXIST`` if another writer got there first (``link`` is atomic
  on NFS, unlike ``O_EXCL`` on old clients);
* events are appended with one ``write`` per line on an ``O_APPEND`` descriptor; readers skip a torn
  trailing line instead of failing.
Temporary files are named ``.<name>.<pid>.<random>.tmp`` and never end in ``.json``.
"""
from __future__ import annotations

import errno
import json
import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Iterator

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "create_once_json",
    "append_jsonl",
    "read_json",
    "iter_jsonl",
    "json_dumps",
    "is_disk_full",
]


def json_dumps(obj: Any, *, indent: int | None = None) -> str:
    """Serialize for the store: UTF-8 safe (lone surrogates from undecodable argv are escaped)."""
    return json.dumps(obj, indent=indent, sort_keys=False, ensure_ascii=True, allow_nan=True)


def _tmp_name(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _write_tmp(path: str, data: bytes, fsync: bool, mode: int) -> str:
    tmp = _tmp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        _write_all(fd, data)
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    return tmp


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write_bytes(path: str, data: bytes, *, fsync: bool = True, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that no reader ever sees a partial file."""
    tmp = _write_tmp(path, data, fsync, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def atomic_write_json(path: str, obj: Any, *, fsync: bool = True, compact: bool = False) -> None:
    """Replace ``path`` with the JSON encoding of ``obj`` (atomically).

    ``compact`` (one line) is much faster for big documents: indentation forces json's Python encoder.
    """
    text = json_dumps(obj) if compact else json_dumps(obj, indent=1)
    atomic_write_bytes(path, (text + "\n").encode("ascii"), fsync=fsync)


def create_once_json(path: str, obj: Any) -> bool:
    """Create ``path`` holding ``obj`` unless it exists; return whether this call created it."""
    tmp = _write_tmp(path, (json_dumps(obj, indent=1) + "\n").encode("ascii"), True, 0o644)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        _unlink_quietly(tmp)


def append_jsonl(path: str, obj: Any, *, fsync: bool = False) -> None:
    """Append one JSON line with a single ``write`` (a kill can not leave half a line behind)."""
    line = (json_dumps(obj) + "\n").encode("ascii")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        written = os.write(fd, line)
        if written != len(line):  # only on a full disk: never leave a torn line for others to append to
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: str) -> Any:
    """Read a JSON file written by this module (raises ``OSError`` / ``ValueError``)."""
    with open(path, "rb") as fh:
        return json.loads(fh.read())


def iter_jsonl(path: str) -> Iterator[Any]:
    """Yield the records of a JSON-lines file, skipping lines that do not parse (a torn tail)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            yield json.loads(raw)
        except ValueError:
            continue


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` means the filesystem is out of space (or quota)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
