"""`tflaunch runs rerun` and `Run.rerun`: a new run from a recorded run's snapshot, spec and arguments, with
overrides, with real processes (plain Python scripts)."""
from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import pytest

from conftest import show, wait_status

TRAIN = """
import os, sys, time
import helper
print("code", helper.VERSION)
print("args", sys.argv[1:])
print("env", os.environ.get("FOO"), "world", os.environ["TFLAUNCH_WORLD_SIZE"], "rank", os.environ["TFLAUNCH_RANK"])
if "--sleep" in sys.argv:
    time.sleep(float(sys.argv[sys.argv.index("--sleep") + 1]))
"""


def _run_ids(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "runs").iterdir() if not p.name.startswith("."))


def _files(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file())


@pytest.fixture
def recorded(cli, project, home):
    """A completed run of TRAIN (``helper.VERSION`` 'original'), its id."""
    src = project(**{"train.py": TRAIN, "helper.py": "VERSION = 'original'\n"})
    result = cli("run", "--source-dir", str(src), "--tag", "team=a", "train.py", "--", "--lr", "0.1", "--verbose",
                 "--batch=32", check=True)
    assert "code original" in result.stdout
    return src, _run_ids(home)[-1]


def test_rerun_runs_the_recorded_snapshot_with_new_arguments(cli, recorded, home):
    src, old = recorded
    old_dir = home / "runs" / old
    old_status = (old_dir / "status.json").read_bytes()
    objects, trees = _files(home / "objects"), len(list((home / "trees").iterdir()))
    (src / "helper.py").write_text("VERSION = 'changed'\n")   # the source changes, then is gone
    (src / "train.py").write_text("raise SystemExit('the source directory was read again')\n")
    shutil.rmtree(src)

    result = cli("runs", "rerun", old[-8:], "--arg", "--lr=0.5", "--arg", "epochs=3", "--arg=--batch=64",
                 "--drop-arg", "--verbose", "--tag", "round=2")
    assert result.returncode == 0, result.stderr
    assert "code original" in result.stdout
    assert "args ['--lr', '0.5', '--batch=64', '--epochs', '3']" in result.stdout
    new = _run_ids(home)[-1]
    assert new != old and f"rerun of {old}" in result.stderr

    # the snapshot is the recorded one: same manifest, same tree, nothing stored again
    new_dir = home / "runs" / new
    assert json.loads((new_dir / "snapshot.json").read_text()) == json.loads((old_dir / "snapshot.json").read_text())
    assert (new_dir / "snapshot").resolve() == (old_dir / "snapshot").resolve()
    assert _files(home / "objects") == objects and len(list((home / "trees").iterdir())) == trees

    # both records name each other; the finished record's status.json is not rewritten
    run = show(cli, new)
    assert run["status"] == "Completed" and run["rerun_of"] == old and run["reruns"] == []
    assert run["arguments"] == ["--lr", "0.5", "--batch=64", "--epochs", "3"]
    assert run["tags"] == {"team": "a", "round": "2"} and run["experiment"] == "default"
    assert run["rerun_overrides"]["arguments"] == {"--lr": "0.5", "--epochs": "3", "--batch": "64",
                                                   "--verbose": None}
    before = show(cli, old)
    assert before["reruns"] == [new] and before["rerun_of"] is None
    assert (old_dir / "status.json").read_bytes() == old_status
    assert json.loads((old_dir / "reruns" / f"{new}.json").read_text())["id"] == new
    text_new = cli("runs", "show", new, check=True).stdout
    assert f"rerun of:    {old} (--arg --lr=0.5" in text_new and "--drop-arg --verbose" in text_new
    assert f"reruns:      {new}" in cli("runs", "show", old, check=True).stdout
    listed = {r["id"]: r for r in json.loads(cli("runs", "list", "--json", check=True).stdout)}
    assert listed[new]["rerun_of"] == old

    # a rerun of the rerun: linked to its own source; the first run now has one rerun, the second one
    again = cli("runs", "rerun", new, "--arg", "--lr=0.7")
    assert again.returncode == 0, again.stderr
    assert "args ['--lr', '0.7', '--batch=64', '--epochs', '3']" in again.stdout
    third = _run_ids(home)[-1]
    assert show(cli, third)["rerun_of"] == new and show(cli, new)["reruns"] == [third]
    assert show(cli, old)["reruns"] == [new]


