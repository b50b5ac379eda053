"""``tflaunch env build|list|show|rm`` through ``python -m tflaunch`` in a subprocess, offline from a wheelhouse
made in the test."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.infra.wheels import make_wheel

BASE_PYTHON = os.path.realpath(getattr(sys, "_base_executable", sys.executable))


@pytest.fixture(scope="module")
def house(tmp_path_factory) -> Path:
    house = tmp_path_factory.mktemp("house")
    make_wheel(house, "tfl-x", "1.0")
    make_wheel(house, "tfl-y", "1.0", requires=["tfl-x>=1"])
    return house


@pytest.fixture(scope="module")
def python(tmp_path_factory) -> str:
    """A small virtualenv as the job's interpreter (nothing installed)."""
    venv = tmp_path_factory.mktemp("job") / "venv"
    subprocess.run([BASE_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True)
    return str(venv / "bin" / "python")


def one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("tflaunch: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_env_build_list_show_rm(cli, home, house, python):
    build = cli("env", "build", "--python", python, "--pip", "tfl-y", "--no-index", "--find-links", str(house),
                "--builder", "pip", "--json", check=True)
    result = json.loads(build.stdout)
    assert result["built"] and result["builder"] == "pip" and result["freeze"] == ["tfl-x==1.0", "tfl-y==1.0"]
    assert result["path"] == str(home / "envs" / result["key"][:20]) and result["request"]["requirements"] == ["tfl-y"]
    key = result["key"]
    again = json.loads(cli("env", "build", "--python", python, "--pip", "tfl-y", "--no-index", "--find-links",
                           str(house), "--json", check=True).stdout)
    assert not again["built"] and again["key"] == key

    listed = json.loads(cli("env", "list", "--json", check=True).stdout)
    assert [(e["key"], e["status"], e["packages"], e["python_version"]) for e in listed] == \
        [(key, "ready", ["tfl-y"], result["request"]["python_version"])]
    table = cli("env", "list", check=True).stdout
    assert table.splitlines()[0].split()[:4] == ["KEY", "STATUS", "PYTHON", "PACKAGES"] and key[:20] in table

    shown = cli("env", "show", key[:7], check=True).stdout
    assert f"key:          {key}" in shown and "  tfl-x==1.0" in shown and "  tfl-y==1.0" in shown
    assert "--no-index --find-links " + str(house) in shown
    record = json.loads(cli("env", "show", key[:7], "--json", check=True).stdout)
    assert record["status"] == "ready" and record["freeze"] == result["freeze"] and record["builder"] == "pip"

    removed = json.loads(cli("env", "rm", key[:9], "--json", check=True).stdout)
    assert removed[0]["key"] == key and not Path(result["path"]).exists()
    assert cli("env", "list", check=True).stdout.startswith("no environments in ")


def test_env_build_uses_the_homes_config(cli, home, house, python):
    home.mkdir(parents=True)
    (home / "config.json").write_text(json.dumps({"find_links": str(house), "no_index": True}))
    result = json.loads(cli("env", "build", "--python", python, "--pip", "tfl-x", "--json", check=True).stdout)
    assert result["request"]["index"] == {"find_links": [str(house)], "index_url": None, "no_index": True}
    assert result["freeze"] == ["tfl-x==1.0"]


def test_env_build_nothing_to_do(cli, python):
    out = cli("env", "build", "--python", python, "--json", check=True)
    assert json.loads(out.stdout)["environment"] is None


@pytest.mark.parametrize("args, code, text", [
    (["--pip", "numpy>>2"], 2, "pip_packages: 'numpy>>2' is not a valid requirement"),
    (["--pip", "pkg @ git+https://example.com/pkg.git"], 2, "VCS or URL requirement"),
    (["--conda", "numpy"], 2, "conda_packages (--conda)"),
    (["--pip", "tfl-missing"], 1, "no wheel for 'tfl-missing' in --no-index wheelhouse"),
])
def test_env_build_errors_are_one_line(cli, home, house, python, args, code, text):
    env = None
    if "--conda" in args:
        from tests.conftest import cli_env
        env = cli_env(home, PATH=os.path.dirname(sys.executable) + os.pathsep + "/usr/bin:/bin")
    result = cli("env", "build", "--python", python, "--no-index", "--find-links", str(house), *args, env=env)
    assert result.returncode == code
    assert text in one_line_error(result)
    assert not list((home / "envs").glob("[0-9a-f]*")) if (home / "envs").exists() else True


def test_env_show_and_rm_unknown_key(cli):
    for args in (["env", "show", "abc123"], ["env", "rm", "abc123"], ["env", "show", "../x"]):
        result = cli(*args)
        assert result.returncode == 2 and "environment" in one_line_error(result)
