"""Programs shipped as ONE source string (tflaunch.remote.bundle): the agent and the environment builder are
several modules here and one program on the hosts; what runs there is exactly their parts, joined."""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys

import pytest

from tflaunch.remote import agent, envbuild
from tflaunch.remote.bundle import AGENT, ENVBUILD, JOINED, shipped_source


@pytest.mark.parametrize("module, parts", [(agent, AGENT), (envbuild, ENVBUILD)], ids=["agent", "envbuild"])
def test_the_parts_join_into_one_program_that_defines_every_name(module, parts):
    source = shipped_source(parts)
    tree = ast.parse(source)
    assert JOINED not in source
    assert parts[-1] == module.__name__
    if "from __future__" in source:  # once, first
        assert source.count("from __future__ import annotations") == 1
        assert isinstance(tree.body[1], ast.ImportFrom) and tree.body[1].module == "__future__"
    assert ast.get_docstring(tree).strip() == module.__doc__.strip()  # the main module's, as the program's __doc__
    # nothing of tflaunch is imported when the program starts: the hosts have only the standard library
    # (the builder's hand-run `horovod-wheel --mpirun` imports tflaunch's mpirun detection, from a checkout)
    imported = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)} | \
        {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and m.startswith("tflaunch")}
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
    # every top-level name of every part is defined in the program
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))} | \
        {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    for name in parts:
        part = importlib.import_module(name)
        own = {k for k, v in vars(part).items() if getattr(v, "__module__", None) == name}
        assert own <= defined, (name, own - defined)


def test_the_joined_programs_run_under_isolated_python(tmp_path):
    """Run as the hosts run them: python -I -S -c SOURCE, nothing of tflaunch on the path."""
    builder = subprocess.run([sys.executable, "-I", "-S", "-c", shipped_source(ENVBUILD), "--help"],
                             capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert builder.returncode == 0 and "horovod-wheel" in builder.stdout, builder.stderr
    # the agent reads a length-prefixed spec on stdin; a bad one is refused with its own message
    bad = subprocess.run([sys.executable, "-I", "-S", "-c", shipped_source(AGENT)], input=b"0000000002{]",
                         capture_output=True, cwd=tmp_path, timeout=60)
    assert bad.returncode == 3 and b"tflaunch agent: bad spec" in bad.stderr
