"""The failed process's exception in the run's error (issue 19, "what a user reads"): a real run whose
script prints a long tensor dump after the traceback's cause, and the pure line finder."""
from __future__ import annotations

import json

from conftest import cli_env, run_cli, show

from tflaunch.supervise.finalize import exception_line

FAILING = """
import sys
print("loading", flush=True)
try:
    raise KeyError("shape")
except KeyError:
    raise ValueError("Input 0 of layer 'dense' is incompatible with the layer: expected axis -1 of input shape to have value 784")
"""

DUMPING = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("[[0.1 0.2 0.3]]\\n" * 300))
""" + FAILING


def test_the_exception_line_is_in_the_error_and_on_the_console(project, home, cli):
    src = project(**{"train.py": DUMPING})
    result, _ = run_cli(cli_env(home), "--source-dir", str(src), "train.py")
    assert result.returncode == 1
    run = show(cli, json.loads(cli("runs", "list", "--json").stdout)[0]["id"])
    error = run["error"]
    assert error["exception"].startswith("ValueError: Input 0 of layer 'dense' is incompatible")
    assert "ValueError" not in error["stderr_tail"]  # the last 10 lines are the dump
    assert "(ValueError: Input 0 of layer" in result.stderr.splitlines()[-1]
    assert "exception:   ValueError: Input 0" in cli("runs", "show", run["id"]).stdout


def test_a_failure_without_a_traceback_has_no_exception(project, home, cli):
    src = project(**{"train.py": "import sys\nprint('bye', file=sys.stderr)\nsys.exit(3)\n"})
    result, _ = run_cli(cli_env(home), "--source-dir", str(src), "train.py")
    assert result.returncode == 3
    run = show(cli, json.loads(cli("runs", "list", "--json").stdout)[0]["id"])
    assert "exception" not in run["error"] and run["error"]["stderr_tail"] == "bye"


def test_exception_line_finder():
    assert exception_line("x\nTraceback (most recent call last):\n  File \"a\", line 1\n"
                          "tensorflow.python.framework.errors_impl.InvalidArgumentError: bad\n") == \
        "tensorflow.python.framework.errors_impl.InvalidArgumentError: bad"
    chained = ("Traceback (most recent call last):\n  f\nKeyError: 'a'\n\nDuring handling of the above exception, "
               "another exception occurred:\n\nTraceback (most recent call last):\n  g\nRuntimeError: b\n")
    assert exception_line(chained) == "RuntimeError: b"
    assert exception_line("Traceback (most recent call last):\n  h\nKeyboardInterrupt\n") == "KeyboardInterrupt"
    assert exception_line("ValueError: not after a traceback\n") is None
    assert exception_line("") is None
