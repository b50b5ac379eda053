"""Job environments: ``pip_packages`` / ``conda_packages`` / ``framework_version`` as virtual environments
(or conda prefixes) built once per key under the home, offline-capable, without containers.

:func:`request_environment` turns what a job asks for into an :class:`EnvRequest` (or ``None`` when the
job's interpreter already has everything): requirements normalized, the interpreter probed once (and
cached by its files' stat under the home), a TensorFlow series added when ``framework_version`` asks
for one the interpreter lacks. Its :attr:`EnvRequest.key` (sha256) names the environment.
:func:`ensure_environment` reuses a built environment at once (no subprocess), else runs the builder
(:mod:`tflaunch._envbuild`, standard library only, shipped as source with :func:`builder_command`) in a
subprocess: it waits for a concurrent build of the same key, or builds aside and renames into place.

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

from . import _envbuild
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

log = logging.getLogger(__name__)

ENVS_DIR = "envs"
SHORT = _envbuild.SHORT
PYPI = "https://pypi.org/simple"
HOROVOD_DEFAULT = "0.28.1"  # Horovod's last release; it builds against TensorFlow <= 2.15
_PROBE_FORMAT = 1

# TensorFlow series -> the Pythons its wheels exist for (PyPI, Linux) and the pins it needs beside it
# (what its own metadata does not say, or says too loosely for today's index). cpu/gpu: the distribution
# installed without / with use_gpu.
_OLD = ("numpy<2",)
TF_SERIES: dict[str, dict[str, Any]] = {
    "1.13": {"python": ("3.5", "3.6", "3.7"), "pins": _OLD, "cpu": "tensorflow", "gpu": "tensorflow-gpu"},
    "1.14": {"python": ("3.5", "3.6", "3.7"), "pins": _OLD, "cpu": "tensorflow", "gpu": "tensorflow-gpu"},
    "1.15": {"python": ("3.5", "3.6", "3.7"), "pins": _OLD, "cpu": "tensorflow-cpu", "gpu": "tensorflow-gpu"},
    "2.0": {"python": ("3.5", "3.6", "3.7"), "pins": _OLD, "cpu": "tensorflow", "gpu": "tensorflow-gpu"},
    "2.1": {"python": ("3.5", "3.6", "3.7"), "pins": _OLD},
    "2.2": {"python": ("3.5", "3.6", "3.7", "3.8"), "pins": _OLD},
    "2.3": {"python": ("3.5", "3.6", "3.7", "3.8"), "pins": _OLD},
    "2.4": {"python": ("3.6", "3.7", "3.8"), "pins": _OLD},
    "2.5": {"python": ("3.6", "3.7", "3.8", "3.9"), "pins": _OLD},
    "2.6": {"python": ("3.6", "3.7", "3.8", "3.9"), "pins": _OLD},
    "2.7": {"python": ("3.7", "3.8", "3.9"), "pins": _OLD},
    "2.8": {"python": ("3.7", "3.8", "3.9", "3.10"), "pins": _OLD + ("protobuf<4",)},
    "2.9": {"python": ("3.7", "3.8", "3.9", "3.10"), "pins": _OLD + ("protobuf<4",)},
    "2.10": {"python": ("3.7", "3.8", "3.9", "3.10"), "pins": _OLD},
    "2.11": {"python": ("3.7", "3.8", "3.9", "3.10"), "pins": _OLD},
    "2.12": {"python": ("3.8", "3.9", "3.10", "3.11"), "pins": ("numpy<2", "protobuf<5")},
    "2.13": {"python": ("3.8", "3.9", "3.10", "3.11"), "pins": ("numpy<2", "protobuf<5")},
    "2.14": {"python": ("3.9", "3.10", "3.11"), "pins": ("numpy<2", "protobuf<5")},
    "2.15": {"python": ("3.9", "3.10", "3.11"), "pins": ("numpy<2", "protobuf<5", "ml-dtypes~=0.3.1")},
    "2.16": {"python": ("3.9", "3.10", "3.11", "3.12"), "pins": ("numpy<2",)},
    "2.17": {"python": ("3.9", "3.10", "3.11", "3.12"), "pins": ("numpy<2",)},
    "2.18": {"python": ("3.9", "3.10", "3.11", "3.12"), "pins": ()},
    "2.19": {"python": ("3.9", "3.10", "3.11", "3.12"), "pins": ()},
    "2.20": {"python": ("3.9", "3.10", "3.11", "3.12", "3.13"), "pins": ()},
    "2.21": {"python": ("3.10", "3.11", "3.12", "3.13"), "pins": ()},
}


def home_envs_root(home: str) -> str:
    """``<home>/envs``: where environments live for hosts that see the home."""
    from .store import resolve_home

    return os.path.join(resolve_home(home), ENVS_DIR)


def node_envs_root(scratch_root: str | None = None) -> str:
    """A node-local root for hosts that cannot see the home: ``($TMPDIR or /tmp)/tflaunch-<uid>/envs``."""
    base = scratch_root or os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(base, f"tflaunch-{os.getuid()}", ENVS_DIR)


# -- index options -----------------------------------------------------------------------------------------
@dataclass
class IndexOptions:
    """Where packages come from: wheelhouse directories (``--find-links``), one index (``--index-url``,
    default PyPI), or no index at all (``--no-index``: only the wheelhouses)."""

    find_links: list[str] = field(default_factory=list)
    index_url: str | None = None
    no_index: bool = False

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, base_dir: str | None = None) -> IndexOptions:
        """From config.json's keys ``find_links`` (a string or a list; relative paths against
        ``base_dir``), ``index_url``, ``no_index``."""
        data = data or {}
        links = data.get("find_links")
        if links is None:
            links = []
        elif isinstance(links, str):
            links = [links]
        if not isinstance(links, (list, tuple)) or not all(isinstance(x, str) and x for x in links):
            raise SpecError(f"find_links (--find-links): expected a directory or URL, or a list of them, got {links!r}")
        index_url = data.get("index_url")
        if index_url is not None and (not isinstance(index_url, str) or not index_url):
            raise SpecError(f"index_url (--index-url): expected a URL, got {index_url!r}")
        no_index = data.get("no_index")
        if no_index is not None and not isinstance(no_index, bool):
            raise SpecError(f"no_index (--no-index): expected true or false, got {no_index!r}")
        return cls([_link(x, base_dir) for x in links], index_url, bool(no_index))

    @classmethod
    def layered(cls, *layers: Mapping[str, Any] | None) -> IndexOptions:
        """Merge config layers, lowest first (home config.json, workspace config.json, explicit options):
        a key present (not None) in a later layer wins; an explicit ``index_url`` clears an earlier
        ``no_index``."""
        merged: dict[str, Any] = {}
        for layer in layers:
            for key in ("find_links", "index_url", "no_index"):
                value = (layer or {}).get(key)
                if value is None or (key == "find_links" and value == []):
                    continue
                merged[key] = value
                if key == "index_url" and "no_index" not in (layer or {}):
                    merged.pop("no_index", None)
        return cls.from_mapping(merged)

    def overridden_by(self, other: IndexOptions | None) -> IndexOptions:
        """``other``'s settings where it has any (find links given, an index URL, no_index set)."""
        if other is None:
            return IndexOptions(list(self.find_links), self.index_url, self.no_index)
        no_index = other.no_index or (self.no_index and other.index_url is None)
        return IndexOptions(list(other.find_links or self.find_links), other.index_url or self.index_url, no_index)

    def to_dict(self) -> dict[str, Any]:
        return {"find_links": list(self.find_links), "index_url": self.index_url, "no_index": self.no_index}

    def describe(self) -> str:
        parts = [] if self.no_index else [self.index_url or PYPI]
        parts += self.find_links
        return ", ".join(parts) or "nowhere (--no-index without --find-links)"


