"""Progress on the console (issue 19): on a terminal one status line per stage that rewrites itself
(snapshot, environment, hosts connecting, ranks running, outputs collected), plain lines elsewhere (a pipe,
CI, ``--detach``, a detached supervisor's log), never inside the script's own lines."""
from __future__ import annotations

import io
import logging
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

from conftest import cli_env, last_run, run_cli

from tflaunch import progress
from tflaunch.cli.console import ConsoleHandler

QUIET_THEN_TALK = """
import os, time
time.sleep(0.5)
os.makedirs("outputs", exist_ok=True)
open(f"outputs/r{os.environ['TFLAUNCH_RANK']}.bin", "wb").write(b"o" * 300000)
print("line from rank", os.environ["TFLAUNCH_RANK"], flush=True)
"""


def _on_a_terminal(env: dict, *args: str, timeout: float = 120) -> tuple[int, bytes]:
    """``python -m tflaunch ARGS`` with stdout and stderr on one pseudo-terminal: (exit status, all it wrote)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "tflaunch", *args], env=env, stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the other end is closed
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
    return proc.wait(timeout=30), out


def _screen_lines(out: bytes) -> list[str]:
    """What the terminal shows at the end: each line's text after its last ``\\r`` (erase codes removed)."""
    text = out.decode("utf-8", "replace").replace("\x1b[K", "")
    return [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]


def test_stages_rewrite_one_line_each_on_a_terminal(project, home, netns_hosts):
    src = project(**{"train.py": QUIET_THEN_TALK})
    code, out = _on_a_terminal(cli_env(home), "run", "--ssh-config", netns_hosts.config, "--hosts", "h1,h3",
                               "--source-dir", str(src), "train.py")
    assert code == 0, out[-3000:]
    text = out.decode()
    assert "\x1b[K" in text
    # each stage is a line of its own that rewrites itself with \r, ended once, with its final state
    screen = _screen_lines(out)
    assert any(re.fullmatch(r"tflaunch: snapshot: 1 file \(\d+ bytes\) stored", line) for line in screen), screen
    assert "tflaunch: hosts: 2/2 connected" in screen
    assert "tflaunch: ranks: 2/2 running" in screen
    assert any(re.fullmatch(r"tflaunch: outputs: \d+\.\d KB from 1/1 host without the shared filesystem", line)
               for line in screen), "\n".join(screen)
    assert re.search(r"\rtflaunch: hosts: [01]/2 connected\x1b\[K\rtflaunch: hosts: 2/2 connected\x1b\[K\r\n", text) \
        or "\rtflaunch: hosts: 2/2 connected\x1b[K\r\n" in text
    # never mixed with the script's own lines: each of them is a line of its own, whole
    for rank in (0, 1):
        assert f"[rank {rank}] line from rank {rank}" in screen
    for raw in text.split("\n"):
        if "[rank " in raw:
            assert "tflaunch:" not in raw and "\x1b" not in raw, repr(raw)


def test_plain_lines_on_a_pipe(project, home):
    src = project(**{"train.py": QUIET_THEN_TALK})
    result, _ = run_cli(cli_env(home), "--procs-per-node", "2", "--source-dir", str(src), "train.py")
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    lines = result.stderr.splitlines()
    assert any(re.fullmatch(r"tflaunch: snapshot: 1 file \(\d+ bytes\) stored", line) for line in lines), lines
    assert "tflaunch: ranks: 2/2 running" in lines
    assert not [line for line in lines if "snapshot: reading" in line or "1/2 running" in line]  # ends only
    assert not [line for line in lines if "hosts:" in line]  # no ssh login: nothing to wait for
    assert sorted(result.stdout.splitlines()) == ["[rank 0] line from rank 0", "[rank 1] line from rank 1"]


def test_detach_on_a_terminal_prints_plain_lines(project, home):
    src = project(**{"train.py": "print('x')\n"})
    code, out = _on_a_terminal(cli_env(home), "run", "--detach", "--source-dir", str(src), "train.py")
    assert code == 0, out
    text = out.decode()
    assert "\x1b[K" not in text and "\rtflaunch" not in text
    assert "tflaunch: snapshot: 1 file (11 bytes) stored\r\n" in text
    run_id = last_run(home)
    assert text.endswith(run_id + "\r\n")
    subprocess.run([sys.executable, "-m", "tflaunch", "runs", "show", run_id], env=cli_env(home), check=True,
                   capture_output=True)
    log = home / "runs" / run_id / "tflaunch_logs" / "launcher.log"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "ranks: 1/1 running" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.2)
    assert "supervisor INFO ranks: 1/1 running" in log.read_text()  # the detached supervisor's log: plain


def test_a_dry_run_on_a_terminal_leaves_no_stage_line(project, home):
    src = project(**{"train.py": "print('x')\n"})
    code, out = _on_a_terminal(cli_env(home), "run", "--dry-run", "--source-dir", str(src), "train.py")
    assert code == 0, out
    screen = _screen_lines(out)
    assert not [line for line in screen if "tflaunch: snapshot:" in line], screen  # erased: nothing was stored
    assert any(line.startswith("process rank 0 on localhost") for line in screen), screen


def test_an_error_goes_below_the_status_line(project, home, tmp_path):
    src = project(**{"train.py": "print('x')\n"})
    (tmp_path / "ssh_config").write_text("Host *\n  ConnectTimeout 5\n  BatchMode yes\n")
    code, out = _on_a_terminal(cli_env(home), "run", "--source-dir", str(src), "--hosts", "nosuchhost-x.invalid:1",
                               "--ssh-config", str(tmp_path / "ssh_config"), "train.py")
    assert code != 0
    screen = _screen_lines(out)
    errors = [line for line in screen if "nosuchhost-x" in line]
    assert errors and all(line.startswith("tflaunch:") for line in errors), screen


