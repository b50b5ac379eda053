"""The environment builder's groundwork (part of :mod:`tflaunch.remote.envbuild`): its constants and
errors, the request's key, small file and process utilities, the build log, running a tool, and the build
lock that lets one builder build while the others wait (:class:`Lock`).

Standard library only; shipped joined with the builder's other parts into ONE source string
(:mod:`tflaunch.remote.bundle`), so it imports nothing from them.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time


FORMAT = 1
SHORT = 20
RESULT_MARK = "TFLAUNCH_ENV_RESULT "
ERROR_MARK = "TFLAUNCH_ENV_ERROR "
SHADOW_MARK = "TFLAUNCH_SHADOW"
PARENT_PTH = "_tflaunch_parent.pth"
DEFAULT_LOCK_TIMEOUT = 60.0   # seconds without a heartbeat before another machine's lock is stale
DEFAULT_HEARTBEAT = 5.0
HOROVOD_ENV = {"HOROVOD_WITH_TENSORFLOW": "1", "HOROVOD_WITHOUT_PYTORCH": "1", "HOROVOD_WITHOUT_MXNET": "1",
               "HOROVOD_WITH_MPI": "1"}
# Ambient settings that would change what a tool installs: never passed to pip or uv.
_DROP_PREFIXES = ("PIP_", "UV_", "PYTHON", "CONDA_", "MAMBA_", "VIRTUAL_ENV", "__PYVENV_LAUNCHER__")
# Transport settings (how to reach an index, not what it gives): kept.
_KEEP = ("PIP_CERT", "PIP_CLIENT_CERT", "PIP_DEFAULT_TIMEOUT")
TF_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-intel", "tensorflow-macos",
                    "tensorflow-aarch64", "tensorflow-rocm", "intel-tensorflow", "tf-nightly", "tf-nightly-cpu")



class BuildError(Exception):
    """A one-line message naming the cause (what the launcher shows as EnvBuildError)."""


class DiskFull(BuildError):
    pass


class MissingPackage(BuildError):
    """The index or wheelhouse has no distribution for a requirement (``name``)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no distribution for {name!r}")
        self.name = name


# -- keys --------------------------------------------------------------------------------------------------
KEY_FIELDS = ("format", "kind", "python", "python_version", "implementation", "platform", "requirements",
              "local_files", "conda_packages", "index", "inherit", "parent_site", "framework", "horovod")