def _link(value: str, base_dir: str | None) -> str:
    if "://" in value:
        return value
    value = os.path.expanduser(value)
    return os.path.normpath(os.path.join(base_dir, value)) if base_dir and not os.path.isabs(value) \
        else os.path.abspath(value)


# -- requirements ------------------------------------------------------------------------------------------
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
# Patterns, compiled on first use (re caches them): importing this module stays cheap.
_REQ = (rf"^\s*(?P<name>{_NAME})\s*(?:\[(?P<extras>[^\]]*)\])?\s*"
        r"(?:@\s*(?P<url>\S+)\s*|\(?(?P<specs>[^;()@]*)\)?\s*)"
        r"(?:;\s*(?P<marker>.*?))?\s*$")
_SPEC = r"^\s*(~=|===|==|!=|<=|>=|<|>)\s*([A-Za-z0-9_.*+!-]+)\s*$"
_MARKER_TOKEN = r'"[^"]*"|\'[^\']*\'|\(|\)|===|==|!=|<=|>=|~=|<|>|[A-Za-z_][A-Za-z0-9_.]*|\S'
_VCS = ("git+", "hg+", "svn+", "bzr+")
_ARCHIVES = (".whl", ".tar.gz", ".zip", ".tar.bz2", ".tgz")


def normalize_name(name: str) -> str:
    """PEP 503: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


_MARKER_VARS = {"python_version", "python_full_version", "os_name", "sys_platform", "platform_release",
                "platform_system", "platform_version", "platform_machine", "platform_python_implementation",
                "implementation_name", "implementation_version", "extra", "os.name", "sys.platform",
                "platform.version", "platform.machine", "platform.python_implementation", "python_implementation"}
_MARKER_OPS = {"===", "==", "!=", "<=", ">=", "~=", "<", ">", "in"}


def _marker_ok(tokens: list[str]) -> bool:
    """PEP 508 marker grammar: comparisons of variables and quoted strings, joined by and/or, in parentheses."""
    pos = 0

    def value() -> bool:
        nonlocal pos
        if pos < len(tokens) and (tokens[pos] in _MARKER_VARS or tokens[pos][:1] in "'\""):
            pos += 1
            return True
        return False

    def atom() -> bool:
        nonlocal pos
        if pos < len(tokens) and tokens[pos] == "(":
            pos += 1
            if not expr() or pos >= len(tokens) or tokens[pos] != ")":
                return False
            pos += 1
            return True
        if not value():
            return False
        if pos + 1 < len(tokens) and tokens[pos] == "not" and tokens[pos + 1] == "in":
            pos += 2
        elif pos < len(tokens) and tokens[pos] in _MARKER_OPS:
            pos += 1
        else:
            return False
        return value()

    def expr() -> bool:
        nonlocal pos
        if not atom():
            return False
        while pos < len(tokens) and tokens[pos] in ("and", "or"):
            pos += 1
            if not atom():
                return False
        return True

    return expr() and pos == len(tokens)


def _normalize_marker(marker: str, where: str, item: str) -> str:
    tokens = re.findall(_MARKER_TOKEN, marker)
    if "".join(tokens) != re.sub(r"\s+", "", marker) or not _marker_ok(tokens):
        raise SpecError(f"{where}: {item!r} is not a valid requirement (its marker {marker!r} does not parse)")
    out = []
    for tok in tokens:
        if tok.startswith("'") and '"' not in tok:
            tok = '"' + tok[1:-1] + '"'
        out.append(tok)
    return re.sub(r"\( ", "(", re.sub(r" \)", ")", " ".join(out)))


def _refuse_url(item: str, where: str) -> SpecError:
    return SpecError(f"{where}: {item!r} is a VCS or URL requirement, which needs the network when the "
                     "environment is built (uv --offline still reaches it for VCS): build a wheel of it first "
                     "(pip wheel --no-deps -w WHEELHOUSE '...'), then give the package by name with --find-links "
                     "WHEELHOUSE")


def _local_file(item: str, where: str, base_dir: str | None) -> str | None:
    """``./dist/foo-1.0-py3-none-any.whl``, ``/abs/foo.tar.gz`` or ``file:///...``: ``foo @ file:///abs``."""
    path = item[len("file://"):] if item.startswith("file://") else item
    if "@" in item or ("://" in item and not item.startswith("file://")) or ";" in item:
        return None
    if not (item.startswith("file://") or os.sep in item or item.startswith(".")):
        return None
    if not path.endswith(_ARCHIVES):
        if os.path.isdir(_link(path, base_dir)):
            raise SpecError(f"{where}: {item!r} is a source directory: build a wheel of it (pip wheel --no-deps -w "
                            "WHEELHOUSE DIR) and give the package by name with --find-links WHEELHOUSE")
        return None
    path = _link(path, base_dir)
    if not os.path.isfile(path):
        raise SpecError(f"{where}: {item!r}: no such file ({path})")
    base = os.path.basename(path)
    name = base.split("-")[0] if base.endswith(".whl") else re.sub(r"-\d.*$", "", re.sub(r"\.(tar\.gz|zip|tar\.bz2|tgz)$", "", base))
    if not re.fullmatch(_NAME, name or ""):
        raise SpecError(f"{where}: cannot tell the package name of {item!r}")
    return f"{normalize_name(name)} @ file://{path}"


