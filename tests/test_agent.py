"""The agent on its own: the protocol, and stopping exactly the run's processes when the launcher goes."""
from __future__ import annotations

import json
import os
import select
import sys
import time

from tflaunch.remote.agent import run_pids
from tflaunch.launch.local import start_local
from tflaunch.plan.processes import ProcessPlan

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


def _setup_agent(**setup):
    from tflaunch.launch import AgentConnection
    from tflaunch.launch.local import spawn_agent
    conn = AgentConnection(spawn_agent())
    conn.start({"grace": 5, "orphan_grace": 1, **setup})
    return conn


def test_relay_upload_collect_and_ports(tmp_path):
    """What a remote agent does: reserve ports, receive files, relay output, send outputs back, clean up."""
    import io
    import socket
    import tarfile

    scratch_root = tmp_path / "scratch"
    probe = tmp_path / "probe"
    probe.write_text("secret")
    conn = _setup_agent(token="tok-remote", agent_id=1, ports=2, scratch_root=str(scratch_root),
                        probe={"path": str(probe), "content": "other"})
    hello = _events(conn, "hello")[-1]
    assert hello["shared"] is False and hello["hostname"] == os.uname().nodename
    assert len(set(hello["ports"])) == 2
    for port in hello["ports"]:  # held: nobody else can take them until the processes start
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                pass
            else:
                raise AssertionError(f"port {port} was not held")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b"import os, sys\nprint('out', os.environ['TFLAUNCH_AGENT_ID']); print('err', file=sys.stderr)\n" \
               b"os.makedirs('outputs'); open('outputs/m.txt', 'w').write('model')\n"
        info = tarfile.TarInfo("job.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    work = os.path.join(hello["scratch"], "work")
    assert conn.send({"cmd": "data"}, buf.getvalue()) and conn.send({"cmd": "unpack", "dest": work})
    _events(conn, "unpacked")
    conn.send({"cmd": "start", "processes": [{"index": 0, "argv": [sys.executable, "job.py"], "cwd": work,
                                               "env": {}, "stdout": None, "stderr": None}]})
    events = _events(conn, "done")
    output = {fd: b"".join(e["data"] for e in events if e["event"] == "output" and e["fd"] == fd) for fd in (1, 2)}
    assert output == {1: b"out tok-remote:1\n", 2: b"err\n"}, events
    conn.send({"cmd": "collect", "dir": work, "names": ["outputs", "logs"]})
    events = _events(conn, "collected")
    data = b"".join(e["data"] for e in events if e["event"] == "data")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.extractfile("outputs/m.txt").read() == b"model"
    conn.send({"cmd": "cleanup"})
    _events(conn, "cleaned")
    conn.close()
    assert not os.path.exists(hello["scratch"])


def test_agents_of_one_run_on_one_machine_stop_only_their_own(tmp_path):
    """Two hosts of a run can be one machine (aliases): the first agent to finish must not kill the other's."""
    long = _setup_agent(token="tok-shared", agent_id=0)
    short = _setup_agent(token="tok-shared", agent_id=1)
    for conn, code in ((long, "import time; time.sleep(30)"), (short, "pass")):
        conn.send({"cmd": "start", "processes": [{"index": 0, "argv": [sys.executable, "-c", code],
                                                   "cwd": str(tmp_path), "env": {}, "stdout": None, "stderr": None}]})
    _events(short, "done")
    _events(long, "started")
    assert len(run_pids("tok-shared")) == 1
    short.close()
    time.sleep(0.3)
    assert len(run_pids("tok-shared")) == 1
    long.close()
    wait_no_processes("tok-shared", 5)


def test_launcher_gone_before_start_removes_a_partial_upload(tmp_path):
    conn = _setup_agent(token="tok-partial", agent_id=0, scratch_root=str(tmp_path))
    hello = _events(conn, "hello")[-1]
    conn.send({"cmd": "data"}, b"x" * 1000)
    deadline = time.monotonic() + 5
    while not os.path.exists(hello["scratch"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    conn.close()
    assert not os.path.exists(hello["scratch"])


def test_reserved_ports_are_not_handed_out_again_while_leased(tmp_path):
    """A port is released when the processes start, seconds before a TensorFlow server binds it: the
    lease file keeps other runs on this host from being handed it meanwhile. 2,000 reservations whose
    sockets are closed at once would repeat ports without it (the kernel picks at random)."""
    from tflaunch.remote.agent_host import PORT_LEASE, reserve_ports

    seen = []
    for _ in range(100):
        held = reserve_ports(20, str(tmp_path))
        seen += [s.getsockname()[1] for s in held]
        for s in held:
            s.close()
    assert len(seen) == 2000 and len(set(seen)) == 2000
    leases = json.loads((tmp_path / "ports.json").read_text())
    assert len(leases) == 2000 and all(v > time.time() + PORT_LEASE - 60 for v in leases.values())
    (tmp_path / "ports.json").write_text("{not json")  # a torn file is ignored, not fatal
    assert len(reserve_ports(1, str(tmp_path))) == 1


# -- the agent's lease: a launcher it hears nothing from is gone ------------------------------------------
def _leased_agent(tmp_path, token: str, code: str, **setup):
    """An agent running ``code`` at once (output relayed), its stderr in tmp_path/<token>.log."""
    from tflaunch.launch import AgentConnection
    from tflaunch.launch.local import spawn_agent

    with open(tmp_path / f"{token}.log", "wb") as log:
        conn = AgentConnection(spawn_agent(log))
    conn.start({"token": token, "grace": 5, "orphan_grace": 1, **setup,
                "processes": [{"index": 0, "argv": [sys.executable, "-c", code], "cwd": str(tmp_path), "env": {},
                               "stdout": None, "stderr": None}]})
    return conn


def test_an_agent_that_hears_nothing_for_its_lease_stops_the_run(tmp_path):
    """Silent launcher (stdin open, no bytes): the run's processes stop within the lease, even while the
    agent's writes cannot go on (nobody reads a flooding job's output); pinged, or without a lease in its
    setup (as before), the agent keeps them running past it."""
    lease, sleep = 2.0, "import time; time.sleep(60)"
    flood = "import sys\nwhile True:\n    sys.stdout.buffer.write(b'x' * 65536)\n"
    silent = _leased_agent(tmp_path, "tok-lease-silent", sleep, lease_timeout=lease)
    blocked = _leased_agent(tmp_path, "tok-lease-blocked", flood, lease_timeout=lease)
    pinged = _leased_agent(tmp_path, "tok-lease-pinged", sleep, lease_timeout=lease)
    old = _leased_agent(tmp_path, "tok-lease-none", sleep)
    started = time.monotonic()
    tokens = ["tok-lease-silent", "tok-lease-blocked", "tok-lease-pinged", "tok-lease-none"]
    try:
        while not all(run_pids(t) for t in tokens):
            assert time.monotonic() < started + 10, {t: run_pids(t) for t in tokens}
            pinged.keepalive(time.monotonic())
            time.sleep(0.05)
        while run_pids("tok-lease-silent") or run_pids("tok-lease-blocked") or time.monotonic() < started + 2 * lease:
            assert time.monotonic() < started + lease + 8, "the silent agents' processes outlived their lease"
            pinged.keepalive(time.monotonic())
            time.sleep(0.05)
        for conn in (silent, blocked):  # gone as after an end of file, saying why
            assert conn.popen.wait(5) == 0
        for token in ("tok-lease-silent", "tok-lease-blocked"):
            assert "nothing from the launcher for 2 s" in (tmp_path / f"{token}.log").read_text()
        assert run_pids("tok-lease-pinged") and run_pids("tok-lease-none")  # twice the lease later
        assert pinged.popen.poll() is None and old.popen.poll() is None
    finally:
        for conn in (silent, blocked, pinged, old):
            conn.close()
    for token in tokens:
        wait_no_processes(token, 5)


def test_a_flooding_job_loses_nothing_while_the_launcher_reads_late_but_pings(tmp_path):
    """Heavy output relay with a lease: the agent's writes wait (the launcher reads nothing for longer than
    the lease, but pings, and sends a command), then every byte arrives in order, the command is run and
    the job ends normally."""
    lines = 300_000  # 2.7 MB: more than the pipes and the agent's read hold, so its write has to wait
    code = f"import sys\nw = sys.stdout.buffer.write\nfor i in range({lines}):\n    w(b'%08d' % i + b'\\n')\n"
    conn = _leased_agent(tmp_path, "tok-lease-flood", code, lease_timeout=1.0)
    try:
        until = time.monotonic() + 2.5  # longer than the lease without reading, pinging only
        while time.monotonic() < until:
            conn.keepalive(time.monotonic())
            time.sleep(0.05)
        conn.send({"cmd": "cleanup"})  # read while the agent's write waits: run when it can go on
        events = []
        deadline = time.monotonic() + 60
        while not any(e.get("event") == "done" for e in events):
            assert time.monotonic() < deadline and not conn.eof, [e["event"] for e in events[-5:]]
            select.select([conn.fileno()], [], [], 0.2)
            events += conn.read_events()
            conn.keepalive(time.monotonic())
        out = b"".join(e["data"] for e in events if e["event"] == "output" and e["fd"] == 1)
        assert out == b"".join(b"%08d\n" % i for i in range(lines))
        assert [e["returncode"] for e in events if e["event"] == "exited"] == [0]
        assert [e["event"] for e in events].count("cleaned") == 1
    finally:
        conn.close()
    wait_no_processes("tok-lease-flood", 5)


def test_pings_that_wait_while_a_long_command_runs_keep_the_lease(tmp_path):
    """A command that holds the agent longer than the lease (a sweep waiting out its grace for a process
    that ignores SIGTERM): the pings sent meanwhile are read after it, and count."""
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ignoring', flush=True); " \
           "time.sleep(60)"
    conn = _leased_agent(tmp_path, "tok-lease-busy", code, lease_timeout=1.0)
    try:
        _events(conn, "output")
        conn.send({"cmd": "sweep", "grace": 2.0})  # SIGTERM, 2 s, SIGKILL: the agent reads nothing meanwhile
        events = []
        deadline = time.monotonic() + 20
        while not any(e.get("event") == "swept" for e in events):
            assert time.monotonic() < deadline and not conn.eof, events
            select.select([conn.fileno()], [], [], 0.05)
            events += conn.read_events()
            conn.keepalive(time.monotonic())
        conn.send({"cmd": "cleanup"})
        _events(conn, "cleaned")  # still there: it heard the pings, late
        assert conn.popen.poll() is None
    finally:
        conn.close()
    wait_no_processes("tok-lease-busy", 5)
