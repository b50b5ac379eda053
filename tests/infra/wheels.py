"""Real wheels for tests: pure-Python ``py3-none-any`` wheels written as zip files (dist-info METADATA,
WHEEL, RECORD and a tiny module), so that every environment build in the tests runs offline from a
wheelhouse (``--no-index --find-links DIR``) with the real pip and uv.

    from tests.infra.wheels import make_wheel
    make_wheel(house, "tfl-alpha", "1.0")                                  # module tfl_alpha
    make_wheel(house, "tfl-beta", "2.0", requires=["tfl-alpha>=1"])        # Requires-Dist
    make_wheel(house, "tfl-tool", "1.0", scripts={"tfl-tool": "tfl_tool:main"})
    make_wheel(house, "tfl-big", "1.0", payload_mb=200)                   # slow to install

Usable as a script too:  python tests/infra/wheels.py DIR NAME VERSION [REQUIRES...]
"""
from __future__ import annotations

import base64
import hashlib
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

__all__ = ["make_wheel", "wheel_filename", "module_name"]


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def module_name(name: str) -> str:
    """The import name of the test package ``name`` (``tfl-alpha`` -> ``tfl_alpha``)."""
    return _normalize(name).replace("-", "_")


def wheel_filename(name: str, version: str) -> str:
    return f"{module_name(name)}-{version}-py3-none-any.whl"


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def make_wheel(wheelhouse: str | os.PathLike, name: str, version: str, *, requires: Iterable[str] = (),
               module_source: str | None = None, scripts: Mapping[str, str] | None = None,
               payload_mb: int = 0, files: Mapping[str, bytes] | None = None) -> Path:
    """Write the wheel of distribution ``name`` ``version`` into ``wheelhouse`` and return its path.

    The wheel holds the package ``module_name(name)`` whose ``__init__.py`` sets ``__version__`` (or is
    ``module_source``) and has a ``main()`` printing ``name version``; ``requires`` become Requires-Dist
    lines; ``scripts`` console-script entry points (``{"cmd": "module:function"}``); ``payload_mb``
    adds that many MiB of random (incompressible) data, which makes installing it take a while;
    ``files`` adds more files (path inside the wheel -> bytes).
    """
    house = Path(wheelhouse)
    house.mkdir(parents=True, exist_ok=True)
    mod = module_name(name)
    dist_info = f"{mod}-{version}.dist-info"
    source = module_source if module_source is not None else (
        f"__version__ = {version!r}\n\n\ndef main():\n    print({name!r}, __version__)\n")
    entries: list[tuple[str, bytes]] = [(f"{mod}/__init__.py", source.encode())]
    if payload_mb:
        entries.append((f"{mod}/payload.bin", os.urandom(payload_mb * 1024 * 1024)))
    for path, data in (files or {}).items():
        entries.append((path, data))
    metadata = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                f"Summary: test package {name}"]
    metadata += [f"Requires-Dist: {req}" for req in requires]
    entries.append((f"{dist_info}/METADATA", ("\n".join(metadata) + "\n").encode()))
    entries.append((f"{dist_info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: tflaunch-tests\n"
                                          b"Root-Is-Purelib: true\nTag: py3-none-any\n"))
    if scripts:
        lines = ["[console_scripts]"] + [f"{cmd} = {target}" for cmd, target in scripts.items()]
        entries.append((f"{dist_info}/entry_points.txt", ("\n".join(lines) + "\n").encode()))
    entries.append((f"{dist_info}/top_level.txt", f"{mod}\n".encode()))
    record = [_record_line(path, data) for path, data in entries] + [f"{dist_info}/RECORD,,"]
    entries.append((f"{dist_info}/RECORD", ("\n".join(record) + "\n").encode()))
    target = house / wheel_filename(name, version)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path, data in entries:
            info = zipfile.ZipInfo(path, date_time=(2026, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_STORED if path.endswith(".bin") else zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    os.replace(tmp, target)
    return target


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit("usage: python tests/infra/wheels.py DIR NAME VERSION [REQUIRES...]")
    print(make_wheel(sys.argv[1], sys.argv[2], sys.argv[3], requires=sys.argv[4:]))