def parse_requirement(item: str, where: str = "pip_packages", base_dir: str | None = None) -> str:
    """One requirement in canonical form (PEP 503 name, sorted extras and specifiers, no spaces but in
    the marker): ``Foo_Bar [x] >= 1.0 , <2`` -> ``foo-bar[x]<2,>=1.0``."""
    if not isinstance(item, str) or not item.strip():
        raise SpecError(f"{where}: expected a requirement such as 'keras' or 'numpy<2', got {item!r}")
    text = item.strip()
    if text.startswith("-"):
        flag = text.split()[0]
        hint = {"-e": "editable installs are not supported: build a wheel (pip wheel --no-deps -w WHEELHOUSE DIR) "
                      "and use --find-links WHEELHOUSE",
                "--editable": "editable installs are not supported: build a wheel and use --find-links"}.get(
            flag, "options do not go among the packages: use tflaunch's --find-links/--index-url/--no-index")
        raise SpecError(f"{where}: {item!r}: {hint}")
    if text.startswith(_VCS) or re.match(r"^[a-z]+://", text) and not text.startswith("file://"):
        raise _refuse_url(item, where)
    local = _local_file(text, where, base_dir)
    if local:
        return local
    m = re.match(_REQ, text)
    if not m:
        raise SpecError(f"{where}: {item!r} is not a valid requirement (expected NAME[EXTRAS] SPECIFIERS; MARKER, "
                        "e.g. 'keras>=3,<4')")
    name = normalize_name(m.group("name"))
    extras = ""
    if m.group("extras") is not None:
        parts = [p.strip() for p in m.group("extras").split(",") if p.strip()]
        if not all(re.fullmatch(_NAME, p) for p in parts):
            raise SpecError(f"{where}: {item!r} has invalid extras [{m.group('extras')}]")
        extras = "[" + ",".join(sorted({normalize_name(p) for p in parts})) + "]" if parts else ""
    marker = m.group("marker")
    marker = _normalize_marker(marker, where, item) if marker else ""
    url = m.group("url")
    if url:
        if not url.startswith("file://"):
            raise _refuse_url(item, where)
        path = _link(url[len("file://"):], base_dir)
        if not os.path.exists(path):
            raise SpecError(f"{where}: {item!r}: no such file ({path})")
        if os.path.isdir(path):
            raise SpecError(f"{where}: {item!r} is a source directory: build a wheel of it and use --find-links")
        return f"{name}{extras} @ file://{path}" + (f" ; {marker}" if marker else "")
    specs = []
    raw = (m.group("specs") or "").strip()
    if raw:
        for part in raw.split(","):
            s = re.match(_SPEC, part)
            if not s:
                raise SpecError(f"{where}: {item!r} is not a valid requirement (bad version specifier {part.strip()!r})")
            specs.append(s.group(1) + s.group(2))
    return name + extras + ",".join(sorted(set(specs))) + (f"; {marker}" if marker else "")