# -- the console handler itself (a terminal stand-in: a text stream that says it is one) ---------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def console():
    stream = _Terminal()
    handler = ConsoleHandler(stream)
    handler.setFormatter(logging.Formatter("tflaunch: %(message)s"))
    logger = logging.getLogger("tflaunch.test_progress")
    saved = progress.log.handlers[:], progress.log.propagate, progress.log.level
    progress.log.handlers[:] = [handler]
    progress.log.propagate = False
    progress.log.setLevel(logging.INFO)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield stream, logger
    progress.end_line()
    progress.log.handlers[:], progress.log.propagate, progress.log.level = saved


def test_updates_are_throttled_and_the_latest_shown_at_the_end(console, monkeypatch):
    stream, _ = console
    monkeypatch.setattr(progress, "REDRAW_INTERVAL", 3600.0)
    for i in range(1, 1001):
        progress.report("ranks", f"ranks: {i}/1000 running", done=i == 1000)
    text = stream.getvalue()
    assert text == "\rtflaunch: ranks: 1/1000 running\x1b[K\rtflaunch: ranks: 1000/1000 running\x1b[K\n"


def test_a_message_ends_the_status_line_with_its_latest_state(console, monkeypatch):
    stream, logger = console
    monkeypatch.setattr(progress, "REDRAW_INTERVAL", 3600.0)
    progress.report("hosts", "hosts: 0/3 connected")
    progress.report("hosts", "hosts: 2/3 connected")  # not drawn yet (throttled)
    logger.warning("host h3 is slow")
    progress.report("hosts", "hosts: 3/3 connected", done=True)
    assert stream.getvalue() == ("\rtflaunch: hosts: 0/3 connected\x1b[K\rtflaunch: hosts: 2/3 connected\x1b[K\n"
                                 "tflaunch: host h3 is slow\n"
                                 "\rtflaunch: hosts: 3/3 connected\x1b[K\n")


def test_a_new_stage_starts_a_new_line(console):
    stream, _ = console
    progress.report("snapshot", "snapshot: 3 files (10 bytes) stored", done=True)
    progress.report("environment", "environment: building or reusing abc", slow=True)
    progress.report("hosts", "hosts: 1/2 connected")
    progress.clear_line()
    assert stream.getvalue() == ("\rtflaunch: snapshot: 3 files (10 bytes) stored\x1b[K\n"
                                 "\rtflaunch: environment: building or reusing abc\x1b[K\n"
                                 "\rtflaunch: hosts: 1/2 connected\x1b[K\r\x1b[K")


def test_a_line_wider_than_the_terminal_is_cut(console, monkeypatch):
    stream, _ = console
    monkeypatch.setenv("COLUMNS", "40")
    progress.report("environment", "environment: building or reusing " + "x" * 100, done=True)
    shown = stream.getvalue().split("\r")[1].split("\x1b")[0]
    assert len(shown) < 40 and shown.endswith("...")


def test_not_a_terminal_ends_and_slow_beginnings_only():
    stream = io.StringIO()
    handler = ConsoleHandler(stream)
    assert not handler.terminal
    handler.setFormatter(logging.Formatter("tflaunch: %(message)s"))
    saved = progress.log.handlers[:], progress.log.propagate, progress.log.level
    progress.log.handlers[:], progress.log.propagate = [handler], False
    progress.log.setLevel(logging.INFO)
    try:
        progress.report("snapshot", "snapshot: reading /src")
        progress.report("snapshot", "snapshot: 1 file (1 byte) stored", done=True)
        progress.report("environment", "environment: building or reusing k (log: x)", slow=True)
        progress.report("environment", "environment: k built on 1 of 1 (3.0 s)", done=True)
        progress.report("ranks", "ranks: 1/2 running")
    finally:
        progress.log.handlers[:], progress.log.propagate, progress.log.level = saved
    assert stream.getvalue().splitlines() == ["tflaunch: snapshot: 1 file (1 byte) stored",
                                              "tflaunch: environment: building or reusing k (log: x)",
                                              "tflaunch: environment: k built on 1 of 1 (3.0 s)"]


def test_the_snapshot_says_how_far_it_got_while_storing(tmp_path, monkeypatch, caplog):
    """snapshot.store calls back per file stored (from its threads); the stage's text counts files and bytes."""
    from tflaunch import submit
    from tflaunch.history import snapshot

    src = tmp_path / "src"
    src.mkdir()
    for i in range(300):
        (src / f"f{i}.py").write_bytes(b"#" * 1000 + str(i).encode())
    (src / "train.py").write_text("print(1)\n")
    scan = snapshot.scan(str(src), "train.py", home=str(tmp_path / "home"))
    run_dir = tmp_path / "home" / "runs" / "r"
    run_dir.mkdir(parents=True)
    ticks = iter(range(10 ** 6))
    monkeypatch.setattr(time, "monotonic", lambda: float(next(ticks)))  # every call a second later: all reported
    with caplog.at_level(logging.INFO, logger="tflaunch.progress"):
        snapshot.store(scan, str(tmp_path / "home"), str(run_dir), threads=4, progress=submit._storing(scan))
    texts = [r.getMessage() for r in caplog.records if progress.stage_of(r)[0] == "snapshot"]
    assert len(texts) == 301
    assert re.fullmatch(r"snapshot: storing, 1 file \(\d+ bytes\) read of 301 \(293\.7 KB\)", texts[0]), texts[0]
    assert texts[-1] == "snapshot: storing, 301 files (293.7 KB) read of 301 (293.7 KB)"