def test_rerun_set_fields_and_exit_status(cli, recorded, home):
    _, old = recorded
    result = cli("runs", "rerun", old, "--set", "process_count_per_node=2", "--set", "environment_variables.FOO=bar",
                 "-e", "more")
    assert result.returncode == 0, result.stderr
    assert "[rank 0] env bar world 2 rank 0" in result.stdout and "[rank 1] env bar world 2 rank 1" in result.stdout
    run = show(cli, _run_ids(home)[-1])
    assert run["experiment"] == "more" and "FOO" in run["environment_variables"]
    assert run["rerun_overrides"]["settings"] == {"process_count_per_node": "2", "environment_variables.FOO": "bar"}

    start = time.monotonic()
    timed = cli("runs", "rerun", old, "--set", "max_run_duration_seconds=1", "--arg", "--sleep=30")
    assert timed.returncode == 124, timed.stderr
    assert time.monotonic() - start < 20
    run = show(cli, _run_ids(home)[-1])
    assert run["status"] == "Failed" and run["error"]["reason"] == "timeout" and run["timeout"] == 1.0


def test_rerun_detach_returns_at_once(cli, recorded, home):
    _, old = recorded
    start = time.monotonic()
    result = cli("runs", "rerun", old, "--detach", "--arg", "--sleep=1", "--arg", "lr=9")
    assert result.returncode == 0 and result.stderr == ""
    assert time.monotonic() - start < 5
    new = result.stdout.strip()
    assert "\n" not in new and new in _run_ids(home)
    assert show(cli, new)["status"] in ("Preparing", "Running")
    run = wait_status(cli, new, {"Completed", "Failed", "Canceled"})
    assert run["status"] == "Completed" and run["rerun_of"] == old
    logs = cli("runs", "logs", new, check=True).stdout
    assert "args ['--lr', '9', '--verbose', '--batch=32', '--sleep', '1']" in logs
    assert show(cli, old)["reruns"] == [new]


def test_rerun_dry_run_writes_nothing(cli, recorded, home):
    _, old = recorded
    before = _run_ids(home)
    plan = json.loads(cli("runs", "rerun", old, "--dry-run", "--json", "--arg", "--lr=2", check=True).stdout)
    assert plan["rerun_of"] == old and plan["snapshot"]["from_run"] == old
    assert plan["processes"][0]["argv"][-4:] == ["--lr", "2", "--verbose", "--batch=32"]
    assert _run_ids(home) == before and not (home / "runs" / old / "reruns").exists()


@pytest.mark.parametrize("args, message", [
    (["nosuchrun"], "no run 'nosuchrun'"),
    (["{old}", "--set", "bogus=1"], "valid: node_count, process_count_per_node"),
    (["{old}", "--set", "node_count=many"], "--set node_count=many: expected an integer >= 1"),
    (["{old}", "--set", "node_count=2"], "give the hosts with --hosts or --hostfile"),
    (["{old}", "--set", "use_gpu=perhaps"], "expected true or false"),
    (["{old}", "--set", "entry_script=other.py"], "'other.py' is not a file of the recorded snapshot"),
    (["{old}", "--set", "environment_variables.TFLAUNCH_RANK=3"], "set by tflaunch itself"),
    (["{old}", "--set", "nokey"], "expected KEY=VALUE"),
    (["{old}", "--arg"], "argument --arg: expected one argument"),
    (["{old}", "--drop-arg", "--lr=1"], "expected a parameter name"),
    (["{old}", "--arg", "--data={{data:nope}}"], "no input 'nope'"),
    (["{old}", "-e", "no/such"], "experiment name 'no/such' is invalid"),
    (["{old}", "--json"], "--json goes with --dry-run"),
])
def test_rerun_bad_input_is_one_line(cli, recorded, home, args, message):
    _, old = recorded
    before = _run_ids(home)
    result = cli("runs", "rerun", *[a.format(old=old) for a in args])
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert _run_ids(home) == before