def parse_requirements(items: Sequence[str], where: str = "pip_packages", base_dir: str | None = None) -> list[str]:
    """Canonical requirements, duplicates dropped, sorted (the order of a requirement list does not
    change what a resolver installs). SpecError naming ``where`` and the bad item."""
    if isinstance(items, str):
        raise SpecError(f"{where}: expected a list of requirements, got the string {items!r}")
    out = {parse_requirement(item, where, base_dir) for item in items}
    return sorted(out)


_FILE_OPTIONS = {
    "-f": "--find-links DIR (or find_links in config.json)", "--find-links": "--find-links DIR (or find_links in config.json)",
    "-i": "--index-url URL (or index_url in config.json)", "--index-url": "--index-url URL (or index_url in config.json)",
    "--extra-index-url": "--index-url URL for one index, or a wheelhouse with --find-links (tflaunch asks one index)",
    "--no-index": "--no-index (or no_index in config.json)",
    "-c": "pins in the requirements themselves (constraints files are not supported)",
    "--constraint": "pins in the requirements themselves (constraints files are not supported)",
    "-e": "a wheel (pip wheel --no-deps -w WHEELHOUSE DIR) with --find-links WHEELHOUSE",
    "--editable": "a wheel (pip wheel --no-deps -w WHEELHOUSE DIR) with --find-links WHEELHOUSE",
}


