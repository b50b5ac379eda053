"""Job environments: ``pip_packages`` / ``conda_packages`` / ``framework_version`` as virtual environments
(or conda prefixes) built once per key under the home, offline-capable, without containers.

:func:`request_environment` turns what a job asks for into an :class:`EnvRequest` (or ``None`` when the
job's interpreter already has everything): requirements normalized, the interpreter probed once (and
cached by its files' stat under the home), a TensorFlow series added when ``framework_version`` asks
for one the interpreter lacks. Its :attr:`EnvRequest.key` (sha256) names the environment.
:func:`ensure_environment` reuses a built environment at once (no subprocess), else runs the builder
(:mod:`tflaunch.remote.envbuild`, standard library only, shipped as source with :func:`builder_command`) in a
subprocess: it waits for a concurrent build of the same key, or builds aside and renames into place.

What a job asks for is parsed in :mod:`tflaunch.env_requirements` (requirements, markers, index
options, TensorFlow pins); the interpreter, uv, conda and the index are probed in
:mod:`tflaunch.env_probe`. This module keeps the requests and results, the builds and the built
environments (list, find, remove), and re-exports the public names of both.

Standard library only, and imported lazily: ``tflaunch --help`` never loads it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

from .remote import envbuild as _envbuild
from . import env_requirements
from .env_probe import check_framework_available, find_conda, find_uv, probe_interpreter
from .env_requirements import (TF_SERIES, IndexOptions, _conda_packages, framework_requirements,
                               parse_requirements, read_requirements_file)
from .errors import EnvBuildError, EnvBusyError, EnvNotFoundError, SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, BinaryIO, Mapping, Sequence

__all__ = [
    "ENVS_DIR", "home_envs_root", "node_envs_root", "IndexOptions", "parse_requirements", "read_requirements_file",
    "EnvRequest", "EnvResult", "request_environment", "ensure_environment", "builder_command",
    "parse_builder_output", "list_environments", "find_environment", "remove_environment", "find_uv",
    "find_conda", "TF_SERIES", "framework_requirements", "is_built", "probe_interpreter",
]

# Importable from here as they always were (not in __all__, as before); they live in env_requirements.
PYPI = env_requirements.PYPI
normalize_name = env_requirements.normalize_name
parse_requirement = env_requirements.parse_requirement

ENVS_DIR = "envs"
SHORT = _envbuild.SHORT
HOROVOD_DEFAULT = "0.28.1"  # Horovod's last release; it builds against TensorFlow <= 2.15


def home_envs_root(home: str) -> str:
    """``<home>/envs``: where environments live for hosts that see the home."""
    from .history.store import resolve_home

    return os.path.join(resolve_home(home), ENVS_DIR)


def node_envs_root(scratch_root: str | None = None) -> str:
    """A node-local root for hosts that cannot see the home: ``($TMPDIR or /tmp)/tflaunch-<uid>/envs``."""
    base = scratch_root or os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(base, f"tflaunch-{os.getuid()}", ENVS_DIR)


# -- requests and results ----------------------------------------------------------------------------------
@dataclass
class EnvRequest:
    """What to build (JSON-able; the run record keeps it as ``spec["environment"]``). :attr:`key` covers
    every field that changes the result; ``conda_tool`` (which of conda/mamba/micromamba) does not."""

    kind: str = "venv"                                           # "venv" | "conda"
    python: str = ""                                             # the job's interpreter (absolute)
    python_version: str = ""                                     # "3.11.7"
    implementation: str = "cpython"
    platform: str = ""                                           # sysconfig.get_platform(): "linux-x86_64"
    requirements: list[str] = field(default_factory=list)       # canonical, sorted (Horovod apart)
    local_files: dict[str, str] = field(default_factory=dict)   # local archives -> sha256 of their content
    conda_packages: list[str] = field(default_factory=list)
    index: dict[str, Any] = field(default_factory=lambda: IndexOptions().to_dict())
    inherit: bool = True                                         # sees the parent's packages (a .pth)
    parent_site: list[str] = field(default_factory=list)        # the parent's site-packages dirs
    framework: dict[str, Any] | None = None                      # framework_requirements(...) when added
    horovod: dict[str, Any] | None = None                        # {"version", "requirement", "mpi": {flavour, version, bin}}
    conda_tool: str | None = None
    format: int = _envbuild.FORMAT

    @property
    def key(self) -> str:
        return _envbuild.request_key(self.to_dict())

    @property
    def short_key(self) -> str:
        return self.key[:SHORT]

    def index_options(self) -> IndexOptions:
        return IndexOptions.from_mapping(self.index)

    def packages(self) -> list[str]:
        """Everything asked for, for display: requirements, framework, Horovod, conda packages."""
        out = list(self.requirements)
        out += [r for r in (self.framework or {}).get("requirements", []) if r not in out]
        if self.horovod:
            out.append(self.horovod["requirement"])
        out += [f"conda:{p}" for p in self.conda_packages]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "kind": self.kind, "python": self.python, "python_version": self.python_version,
                "implementation": self.implementation, "platform": self.platform,
                "requirements": list(self.requirements), "local_files": dict(self.local_files),
                "conda_packages": list(self.conda_packages), "index": dict(self.index), "inherit": self.inherit,
                "parent_site": list(self.parent_site), "framework": self.framework, "horovod": self.horovod,
                "conda_tool": self.conda_tool}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EnvRequest:
        from collections.abc import Mapping as _Mapping

        if not isinstance(data, _Mapping) or not data.get("python"):
            raise SpecError(f"environment: not an environment request: {data!r}")
        known = {f for f in cls.__dataclass_fields__}  # type: ignore[attr-defined]
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class EnvResult:
    """A built (or reused) environment: ``python`` is the interpreter the job runs."""

    key: str
    path: str
    python: str
    built: bool            # built by this call; False: reused (or built by a concurrent caller we waited for)
    builder: str | None    # "uv" | "pip" | "conda" (what built it; env.json "tools" says which conda and pip/uv)
    seconds: float         # time this call took
    freeze: list[str] = field(default_factory=list)  # name==version of the env's own packages
    horovod: dict[str, Any] | None = None            # {"wheel", "compiled", "cache", "tensorflow"}

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "path": self.path, "python": self.python, "built": self.built,
                "builder": self.builder, "seconds": self.seconds, "freeze": list(self.freeze), "horovod": self.horovod}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EnvResult:
        try:
            return cls(key=str(data["key"]), path=str(data["path"]), python=str(data["python"]),
                       built=bool(data.get("built")), builder=data.get("builder"),
                       seconds=float(data.get("seconds") or 0.0), freeze=list(data.get("freeze") or []),
                       horovod=data.get("horovod"))
        except (KeyError, TypeError, ValueError) as exc:
            raise EnvBuildError(f"invalid environment result {data!r}: {exc}") from None


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _horovod(requirements: list[str], mpi: Mapping[str, Any] | None, python: str,
             env: Mapping[str, str] | None) -> tuple[list[str], dict[str, Any] | None]:
    rest, found = [], []
    for req in requirements:
        (found if re.match(r"horovod(\[|=|$| |;|<|>|!|~)", req) else rest).append(req)
    if not found:
        return requirements, None
    if len(found) > 1:
        raise SpecError(f"pip_packages: horovod is given twice ({', '.join(found)})")
    m = re.fullmatch(r"horovod(?:\[[^\]]*\])?(?:==([0-9][0-9A-Za-z.+!-]*))?(?:;.*)?", found[0])
    if not m:
        raise SpecError(f"pip_packages: {found[0]!r}: give Horovod without a version or with an exact one "
                        f"(horovod=={HOROVOD_DEFAULT}); it is compiled for the environment")
    version = m.group(1) or HOROVOD_DEFAULT
    if mpi is None:
        from .plan.mpirun import detect, find_mpirun

        install = detect(find_mpirun(None, python, env))
        mpi = {"flavour": install.flavour, "version": install.version, "path": install.path}
    flavour, mversion = mpi.get("flavour"), mpi.get("version")
    bin_dir = mpi.get("bin") or (os.path.dirname(os.path.abspath(str(mpi["path"]))) if mpi.get("path") else None)
    if not (flavour and mversion and bin_dir):
        raise SpecError(f"mpi: expected {{'flavour', 'version', 'bin'}} (tflaunch.plan.mpirun.detect), "
                        f"got {dict(mpi)!r}")
    return rest, {"version": version, "requirement": f"horovod=={version}",
                  "mpi": {"flavour": str(flavour), "version": str(mversion), "bin": os.path.abspath(str(bin_dir))}}


def request_environment(python: str, *, pip_packages: Sequence[str] = (), requirements_file: str | None = None,
                        conda_packages: Sequence[str] = (), framework_version: str | None = None,
                        use_gpu: bool = False, index: IndexOptions | None = None, inherit: bool = True,
                        mpi: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                        home: str | None = None, root: str | None = None) -> EnvRequest | None:
    """What the job's environment must be, or ``None`` when the interpreter does as it is (no packages,
    and it already imports the TensorFlow asked for). One-line SpecError for bad input: an unparsable or
    VCS/URL requirement, conda without conda, a TensorFlow the index/wheelhouse lacks for this Python.

    ``home`` (default ``$TFLAUNCH_HOME``/``~/.tflaunch``) caches the interpreter probe; ``root`` (default
    ``<home>/envs``) is where an environment already built with this key means that the index is not
    asked whether ``framework_version`` exists.
    """
    requirements = parse_requirements(pip_packages if isinstance(pip_packages, str) else list(pip_packages or ()),
                                      "pip_packages")
    if requirements_file is not None:
        requirements = sorted(set(requirements) | set(read_requirements_file(requirements_file)))
    conda = _conda_packages(conda_packages if isinstance(conda_packages, str) else list(conda_packages or ()))
    if framework_version is not None:
        framework_requirements(framework_version, use_gpu)  # validates its form
    if not requirements and not conda and framework_version is None:
        return None
    from .probe import resolve_python, version_matches
    from .history.store import resolve_home

    python = resolve_python(python)
    home = resolve_home(home)
    info = probe_interpreter(python, env, home)
    framework = None
    if framework_version is not None:
        tf = info.get("tensorflow")
        if not (tf and version_matches(framework_version, tf[1])):
            framework = framework_requirements(framework_version, use_gpu)
    if not requirements and not conda and framework is None:
        return None
    requirements, horovod = _horovod(requirements, mpi, python, env)
    local_files = {}
    for req in requirements:
        if " @ file://" in req:
            path = req.split(" @ file://", 1)[1].split(" ;")[0]
            if os.path.isfile(path):
                local_files[path] = _file_sha256(path)
    options = index or IndexOptions()
    if not isinstance(options, IndexOptions):
        options = IndexOptions.from_mapping(options)
    kind = "conda" if conda else "venv"
    inherit_now = bool(inherit) and framework is None and kind == "venv"
    request = EnvRequest(kind=kind, python=python, python_version=info["python_version"],
                         implementation=info.get("implementation", "cpython"), platform=info.get("platform", ""),
                         requirements=requirements, local_files=local_files, conda_packages=conda,
                         index=options.to_dict(), inherit=inherit_now,
                         parent_site=list(info.get("site") or []) if inherit_now else [],
                         framework=framework, horovod=horovod)
    root = root or os.path.join(home, ENVS_DIR)
    if is_built(root, request.key):
        return request
    if kind == "conda":
        request.conda_tool = find_conda(env)
        if request.conda_tool is None:
            raise SpecError("conda_packages (--conda): building a conda environment needs conda, mamba or micromamba "
                            "on PATH, and none was found; give the packages as pip_packages (--pip) instead")
    if framework is not None:
        check_framework_available(request, info, options)
    return request


# -- building ----------------------------------------------------------------------------------------------
def _ready_record(root: str, key: str) -> dict[str, Any] | None:
    return _envbuild.env_ready(root, key)


def is_built(root: str, key: str) -> bool:
    """Whether the environment with this key is complete under ``root``."""
    return _ready_record(root, key) is not None


_SOURCE: list[str] = []


def _builder_source() -> str:
    if not _SOURCE:
        from .remote.bundle import ENVBUILD, shipped_source

        try:
            _SOURCE.append(shipped_source(ENVBUILD))
        except RuntimeError as exc:
            raise EnvBuildError(f"cannot read the source of tflaunch.remote.envbuild: {exc}") from None
    return _SOURCE[0]


def builder_command(python: str, request: EnvRequest, root: str, *, builder: str = "auto", uv: str | None = None,
                    find_links_here: Sequence[str] | None = None, timeout: float | None = None) -> list[str]:
    """argv that builds (or reuses, or waits for) the environment on any host with ``python`` (>= 3.9):
    ``[python, "-I", "-S", "-c", <source of _envbuild.py>, <json>]``. Its output is the build log; its
    last stdout line the result (see :func:`parse_builder_output`). ``find_links_here``: the
    wheelhouses as this host sees them (the key does not change)."""
    if builder not in ("auto", "uv", "pip"):
        raise SpecError(f"builder (--builder): expected auto, uv or pip, got {builder!r}")
    config = {"request": request.to_dict(), "key": request.key, "root": os.path.abspath(root), "builder": builder,
              "uv": uv, "find_links_here": list(find_links_here) if find_links_here is not None else None,
              "timeout": timeout, "lock_timeout": os.environ.get("TFLAUNCH_ENV_LOCK_TIMEOUT")}
    return [python, "-I", "-S", "-c", _builder_source(), json.dumps(config)]


def parse_builder_output(output: bytes) -> EnvResult:
    """The builder's result from its output (its last ``TFLAUNCH_ENV_RESULT`` line); EnvBuildError with
    the builder's one-line message when it failed."""
    text = output.decode("utf-8", "replace") if isinstance(output, (bytes, bytearray)) else str(output)
    for line in reversed(text.splitlines()):
        if line.startswith(_envbuild.RESULT_MARK):
            return EnvResult.from_dict(json.loads(line[len(_envbuild.RESULT_MARK):]))
        if line.startswith(_envbuild.ERROR_MARK):
            try:
                message = json.loads(line[len(_envbuild.ERROR_MARK):])["message"]
            except (ValueError, KeyError, TypeError):
                message = line[len(_envbuild.ERROR_MARK):]
            raise EnvBuildError(str(message))
    last = [ln for ln in text.splitlines() if ln.strip()][-1:] or ["no output"]
    raise EnvBuildError(f"the environment builder ended without a result; its last words: {last[0][:300]}")


