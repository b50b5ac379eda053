"""`python -m tflaunch` end to end with real processes: run, runs list/show/logs/files/download/cancel."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cli_env, show

TRAIN = """
import os, sys
print("args", sys.argv[1:])
for k in ("TFLAUNCH_RUN_ID", "TFLAUNCH_RANK", "TFLAUNCH_LOCAL_RANK", "TFLAUNCH_WORLD_SIZE", "PYTHONUNBUFFERED",
          "CUDA_VISIBLE_DEVICES", "MY_VAR"):
    print(k, repr(os.environ.get(k)))
print("cwd", os.getcwd())
os.makedirs("outputs/sub", exist_ok=True)
open("outputs/model.bin", "wb").write(b"weights")
open("outputs/sub/x.txt", "w").write("x")
open("logs/train.log", "w").write("epoch 1")
code = int(os.environ.get("EXIT_WITH", "0"))
if code:
    print("something broke", file=sys.stderr)
sys.exit(code)
"""


def test_run_completes_and_records_everything(cli, project, home):
    src = project(**{"train.py": TRAIN, "outputs/stale.txt": "not part of the snapshot"})
    result = cli("run", "--source-dir", str(src), "--env", "MY_VAR=a=b", "train.py", "--", "--lr", "0.1",
                 "two words", "'; touch /tmp/pwned #")
    assert result.returncode == 0, result.stderr
    assert "args ['--lr', '0.1', 'two words', \"'; touch /tmp/pwned #\"]" in result.stdout
    assert "TFLAUNCH_WORLD_SIZE '1'" in result.stdout and "PYTHONUNBUFFERED '1'" in result.stdout
    assert "CUDA_VISIBLE_DEVICES ''" in result.stdout and "MY_VAR 'a=b'" in result.stdout
    run_id = result.stdout.split("TFLAUNCH_RUN_ID '")[1].split("'")[0]
    run = show(cli, run_id)
    for key in ("id", "experiment", "status", "exit_code", "created", "started", "ended", "error"):
        assert key in run
    assert (run["status"], run["exit_code"], run["error"], run["experiment"]) == ("Completed", 0, None, "default")
    assert run["created"] <= run["started"] <= run["ended"]
    assert f"cwd {Path(run['run_dir']) / 'work'}" in result.stdout
    files = json.loads(cli("runs", "files", run_id, "--json").stdout)
    names = {f["name"] for f in files}
    assert {"outputs/model.bin", "outputs/sub/x.txt", "logs/train.log", "tflaunch_logs/rank-0.stdout",
            "tflaunch_logs/rank-0.stderr"} <= names
    assert "outputs/stale.txt" not in names
    record = Path(run["run_dir"])
    assert not (record / "work").exists()                  # working copy removed after collection
    assert (record / "snapshot" / "train.py").exists() and not (record / "snapshot" / "outputs").exists()
    for path in record.rglob("*.json"):                    # records hold relative paths only
        assert str(home) not in path.read_text(), path


def test_exit_code_signal_and_stderr_tail(cli, project, home):
    src = project(**{"train.py": TRAIN, "kill.py": "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"})
    failed = cli("run", "--source-dir", str(src), "train.py", env=cli_env(home, EXIT_WITH="3"))
    assert failed.returncode == 3
    assert "Failed" in failed.stderr and "train.py exited with code 3" in failed.stderr
    run = json.loads(cli("runs", "list", "--json").stdout)[0]
    assert run["status"] == "Failed" and run["exit_code"] == 3
    assert run["error"]["reason"] == "exit_code" and "something broke" in run["error"]["stderr_tail"]
    assert (Path(show(cli, run["id"])["run_dir"]) / "outputs" / "model.bin").exists()  # kept on failure
    killed = cli("run", "--source-dir", str(src), "kill.py")
    assert killed.returncode == 128 + 9
    run = json.loads(cli("runs", "list", "--json", "--limit", "1").stdout)[0]
    assert (run["status"], run["signal"], run["exit_code"]) == ("Failed", "SIGKILL", None)


def test_detach_prints_only_the_run_id(cli, project):
    src = project(**{"train.py": TRAIN})
    result = cli("run", "--detach", "--source-dir", str(src), "train.py")
    assert result.returncode == 0
    assert [line for line in result.stderr.splitlines() if "snapshot:" not in line] == []  # progress: plain lines
    run_id = result.stdout.strip()
    assert "\n" not in run_id
    from conftest import wait_status
    assert wait_status(cli, run_id, {"Completed"})["exit_code"] == 0
    logs = cli("runs", "logs", run_id)
    assert "args []" in logs.stdout


def test_dry_run_plans_without_writing(cli, project, home):
    src = project(**{"train.py": TRAIN})
    result = cli("run", "--dry-run", "--json", "--source-dir", str(src), "--env", "X=1", "train.py", "--a", "b")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    (proc,) = plan["processes"]
    assert {"host", "rank", "local_rank", "role", "index", "argv", "env", "cwd"} <= set(proc)
    assert proc["argv"][1:] == ["train.py", "--a", "b"] and proc["env"]["X"] == "1"
    assert proc["env"]["TFLAUNCH_RUN_ID"] == plan["run_id"]
    assert not home.exists()
    text = cli("run", "--dry-run", "--source-dir", str(src), "train.py").stdout
    assert "nothing started" in text and "TFLAUNCH_RANK=0" in text


def test_download_and_home_option_anywhere(cli, project, tmp_path, home):
    src = project(**{"train.py": TRAIN})
    other = tmp_path / "other-home"
    env = {k: v for k, v in cli_env(home).items() if k != "TFLAUNCH_HOME"}
    assert cli("--home", str(other), "run", "--source-dir", str(src), "train.py", env=env).returncode == 0
    listing = json.loads(cli("runs", "list", "--json", "--home", str(other), env=env).stdout)
    run_id = listing[0]["id"]
    dest = tmp_path / "dl"
    dest.mkdir()
    out = cli("runs", "download", "--home", str(other), run_id, "outputs/model.bin", str(dest), env=env)
    assert out.returncode == 0 and (dest / "model.bin").read_bytes() == b"weights"
    out = cli("runs", "download", "--home", str(other), run_id[-8:], "outputs", str(tmp_path / "all"), env=env)
    assert (tmp_path / "all" / "sub" / "x.txt").read_text() == "x"
    out = cli("runs", "download", "--home", str(other), run_id, "snapshot/train.py", str(tmp_path / "t.py"), env=env)
    assert out.returncode == 0 and "TFLAUNCH_RUN_ID" in (tmp_path / "t.py").read_text()
    human = cli("runs", "list", "--home", str(other), env=env).stdout
    assert run_id in human and "Completed" in human


@pytest.mark.parametrize("args, fragment", [
    (["run", "--source-dir", "/nonexistent/dir", "train.py"], "source_directory: /nonexistent/dir does not exist"),
    (["run", "--source-dir", "{src}", "missing.py"], "entry_script: 'missing.py' not found"),
    (["run", "--source-dir", "{src}", "../outside.py"], "is outside source_directory"),
    (["run", "--source-dir", "{src}", "--nodes", "0", "train.py"], "node_count (--nodes): must be an integer >= 1"),
    (["run", "--source-dir", "{src}", "--env", "NOEQUALS", "train.py"], "expected NAME=VALUE"),
    (["run", "--source-dir", "{src}", "--timeout", "-3", "train.py"], "must be > 0"),
    (["run", "--source-dir", "{src}", "--python", "/no/python", "train.py"], "is not an executable file"),
    (["run", "--source-dir", "{src}", "--snapshot-max-files", "1", "train.py"], "over the limit"),
    (["run", "--source-dir", "{src}", "-e", "bad name", "train.py"], "experiment name 'bad name' is invalid"),
    (["runs", "show", "nosuchrun"], "no run 'nosuchrun'"),
    (["runs", "download", "{run}", "../run.json"], "'..' is not allowed"),
    (["runs", "download", "{run}", "/etc/passwd"], "give a path relative to the run"),
    (["runs", "download", "{run}", "outputs/escape/passwd"], "leads outside run"),
    (["runs", "download", "{run}", "outputs/nothing"], "has no file 'outputs/nothing'"),
    (["runs", "frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_nonzero(cli, project, tmp_path, args, fragment):
    src = project(**{"train.py": TRAIN, "extra.py": ""})
    (tmp_path / "outside.py").write_text("")
    run_id = ""
    if "{run}" in args:
        run_id = cli("run", "--source-dir", str(src), "train.py", check=True).stdout.split("TFLAUNCH_RUN_ID '")[1][:28]
        os.symlink("/etc", Path(show(cli, run_id)["run_dir"]) / "outputs" / "escape")
    before = sorted(p.name for p in (tmp_path / "home" / "runs").iterdir()) if run_id else []
    result = cli(*[a.format(src=src, run=run_id) for a in args])
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert fragment in lines[0]
    if run_id:
        assert sorted(p.name for p in (tmp_path / "home" / "runs").iterdir()) == before
        assert show(cli, run_id)["status"] == "Completed"


def test_invalid_script_params_type_from_python(tmp_path):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from tflaunch.cli import main\n"
            "from tflaunch import Estimator, TflaunchError\n"
            "try:\n    Estimator('.', entry_script='t.py', script_params={'--x': object()})\n"
            "except TflaunchError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True)
    assert out.stdout.startswith("script_params['--x']: unsupported type object")


def test_home_not_writable(cli, project, tmp_path):
    src = project(**{"train.py": TRAIN})
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    result = cli("--home", str(blocker / "home"), "run", "--source-dir", str(src), "train.py")
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
    assert "is not writable" in result.stderr


@pytest.mark.parametrize("argv, entry, script_args, detach", [
    (["t.py", "--a", "--", "--b"], "t.py", ["--a", "--", "--b"], False),
    (["t.py", "--", "--a"], "t.py", ["--a"], False),
    (["t.py", "--", "--", "x"], "t.py", ["--", "x"], False),
    (["--detach", "t.py", "-x", "--detach"], "t.py", ["-x", "--detach"], True),
    (["--", "t.py", "--home", "x"], "t.py", ["--home", "x"], False),
])
def test_everything_after_entry_goes_to_the_script(argv, entry, script_args, detach):
    from tflaunch.cli import build_parser
    args = build_parser().parse_args(["run", *argv])
    assert (args.entry, args.script_args, args.detach) == (entry, script_args, detach)


def test_shim_and_version(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "tflaunch.py"), "--version"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("tflaunch ")


def test_logs_follow_until_the_run_ends(cli, project, home):
    src = project(**{"train.py": "import sys, time\nfor i in range(3):\n    print('tick', i, flush=True)\n"
                                 "    time.sleep(0.3)\nprint('oops', file=sys.stderr)\n"})
    run_id = cli("run", "-d", "--source-dir", str(src), "train.py", check=True).stdout.strip()
    followed = cli("runs", "logs", "--follow", run_id, timeout=60)
    assert followed.returncode == 0
    assert followed.stdout == "tick 0\ntick 1\ntick 2\n" and followed.stderr == "oops\n"
    assert show(cli, run_id)["status"] == "Completed"
