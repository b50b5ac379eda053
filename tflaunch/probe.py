"""Questions asked of the job's interpreter before a run starts (which TensorFlow it would import).

The probe runs the job's Python with the job's environment and reads package metadata only; it never
imports TensorFlow, so it takes a fraction of a second.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

from .errors import SpecError
from .spec import JobSpec

__all__ = ["resolve_python", "probe", "check_framework", "version_matches"]

_PROBE = r'''
import importlib.util, json, os, sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Mapping
out = {"python": "%d.%d.%d" % sys.version_info[:3], "tensorflow": None}
try:
    spec = importlib.util.find_spec("tensorflow")
except Exception:
    spec = None
if spec is not None:
    from importlib import metadata
    for name in ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-intel", "tensorflow-macos",
                 "tensorflow-aarch64", "tensorflow-rocm", "intel-tensorflow", "tf-nightly", "tf-nightly-cpu"):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found = [name, dist.version]
        where = os.path.realpath(str(dist.locate_file("tensorflow/__init__.py")))
        if spec.origin and where == os.path.realpath(spec.origin):
            out["tensorflow"] = found
            break
        out["tensorflow"] = out["tensorflow"] or found
    if out["tensorflow"] is None:
        out["tensorflow"] = ["tensorflow", "unknown"]
print(json.dumps(out))
'''


def resolve_python(python: str) -> str:
    """Absolute path of the job's interpreter (a bare name is looked up on PATH)."""
    path = python if os.sep in python else (shutil.which(python) or "")
    if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise SpecError(f"python (--python): {python!r} is not an executable file")
    return os.path.abspath(path)


def probe(python: str, env: Mapping[str, str], cwd: str) -> dict[str, Any]:
    """Run the probe in ``python`` with ``env`` added to ours; returns ``{"python", "tensorflow"}``."""
    full_env = {**os.environ, **env}
    try:
        result = subprocess.run([python, "-c", _PROBE], env=full_env, cwd=cwd, capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SpecError(f"python (--python): cannot run {python}: {exc}") from None
    if result.returncode != 0:
        last = result.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise SpecError(f"python (--python): {python} failed to start: {last[0]}")
    return json.loads(result.stdout.decode().strip().splitlines()[-1])


def version_matches(requested: str, installed: str) -> bool:
    """``'2.21'`` matches ``2.21.0`` and ``2.21.3rc1``; ``'2.21.0'`` matches only 2.21.0 builds."""
    release = re.match(r"\d+(?:\.\d+)*", installed)
    if not release:
        return False
    have = release.group(0).split(".")
    want = requested.split(".")
    have += ["0"] * (len(want) - len(have))
    return [int(x) for x in have[:len(want)]] == [int(x) for x in want]


def check_framework(spec: JobSpec, cwd: str) -> dict[str, Any] | None:
    """For a TensorFlow job, check the interpreter imports TensorFlow (of ``framework_version``)."""
    framework = spec.framework
    if not framework or framework.get("name") != "tensorflow":
        return None
    info = probe(spec.python, spec.environment_variables, cwd)
    requested = framework.get("version")
    if info["tensorflow"] is None:
        want = f"TensorFlow {requested}" if requested else "TensorFlow"
        raise SpecError(f"framework_version (--framework-version): {want} is needed but {spec.python} cannot "
                        "import tensorflow; install it (pip install 'tflaunch[tf]') or pass --python")
    dist, version = info["tensorflow"]
    if requested and not version_matches(requested, version):
        raise SpecError(f"framework_version (--framework-version): TensorFlow {requested} was requested but "
                        f"{spec.python} imports TensorFlow {version} ({dist}); install a matching TensorFlow "
                        "or pass --python for an interpreter that has one")
    return {"python": info["python"], "tensorflow": {"distribution": dist, "version": version}}