def test_rerun_without_a_snapshot_manifest(cli, recorded, home):
    _, old = recorded
    (home / "runs" / old / "snapshot.json").unlink()
    result = cli("runs", "rerun", old)
    assert result.returncode == 2
    assert f"run {old} has no snapshot manifest" in result.stderr and len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_run_rerun_from_the_python_api(cli, recorded, home):
    from tflaunch import Experiment, Run, SpecError

    src, old = recorded
    shutil.rmtree(src)
    run = Run(Experiment("default", home=home), old)
    new = run.rerun({"--lr": 0.25, "--verbose": None}, environment_variables={"FOO": "api"}, experiment="api",
                    tags={"via": "api"})
    out = io.StringIO()
    details = new.wait_for_completion(show_output=True, stdout=out, stderr=io.StringIO())
    assert "code original" in out.getvalue() and "args ['--lr', '0.25', '--batch=32']" in out.getvalue()
    assert "env api" in out.getvalue()
    assert details["rerun_of"] == old and new.experiment.name == "api" and details["tags"]["via"] == "api"
    assert run.get_details()["reruns"] == [new.id]
    with pytest.raises(SpecError, match=r"rerun\(bogus=1\): 'bogus' is not a field"):
        run.rerun(bogus=1)


def test_apply_arguments_forms():
    from tflaunch.rerun import apply_arguments

    argv = ["--lr", "0.1", "--verbose", "--batch=32", "--shift", "-5", "data.csv"]
    assert apply_arguments(argv, {"--lr": 0.5}) == ["--lr", "0.5", "--verbose", "--batch=32", "--shift", "-5",
                                                    "data.csv"]
    assert apply_arguments(argv, {"batch": 64, "shift": 2})[3:6] == ["--batch=64", "--shift", "2"]
    assert apply_arguments(argv, {"--verbose": 2})[:4] == ["--lr", "0.1", "--verbose", "2"]  # a bare flag gets a value
    assert apply_arguments(argv, {"--lr": None, "--batch": None}) == ["--verbose", "--shift", "-5", "data.csv"]
    assert apply_arguments(argv, {"--lr": ""})[:2] == ["--lr", "--verbose"]
    assert apply_arguments(argv, {"--new": "x", "-q": ""})[-3:] == ["--new", "x", "-q"]
    assert apply_arguments(argv, {"--absent": None}) == argv


def test_route_joins_option_like_values():
    from tflaunch.cli.rerun import route

    assert route(["runs", "rerun", "R", "--arg", "--lr=1", "--drop-arg", "-v"]) == \
        ["runs", "rerun", "R", "--arg=--lr=1", "--drop-arg=-v"]
    assert route(["--home", "h", "runs", "rerun", "--arg", "--x"]) == ["--home", "h", "runs", "rerun", "--arg=--x"]
    untouched = ["run", "train.py", "runs", "rerun", "--arg", "--x"]  # a script's own arguments
    assert route(untouched) == untouched


def test_rerun_sets_recovery_fields(project, cli, home):
    """--set max_restarts=N (and the other recovery fields) on a rerun: checked like the run's options."""
    src = project(**{"flaky.py": """
        import os, sys
        sys.exit(3 if os.environ["TFLAUNCH_ATTEMPT"] == "1" else 0)
    """})
    first = cli("run", "--source-dir", str(src), "flaky.py")
    assert first.returncode == 3
    run_id = json.loads(cli("runs", "list", "--json").stdout)[0]["id"]
    again = cli("runs", "rerun", run_id, "--set", "max_restarts=1", "--set", "restart_delay=0")
    assert again.returncode == 0, again.stderr
    new = json.loads(cli("runs", "list", "--json").stdout)[0]
    shown = json.loads(cli("runs", "show", new["id"], "--json").stdout)
    assert shown["status"] == "Completed" and shown["attempt"] == 2
    bad = cli("runs", "rerun", run_id, "--set", "max_restarts=-1")
    assert bad.returncode == 2 and "max_restarts" in bad.stderr and "Traceback" not in bad.stderr
