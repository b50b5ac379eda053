"""The job-environment builder: builds (or reuses, or waits for) one environment under a root directory.

Self-contained on purpose: standard library only, nothing of tflaunch is imported, so the launcher can
ship this file's source to a host that has only the job's Python (``python -I -S -c SOURCE JSON``, see
:func:`tflaunch.envs.builder_command`). Its stdout and stderr are the build log; the last stdout line is
``TFLAUNCH_ENV_RESULT <json>`` or ``TFLAUNCH_ENV_ERROR <json {"message"}>`` (then the exit status is 1).

Layout under the root (``<home>/envs`` or a node-local ``/tmp/tflaunch-<uid>/envs``)::

    <short>/                   the environment (a virtualenv, or a conda prefix), <short> = key[:20]
        env.json               the request, the full key, builder, times, freeze (written last: complete)
        freeze.txt             name==version of every distribution in the env's own site-packages
        build.log              what the tools printed
        .last-used             its mtime says when a run last resolved the environment
    .build-<short>-<rand>/     a venv being built aside; renamed to <short> when complete
    .trash-<short>-<rand>/     an environment being removed
    .locks/<short>/<gen>       build lock generations (see :class:`Lock`)
    .tools/pip-<version>/      the interpreter's bundled pip, unpacked (the pip builder runs it), when
                               the user's cache (~/.cache/tflaunch/tools) is not writable

A virtualenv is built aside and renamed into place, so a reader never sees a half-built one, whatever
kills the builder (the paths the tools wrote, shebangs and activate scripts, are rewritten to the final
place first). A conda prefix is not relocatable (conda rewrites prefixes inside binaries at install
time), so it is built at its final path and counts as built only once its env.json exists; a
directory without one is removed by the next builder.

Run by hand (from a checkout): ``python -m tflaunch.remote.envbuild horovod-wheel --python PY --mpirun MPIRUN``
prints the path of the cached Horovod wheel for that Python's TensorFlow and that MPI, building it first
when the cache has none (tests/infra/horovod_env.sh uses this).
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


# -- what is installed ---------------------------------------------------------------------------------------
def _metadata_fields(text: str) -> dict:
    out: dict = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the body starts
        name, sep, value = line.partition(":")
        if sep and name in ("Name", "Version") and name not in out:
            out[name] = value.strip()
    return out


def read_dist(path: str) -> tuple | None:
    """(name, version) of a ``.dist-info``/``.egg-info`` directory (or an ``.egg-info`` file)."""
    candidates = [os.path.join(path, "METADATA"), os.path.join(path, "PKG-INFO")] if os.path.isdir(path) else [path]
    for meta in candidates:
        try:
            with open(meta, "rb") as fh:
                fields = _metadata_fields(fh.read().decode("utf-8", "replace"))
        except OSError:
            continue
        if fields.get("Name") and fields.get("Version"):
            return fields["Name"], fields["Version"]
    return None


def freeze(site_dirs: list) -> list:
    """``name==version`` (PEP 503 names, sorted) of the distributions in these site-packages dirs only."""
    found = {}
    for site in site_dirs:
        try:
            names = os.listdir(site)
        except OSError:
            continue
        for name in names:
            if not (name.endswith(".dist-info") or name.endswith(".egg-info")):
                continue
            path = os.path.join(site, name)
            if os.path.exists(os.path.join(path, SHADOW_MARK)):
                continue
            dist = read_dist(path)
            if dist:
                found.setdefault(normalize_name(dist[0]), dist[1])
    return [f"{name}=={version}" for name, version in sorted(found.items())]


_QUERY = r'''
import json, os, sys, sysconfig, glob
paths = sysconfig.get_paths()
wheels = []
try:
    import ensurepip
    wheels += glob.glob(os.path.join(os.path.dirname(ensurepip.__file__), "_bundled", "pip-*.whl"))
except Exception:
    pass
wheels += glob.glob("/usr/share/python-wheels/pip-*.whl")
print(json.dumps({"purelib": paths["purelib"], "platlib": paths["platlib"], "scripts": paths["scripts"],
                  "version": "%d.%d.%d" % sys.version_info[:3], "tag": "py%d%d" % sys.version_info[:2],
                  "prefix": sys.prefix, "pip_wheels": sorted(wheels)}))
'''

_VISIBLE = r'''
import json, os, sys
import importlib.metadata as md
own = set(os.path.realpath(p) for p in sys.argv[1:])
seen, out = set(), []
for dist in md.distributions():
    path = getattr(dist, "_path", None)
    if path is None:
        continue
    name = (dist.metadata["Name"] or "").strip()
    if not name:
        continue
    norm = name.lower().replace("_", "-").replace(".", "-")
    if norm in seen:
        continue
    seen.add(norm)
    if os.path.realpath(os.path.dirname(str(path))) in own:
        continue
    out.append([str(path), name, dist.version])
print(json.dumps(out))
'''

_TF_VERSION = r'''
import json
import importlib.metadata as md
for name in %r:
    try:
        print(json.dumps([name, md.version(name)]))
        break
    except md.PackageNotFoundError:
        pass
else:
    print("null")
'''


def query_python(python: str, env: dict) -> dict:
    try:
        out = subprocess.run([python, "-I", "-c", _QUERY], capture_output=True, env=env, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"cannot run {python}: {exc}") from None
    if out.returncode != 0:
        last = out.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise BuildError(f"{python} does not start: {last[0]}")
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def installed_tensorflow(python: str, env: dict) -> tuple | None:
    out = subprocess.run([python, "-c", _TF_VERSION % (TF_DISTRIBUTIONS,)], capture_output=True, env=env,
                         timeout=120)
    if out.returncode != 0:
        return None
    value = json.loads(out.stdout.decode().strip().splitlines()[-1] or "null")
    return tuple(value) if value else None


def tool_env(extra: dict | None = None) -> dict:
    """Our environment without the settings that change what pip/uv/conda install."""
    env = {k: v for k, v in os.environ.items() if k in _KEEP or not k.startswith(_DROP_PREFIXES)}
    env.update(extra or {})
    return env


# -- pip and uv ----------------------------------------------------------------------------------------------
def pip_runner(env_python: str, info: dict, tools_dir: str, fallback_python: str | None, log: Log) -> tuple:
    """(argv prefix, extra env) that runs a pip for ``env_python`` without installing pip into it: the
    interpreter's own bundled pip (ensurepip's wheel), unpacked once under ``tools_dir``; else the
    job's Python's pip with ``--python``."""
    wheels = info.get("pip_wheels") or []
    if wheels:
        wheel = wheels[-1]
        version = os.path.basename(wheel).split("-")[1]
        dest = os.path.join(tools_dir, f"pip-{version}")
        if not os.path.isdir(os.path.join(dest, "pip")):
            os.makedirs(tools_dir, exist_ok=True)
            tmp = os.path.join(tools_dir, f".pip-{version}-{os.getpid()}-{os.urandom(4).hex()}")
            import zipfile

            try:
                with zipfile.ZipFile(wheel) as zf:
                    zf.extractall(tmp)
                try:
                    os.rename(tmp, dest)
                except OSError:
                    if not os.path.isdir(os.path.join(dest, "pip")):
                        raise
            finally:
                remove_tree(tmp)
        return [env_python, "-m", "pip"], {"PYTHONPATH": dest}
    if fallback_python:
        probe = subprocess.run([fallback_python, "-m", "pip", "--version"], capture_output=True, env=tool_env())
        if probe.returncode == 0:
            return [fallback_python, "-m", "pip", "--python", env_python], {}
    raise BuildError(f"no pip for {env_python}: its Python has no bundled pip (ensurepip) and {fallback_python} "
                     "has no pip; install uv (pip install uv) or pip")


def tools_dir(fallback: str) -> str:
    """Where the bundled pip is unpacked: the user's cache (``${XDG_CACHE_HOME:-~/.cache}/tflaunch/tools``),
    else ``fallback`` when that is not writable."""
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                         "tflaunch", "tools")
    try:
        os.makedirs(cache, exist_ok=True)
        if os.access(cache, os.W_OK | os.X_OK):
            return cache
    except OSError:
        pass
    return fallback


def certificate() -> str | None:
    for name in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        value = os.environ.get(name)
        if value and os.path.exists(value):
            return value
    return None


def pip_index_args(index: dict, find_links: list) -> list:
    args = []
    if index.get("no_index"):
        args.append("--no-index")
    elif index.get("index_url"):
        args += ["--index-url", index["index_url"]]
    for link in find_links:
        args += ["--find-links", link]
    return args


def uv_index_args(index: dict, find_links: list) -> list:
    args = []
    if index.get("no_index"):
        args += ["--no-index", "--offline"]
    elif index.get("index_url"):
        args += ["--index-url", index["index_url"]]
    for link in find_links:
        args += ["--find-links", link]
    return args


def pip_install(runner: tuple, args: list, log: Log, index: dict, find_links: list, what: str = "pip") -> None:
    argv, extra = runner
    options = ["--isolated", "--disable-pip-version-check", "--no-input", "--no-compile",
               "--no-warn-script-location", "--progress-bar", "off"]
    cert = certificate()
    if cert:
        options += ["--cert", cert]
    timeout = os.environ.get("PIP_DEFAULT_TIMEOUT")
    if timeout:
        options += ["--timeout", timeout]
    env = tool_env({"PIP_CONFIG_FILE": os.devnull, **extra})
    env.pop("PIP_CERT", None)
    env.pop("PIP_DEFAULT_TIMEOUT", None)
    run_tool(argv + ["install"] + options + pip_index_args(index, find_links) + args, log, env=env, what=what)


def uv_install(uv: str, env_python: str, args: list, log: Log, index: dict, find_links: list) -> None:
    env = tool_env()
    cert = certificate()
    if cert and not env.get("SSL_CERT_FILE"):
        env["SSL_CERT_FILE"] = cert
    run_tool([uv, "pip", "install", "--no-config", "--no-progress", "--python", env_python]
             + uv_index_args(index, find_links) + args, log, env=env, what="uv")


def write_shadows(env_python: str, site_dirs: list, log: Log) -> int:
    """Tell uv what the parent environment already provides: uv looks only at the env's own
    site-packages, pip at everything the env's Python imports (the parent too, through the .pth). For
    each distribution the env's Python sees outside its own site-packages, a metadata-only copy
    (METADATA, a RECORD of itself, marked) goes into the env before uv runs and is removed after, so uv
    keeps what the parent has exactly as pip does (and replaces it in the env when the request needs
    another version)."""
    out = subprocess.run([env_python, "-c", _VISIBLE] + site_dirs, capture_output=True, env=tool_env(),
                         timeout=120)
    if out.returncode != 0:
        raise BuildError(f"cannot list the parent environment's packages with {env_python}: "
                         + (out.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["?"])[0])
    site = site_dirs[0]
    count = 0
    for path, name, version in json.loads(out.stdout.decode().strip().splitlines()[-1]):
        if os.path.isdir(path):
            meta = os.path.join(path, "METADATA")
            if not os.path.exists(meta):
                meta = os.path.join(path, "PKG-INFO")
        else:
            meta = path
        try:
            with open(meta, "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        dist_info = f"{re.sub(r'[-_.]+', '_', name)}-{version}.dist-info"
        target = os.path.join(site, dist_info)
        if os.path.exists(target):
            continue
        os.mkdir(target)
        files = {"METADATA": data, "INSTALLER": b"tflaunch-shadow\n", SHADOW_MARK: b"parent: " + path.encode() + b"\n"}
        for fname, content in files.items():
            with open(os.path.join(target, fname), "wb") as fh:
                fh.write(content)
        record = "".join(f"{dist_info}/{f},,\n" for f in list(files) + ["RECORD"])
        with open(os.path.join(target, "RECORD"), "w") as fh:
            fh.write(record)
        count += 1
    log.line(f"uv: {count} distributions of the parent environment marked as installed")
    return count


def remove_shadows(site_dirs: list) -> None:
    for site in site_dirs:
        try:
            names = os.listdir(site)
        except OSError:
            continue
        for name in names:
            path = os.path.join(site, name)
            if name.endswith(".dist-info") and os.path.exists(os.path.join(path, SHADOW_MARK)):
                shutil.rmtree(path, ignore_errors=True)


# -- Horovod ------------------------------------------------------------------------------------------------
def wheel_cache_root() -> str:
    return os.environ.get("TFLAUNCH_WHEEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "tflaunch", "wheels")


def horovod_cache_dir(horovod: str, tensorflow: str, pytag: str, mpi: dict, root: str | None = None) -> str:
    """``<cache>/horovod-<hv>-tf<tfv>-<pytag>-<flavour><version>``: one compiled wheel per combination."""
    name = f"horovod-{horovod}-tf{tensorflow}-{pytag}-{mpi.get('flavour')}{mpi.get('version')}"
    return os.path.join(root or wheel_cache_root(), name)


def cached_wheel(directory: str, horovod: str) -> str | None:
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return None
    for name in names:
        if name.startswith(f"horovod-{horovod}-") and name.endswith(".whl"):
            return os.path.join(directory, name)
    return None


def horovod_wheel(env_python: str, horovod: str, mpi: dict, log: Log, *, index: dict | None = None,
                  find_links: list | None = None, cache_root: str | None = None) -> dict:
    """The Horovod wheel for the TensorFlow of ``env_python`` and ``mpi`` (``{"flavour", "version",
    "bin"}``): from the cache, or compiled into it (about 5 minutes on 2 cores). Returns ``{"wheel",
    "compiled", "cache", "tensorflow"}``.

    The compile: a throwaway virtualenv that sees ``env_python``'s packages (a .pth), with pip,
    setuptools and wheel (and cmake when none is on PATH), then ``pip wheel --no-deps
    --no-build-isolation --no-cache-dir horovod==V`` with HOROVOD_WITH_TENSORFLOW=1
    HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_MPI=1 MAKEFLAGS=-j<cores> and the
    MPI's bin directory on PATH before anything but that virtualenv (its mpicc/mpicxx; the virtualenv
    first so that ``python`` is the one with TensorFlow). Built in a temporary directory of the cache and
    renamed in: the cache only ever holds complete wheels.
    """
    index = index or {}
    find_links = list(find_links or [])
    env = tool_env()
    info = query_python(env_python, env)
    tf = installed_tensorflow(env_python, env)
    if tf is None:
        raise BuildError(f"horovod is built against TensorFlow but {env_python} has none: add framework_version "
                         "(--framework-version) or tensorflow to the packages")
    cache_root = cache_root or wheel_cache_root()
    directory = horovod_cache_dir(horovod, tf[1], info["tag"], mpi, cache_root)
    found = cached_wheel(directory, horovod)
    if found:
        log.line(f"horovod: reusing the cached wheel {found} (no compile)")
        return {"wheel": found, "compiled": False, "cache": directory, "tensorflow": tf[1]}
    mpi_bin = mpi.get("bin") or ""
    if not mpi_bin or not os.path.isdir(mpi_bin):
        raise BuildError(f"horovod: the MPI's bin directory {mpi_bin!r} does not exist")
    log.line(f"horovod: compiling horovod=={horovod} against {tf[0]} {tf[1]} and {mpi.get('flavour')} "
             f"{mpi.get('version')} ({mpi_bin}) into {directory} (about 5 minutes)")
    start = time.time()
    os.makedirs(cache_root, exist_ok=True)
    tmp = os.path.join(cache_root, f".build-{os.getpid()}-{os.urandom(4).hex()}")
    os.mkdir(tmp)
    try:
        venv = os.path.join(tmp, "venv")
        run_tool([env_python, "-m", "venv", "--without-pip", venv], log, env=env, what="python -m venv")
        build_python = os.path.join(venv, "bin", "python")
        binfo = query_python(build_python, env)
        own = sorted({info["purelib"], info["platlib"]})
        with open(os.path.join(binfo["purelib"], PARENT_PTH), "w") as fh:
            fh.write("".join(f"import site; site.addsitedir({p!r})\n" for p in own))
        runner = pip_runner(build_python, binfo, tools_dir(os.path.join(cache_root, ".tools")), env_python, log)
        tools = ["setuptools", "wheel"] + ([] if which("cmake") else ["cmake"])
        pip_install(runner, tools, log, index, find_links, what="pip (Horovod's build tools)")
        out = os.path.join(tmp, "out")
        argv, extra = runner
        build_env = tool_env({**HOROVOD_ENV, "MAKEFLAGS": f"-j{cpu_count()}", "PIP_CONFIG_FILE": os.devnull, **extra,
                              "PATH": os.pathsep.join([os.path.join(venv, "bin"), mpi_bin,
                                                       os.environ.get("PATH", os.defpath)])})
        cert = certificate()
        run_tool(argv + ["wheel", "--isolated", "--disable-pip-version-check", "--no-input", "--no-deps",
                         "--no-build-isolation", "--no-cache-dir", "--progress-bar", "off", "-w", out]
                 + (["--cert", cert] if cert else []) + pip_index_args(index, find_links) + [f"horovod=={horovod}"],
                 log, env=build_env, what="pip wheel horovod")
        built = [n for n in os.listdir(out) if n.startswith("horovod-") and n.endswith(".whl")]
        if not built:
            raise BuildError(f"pip wheel horovod=={horovod} made no wheel (see the build log)")
        os.makedirs(directory, exist_ok=True)
        for name in built:
            os.replace(os.path.join(out, name), os.path.join(directory, name))  # same filesystem: atomic
    finally:
        remove_tree(tmp)
    found = cached_wheel(directory, horovod)
    log.line(f"horovod: compiled {found} in {time.time() - start:.0f} s")
    return {"wheel": found, "compiled": True, "cache": directory, "tensorflow": tf[1]}


# -- the build -----------------------------------------------------------------------------------------------
def env_ready(root: str, key: str) -> dict | None:
    """env.json of the complete environment with this key, or None."""
    path = os.path.join(root, key[:SHORT])
    try:
        record = read_json(os.path.join(path, "env.json"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    if not os.path.exists(record.get("python") or ""):
        return None
    return record


def touch(path: str) -> None:
    try:
        os.utime(path)
    except FileNotFoundError:
        try:
            open(path, "ab").close()
        except OSError:
            pass
    except OSError:
        pass


def result_of(record: dict, built: bool, seconds: float) -> dict:
    return {"key": record["key"], "path": record["path"], "python": record["python"], "built": built,
            "builder": record.get("builder"), "seconds": round(seconds, 3), "freeze": record.get("freeze", []),
            "horovod": record.get("horovod")}


def relocate(staging: str, final: str, log: Log) -> None:
    """Rewrite the staging path to the final one where the tools wrote it: bin/ (script shebangs,
    activate scripts) and pyvenv.cfg. Everything else a venv holds uses relative paths."""
    old, new = staging.encode(), final.encode()
    candidates = [os.path.join(staging, "pyvenv.cfg")]
    bindir = os.path.join(staging, "bin")
    try:
        candidates += [os.path.join(bindir, n) for n in os.listdir(bindir)]
    except OSError:
        pass
    count = 0
    for path in candidates:
        try:
            if os.path.islink(path) or not os.path.isfile(path) or os.path.getsize(path) > 1 << 20:
                continue
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        if old not in data or b"\0" in data[:4096]:
            continue
        mode = os.stat(path).st_mode
        atomic_write(path, data.replace(old, new))
        os.chmod(path, mode & 0o7777)
        count += 1
    log.line(f"relocated {count} files from {staging} to {final}")


class Builder:
    def __init__(self, config: dict, log: Log) -> None:
        self.config = config
        self.request = config["request"]
        self.root = os.path.abspath(config["root"])
        self.key = request_key(self.request)
        self.short = self.key[:SHORT]
        self.final = os.path.join(self.root, self.short)
        self.log = log
        self.index = key_index(self.request.get("index"))
        here = config.get("find_links_here")
        self.find_links = list(here) if here is not None else list(self.index["find_links"])
        self.lock = Lock(self.root, self.short,
                         float(config.get("lock_timeout") or os.environ.get("TFLAUNCH_ENV_LOCK_TIMEOUT")
                               or DEFAULT_LOCK_TIMEOUT),
                         float(config.get("heartbeat") or DEFAULT_HEARTBEAT))
        self.staging: str | None = None

    # the whole protocol: reuse, or wait, or build
    def run(self) -> dict:
        start = time.time()
        if config_key := self.config.get("key"):
            if config_key != self.key:
                raise BuildError(f"the request's key {config_key[:SHORT]} is not what this builder computes "
                                 f"({self.short}): tflaunch versions differ between launcher and builder")
        deadline = None if self.config.get("timeout") is None else start + float(self.config["timeout"])
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFull("no space left") from None
            raise BuildError(f"cannot create {self.root}: {exc.strerror or exc}") from None
        delay, said = 0.1, 0.0
        while True:
            record = env_ready(self.root, self.key)
            if record is not None:
                touch(os.path.join(self.final, ".last-used"))
                self.log.line(f"environment {self.short} is ready: {self.final}")
                return result_of(record, False, time.time() - start)
            if self.lock.try_acquire():
                break
            holder = self.lock.holder() or {}
            now = time.time()
            if now - said >= 30 or not said:
                said = now
                self.log.line(f"waiting for the build of {self.short} by pid {holder.get('pid')} on "
                              f"{holder.get('host')} (since {holder.get('started')})")
            if deadline is not None and now > deadline:
                raise BuildError(f"timed out after {self.config['timeout']} s waiting for the build of environment "
                                 f"{self.short} by pid {holder.get('pid')} on {holder.get('host')}")
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)
        try:
            record = env_ready(self.root, self.key)  # built while we took the lock
            if record is not None:
                return result_of(record, False, time.time() - start)
            record = self.build()
            return result_of(record, True, time.time() - start)
        finally:
            self.lock.release()

    def _clear_leftovers(self) -> None:
        """Under the lock: what killed builders of this key left (staging dirs, an incomplete final)."""
        for name in os.listdir(self.root):
            if name.startswith((f".build-{self.short}-", ".trash-")):
                self.log.line(f"removing {name}, left by an interrupted build")
                remove_tree(os.path.join(self.root, name))
        if os.path.lexists(self.final):
            trash = os.path.join(self.root, f".trash-{self.short}-{os.urandom(4).hex()}")
            self.log.line(f"removing the incomplete {self.final}")
            os.rename(self.final, trash)
            remove_tree(trash)

    def build(self) -> dict:
        self._clear_leftovers()
        kind = self.request.get("kind", "venv")
        if kind == "conda":
            return self.build_conda()
        staging = os.path.join(self.root, f".build-{self.short}-{os.urandom(4).hex()}")
        self.staging = staging
        self.lock.record["staging"] = staging
        start = time.time()
        env = tool_env()
        python = self.request["python"]
        self.log.line(f"building environment {self.short} with {python} in {staging}")
        run_tool([python, "-m", "venv", "--without-pip", "--prompt", f"tflaunch-{self.short}", staging], self.log,
                 env=env, what="python -m venv")
        self.log.attach(os.path.join(staging, "build.log"))
        env_python = os.path.join(staging, "bin", "python")
        info = query_python(env_python, env)
        site_dirs = sorted({info["purelib"], info["platlib"]}, key=lambda p: p != info["purelib"])
        self.install(env_python, info, site_dirs, staging)
        record = self.finish(staging, self.final, env_python, info, site_dirs, start)
        relocate(staging, self.final, self.log)
        self.log.close()
        try:
            os.rename(staging, self.final)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and env_ready(self.root, self.key):
                self.log.line("another builder finished first; using its environment")
                remove_tree(staging)
                return env_ready(self.root, self.key) or record
            raise
        self.staging = None
        return record

    def parent_pth(self, site: str) -> None:
        parents = list(self.request.get("parent_site") or [])
        if self.request.get("inherit") and parents:
            with open(os.path.join(site, PARENT_PTH), "w") as fh:
                fh.write("".join(f"import site; site.addsitedir({p!r})\n" for p in parents))
            self.log.line(f"the environment sees the packages of {', '.join(parents)}")

    def requirements(self) -> list:
        reqs = list(self.request.get("requirements") or [])
        framework = self.request.get("framework") or {}
        reqs += [r for r in framework.get("requirements") or [] if r not in reqs]
        return reqs

    def choose_builder(self) -> tuple:
        wanted = self.config.get("builder") or "auto"
        uv = self.config.get("uv")
        if uv and not os.path.exists(uv):
            uv = None
        uv = uv or which("uv")
        if wanted == "uv" and not uv:
            raise BuildError("the uv builder was asked for but uv is not installed here (pip install uv, or put uv "
                             "on PATH), or use --builder pip")
        if wanted == "pip" or not uv:
            return "pip", None
        return "uv", uv

    def install(self, env_python: str, info: dict, site_dirs: list, staging: str, requirements: list | None = None,
                inherit: bool = True) -> None:
        if inherit:
            self.parent_pth(site_dirs[0])
        reqs = self.requirements() if requirements is None else requirements
        name, uv = self.choose_builder()
        self.builder_name = name
        req_file = os.path.join(staging, "tflaunch-requirements.txt")
        with open(req_file, "w") as fh:
            fh.write("".join(r + "\n" for r in reqs))
        if reqs:
            self.log.line(f"installing with {name}: {', '.join(reqs)}")
            self.installer(name, uv, env_python, info, site_dirs, ["-r", req_file])
        horovod = self.request.get("horovod")
        self.horovod_result = None
        if horovod:
            found = horovod_wheel(env_python, horovod["version"], horovod.get("mpi") or {}, self.log,
                                  index=self.index, find_links=self.find_links)
            self.horovod_result = found
            self.log.line(f"installing {found['wheel']} with {name}")
            # the other requirements again: Horovod's dependencies cannot move their pins
            self.installer(name, uv, env_python, info, site_dirs, [found["wheel"], "-r", req_file])
        os.unlink(req_file)

    def installer(self, name: str, uv: str | None, env_python: str, info: dict, site_dirs: list, args: list) -> None:
        """Install ``args`` with uv (told what the parent environment has) or pip."""
        if name == "uv":
            shadows = bool(self.request.get("inherit") and self.request.get("parent_site"))
            try:
                if shadows:
                    write_shadows(env_python, site_dirs, self.log)
                uv_install(str(uv), env_python, args, self.log, self.index, self.find_links)
            finally:
                if shadows:
                    remove_shadows(site_dirs)
        else:
            runner = pip_runner(env_python, info, tools_dir(os.path.join(self.root, ".tools")),
                                self.request.get("python"), self.log)
            pip_install(runner, args, self.log, self.index, self.find_links)

    def finish(self, staging: str, final: str, env_python: str, info: dict, site_dirs: list, start: float) -> dict:
        check = subprocess.run([env_python, "-c", "import sys"], capture_output=True, env=tool_env())
        if check.returncode != 0:
            raise BuildError("the new environment's Python does not start: "
                             + (check.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["?"])[0])
        frozen = freeze(site_dirs)
        rel = os.path.relpath(env_python, staging)
        record = {
            "format": FORMAT, "key": self.key, "short": self.short, "kind": self.request.get("kind", "venv"),
            "path": final, "python": os.path.join(final, rel), "python_version": info.get("version"),
            "builder": getattr(self, "builder_name", None), "tools": getattr(self, "tools", None) or
            getattr(self, "builder_name", None), "created": now_iso(), "seconds": round(time.time() - start, 3),
            "host": os.uname().nodename, "freeze": frozen, "request": self.request,
            "find_links_used": self.find_links, "horovod": getattr(self, "horovod_result", None),
            "site_packages": [os.path.join(final, os.path.relpath(p, staging)) for p in site_dirs],
        }
        record["size"] = tree_size(staging)
        with open(os.path.join(staging, "freeze.txt"), "w") as fh:
            fh.write("".join(line + "\n" for line in frozen))
        open(os.path.join(staging, ".last-used"), "ab").close()
        atomic_write(os.path.join(staging, "env.json"), (json.dumps(record, indent=1) + "\n").encode("ascii"))
        self.log.line(f"environment {self.short}: {len(frozen)} distributions, built in {record['seconds']} s "
                      f"with {record['builder']}")
        return record

    def build_conda(self) -> dict:
        """conda/mamba/micromamba ``create -y -p <final> python=X.Y pkgs...``, then the pip packages with
        the prefix's Python (built in place: see the module's docstring)."""
        tool = self.config.get("conda") or self.request.get("conda_tool")
        tool = (tool if tool and os.path.exists(tool) else None) or which(os.path.basename(tool or "conda")) \
            or which("mamba") or which("micromamba") or which("conda")
        if not tool:
            raise BuildError("conda_packages need conda, mamba or micromamba on PATH, and none is here; "
                             "use pip_packages instead")
        start = time.time()
        final = self.final
        self.staging = final
        self.lock.record["staging"] = final
        version = ".".join((self.request.get("python_version") or "").split(".")[:2])
        argv = [tool, "create", "-y", "-p", final] + ([f"python={version}"] if version else []) \
            + list(self.request.get("conda_packages") or [])
        if self.index.get("no_index"):
            argv.append("--offline")
        self.log.line(f"building conda environment {self.short} with {os.path.basename(tool)} in {final}")
        run_tool(argv, self.log, env=tool_env({k: v for k, v in os.environ.items()
                                               if k.startswith(("CONDA_", "MAMBA_"))}), what=os.path.basename(tool))
        self.log.attach(os.path.join(final, "build.log"))
        env_python = os.path.join(final, "bin", "python")
        if not os.path.exists(env_python):
            raise BuildError(f"{os.path.basename(tool)} create made no {env_python}")
        info = query_python(env_python, tool_env())
        site_dirs = sorted({info["purelib"], info["platlib"]}, key=lambda p: p != info["purelib"])
        self.install(env_python, info, site_dirs, final, inherit=False)
        self.tools = os.path.basename(tool) + (f" + {self.builder_name}" if self.requirements() else "")
        self.builder_name = "conda"
        record = self.finish(final, final, env_python, info, site_dirs, start)
        self.log.close()
        self.staging = None
        return record

    def abandon(self) -> None:
        """After a failure: nothing half-built stays where it could be used."""
        self.log.close()
        if self.staging:
            if self.staging == self.final:  # conda, in place: move it out of the way first
                trash = os.path.join(self.root, f".trash-{self.short}-{os.urandom(4).hex()}")
                try:
                    os.rename(self.final, trash)
                except OSError:
                    trash = self.final
                remove_tree(trash)
            else:
                remove_tree(self.staging)
            self.staging = None


def message_for(exc: BaseException, key: str, root: str, index: dict, find_links: list) -> str:
    short = key[:SHORT]
    if isinstance(exc, DiskFull) or is_disk_full(exc):
        return f"No space left on device while building environment {short} in {root}"
    text = str(exc)
    if isinstance(exc, MissingPackage):
        name = exc.name
        if index.get("no_index"):
            where = ", ".join(find_links) or "(no --find-links given)"
            return f"no wheel for {name!r} in --no-index wheelhouse {where} (environment {short})"
        sources = [index.get("index_url") or "https://pypi.org/simple"] + list(find_links)
        return f"no distribution for {name!r} in {', '.join(sources)} (environment {short})"
    if isinstance(exc, BuildError):
        return f"{text} (environment {short} in {root})"
    if isinstance(exc, OSError):
        return f"building environment {short} in {root} failed: {exc.strerror or exc}" + \
            (f": {exc.filename}" if getattr(exc, "filename", None) else "")
    return f"building environment {short} in {root} failed: {exc!r}"


def build_main(config: dict, out: object = None) -> int:
    """Build as the config says; print the result (or error) line; return the exit status."""
    stream = out if out is not None else sys.stdout
    log = Log(getattr(stream, "buffer", None))

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(sig, stop)
        except (ValueError, OSError):
            pass
    try:
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # the launcher may go away: finish the build anyway
    except (AttributeError, ValueError, OSError):
        pass
    builder = None
    try:
        builder = Builder(config, log)
        result = builder.run()
    except BaseException as exc:
        if builder is not None:
            builder.abandon()
        if isinstance(exc, KeyboardInterrupt):
            message = f"the build of environment {builder.short if builder else '?'} was interrupted " \
                      f"({exc.args[0] if exc.args else 'SIGINT'}); nothing was kept"
        elif builder is not None:
            message = message_for(exc, builder.key, builder.root, builder.index, builder.find_links)
        else:
            message = f"invalid builder input: {exc!r}"
        line = ERROR_MARK + json.dumps({"message": message})
        _emit(stream, line)
        return 1
    _emit(stream, RESULT_MARK + json.dumps(result))
    return 0


def _emit(stream: object, line: str) -> None:
    try:
        stream.write("\n" + line + "\n")  # type: ignore[attr-defined]
        stream.flush()  # type: ignore[attr-defined]
    except (OSError, ValueError):
        pass


# -- command line (from a checkout: python -m tflaunch.remote.envbuild ...) -----------------------------------------
def _mpi_install(mpirun: str) -> dict:
    try:
        from tflaunch.plan.mpirun import detect  # only when run from a checkout or an installed tflaunch
    except ImportError:
        raise BuildError("--mpirun needs tflaunch importable (run with python -m tflaunch.remote.envbuild from a "
                         "checkout); or give --mpi-flavour, --mpi-version and --mpi-bin") from None
    install = detect(mpirun)
    return {"flavour": install.flavour, "version": install.version,
            "bin": os.path.dirname(os.path.abspath(install.path))}


def main(argv: list | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].lstrip().startswith("{"):  # python -I -S -c SOURCE JSON
        return build_main(json.loads(argv[0]))
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tflaunch.remote.envbuild", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="build from a JSON config (what tflaunch.envs.builder_command passes)")
    p.add_argument("config", help="the JSON, or @FILE")
    p = sub.add_parser("horovod-wheel", help="print the cached Horovod wheel for PYTHON's TensorFlow and an MPI, "
                                             "compiling it into the cache first when needed")
    p.add_argument("--python", required=True, help="the environment's Python (with TensorFlow installed)")
    p.add_argument("--horovod", default="0.28.1", help="Horovod version (default 0.28.1)")
    p.add_argument("--mpirun", help="the MPI's mpirun (flavour and version from mpirun --version)")
    p.add_argument("--mpi-flavour")
    p.add_argument("--mpi-version")
    p.add_argument("--mpi-bin")
    p.add_argument("--cache", help="wheel cache (default $TFLAUNCH_WHEEL_CACHE, else "
                                   "${XDG_CACHE_HOME:-~/.cache}/tflaunch/wheels)")
    p.add_argument("--find-links", action="append", default=[])
    p.add_argument("--index-url")
    p.add_argument("--no-index", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "build":
        text = args.config
        if text.startswith("@"):
            with open(text[1:]) as fh:
                text = fh.read()
        return build_main(json.loads(text))
    log = Log(getattr(sys.stderr, "buffer", None))
    try:
        if args.mpirun:
            mpi = _mpi_install(args.mpirun)
        else:
            if not (args.mpi_flavour and args.mpi_version and args.mpi_bin):
                parser.error("give --mpirun, or --mpi-flavour, --mpi-version and --mpi-bin")
            mpi = {"flavour": args.mpi_flavour, "version": args.mpi_version, "bin": os.path.abspath(args.mpi_bin)}
        found = horovod_wheel(os.path.abspath(args.python), args.horovod, mpi, log,
                              index={"no_index": args.no_index, "index_url": args.index_url},
                              find_links=args.find_links, cache_root=args.cache)
    except (BuildError, OSError) as exc:
        message = "No space left on device while building the Horovod wheel" if is_disk_full(exc) else str(exc)
        sys.stderr.write(f"tflaunch-env: error: {message}\n")
        return 1
    sys.stdout.write(found["wheel"] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