def ensure_environment(request: EnvRequest, root: str, *, log: BinaryIO | None = None, builder: str = "auto",
                       find_links_here: Sequence[str] | None = None, timeout: float | None = None,
                       uv: str | None = None, python: str | None = None) -> EnvResult:
    """Build (or reuse, or wait for a concurrent builder of) the environment under ``root``.

    A complete environment with the key is returned at once (no subprocess). Otherwise the builder runs
    as a subprocess of ``python`` (default: the launcher's), its output streamed to ``log``; ``timeout``
    bounds the wait for another builder. EnvBuildError names the cause.
    """
    start = time.monotonic()
    root = os.path.abspath(root)
    key = request.key
    record = _ready_record(root, key)
    used = os.path.join(root, key[:SHORT], ".last-used")  # its mtime: when a run last used it (`tflaunch gc`)
    if record is not None:
        _envbuild.touch(used)
    if record is not None and os.path.exists(used):  # else removed meanwhile (`tflaunch gc`): built again below
        return EnvResult(key=key, path=record["path"], python=record["python"], built=False,
                         builder=record.get("builder"), seconds=round(time.monotonic() - start, 6),
                         freeze=list(record.get("freeze") or []), horovod=record.get("horovod"))
    argv = builder_command(python or sys.executable, request, root, builder=builder,
                           uv=uv if uv is not None else find_uv(), find_links_here=find_links_here, timeout=timeout)
    logger = logging.getLogger(__name__)
    logger.info("environment %s: building or waiting for it under %s", key[:SHORT], root)
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise EnvBuildError(f"cannot start the environment builder {argv[0]}: {exc.strerror or exc}") from None
    assert proc.stdout is not None
    tail = bytearray()
    try:
        while True:
            chunk = proc.stdout.read1(65536)  # type: ignore[attr-defined]
            if not chunk:
                break
            tail += chunk
            del tail[:-(1 << 20)]
            if log is not None:
                try:
                    log.write(chunk)
                    log.flush()
                except (OSError, ValueError):
                    log = None
            else:
                for line in chunk.decode("utf-8", "replace").splitlines():
                    if line.strip() and not line.startswith(("TFLAUNCH_ENV_", "tflaunch-env: $")):
                        logger.debug("env %s: %s", key[:SHORT], line)
        rc = proc.wait()
    except BaseException:
        proc.terminate()  # the builder removes what it started and releases the lock
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    if rc < 0:
        import signal

        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        raise EnvBuildError(f"the environment builder was killed by {name} while building environment {key[:SHORT]} in "
                            f"{root}; nothing half-built is used: run again to rebuild it")
    result = parse_builder_output(bytes(tail))
    result.seconds = round(time.monotonic() - start, 3)
    return result


