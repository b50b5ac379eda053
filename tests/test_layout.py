"""The package's shape: modules and classes small enough to read, and a supervision loop that never tests
which distribution, launcher or scheduler a run has (they answer through their tables and interfaces)."""
from __future__ import annotations

import ast
import re

from conftest import REPO

PACKAGE = REPO / "tflaunch"
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 300


def test_no_module_over_the_limit():
    big = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
           if (n := p.read_text().count("\n")) > MAX_MODULE_LINES}
    assert big == {}


def test_no_class_over_the_limit():
    big = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                big[f"{path.relative_to(PACKAGE)}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert big == {}


def test_the_supervision_loop_names_no_backend():
    names = re.compile(r"""["'](plain|ps|multiworker|mpi|mpirun|srun|slurm|agents)["']|TF_BACKENDS|slurm_job|"""
                       r"""\.backend\b|in_allocation""")
    for name in ("supervisor.py", "policy.py", "finalize.py"):
        source = (PACKAGE / "supervise" / name).read_text()
        code = "\n".join(line.split("#")[0] for line in source.splitlines())
        assert not names.findall(code), name