def canonical(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def key_index(index: dict | None) -> dict:
    """The index options as they change the result: ``index_url`` means nothing with ``no_index``."""
    index = dict(index or {})
    no_index = bool(index.get("no_index"))
    return {"find_links": list(index.get("find_links") or []),
            "index_url": None if no_index else (index.get("index_url") or None), "no_index": no_index}


def request_key(request: dict) -> str:
    """sha256 (hex) of everything in the request that changes the environment built."""
    data = {name: request.get(name) for name in KEY_FIELDS}
    data["index"] = key_index(request.get("index"))
    return hashlib.sha256(canonical(data).encode("ascii")).hexdigest()


def normalize_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# -- small utilities -----------------------------------------------------------------------------------------
def now_iso(t: float | None = None) -> str:
    t = time.time() if t is None else t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % (int(t * 1000) % 1000)


def _read_first_line(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.readline().strip()
    except OSError:
        return ""


def local_identity() -> dict:
    """Host name, boot id and pid namespace: what makes two processes "on the same machine" (as
    tflaunch.history.store.local_identity)."""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return {"host": os.uname().nodename, "boot_id": _read_first_line("/proc/sys/kernel/random/boot_id"),
            "pidns": pidns}


def process_start_time(pid: int) -> str | None:
    """Kernel start time of ``pid``, or None if it is gone (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
        fields = data[data.rindex(b")") + 2:].split()
        return None if fields[0] in (b"Z", b"X") else fields[19].decode()
    except (OSError, ValueError, IndexError):
        if not os.path.isdir("/proc"):
            try:
                os.kill(pid, 0)
                return ""
            except ProcessLookupError:
                return None
            except PermissionError:
                return ""
        return None


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def atomic_write(path: str, data: bytes) -> None:
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_json(path: str) -> object:
    with open(path, "rb") as fh:
        return json.loads(fh.read())


def remove_tree(path: str) -> None:
    """Remove a directory (first renamed aside when it is an environment, so it vanishes at once)."""
    shutil.rmtree(path, ignore_errors=True)


def tree_size(path: str) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            total += st.st_size
    return total


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def which(name: str, path: str | None = None) -> str | None:
    return shutil.which(name, path=path if path is not None else os.environ.get("PATH", os.defpath))


class Log:
    """The build log: to stdout (the launcher streams it) and, once there is one, a file in the env."""

    def __init__(self, stream: object = None) -> None:
        self.stream = stream if stream is not None else getattr(sys.stdout, "buffer", None)
        self.file = None
        self.tail: list[str] = []

    def attach(self, path: str) -> None:
        try:
            self.file = open(path, "ab")
        except OSError:
            self.file = None

    def write(self, data: bytes) -> None:
        for target in ("stream", "file"):
            fh = getattr(self, target)
            if fh is None:
                continue
            try:
                fh.write(data)
                fh.flush()
            except (OSError, ValueError):  # the launcher went away (EPIPE) or the disk is full: build on
                setattr(self, target, None)
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                self.tail.append(line)
        del self.tail[:-200]

    def line(self, text: str) -> None:
        self.write(("tflaunch-env: " + text + "\n").encode("utf-8", "replace"))

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
            self.file = None


_PRCTL: list = []


def _load_prctl() -> object:
    """libc's prctl, loaded in the builder itself (never after fork: another thread may hold the import lock)."""
    if not _PRCTL:
        try:
            import ctypes

            _PRCTL.append(ctypes.CDLL(None, use_errno=True).prctl)
        except Exception:
            _PRCTL.append(None)
    return _PRCTL[0]


def _pdeathsig() -> None:
    """In a tool's child: die with the builder (Linux), so a SIGKILLed builder leaves no pip running."""
    prctl = _PRCTL[0] if _PRCTL else None
    if prctl is not None:
        prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL


def run_tool(argv: list, log: Log, env: dict | None = None, cwd: str | None = None, what: str = "") -> None:
    """Run a tool with its output in the log; BuildError (one line, naming the cause) when it fails."""
    log.line("$ " + " ".join(str(a) for a in argv))
    linux = sys.platform.startswith("linux") and _load_prctl() is not None
    try:
        proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=cwd, preexec_fn=_pdeathsig if linux else None)
    except OSError as exc:
        raise BuildError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    assert proc.stdout is not None
    tail = bytearray()
    try:
        while True:
            chunk = proc.stdout.read1(65536)
            if not chunk:
                break
            log.write(chunk)
            tail += chunk
            del tail[:-65536]
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if rc != 0:
        raise tool_error(what or os.path.basename(str(argv[0])), rc, bytes(tail).decode("utf-8", "replace").splitlines())


def tool_error(what: str, rc: int, lines: list) -> BuildError:
    text = "\n".join(lines)
    if "No space left on device" in text or "os error 28" in text or "Errno 28" in text:
        return DiskFull("no space left")
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return BuildError(f"{what} was killed by {name}")
    missing = _missing_package(text)
    if missing:
        return MissingPackage(missing)
    useful = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("tflaunch-env: ")]
    errors = [ln for ln in useful if re.match(r"^(ERROR|error|×|╰─▶|Because)", ln)]
    last = (errors or useful or [f"exit status {rc}"])[-1]
    last = re.sub(r"^(ERROR:|error:|×|╰─▶)\s*", "", last)
    return BuildError(f"{what} failed (exit status {rc}): {last[:300]}")


def _missing_package(text: str) -> str | None:
    """The requirement that pip's or uv's resolver found no distribution for, if that is the failure."""
    for pattern in (r"No matching distribution found for (\S+)",                                     # pip
                    r"Because (\S+?) was not found in the (?:provided package locations|package registry)",  # uv
                    r"Because there (?:is|are) no versions? of (\S+?)(?: and|,| we|$)"):
        m = re.search(pattern, text, re.M)
        if m:
            return m.group(1).strip("'\"")
    return None