# -- listing and removing ----------------------------------------------------------------------------------
def _iso(t: float | None) -> str | None:
    return _envbuild.now_iso(t) if t else None


def _entry(root: str, short: str) -> dict[str, Any]:
    path = os.path.join(root, short)
    lock = _envbuild.Lock(root, short, float(os.environ.get("TFLAUNCH_ENV_LOCK_TIMEOUT") or
                                             _envbuild.DEFAULT_LOCK_TIMEOUT))
    holder = lock.holder()
    record = None
    try:
        record = _envbuild.read_json(os.path.join(path, "env.json"))
    except (OSError, ValueError):
        pass
    entry: dict[str, Any] = {"key": short, "short": short, "path": path, "status": "broken", "python": None,
                             "python_version": None, "builder": None, "packages": [], "size": None, "created": None,
                             "last_used": None, "building_by": None}
    if isinstance(record, dict) and record.get("key", "").startswith(short):
        request = EnvRequest.from_dict(record.get("request") or {"python": record.get("python")})
        ok = record.get("key") == request.key and os.path.exists(record.get("python") or "")
        entry.update(key=record["key"], python=record.get("python"), python_version=record.get("python_version"),
                     builder=record.get("builder"), packages=request.packages(), size=record.get("size"),
                     created=record.get("created"), status="ready" if ok else "broken", record=record)
        try:
            entry["last_used"] = _iso(os.stat(os.path.join(path, ".last-used")).st_mtime)
        except OSError:
            entry["last_used"] = entry["created"]
    elif not os.path.isdir(path):
        entry.update(status="broken" if holder is None else "building", path=None)
    if holder is not None and entry["status"] != "ready":
        entry.update(status="building", building_by={"host": holder.get("host"), "pid": holder.get("pid"),
                                                      "started": holder.get("started")})
    return entry


