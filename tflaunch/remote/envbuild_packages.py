"""What goes into a job environment (part of :mod:`tflaunch.remote.envbuild`): reading what is installed
(``freeze``, an interpreter's own view), installing with pip or uv from the job's index, the shadow files
that keep a parent environment's packages out of the way, and the cached Horovod wheel.

Standard library only; shipped joined with the builder's other parts (:mod:`tflaunch.remote.bundle`):
its imports of them are marked and dropped from the shipped source.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

from .envbuild_base import BuildError, HOROVOD_ENV, Log, PARENT_PTH, SHADOW_MARK  # joined when shipped
from .envbuild_base import TF_DISTRIBUTIONS, _DROP_PREFIXES, _KEEP, cpu_count  # joined when shipped
from .envbuild_base import normalize_name, remove_tree, run_tool, which  # joined when shipped


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
