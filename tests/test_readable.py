"""What a user reads (issue 19): progress bars under their rank's prefix (a pipe: the last state of each
bar line; a terminal: the bar in place), the files the script wrote outside ./outputs and ./logs named
before they are discarded, and `runs show` saying the backend, the hosts and the processes."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from conftest import cli_env, last_run, run_cli

BAR = r"""
import os, sys, time
if os.environ["TFLAUNCH_RANK"] == "0":
    for epoch in (1, 2):
        print(f"Epoch {epoch}/2", flush=True)
        for i in range(1, 61):
            sys.stdout.write("\r%2d/60 [%-30s] - loss: %.3f" % (i, "=" * (i // 2), 1.0 / i))
            sys.stdout.flush()
            time.sleep(0.005)
        sys.stdout.write("\n")
    print("done", flush=True)
"""


def _rank0_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("[rank 0] ")]


def test_a_progress_bar_on_a_pipe_shows_its_last_state(project, home):
    src = project(**{"bar.py": BAR})
    result, _ = run_cli(cli_env(home), "--procs-per-node", "2", "--source-dir", str(src), "bar.py")
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stdout
    assert _rank0_lines(result.stdout) == [
        "[rank 0] Epoch 1/2", "[rank 0] 60/60 [==============================] - loss: 0.017",
        "[rank 0] Epoch 2/2", "[rank 0] 60/60 [==============================] - loss: 0.017", "[rank 0] done"]
    raw = (home / "runs" / last_run(home) / "tflaunch_logs" / "rank-0.stdout").read_bytes()
    assert raw.count(b"\r") == 120 and raw.startswith(b"Epoch 1/2\n\r 1/60 [")  # the record keeps every byte


def _read_all(fd: int, proc: subprocess.Popen, timeout: float = 60) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            data += chunk
        elif proc.poll() is not None:
            break
    return data


def test_a_progress_bar_on_a_terminal_stays_under_its_prefix(project, home):
    src = project(**{"bar.py": BAR})
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "tflaunch", "run", "--procs-per-node", "2", "--source-dir",
                             str(src), "bar.py"], env=cli_env(home), stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave)
    os.close(slave)
    try:
        out = _read_all(master, proc)
    finally:
        os.close(master)
    assert proc.wait(timeout=30) == 0, out[-2000:]
    assert out.count(b"\r[rank 0] ") >= 100, out[-2000:]  # 59 updates in place per bar (the first opens it)
    segments = [s for s in out.replace(b"\r", b"\n").split(b"\n") if b"/60 [" in s]
    assert segments and all(s.startswith(b"[rank 0] ") for s in segments)  # never overwritten by the bar
    assert b"[rank 0] 60/60 [==============================] - loss: 0.017\r\n" in out  # the line ends
    assert b"[rank 0] done" in out


CHECKPOINTS = """
import helper
open("checkpoint-1.h5", "wb").write(b"x" * 5000)
open("notes.txt", "w").write("hi")
open("outputs/model.txt", "w").write("kept")
"""


@pytest.mark.parametrize("scratch", [False, True])
def test_files_outside_outputs_are_named_when_discarded(project, home, tmp_path, scratch):
    src = project(**{"train.py": CHECKPOINTS, "helper.py": "X = 1\n"})
    (tmp_path / "scratch").mkdir()
    where = ["--scratch", str(tmp_path / "scratch")] if scratch else []
    result, _ = run_cli(cli_env(home), *where, "--source-dir", str(src), "train.py")
    assert result.returncode == 0, result.stderr
    run = show_last(home)
    warning = "2 files (4.9 KB) the script wrote outside ./outputs and ./logs were discarded with the working " \
              "directory: checkpoint-1.h5 (4.9 KB), notes.txt (2 bytes); write what should be kept under ./outputs"
    assert run["warnings"] == [warning]  # neither the snapshot's files nor __pycache__
    assert warning in result.stderr
    assert (Path(run["run_dir"]) / "outputs" / "model.txt").read_text() == "kept"


def test_nothing_discarded_no_warning(project, home):
    src = project(**{"train.py": "open('outputs/a', 'w').write('a')\n"})
    result, _ = run_cli(cli_env(home), "--source-dir", str(src), "train.py")
    assert result.returncode == 0 and "warnings" not in show_last(home)


def test_the_agent_reports_what_its_copy_held(tmp_path):
    """A host without the shared filesystem: its agent sends what is discarded with its copy."""
    from tflaunch.remote.agent_run import Files

    events: list[dict] = []
    files = Files("tok", str(tmp_path / "scratch"), False, lambda event, data=None: events.append(event))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, content in (("train.py", b"print(1)\n"), ("pkg/mod.py", b"X = 1\n")):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    files.receive(buf.getvalue())
    work = str(tmp_path / "work")
    files.unpack(work)
    os.makedirs(os.path.join(work, "outputs"))
    Path(work, "outputs", "model.h5").write_bytes(b"m" * 10)
    Path(work, "pkg", "mod.py").write_text("X = 2  # rewritten\n")
    Path(work, "ckpt.h5").write_bytes(b"c" * 3000)
    os.makedirs(os.path.join(work, "pkg", "__pycache__"))
    Path(work, "pkg", "__pycache__", "mod.pyc").write_bytes(b"p")
    files.collect(work, ["outputs", "logs"])
    collected = [e for e in events if e.get("event") == "collected"][0]
    assert collected["discarded"] == {"files": 2, "bytes": 3000 + len("X = 2  # rewritten\n"),
                                      "largest": [["ckpt.h5", 3000], ["pkg/mod.py", 19]]}


def show_last(home: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "tflaunch", "runs", "show", last_run(home), "--json"],
                         env=cli_env(home), capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def _show_text(home: Path) -> str:
    return subprocess.run([sys.executable, "-m", "tflaunch", "runs", "show", last_run(home)], env=cli_env(home),
                          capture_output=True, text=True, check=True).stdout


RANKED = "import os; print(os.environ['TFLAUNCH_RANK'])\n"


def test_runs_show_says_backend_hosts_and_processes(project, home):
    src = project(**{"r.py": RANKED})
    result, _ = run_cli(cli_env(home), "--procs-per-node", "3", "--source-dir", str(src), "r.py")
    assert result.returncode == 0, result.stderr
    run = show_last(home)
    assert run["backend"] == "plain"
    assert [(h["name"], h["ranks"]) for h in run["hosts"]] == [("localhost", [0, 1, 2])]
    assert [(p["rank"], p["host"], p["cuda_visible_devices"]) for p in run["processes"]] == \
        [(0, "localhost", ""), (1, "localhost", ""), (2, "localhost", "")]
    text = _show_text(home)
    assert "backend:     plain (3 processes)\n" in text
    assert "hosts:       localhost (ranks 0-2)\n" in text
    assert "processes:\n  rank  host       GPUs\n  0     localhost  -\n" in text


def test_runs_show_of_ssh_hosts(project, home, ssh_loopback):
    src = project(**{"r.py": RANKED})
    result, _ = run_cli(cli_env(home), "--ssh-config", ssh_loopback.config, "--hosts", "loop1:1,loop2:1",
                        "--source-dir", str(src), "r.py")
    assert result.returncode == 0, result.stderr
    run = show_last(home)
    assert [(h["name"], h["ranks"]) for h in run["hosts"]] == [("loop1", [0]), ("loop2", [1])]
    text = _show_text(home)
    assert "backend:     plain (2 processes)\n" in text
    assert "hosts:       loop1 [127.0.0.1] (rank 0), loop2 [127.0.0.1] (rank 1)\n" in text  # name [address]
    assert "  1     loop2  -\n" in text


def test_runs_show_of_an_mpi_job_leaves_the_launcher_out(project, home, ssh_loopback):
    if not os.access("/usr/bin/mpirun", os.X_OK):
        pytest.skip("/usr/bin/mpirun missing (apt-get install openmpi-bin)")
    src = project(**{"r.py": RANKED})
    result, _ = run_cli(cli_env(home), "--backend", "mpi", "--mpirun", "/usr/bin/mpirun", "--ssh-config",
                        ssh_loopback.config, "--hosts", "loop1:2,loop2:2", "--source-dir", str(src), "r.py")
    assert result.returncode == 0, result.stderr
    run = show_last(home)
    assert run["backend"] == "mpi"
    assert [(h["name"], h["ranks"]) for h in run["hosts"]] == [("loop1", [0, 1]), ("loop2", [2, 3])]
    recorded = json.loads((Path(run["run_dir"]) / "hosts.json").read_text())
    assert [h["name"] for h in recorded] == ["loop1", "loop2"]  # mpirun's agent on this machine is no host
    text = _show_text(home)
    assert "backend:     mpi (4 processes)\n" in text and "(launcher)" not in text
    assert "hosts:       loop1 (ranks 0-1), loop2 (ranks 2-3)\n" in text


def test_runs_show_of_a_local_mpi_job(project, home):
    if not os.access("/usr/bin/mpirun", os.X_OK):
        pytest.skip("/usr/bin/mpirun missing (apt-get install openmpi-bin)")
    src = project(**{"r.py": RANKED})
    result, _ = run_cli(cli_env(home), "--backend", "mpi", "--mpirun", "/usr/bin/mpirun", "--procs-per-node", "2",
                        "--source-dir", str(src), "r.py")
    assert result.returncode == 0, result.stderr
    run = show_last(home)
    assert run["backend"] == "mpi" and [(h["name"], h["ranks"]) for h in run["hosts"]] == [("localhost", [0, 1])]


def test_runs_show_text_of_a_ps_job():
    from tflaunch.cli.console import placement_lines

    roles = [("chief", 0, "h1"), ("worker", 0, "h1"), ("worker", 1, "h2"), ("ps", 0, "h2")]
    run = {"backend": "ps", "hosts": [{"name": "h1", "address": "10.0.0.1", "ranks": [0, 1]},
                                      {"name": "h2", "address": "h2", "ranks": [2, 3]}],
           "processes": [{"rank": r, "role": role, "index": i, "host": h, "port": 4000 + r,
                          "cuda_visible_devices": "0" if role == "worker" else ""}
                         for r, (role, i, h) in enumerate(roles)]}
    assert placement_lines(run) == [
        "backend:     ps (chief 1, workers 2, ps 1)",
        "hosts:       h1 [10.0.0.1] (ranks 0-1), h2 (ranks 2-3)",
        "processes:",
        "  rank  role      host  port  GPUs",
        "  0     chief 0   h1    4000  -",
        "  1     worker 0  h1    4001  0",
        "  2     worker 1  h2    4002  0",
        "  3     ps 0      h2    4003  -"]


def test_a_host_without_the_shared_filesystem_reports_its_discarded_files(project, home, netns_hosts):
    src = project(**{"train.py": "import os\nopen(f\"ckpt-{os.environ['TFLAUNCH_RANK']}.h5\", 'wb').write(b'c' * 2048)\n"})
    result, _ = run_cli(cli_env(home), "--ssh-config", netns_hosts.config, "--hosts", "h1,h3", "--source-dir",
                        str(src), "train.py", timeout=120)
    assert result.returncode == 0, result.stderr
    warnings = show_last(home)["warnings"]
    assert any(w.startswith("1 file (2.0 KB) the script wrote outside ./outputs and ./logs were discarded")
               and "ckpt-0.h5 (2.0 KB)" in w for w in warnings), warnings  # h1 shares this machine's copy
    assert any("outside ./outputs and ./logs on host h3 were discarded" in w and "ckpt-1.h5 (2.0 KB)" in w
               for w in warnings), warnings


def test_a_data_input_copied_into_the_working_directory_is_not_reported(tmp_path, home, project):
    from tflaunch import Estimator, Experiment, Workspace
    from tflaunch.data import Dataset

    data = tmp_path / "mnist"
    data.mkdir()
    (data / "train.gz").write_bytes(b"x" * 4000)
    src = project(**{"train.py": "import sys, os\nassert os.path.exists(os.path.join(sys.argv[2], 'train.gz'))\n"})
    est = Estimator(str(src), entry_script="train.py", script_params={
        "--data": Dataset.File.from_files(path=str(data)).as_named_input("mnist").as_download(path_on_compute="in")})
    run = Experiment(Workspace(home=str(home)), "default").submit(est)
    assert run.wait_for_completion()["status"] == "Completed"
    assert "warnings" not in show_last(home)


KERAS_FIT = """
import os
import numpy as np
import keras
x = np.random.default_rng(0).random((512, 8)).astype("float32")
y = (x.sum(axis=1) > 4).astype("float32")
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
model.compile(optimizer="sgd", loss="mse")
verbose = 1 if os.environ["TFLAUNCH_RANK"] == "0" else 0
model.fit(x, y, epochs=2, batch_size=8, verbose=verbose, callbacks=[keras.callbacks.LambdaCallback(
    on_batch_end=lambda batch, logs: __import__("time").sleep(0.002))])
"""


@pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="needs TensorFlow / Keras")
def test_a_real_keras_progress_bar_on_a_pipe(project, home):
    """Keras' own Progbar (it writes \\r updates on Linux even to a pipe): one line per epoch's last state."""
    src = project(**{"fit.py": KERAS_FIT})
    result, _ = run_cli(cli_env(home, TF_CPP_MIN_LOG_LEVEL="3"), "--procs-per-node", "2", "--source-dir", str(src),
                        "fit.py", timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stdout
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in _rank0_lines(result.stdout)]  # Keras' colours
    bars = [line for line in lines if "/64" in line]
    assert [line for line in lines if line.startswith("[rank 0] Epoch ")] == ["[rank 0] Epoch 1/2", "[rank 0] Epoch 2/2"]
    assert len(bars) == 2 and all(line.startswith("[rank 0] 64/64 ") and "loss:" in line for line in bars), lines
    raw = (home / "runs" / last_run(home) / "tflaunch_logs" / "rank-0.stdout").read_bytes()
    assert raw.count(b"\r") > 4  # the record keeps every update


def test_on_a_terminal_a_line_written_in_pieces_is_not_cut_by_another_rank(tmp_path, monkeypatch):
    """An unbuffered print() writes its pieces one by one; another rank's line coming in between must not
    cut it on a terminal (the start of a new line without \\r is held up to PARTIAL_LINE_DELAY)."""
    from tflaunch import tail

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    logs = [tmp_path / "rank-0.stdout", tmp_path / "rank-1.stdout"]
    followers = [tail.Follower(str(p), screen, prefix=f"[rank {i}] ") for i, p in enumerate(logs)]

    def write(i: int, text: str) -> None:
        with open(logs[i], "a") as fh:
            fh.write(text)
        followers[i].poll()

    write(0, "line from rank")
    write(1, "other rank's line\n")
    write(0, " 0")
    write(1, "\r 3/60 [==]")  # a bar: in place at once
    write(0, "\n")
    for f in followers:
        f.poll(final=True)
    assert screen.getvalue() == ("[rank 1] other rank's line\n[rank 1]  3/60 [==]\n"  # the bar's line ends
                                 "[rank 0] line from rank 0\n")
    monkeypatch.setattr(tail, "PARTIAL_LINE_DELAY", 0.0)  # a prompt without newline still shows, after the delay
    write(0, "Password: ")
    assert screen.getvalue().endswith("[rank 0] Password: ")