def list_environments(root: str) -> list[dict[str, Any]]:
    """Every environment under ``root``: ``{"key", "short", "status" (ready | building | broken), "path",
    "python", "python_version", "builder", "packages", "size", "created", "last_used", "building_by"}``
    (``record``: env.json, when there is one), newest first. An interrupted build shows as broken until
    the next build of it (or ``remove_environment``) clears it."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    shorts = {n for n in names if re.fullmatch(r"[0-9a-f]{%d}" % SHORT, n)}
    shorts |= {m.group(1) for n in names for m in [re.match(r"\.build-([0-9a-f]{%d})-" % SHORT, n)] if m}
    try:
        shorts |= {n for n in os.listdir(os.path.join(root, ".locks")) if re.fullmatch(r"[0-9a-f]{%d}" % SHORT, n)}
    except OSError:
        pass
    entries = []
    for short in shorts:
        entry = _entry(root, short)
        if entry["status"] == "broken" and entry["path"] is None:
            if not any(n.startswith(f".build-{short}-") for n in names):
                continue  # only a released lock: nothing there
            entry["path"] = os.path.join(root, sorted(n for n in names if n.startswith(f".build-{short}-"))[0])
        entries.append(entry)
    entries.sort(key=lambda e: (e.get("created") or "", e["short"]), reverse=True)
    return entries


def find_environment(root: str, ref: str) -> dict[str, Any]:
    """The environment whose key starts with ``ref`` (EnvNotFoundError when none, or several, match)."""
    if not isinstance(ref, str) or not re.fullmatch(r"[0-9a-f]{1,64}", ref):
        raise EnvNotFoundError(f"invalid environment key {ref!r} (a prefix of the keys `tflaunch env list` shows)")
    matches = [e for e in list_environments(root)
               if e["key"].startswith(ref) or e["short"].startswith(ref)
               or (len(ref) > SHORT and len(e["key"]) == SHORT and ref.startswith(e["short"]))]
    if not matches:
        raise EnvNotFoundError(f"no environment {ref!r} in {root} (see `tflaunch env list`)")
    if len(matches) > 1:
        shown = ", ".join(sorted(e["short"] for e in matches)[:5])
        raise EnvNotFoundError(f"environment key {ref!r} is ambiguous: {len(matches)} match ({shown})")
    return matches[0]


def remove_environment(root: str, ref: str) -> dict[str, Any]:
    """Remove the environment (and any interrupted build of it); refused while a build holds its lock."""
    entry = find_environment(root, ref)
    short = entry["short"]
    if entry["status"] == "building":
        by = entry.get("building_by") or {}
        raise EnvBusyError(f"environment {short} is being built by pid {by.get('pid')} on {by.get('host')} "
                           f"(since {by.get('started')}); wait for the build to end, then remove it")
    final = os.path.join(root, short)
    try:
        if os.path.lexists(final):
            trash = os.path.join(root, f".trash-{short}-{os.urandom(4).hex()}")
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        for name in os.listdir(root):
            if name.startswith(f".build-{short}-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    except OSError as exc:
        raise EnvBuildError(f"cannot remove environment {short} in {root}: {exc.strerror or exc}") from None
    entry.pop("record", None)
    return entry