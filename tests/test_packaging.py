"""The core is standard library only, runs from one file (zipapp) and from the checkout shim."""
from __future__ import annotations

import json
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tflaunch

from conftest import REPO

CORE_MODULES = sorted(
    ["tflaunch"] + [m.name for m in pkgutil.walk_packages(tflaunch.__path__, "tflaunch.")])  # subpackages too


def test_every_core_module_imports_without_site_packages():
    assert len(CORE_MODULES) >= 14
    code = ("import sys, importlib\n"
            "sys.path[:] = [p for p in sys.path if 'site-packages' not in p and 'dist-packages' not in p]\n"
            f"sys.path.insert(0, {str(REPO)!r})\n"
            f"for name in {CORE_MODULES!r}:\n    importlib.import_module(name)\n"
            "bad = sorted(m for m, mod in sys.modules.items() if getattr(mod, '__file__', None) and "
            "('site-packages' in mod.__file__ or 'dist-packages' in mod.__file__))\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_syntax_is_python_3_9_compatible():
    vermin = shutil.which("vermin") or (Path(sys.executable).parent / "vermin")
    if not Path(vermin).exists():
        pytest.skip("vermin not installed (pip install '.[dev]')")
    out = subprocess.run([str(vermin), "-t=3.9-", "--no-tips", "--violations", "--eval-annotations",
                          "--backport", "dataclasses", str(REPO / "tflaunch"), str(REPO / "tflaunch.py")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="module")
def pyz(tmp_path_factory):
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    subprocess.run([make, "-s", "dist"], cwd=REPO, check=True, capture_output=True)
    built = REPO / "dist" / "tflaunch.pyz"
    copy = tmp_path_factory.mktemp("bin") / "tflaunch.pyz"
    shutil.copy(built, copy)         # a single file, away from the checkout
    return copy


def test_zipapp_runs_a_job_with_a_bare_python(pyz, project, tmp_path):
    src = project(**{"train.py": "import os; open('outputs/x', 'w').write('1'); print('hi from', os.getcwd())"})
    bare = [sys.executable, "-I", "-S", str(pyz)]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}       # no PYTHONPATH, no TFLAUNCH_HOME
    out = subprocess.run(bare + ["run", "--source-dir", str(src), "train.py"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "hi from" in out.stdout and (tmp_path / ".tflaunch" / "runs").is_dir()   # default home
    run_id = subprocess.run(bare + ["run", "-d", "--source-dir", str(src), "train.py"], env=env,
                            capture_output=True, text=True, check=True).stdout.strip()
    listing = subprocess.run(bare + ["runs", "cancel", "--wait", run_id], env=env, capture_output=True, text=True,
                             timeout=30)
    assert listing.returncode == 0
    runs = json.loads(subprocess.run(bare + ["runs", "list", "--json"], env=env, capture_output=True, text=True,
                                     check=True).stdout)
    assert len(runs) == 2 and runs[1]["status"] == "Completed"


def test_shim_runs_like_the_module(project, tmp_path):
    src = project(**{"train.py": "print('shim ok')"})
    env = {**os.environ, "TFLAUNCH_HOME": str(tmp_path / "h")}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, str(REPO / "tflaunch.py"), "run", "--source-dir", str(src), "train.py"],
                         env=env, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0 and "shim ok" in out.stdout


def test_zipapp_runs_a_sweep_with_a_bare_python(pyz, project, tmp_path):
    """The sweep's driver and its trials' supervisors start from the single file too."""
    src = project(**{"train.py": "import sys; print('x is', sys.argv[2])"})
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-I", "-S", str(pyz), "sweep", "--param", "x=choice(1, 2)", "--sampling",
                          "grid", "--primary-metric", "loss", "--goal", "minimize", "--max-total-runs", "2",
                          "--source-dir", str(src), "train.py"], env=env, capture_output=True, text=True, timeout=120)
    # the script logs no metric: the trials complete, the sweep too, with no best trial
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("Completed") >= 3 and "trial 1" in out.stdout
