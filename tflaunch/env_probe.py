"""What is there to build a job's environment with: the job's interpreter (version, platform,
site-packages dirs, installed TensorFlow; probed once and cached under the home), uv, conda/mamba/
micromamba, and whether the wheelhouses or the index offer the TensorFlow ``framework_version`` asks
for on that interpreter (:func:`check_framework_available`).

Standard library only; imported through :mod:`tflaunch.envs`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess

from .remote import envbuild as _envbuild
from .env_requirements import PYPI, TF_SERIES, IndexOptions, _series, normalize_name
from .errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Mapping, Sequence

    from .envs import EnvRequest

__all__ = ["check_framework_available", "probe_interpreter", "find_uv", "find_conda"]

log = logging.getLogger("tflaunch.envs")  # the name these messages have always had

_PROBE_FORMAT = 1


# -- the TensorFlow the sources offer ------------------------------------------------------------------------
def _wheel_compatible(filename: str, dist: str, info: Mapping[str, Any]) -> str | None:
    """The version in a wheel file name, when it installs on the probed interpreter."""
    if not filename.endswith(".whl"):
        return None
    parts = filename[:-4].split("-")
    if len(parts) not in (5, 6) or normalize_name(parts[0]) != normalize_name(dist):
        return None
    version, pytag, abi, plat = parts[1], parts[-3], parts[-2], parts[-1]
    major, minor = info["python_version"].split(".")[:2]
    ok_py = {f"cp{major}{minor}", f"py{major}{minor}", f"py{major}"}
    if not ok_py & set(pytag.split(".")):
        return None
    abis = set(abi.split("."))
    if not ({"none", f"cp{major}{minor}", "abi3"} & abis):
        return None
    system, _, arch = info.get("platform", "").partition("-")
    arch = arch.rsplit("-", 1)[-1]
    arches = {arch, "universal2"} if system.startswith("macosx") else {arch.replace("-", "_"), "amd64" if arch == "x86_64" else arch}
    for p in plat.split("."):
        if p == "any":
            return version
        if system == "linux" and p.startswith(("manylinux", "linux")) and p.endswith(tuple("_" + a for a in arches)):
            return version
        if system.startswith("macosx") and p.startswith("macosx") and p.endswith(tuple("_" + a for a in arches)):
            return version
        if system.startswith("win") and p.startswith("win") and p.endswith(tuple(arches)):
            return version
    return None


def _index_files(dist: str, index: IndexOptions, links: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """(wheel file names of ``dist`` the sources list, sources asked, sources that could not be asked)."""
    import urllib.request

    files: list[str] = []
    asked: list[str] = []
    failed: list[str] = []
    sources = [(link, False) for link in links] + ([] if index.no_index else [(index.index_url or PYPI, True)])
    for source, is_index in sources:
        local = source[len("file://"):] if source.startswith("file://") else (None if "://" in source else source)
        try:
            if local is not None:
                target = os.path.join(local, normalize_name(dist)) if is_index else local
                if is_index:
                    with open(os.path.join(target, "index.html"), "rb") as fh:
                        files += [os.path.basename(h) for h in re.findall(rb'href="([^"#]+)', fh.read())
                                  for h in [h.decode()]]
                else:
                    files += os.listdir(target)
            else:
                url = source.rstrip("/") + "/" + normalize_name(dist) + "/" if is_index else source
                req = urllib.request.Request(url, headers={
                    "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.2", "User-Agent": "tflaunch"})
                with urllib.request.urlopen(req, timeout=15) as resp:
                    body = resp.read()
                    kind = resp.headers.get("Content-Type", "")
                if "json" in kind:
                    files += [f["filename"] for f in json.loads(body).get("files", []) if not f.get("yanked")]
                else:
                    files += [os.path.basename(h.decode().split("#")[0])
                              for h in re.findall(rb'href="([^"]+)"', body) if b"data-yanked" not in h]
            asked.append(source)
        except FileNotFoundError:
            asked.append(source)  # the index has no such project: asked, nothing there
        except Exception as exc:  # network down, no such host, HTTP error: this source cannot tell
            log.debug("cannot list %s in %s: %s", dist, source, exc)
            if "404" in str(exc):
                asked.append(source)
            else:
                failed.append(source)
    return files, asked, failed


def check_framework_available(request: EnvRequest, info: Mapping[str, Any], index: IndexOptions) -> None:
    framework = request.framework or {}
    version, dist = framework["version"], framework["distribution"]
    pyver = info["python_version"]
    interp = f"{request.python} (Python {pyver}, {info.get('platform')})"
    files, asked, failed = _index_files(dist, index, index.find_links)
    if asked:
        versions = {v for v in (_wheel_compatible(f, dist, info) for f in files) if v}
        if any(_version_matches(version, v) for v in versions):
            return
        # What there is for this Python, under TensorFlow's other name too (tensorflow-cpu since 2.1)
        other = "tensorflow" if dist != "tensorflow" else ("tensorflow-cpu" if not framework.get("use_gpu") else None)
        names = [dist]
        if other:
            more, _, _ = _index_files(other, index, index.find_links)
            found = {v for v in (_wheel_compatible(f, other, info) for f in more) if v}
            if found:
                names.append(other)
            versions |= found
        series = sorted({_series(v) for v in versions if re.match(r"\d+\.\d+", v)}, key=_version_key)
        have = ", ".join(series) if series else "none"
        raise SpecError(f"framework_version (--framework-version): TensorFlow {version} ({dist}) is not available for "
                        f"{interp} from {', '.join(asked)}; TensorFlow there for this Python ({', '.join(names)}): "
                        f"{have}")
    # No source could be asked (offline, index unreachable): the table decides.
    row = TF_SERIES.get(_series(version))
    mine = ".".join(pyver.split(".")[:2])
    supported = sorted((s for s, r in TF_SERIES.items() if mine in r["python"]), key=_version_key)
    if row is None:
        log.warning("framework_version %s is not in tflaunch's table and %s could not be asked; the build decides",
                    version, ", ".join(failed))
        return
    if mine not in row["python"]:
        raise SpecError(f"framework_version (--framework-version): TensorFlow {version} has no release for {interp} "
                        f"(it supports Python {', '.join(row['python'])}); TensorFlow series for Python {mine} "
                        f"(from tflaunch's table; {', '.join(failed)} could not be asked): {', '.join(supported)}")


def _version_key(v: str) -> tuple:
    return tuple(int(x) if x.isdigit() else -1 for x in re.findall(r"\d+|[a-z]+", v))


def _version_matches(requested: str, installed: str) -> bool:
    from .probe import version_matches

    if re.search(r"(a|b|rc|dev)\d*", installed[len(re.match(r"[\d.]*", installed).group(0)):]):
        return False  # a pre-release: ==2.15.* does not install it
    return version_matches(requested, installed)


# -- the interpreter -----------------------------------------------------------------------------------------
_PROBE = r'''
import importlib.util, json, os, site, sys, sysconfig
out = {"python_version": "%d.%d.%d" % sys.version_info[:3], "implementation": sys.implementation.name,
       "platform": sysconfig.get_platform(), "executable": os.path.realpath(sys.executable),
       "prefix": sys.prefix, "base_prefix": getattr(sys, "base_prefix", sys.prefix), "tensorflow": None}
sites = []
try:
    sites += site.getsitepackages()
except Exception:
    pass
if site.ENABLE_USER_SITE:
    sites.append(site.getusersitepackages())
order = [os.path.realpath(p) for p in sys.path if p]
found = [p for p in dict.fromkeys(os.path.realpath(s) for s in sites) if p in order and os.path.isdir(p)]
out["site"] = sorted(found, key=order.index)
try:
    spec = importlib.util.find_spec("tensorflow")
except Exception:
    spec = None
if spec is not None:
    from importlib import metadata
    for name in TF_DISTRIBUTIONS:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        out["tensorflow"] = [name, dist.version]
        break
    else:
        out["tensorflow"] = ["tensorflow", "unknown"]
print(json.dumps(out))
'''.replace("TF_DISTRIBUTIONS", repr(_envbuild.TF_DISTRIBUTIONS))


def _stamp(paths: Sequence[str]) -> list[list[Any]]:
    out = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append([path, st.st_mtime_ns, st.st_size, st.st_ino])
        except OSError:
            out.append([path, None])
    return out


def probe_interpreter(python: str, env: Mapping[str, str] | None = None, home: str | None = None) -> dict[str, Any]:
    """Version, platform, site-packages dirs and installed TensorFlow of ``python`` (with ``env`` added
    to ours), cached under ``<home>/cache/envprobe`` while the interpreter's files and site dirs keep
    their stat (installing a package changes its site dir's mtime)."""
    full_env = {**os.environ, **(env or {})}
    relevant = sorted((k, v) for k, v in full_env.items() if k.startswith(("PYTHON", "PYENV")))
    ident = hashlib.sha256(json.dumps([python, relevant]).encode("utf-8", "surrogatepass")).hexdigest()[:32]
    cache = os.path.join(home, "cache", "envprobe", ident + ".json") if home else None
    venv_cfg = os.path.join(os.path.dirname(os.path.dirname(python)), "pyvenv.cfg")
    if cache:
        try:
            with open(cache, "rb") as fh:
                cached = json.loads(fh.read())
            if cached.get("format") == _PROBE_FORMAT and cached["stamp"] == _stamp(cached["stamp_paths"]):
                return cached["info"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    try:
        result = subprocess.run([python, "-c", _PROBE], env=full_env, capture_output=True, timeout=120,
                                stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SpecError(f"python (--python): cannot run {python}: {exc}") from None
    if result.returncode != 0:
        last = result.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise SpecError(f"python (--python): {python} failed to start: {last[0]}")
    info = json.loads(result.stdout.decode().strip().splitlines()[-1])
    if cache:
        paths = [python, info["executable"], venv_cfg] + list(info["site"])
        try:
            from . import fsio

            os.makedirs(os.path.dirname(cache), exist_ok=True)
            fsio.atomic_write_json(cache, {"format": _PROBE_FORMAT, "stamp_paths": paths, "stamp": _stamp(paths),
                                           "info": info}, fsync=False, compact=True)
        except OSError as exc:
            log.debug("cannot cache the probe of %s: %s", python, exc)
    return info


def find_uv() -> str | None:
    """uv on PATH, else the ``uv`` PyPI package's binary in the launcher's Python."""
    path = shutil.which("uv")
    if path:
        return path
    try:
        import uv  # type: ignore[import-not-found]

        found = uv.find_uv_bin()
        return found if found and os.path.exists(found) else None
    except Exception:
        return None


def find_conda(env: Mapping[str, str] | None = None) -> str | None:
    """conda, mamba or micromamba on PATH (the job's PATH when ``env`` sets one)."""
    path = (env or {}).get("PATH") or os.environ.get("PATH", os.defpath)
    for name in ("conda", "mamba", "micromamba"):
        found = shutil.which(name, path=path)
        if found:
            return found
    return None

