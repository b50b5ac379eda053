"""Supervision with real processes: cancel, timeout, launcher death, leftovers, concurrency, raw output."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_env, pids_with_token, process_exits, show, wait_for_file, wait_no_processes, wait_status

SLEEPER = """
import os, signal, sys, time
if "--ignore-term" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if "--checkpoint-on-term" in sys.argv:
    def on_term(*_):
        open("outputs/checkpoint.txt", "w").write("saved")
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
os.makedirs("outputs", exist_ok=True)
open(os.path.join(os.environ["MARK_DIR"], "started"), "w").write(os.environ["TFLAUNCH_RUN_ID"])
print("sleeping", flush=True)
time.sleep(float(sys.argv[1]))
print("woke up")
"""


@pytest.fixture
def sleeper(project, tmp_path, home):
    src = project(**{"sleep.py": SLEEPER})
    marks = tmp_path / "marks"
    marks.mkdir()
    return src, marks, cli_env(home, MARK_DIR=str(marks))


def _start(cli_popen, src, *args):
    return cli_popen("run", "--source-dir", str(src), *args)


def _started_run(marks: Path) -> str:
    wait_for_file(marks / "started")
    time.sleep(0.05)
    return (marks / "started").read_text()


def _popen(env, *args):
    return subprocess.Popen([sys.executable, "-m", "tflaunch", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def test_ctrl_c_cancels_gracefully(sleeper, cli):
    src, marks, env = sleeper
    proc = _popen(env, "run", "--source-dir", str(src), "sleep.py", "60", "--checkpoint-on-term")
    run_id = _started_run(marks)
    os.killpg(proc.pid, signal.SIGINT)          # what a terminal sends to the foreground group
    assert proc.wait(10) == 130
    run = show(cli, run_id)
    assert run["status"] == "Canceled" and "Ctrl-C" in run["cancel_reason"]
    assert "outputs/checkpoint.txt" in cli("runs", "files", run_id).stdout   # SIGTERM let it save
    wait_no_processes(run_id, 1)


def test_second_ctrl_c_kills_at_once(sleeper, cli):
    src, marks, env = sleeper
    proc = _popen(env, "run", "--source-dir", str(src), "--grace", "60", "sleep.py", "60", "--ignore-term")
    run_id = _started_run(marks)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None                   # still in its 60 s grace
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(30) == 130                  # well within the 60 s grace (and the 60 s sleep)
    run = show(cli, run_id)
    assert run["status"] == "Canceled"
    assert process_exits(run) == {0: -9}         # SIGKILLed, not ended by its own sleep
    wait_no_processes(run_id, 1)


def test_sigterm_to_launcher_cancels(sleeper, cli):
    src, marks, env = sleeper
    proc = _popen(env, "run", "--source-dir", str(src), "sleep.py", "60")
    run_id = _started_run(marks)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 130
    assert show(cli, run_id)["status"] == "Canceled"


def test_timeout_kills_a_process_that_ignores_sigterm(sleeper, cli):
    src, marks, env = sleeper
    result = subprocess.run([sys.executable, "-m", "tflaunch", "run", "--source-dir", str(src), "--timeout", "1",
                             "--grace", "1", "sleep.py", "60", "--ignore-term"], env=env, capture_output=True,
                            text=True, timeout=30)  # catches a launcher that waits for the 60 s sleep
    assert result.returncode == 124
    assert "sleeping" in result.stdout and "woke up" not in result.stdout  # stopped in its sleep
    run = json.loads(cli("runs", "list", "--json").stdout)[0]
    assert run["status"] == "Failed" and run["error"]["reason"] == "timeout" and run["signal"] == "SIGKILL"
    wait_no_processes(run["id"], 1)


def test_runs_cancel_of_a_detached_run(sleeper, cli):
    src, marks, env = sleeper
    run_id = cli("run", "--detach", "--source-dir", str(src), "sleep.py", "60", env=env, check=True).stdout.strip()
    _started_run(marks)
    assert show(cli, run_id)["status"] == "Running"
    result = cli("runs", "cancel", run_id, "--wait", timeout=30)
    assert result.returncode == 0 and "Canceled" in result.stdout
    assert "runs cancel" in show(cli, run_id)["cancel_reason"]
    wait_no_processes(run_id, 2)
    again = cli("runs", "cancel", run_id)
    assert again.returncode == 0 and "already Canceled" in again.stdout


@pytest.mark.parametrize("detached", [False, True])
def test_sigkill_of_the_launcher(sleeper, cli, detached):
    src, marks, env = sleeper
    if detached:
        run_id = cli("run", "--detach", "--source-dir", str(src), "sleep.py", "60", "--checkpoint-on-term",
                     env=env, check=True).stdout.strip()
    else:
        launcher = _popen(env, "run", "--source-dir", str(src), "sleep.py", "60", "--checkpoint-on-term")
    run_id = _started_run(marks)
    run_dir = Path(show(cli, run_id)["run_dir"])
    pid = json.loads((run_dir / "lease.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    if not detached:
        launcher.wait(5)
    wait_no_processes(run_id, 30)  # stopped by the agent, well before their 60 s sleep ends
    run = show(cli, run_id)
    assert run["status"] == "Failed" and run["error"]["reason"] == "launcher_lost", run
    assert (run_dir / "outputs" / "checkpoint.txt").read_text() == "saved"   # SIGTERM; collected after the loss


def test_leftover_and_escaped_descendants_are_killed(project, cli, home):
    src = project(**{"train.py": """
        import subprocess, sys
        # a background child in our process group, and a daemon that left it with setsid
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); time.sleep(300)"], start_new_session=True)
        print("bye")
    """})
    result = cli("run", "--source-dir", str(src), "train.py")
    assert result.returncode == 0
    run_id = json.loads(cli("runs", "list", "--json").stdout)[0]["id"]
    assert pids_with_token(run_id) == []


def test_two_runs_cancel_one_leaves_the_other(sleeper, cli, tmp_path, home):
    src, marks, env = sleeper
    marks2 = tmp_path / "marks2"
    marks2.mkdir()
    a = cli("run", "-d", "--source-dir", str(src), "sleep.py", "60", env=env, check=True).stdout.strip()
    b = cli("run", "-d", "--source-dir", str(src), "sleep.py", "3", env=cli_env(home, MARK_DIR=str(marks2)),
            check=True).stdout.strip()
    _started_run(marks), _started_run(marks2)
    cli("runs", "cancel", a, "--wait", check=True)
    assert show(cli, b)["status"] == "Running" and pids_with_token(b)
    assert wait_status(cli, b, {"Completed", "Failed"})["status"] == "Completed"


def test_twenty_concurrent_runs_into_one_home(project, home):
    src = project(**{"train.py": "import os; os.makedirs('outputs', exist_ok=True); "
                                 "open('outputs/id', 'w').write(os.environ['TFLAUNCH_RUN_ID']); print('ok')"})
    env = cli_env(home)
    procs = [subprocess.Popen([sys.executable, "-m", "tflaunch", "run", "--source-dir", str(src), "-e", "conc",
                               "train.py"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(20)]
    codes = [p.wait(120) for p in procs]
    assert codes == [0] * 20
    out = subprocess.run([sys.executable, "-m", "tflaunch", "runs", "list", "--json"], env=env, capture_output=True,
                         text=True, check=True)
    runs = json.loads(out.stdout)
    assert len({r["id"] for r in runs}) == 20 and {r["status"] for r in runs} == {"Completed"}
    for r in runs:
        run_dir = home / "runs" / r["id"]
        assert (run_dir / "outputs" / "id").read_text() == r["id"]     # each had its own cwd
        for path in run_dir.rglob("*.json"):
            json.loads(path.read_text())


def test_snapshot_is_taken_at_submit(project, cli, home):
    src = project(**{"train.py": "import time; time.sleep(1); print(open('conf.txt').read())", "conf.txt": "v1"})
    run_id = cli("run", "-d", "--source-dir", str(src), "train.py", check=True).stdout.strip()
    (src / "conf.txt").write_text("v2 edited after submit")
    (src / "train.py").write_text("print('edited')")
    wait_status(cli, run_id, {"Completed"})
    assert cli("runs", "logs", run_id).stdout.strip() == "v1"
    assert (home / "runs" / run_id / "snapshot" / "conf.txt").read_text() == "v1"


def test_raw_output_is_preserved_byte_for_byte(project, cli, home):
    src = project(**{"train.py": r"""
        import os, sys
        out, err = sys.stdout.buffer, sys.stderr.buffer
        out.write(b"valid \xc3\xa9 invalid \xff\xfe split \xe2\x82")
        out.flush()
        out.write(b"\xac\n")
        for i in range(5):
            out.write(b"\rprogress %d%%" % (i * 25))
            out.flush()
        out.write(b"\n" + b"x" * (10 * 1024 * 1024))   # a 10 MB line without newline
        err.write(b"err \x80\x81\n")
    """})
    result = subprocess.run([sys.executable, "-m", "tflaunch", "run", "--source-dir", str(src), "train.py"],
                            env=cli_env(home), capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr[-500:]
    run_id = json.loads(cli("runs", "list", "--json").stdout)[0]["id"]
    logs = home / "runs" / run_id / "tflaunch_logs"
    expected = (b"valid \xc3\xa9 invalid \xff\xfe split \xe2\x82\xac\n"
                + b"".join(b"\rprogress %d%%" % (i * 25) for i in range(5)) + b"\n" + b"x" * (10 * 1024 * 1024))
    assert (logs / "rank-0.stdout").read_bytes() == expected
    assert (logs / "rank-0.stderr").read_bytes() == b"err \x80\x81\n"
    assert result.stdout == expected  # the console gets the bytes too, as if the script ran bare


needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"),
                                reason="needs root to mount a small tmpfs (CI runs as root)")


@pytest.fixture
def tmpfs(tmp_path):
    mounts = []

    def mount(name: str, size: str, *options: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        opts = ",".join((f"size={size}",) + options)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)]).returncode != 0:
            pytest.skip("cannot mount tmpfs here")
        mounts.append(path)
        return path
    yield mount
    for path in reversed(mounts):
        subprocess.run(["umount", "-l", str(path)])


@needs_root
def test_disk_full_while_collecting_outputs(project, cli, tmpfs, tmp_path):
    home = tmpfs("small-home", "3m")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    src = project(**{"ok.py": "import os; open('outputs/a.txt', 'w').write('small')",
                     "big.py": "open('outputs/big.bin', 'wb').write(b'0' * 8 * 1024 * 1024)"})
    env = cli_env(home)
    ok = cli("run", "--source-dir", str(src), "--scratch", str(scratch), "ok.py", env=env)
    assert ok.returncode == 0, ok.stderr
    big = cli("run", "--source-dir", str(src), "--scratch", str(scratch), "big.py", env=env)
    assert big.returncode == 1 and len([l for l in big.stderr.splitlines() if "Traceback" in l]) == 0
    runs = json.loads(cli("runs", "list", "--json", env=env).stdout)
    failed, first = runs[0], runs[1]
    assert failed["status"] == "Failed" and failed["error"]["reason"] == "disk_full", failed
    assert str(scratch) in failed["error"]["message"]
    assert (scratch / failed["id"] / "outputs" / "big.bin").stat().st_size == 8 * 1024 * 1024  # not lost
    assert first["status"] == "Completed"
    assert (home / "runs" / first["id"] / "outputs" / "a.txt").read_text() == "small"   # earlier record intact
    for path in home.rglob("*.json"):
        json.loads(path.read_text())


@needs_root
def test_read_only_home(project, cli, tmpfs):
    home = tmpfs("ro-home", "1m", "ro")
    src = project(**{"train.py": "print(1)"})
    result = cli("run", "--source-dir", str(src), "train.py", env=cli_env(home))
    assert result.returncode != 0 and "is not writable" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@needs_root
def test_script_fills_the_disk_and_the_run_is_still_recorded(project, cli, tmpfs):
    home = tmpfs("full-home", "4m")
    src = project(**{"fill.py": """
        import errno, os
        try:
            with open(os.environ["TFLAUNCH_HOME"] + "/filler.bin", "wb") as fh:  # stays after the run
                while True:
                    fh.write(b"0" * 65536)
                    fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC   # (no print: stdout lives on the full disk too)
    """})
    env = cli_env(home)
    result = cli("run", "--source-dir", str(src), "fill.py", env=env)
    assert result.returncode == 0, result.stderr
    run = json.loads(cli("runs", "list", "--json", env=env).stdout)[0]
    assert run["status"] == "Completed"                  # the reserve made room for the final records
    events = [json.loads(line) for line in (home / "runs" / run["id"] / "events.jsonl").read_text().splitlines()]
    assert [e["status"] for e in events if e["event"] == "status"] == ["Preparing", "Running", "Finalizing",
                                                                     "Completed"]
    assert "cannot record" not in result.stderr


def test_background_supervisor_that_cannot_start_fails_the_run(project, home):
    from tflaunch import Estimator, TflaunchError
    from tflaunch.submit import SubmitOptions, create_run, prepare
    from tflaunch.supervise import spawn_detached

    src = project(**{"train.py": "print(1)"})
    record = create_run(prepare(Estimator(str(src), entry_script="train.py"), SubmitOptions(home=str(home))))
    Path(record.path("run.json")).write_text("{ broken")
    with pytest.raises(TflaunchError, match="did not start"):
        spawn_detached(record)
    status = record.read_status()
    assert status["status"] == "Failed" and status["error"]["reason"] == "launch_failed"


def test_follower_prefixes_lines_and_flushes_partial_ones(tmp_path, monkeypatch):
    import io

    from tflaunch import tail
    path = tmp_path / "log"
    path.write_bytes(b"one\ntw")
    out = io.StringIO()
    f = tail.Follower(str(path), out, prefix="[rank 3] ")
    f.poll()
    assert out.getvalue() == "[rank 3] one\n"       # the partial line waits for its newline...
    monkeypatch.setattr(tail, "PARTIAL_LINE_DELAY", 0.0)
    f.poll()
    assert out.getvalue() == "[rank 3] one\n[rank 3] tw\n"  # ...but not forever
    with open(path, "ab") as fh:
        fh.write(b"o\nthree")
    f.poll(final=True)
    f.close()
    assert out.getvalue().endswith("[rank 3] o\n[rank 3] three\n")