# -- the lock ------------------------------------------------------------------------------------------------
class Lock:
    """The build lock of one key: exclusive-create lock files with an owner record and a heartbeat,
    correct on NFS (no flock).

    Lock files are generations ``.locks/<short>/00000001``, ``00000002``, ...; the highest generation
    present is the lock. Whoever creates generation N (atomically: written aside, then ``link``ed to its
    name, which fails if it exists) and then still sees N as the highest owns the lock. The owner
    rewrites its file with a heartbeat every few seconds and marks it released at the end (files are
    kept, so the numbering never goes back). A generation is free when it is released, when its owner
    is on this machine and its pid is gone (or is another process now), or, for an owner elsewhere,
    when its heartbeat is older than the lock timeout. Taking over a stale lock is creating the next
    generation: when two waiters try, exactly one ``link`` succeeds, so two never both take over.
    """

    def __init__(self, root: str, short: str, timeout: float = DEFAULT_LOCK_TIMEOUT,
                 interval: float = DEFAULT_HEARTBEAT) -> None:
        self.dir = os.path.join(root, ".locks", short)
        self.timeout = timeout
        self.interval = interval
        self.gen: int | None = None
        self.record: dict = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _path(self, gen: int) -> str:
        return os.path.join(self.dir, "%08d" % gen)

    def generations(self) -> list:
        try:
            return sorted(int(n) for n in os.listdir(self.dir) if n.isdigit())
        except FileNotFoundError:
            return []

    def read(self, gen: int) -> dict | None:
        path = self._path(gen)
        try:
            data = read_json(path)
            mtime = os.stat(path).st_mtime
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        data["_mtime"] = mtime
        return data

    def holder(self) -> dict | None:
        """The live owner's record, or None when the lock is free (or stale)."""
        gens = self.generations()
        if not gens:
            return None
        record = self.read(gens[-1])
        if record is None:  # unreadable: someone replaced it under us; count it as held for now
            return {"state": "held", "host": "?", "pid": None, "gen": gens[-1]}
        record["gen"] = gens[-1]
        return record if owner_alive(record, self.timeout) else None

    def try_acquire(self, staging: str | None = None) -> bool:
        os.makedirs(self.dir, exist_ok=True)
        gens = self.generations()
        if gens:
            top = self.read(gens[-1])
            if top is None or owner_alive(top, self.timeout):
                return False
            new = gens[-1] + 1
        else:
            new = 1
        pid = os.getpid()
        self.record = {**local_identity(), "pid": pid, "pid_start": process_start_time(pid), "state": "held",
                       "heartbeat": time.time(), "started": now_iso(), "staging": staging}
        path = self._path(new)
        tmp = os.path.join(self.dir, f".tmp-{new}-{pid}-{os.urandom(4).hex()}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(canonical(self.record).encode("ascii"))
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, path)  # atomic, and the record is complete the moment the name exists
        except FileExistsError:
            return False
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if self.generations()[-1:] != [new]:  # a later generation exists: we based ourselves on old news
            try:
                os.unlink(path)
            except OSError:
                pass
            return False
        self.gen = new
        for old in self.generations():
            if old < new:
                try:
                    os.unlink(self._path(old))
                except OSError:
                    pass
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="tflaunch-env-heartbeat", daemon=True)
        self._thread.start()
        return True

    def still_mine(self) -> bool:
        return self.gen is not None and self.generations()[-1:] == [self.gen]

    def _write(self) -> None:
        if self.gen is not None:
            atomic_write(self._path(self.gen), canonical(self.record).encode("ascii"))

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            self.record["heartbeat"] = time.time()
            try:
                if self.still_mine():
                    self._write()
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.gen is None:
            return
        self.record.update(state="released", heartbeat=time.time(), released=now_iso())
        try:
            if self.still_mine():
                self._write()
        except OSError:
            # A full disk: the record stays "held" by this process, which exits now; waiters see its pid
            # gone (or its heartbeat stop) and take over with the next generation. Removing the file instead
            # would let the numbering restart under a waiter that read it earlier.
            pass
        self.gen = None


def owner_alive(record: dict, timeout: float) -> bool:
    """Whether a lock record still holds its lock (see :class:`Lock`)."""
    if record.get("state") != "held":
        return False
    me = local_identity()
    if me["boot_id"] and all(record.get(k) == me[k] for k in ("host", "boot_id", "pidns")):
        try:
            started = process_start_time(int(record.get("pid") or -1))
        except (TypeError, ValueError):
            return False
        if started is None:
            return False
        return not (record.get("pid_start") and started and started != record["pid_start"])
    if record.get("host") == me["host"] and record.get("boot_id") and me["boot_id"] \
            and record.get("boot_id") != me["boot_id"] and record.get("pidns") == me["pidns"]:
        return False  # this machine rebooted since
    try:
        beat = max(float(record.get("heartbeat") or 0), float(record.get("_mtime") or 0))
    except (TypeError, ValueError):
        beat = 0.0
    return time.time() - beat <= timeout
