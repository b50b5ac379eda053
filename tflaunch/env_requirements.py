"""What a job's environment asks for, in canonical form: pip requirements (PEP 503 names, PEP 508
markers, sorted extras and specifiers), pip requirements files, conda package specs, where packages come
from (:class:`IndexOptions`) and the TensorFlow series table with the pins ``framework_version`` adds
(:func:`framework_requirements`).

No subprocess and no network: the same input always gives the same canonical strings, which is what
makes :attr:`tflaunch.envs.EnvRequest.key` stable. Standard library only; imported through
:mod:`tflaunch.envs`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from .errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Mapping, Sequence

__all__ = ["PYPI", "IndexOptions", "normalize_name", "parse_requirement", "parse_requirements",
           "read_requirements_file", "TF_SERIES", "framework_requirements"]

PYPI = "https://pypi.org/simple"


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

