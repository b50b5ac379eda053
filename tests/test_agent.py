"""The agent on its own: the protocol, and stopping exactly the run's processes when the launcher goes."""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

from tflaunch.agent import run_pids
from tflaunch.launch.local import start_local
from tflaunch.plan import ProcessPlan

from conftest import wait_no_processes


def _proc(tmp_path, code: str, index: int = 0) -> ProcessPlan:
    return ProcessPlan(host="localhost", rank=index, local_rank=index, world_size=1, role="worker", index=index,
                       argv=[sys.executable, "-c", code], cwd=str(tmp_path), env={"A.B": "1", "MULTI": "x\ny"},
                       stdout=f"out-{index}", stderr=f"err-{index}")


def _events(agent, until: str, timeout: float = 10) -> list[dict]:
    got, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([agent.fileno()], [], [], 0.2)
        got += agent.read_events()
        if any(e.get("event") == until for e in got):
            return got
    raise AssertionError(f"no {until!r} event: {got}")


def test_protocol_and_environment(tmp_path):
    code = "import os, sys; print(os.environ['A.B'], repr(os.environ['MULTI']), os.environ['TFLAUNCH_RUN_ID']); sys.exit(4)"
    agent = start_local([_proc(tmp_path, code)], token="tok-proto", run_dir=str(tmp_path), grace=5, orphan_grace=1)
    events = _events(agent, "done")
    agent.close()
    kinds = [e["event"] for e in events]
    assert kinds == ["hello", "started", "exited", "done"] and events[2]["returncode"] == 4
    assert (tmp_path / "out-0").read_text() == "1 'x\\ny' tok-proto\n"


def test_big_environment_travels_over_the_pipe(tmp_path):
    proc = _proc(tmp_path, "import os; print(sum(len(v) for k, v in os.environ.items() if k.startswith('BIG')))")
    proc.env.update({f"BIG{i}": "v" * 10_000 for i in range(20)})  # one string may not exceed 128 KiB
    agent = start_local([proc], token="tok-big", run_dir=str(tmp_path), grace=5, orphan_grace=1)
    _events(agent, "done")
    agent.close()
    assert (tmp_path / "out-0").read_text().strip() == "200000"


def test_closing_the_connection_stops_only_this_runs_processes(tmp_path):
    tree = ("import subprocess, sys, time\n"
            "subprocess.Popen([sys.executable, '-c', 'import os, time; os.setsid(); time.sleep(300)'])\n"
            "time.sleep(300)\n")
    mine = start_local([_proc(tmp_path, tree)], token="tok-mine", run_dir=str(tmp_path), grace=5, orphan_grace=1)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = start_local([_proc(other_dir, tree)], token="tok-other", run_dir=str(other_dir), grace=5,
                        orphan_grace=1)
    _events(mine, "started"), _events(other, "started")
    deadline = time.monotonic() + 5
    while (len(run_pids("tok-mine")) < 2 or len(run_pids("tok-other")) < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(run_pids("tok-mine")) == 2
    mine.popen.stdin.close()                     # the launcher went away
    wait_no_processes("tok-mine", 5)
    assert len(run_pids("tok-other")) == 2       # another run on the same host is untouched
    other.terminate(1)
    _events(other, "done")
    other.close()
    wait_no_processes("tok-other", 3)
    mine.popen.wait(5)


def test_spawn_failure_is_reported(tmp_path):
    proc = _proc(tmp_path, "")
    proc.argv = [str(tmp_path / "no-such-interpreter")]
    agent = start_local([proc], token="tok-fail", run_dir=str(tmp_path), grace=5, orphan_grace=1)
    events = _events(agent, "done")
    agent.close()
    assert events[1]["event"] == "spawn_failed" and "no-such-interpreter" in events[1]["error"]
