"""Crash safety of the store's writes: SIGKILL at random moments never leaves partial JSON."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from tflaunch import fsio
from tflaunch.history.store import Store

REPO = Path(__file__).resolve().parent.parent

WRITER = r"""
import sys, os
sys.path.insert(0, sys.argv[1])
from tflaunch.history.store import Store, RUNNING, COMPLETED, now_iso
store = Store(sys.argv[2])
big = {"payload": "x" * 200_000}
print("writing", flush=True)  # killed at a random moment from here on, however long start-up took
while True:
    rec = store.create_run("crash", {"spec": {"entry_script": "t.py"}, **big})
    for i in range(5):
        rec.write_status(RUNNING, started=now_iso(), step=i, **big)
        rec.event("step", i=i, blob="y" * 5000)
        rec.write_lease()
    rec.write_status(COMPLETED, ended=now_iso(), exit_code=0)
    store.list_runs()
"""


def assert_store_consistent(home: Path) -> int:
    """Every .json parses and every line of every .jsonl parses; returns how many files were checked."""
    checked = 0
    for path in home.rglob("*"):
        if path.suffix == ".json" and path.is_file():
            json.loads(path.read_bytes())
            checked += 1
        elif path.suffix == ".jsonl":
            for line in path.read_bytes().splitlines():
                json.loads(line)
            checked += 1
    return checked


def test_sigkill_during_writes_leaves_no_partial_json(tmp_path):
    home = tmp_path / "home"
    rng = random.Random(7)
    for _ in range(25):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(REPO), str(home)], stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"writing\n"
        time.sleep(rng.uniform(0.02, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert assert_store_consistent(home) > 50
    runs = Store(home).list_runs()
    assert runs and all(r["status"] for r in runs)


def test_sigkill_of_real_launches_leaves_no_partial_json(tmp_path, project):
    src = project(**{"train.py": "print('x' * 1000)\n", "data/a.txt": "a" * 100_000, "data/b.txt": "b"})
    home = tmp_path / "home2"
    env = {**os.environ, "TFLAUNCH_HOME": str(home), "PYTHONPATH": str(REPO)}
    rng = random.Random(11)
    for i in range(20):
        before = len(list((home / "runs").glob("2*"))) if (home / "runs").is_dir() else 0
        proc = subprocess.Popen([sys.executable, "-m", "tflaunch", "run", "--source-dir", str(src), "train.py"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if i % 2:  # every other one once its record exists (however slow start-up is), so that some write
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline and (
                    not (home / "runs").is_dir() or len(list((home / "runs").glob("2*"))) == before):
                time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    time.sleep(0.5)
    assert assert_store_consistent(home) > 0
    for run in Store(home).list_runs():  # every run that exists reads as a defined state
        assert run["status"] in ("Completed", "Failed", "Running", "Preparing", "Finalizing")


def test_torn_jsonl_tail_is_skipped(tmp_path):
    path = tmp_path / "events.jsonl"
    fsio.append_jsonl(str(path), {"a": 1})
    with open(path, "ab") as fh:
        fh.write(b'{"b": ')
    assert list(fsio.iter_jsonl(str(path))) == [{"a": 1}]


def test_create_once_first_writer_wins(tmp_path):
    path = str(tmp_path / "x.json")
    assert fsio.create_once_json(path, {"n": 1}) is True
    assert fsio.create_once_json(path, {"n": 2}) is False
    assert fsio.read_json(path) == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
