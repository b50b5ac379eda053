"""framework_version is checked against the TensorFlow the job's interpreter would import."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tflaunch import SpecError, TensorFlow
from tflaunch.probe import check_framework, probe, resolve_python, version_matches


@pytest.mark.parametrize("want, have, ok", [
    ("2.21", "2.21.0", True), ("2.21", "2.21.3rc1", True), ("2", "2.15.1", True),
    ("2.21.0", "2.21.0", True), ("2.21.0", "2.21.1", False), ("2.15", "2.21.0", False), ("2.1", "2.15.0", False),
])
def test_version_matches(want, have, ok):
    assert version_matches(want, have) is ok


def test_python_must_exist(tmp_path):
    with pytest.raises(SpecError, match=r"python \(--python\): .* is not an executable file"):
        resolve_python(str(tmp_path / "nope"))
    assert resolve_python("python3").startswith("/")


def _tf_version() -> str | None:
    info = probe(sys.executable, {}, ".")
    return info["tensorflow"][1] if info["tensorflow"] else None


def test_match_and_mismatch_against_the_real_tensorflow(tmp_path):
    version = _tf_version()
    if version is None:
        pytest.skip("TensorFlow is not installed in the test interpreter (pip install '.[tf-cpu]')")
    major_minor = ".".join(version.split(".")[:2])
    spec = TensorFlow(tmp_path, entry_script="t.py", framework_version=major_minor, python=sys.executable).job_spec()
    assert check_framework(spec, str(tmp_path))["tensorflow"]["version"] == version
    spec.framework["version"] = "1.15"
    with pytest.raises(SpecError, match=f"TensorFlow 1.15 was requested but .* imports TensorFlow {version}"):
        check_framework(spec, str(tmp_path))


def test_interpreter_without_tensorflow(tmp_path):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    spec = TensorFlow(tmp_path, entry_script="t.py", python=str(tmp_path / "bare" / "bin" / "python")).job_spec()
    with pytest.raises(SpecError, match="cannot import tensorflow; install it"):
        check_framework(spec, str(tmp_path))
