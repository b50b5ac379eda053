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

A file created here gets the read and write permissions of its directory, never more than 0664 and
whatever the umask: 0600 in a home's owner-only (0700) directories, 0660 in a group-shared home's (0770),
0644 in a 0755 directory (see :func:`file_mode`); an explicit ``mode`` is passed to ``open`` as it is.
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
    "file_mode",
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


def file_mode(path: str) -> int:
    """The mode a new file ``path`` gets: its directory's read/write bits (0700 -> 0600, 0770 -> 0660,
    0755 -> 0644), never world-writable; 0600 when the directory cannot be examined."""
    try:
        return os.stat(os.path.dirname(path) or ".").st_mode & 0o664
    except OSError:
        return 0o600


def _write_tmp(path: str, data: bytes, fsync: bool, mode: int | None) -> str:
    tmp = _tmp_name(path)
    exact = file_mode(path) if mode is None else None
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode if exact is None else exact)
    try:
        if exact is not None:
            os.fchmod(fd, exact)  # the umask does not decide
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


def atomic_write_bytes(path: str, data: bytes, *, fsync: bool = True, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` so that no reader ever sees a partial file (``mode``: default
    :func:`file_mode`)."""
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
    tmp = _write_tmp(path, (json_dumps(obj, indent=1) + "\n").encode("ascii"), True, None)
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
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    except FileNotFoundError:
        mode = file_mode(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)
        except OSError:
            pass
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