def read_requirements_file(path: str) -> list[str]:
    """Requirements from a pip requirements file: comments, blank lines, ``\\`` continuations and
    ``-r``/``--requirement`` includes (relative to the including file); local archives relative to the
    file. Any other option line is a SpecError saying which tflaunch flag to use instead."""
    return sorted(set(_read_requirements(os.path.abspath(path), set())))


def _read_requirements(path: str, seen: set[str]) -> list[str]:
    if path in seen:
        raise SpecError(f"requirements file {path} includes itself (-r)")
    seen = seen | {path}
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise SpecError(f"requirements file (--requirements): cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SpecError(f"requirements file (--requirements): {path} is not UTF-8 text") from None
    base = os.path.dirname(path)
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        number = i + 1
        line = lines[i]
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + lines[i]
        i += 1
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if not line:
            continue
        where = f"requirements file {path} line {number}"
        if line.startswith("-"):
            flag, _, rest = line.partition(" ")
            flag, eq, value = flag.partition("=")
            value = (value if eq else rest).strip()
            if flag in ("-r", "--requirement"):
                if not value:
                    raise SpecError(f"{where}: {flag} needs a file name")
                out += _read_requirements(os.path.join(base, os.path.expanduser(value)), seen)
                continue
            instead = _FILE_OPTIONS.get(flag)
            if instead:
                raise SpecError(f"{where}: {flag} is not read from requirements files; use {instead}")
            raise SpecError(f"{where}: the option {flag} is not supported in requirements files; remove it")
        if re.search(r"\s--?[a-z]", line):
            option = re.search(r"\s(--?[a-z][\w-]*)", line)
            raise SpecError(f"{where}: per-requirement options ({option.group(1) if option else '--'}) are not "
                            "supported (hash checking included); remove them")
        out.append(parse_requirement(line, where, base))
    return out


def _conda_packages(items: Sequence[str]) -> list[str]:
    if isinstance(items, str):
        raise SpecError(f"conda_packages (--conda): expected a list of packages, got the string {items!r}")
    out = []
    for item in items:
        if not isinstance(item, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.:/=<>!*,-]*", item.strip() or "-"):
            raise SpecError(f"conda_packages (--conda): {item!r} is not a conda package spec such as 'numpy=1.26'")
        out.append(item.strip())
    return sorted(set(out))


# -- TensorFlow series ---------------------------------------------------------------------------------------
def _series(version: str) -> str:
    return ".".join(version.split(".")[:2])


def framework_requirements(version: str, use_gpu: bool = False) -> dict[str, Any]:
    """What ``framework_version`` adds: ``{"name", "version", "distribution", "requirements", "use_gpu"}``."""
    if not isinstance(version, str) or not re.fullmatch(r"\d+\.\d+(\.\d+)?", version):
        raise SpecError(f"framework_version (--framework-version): must look like '2.15' or '2.15.1', got {version!r}")
    row = TF_SERIES.get(_series(version), {})
    dist = row.get("gpu" if use_gpu else "cpu", "tensorflow" if use_gpu else "tensorflow-cpu")
    pin = f"{dist}=={version}.*" if version.count(".") == 1 else f"{dist}=={version}"
    reqs = [pin] + [parse_requirement(p, "framework pins") for p in row.get("pins", ())]
    return {"name": "tensorflow", "version": version, "distribution": dist, "requirements": reqs,
            "use_gpu": bool(use_gpu)}


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


def _check_framework_available(request: EnvRequest, info: Mapping[str, Any], index: IndexOptions) -> None:
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
        from .mpirun import detect, find_mpirun

        install = detect(find_mpirun(None, python, env))
        mpi = {"flavour": install.flavour, "version": install.version, "path": install.path}
    flavour, mversion = mpi.get("flavour"), mpi.get("version")
    bin_dir = mpi.get("bin") or (os.path.dirname(os.path.abspath(str(mpi["path"]))) if mpi.get("path") else None)
    if not (flavour and mversion and bin_dir):
        raise SpecError(f"mpi: expected {{'flavour', 'version', 'bin'}} (tflaunch.mpirun.detect), got {dict(mpi)!r}")
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
    from .store import resolve_home

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
        _check_framework_available(request, info, options)
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
        source = _envbuild.__loader__.get_source(_envbuild.__name__)  # type: ignore[union-attr]
        if not source:
            raise EnvBuildError("cannot read the source of tflaunch._envbuild")
        _SOURCE.append(source)
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
    if record is not None:
        _envbuild.touch(os.path.join(root, key[:SHORT], ".last-used"))
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
