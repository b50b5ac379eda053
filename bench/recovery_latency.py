"""Recovery latency: from a ps job's worker being SIGKILLed to its replacement running
(goal: < 1 s local, < 2 s over ssh).

A ``--backend ps --workers 2 --ps 1 --chief`` job of plain Python processes (no TensorFlow): each reads
TF_CONFIG and, first thing, writes time.time() and its pid to ``<role>-<index>-<TFLAUNCH_ATTEMPT>``
in a stamp directory; the chief then waits for a "done" file, the others sleep. With
``--max-restarts 1 --restart-delay 0``, a trial SIGKILLs worker 1 once its stamp is there and waits
for the stamp of its attempt 2: latency = that stamp - the kill's time.time(). The trial then checks
that nothing else started again, lets the chief finish (run Completed) and that no process of the
run is left (its token in /proc). Also printed, from events.jsonl (the launcher's clock): kill ->
process_exited (the exit seen) and kill -> process_started (the agent reporting the new process).
Median of N trials (one run each), after a warm-up trial.
  local: this machine's agent
  ssh:   --hosts loop1:3 (sshd on 127.0.0.1 started from tests/infra/hosts.py, as the tests' ssh_loopback;
         --ssh-config FILE --ssh HOST for another alias of this machine; --no-ssh skips it)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from _util import REPO, env_with, scratch

SCRIPT = """\
import json, os, sys, time
t = time.time()
task = json.loads(os.environ["TF_CONFIG"])["task"]
name = "%s-%s-%s" % (task["type"], task["index"], os.environ.get("TFLAUNCH_ATTEMPT", "1"))
path = os.path.join(os.environ["STAMP_DIR"], name)
with open(path + ".tmp", "w") as fh:
    fh.write("%.6f %d" % (t, os.getpid()))
os.replace(path + ".tmp", path)
if task["type"] == "chief":
    while not os.path.exists(os.path.join(os.environ["STAMP_DIR"], "done")):
        time.sleep(0.02)
    sys.exit(0)
time.sleep(3600)
"""
JOB = ["--backend", "ps", "--workers", "2", "--ps", "1", "--chief", "--max-restarts", "1", "--restart-delay", "0"]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 30.0) -> tuple[float, int]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"tflaunch ended ({proc.returncode}) before {path.name}: "
                               f"{proc.stderr.read()[-800:] if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {path.name} within {timeout} s")
        time.sleep(0.002)
    stamp, pid = path.read_text().split()
    return float(stamp), int(pid)


def event_time(event: dict) -> float:
    return datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()


def trial(argv: list[str], stamps: Path, home: Path, env: dict) -> tuple[float, float, float]:
    """One run: (kill -> replacement running, kill -> exit seen, kill -> process_started), seconds."""
    from tflaunch.remote.agent import run_pids
    shutil.rmtree(stamps, ignore_errors=True)
    stamps.mkdir(parents=True)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for name in ("chief-0-1", "worker-0-1", "ps-0-1"):
            wait_for(stamps / name, proc)
        _, pid = wait_for(stamps / "worker-1-1", proc)
        killed = time.time()
        os.kill(pid, signal.SIGKILL)
        running, _ = wait_for(stamps / "worker-1-2", proc)
        (stamps / "done").touch()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"expected exit 0, got {proc.returncode}: {err[-800:]}")
    run_id = sorted(p.name for p in (home / "runs").iterdir() if not p.name.startswith("."))[-1]
    started = sorted(p.name for p in stamps.iterdir() if p.name != "done")
    if started != ["chief-0-1", "ps-0-1", "worker-0-1", "worker-1-1", "worker-1-2"]:
        raise RuntimeError(f"expected only worker 1 started again, got {started}")
    if run_pids(run_id):
        raise RuntimeError(f"processes of {run_id} survived the launcher")
    events = [json.loads(line) for line in (home / "runs" / run_id / "events.jsonl").read_text().splitlines()]
    rank = 2  # chief 0, worker 0, worker 1, ps 0
    exited = [event_time(e) for e in events if e["event"] == "process_exited" and e["index"] == rank]
    begun = [event_time(e) for e in events if e["event"] == "process_started" and e["index"] == rank]
    return running - killed, exited[0] - killed, begun[1] - killed


def measure(name: str, argv: list[str], stamps: Path, home: Path, env: dict, repeat: int, goal: float) -> None:
    trial(argv, stamps, home, env)  # warm up
    results = [trial(argv, stamps, home, env) for _ in range(repeat)]
    running, seen, started = ([r[i] for r in results] for i in range(3))
    print(f"{name:30s} kill -> replacement running: median {statistics.median(running) * 1000:5.0f} ms, "
          f"max {max(running) * 1000:5.0f} ms (goal < {goal * 1000:.0f} ms, {repeat} trials); "
          f"exit seen {statistics.median(seen) * 1000:4.0f} ms, process_started "
          f"{statistics.median(started) * 1000:4.0f} ms (medians)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--no-ssh", action="store_true")
    parser.add_argument("--ssh", metavar="HOST", help="an ssh alias of this machine (with --ssh-config); "
                                                      "default: start a loopback sshd (tests/infra)")
    parser.add_argument("--ssh-config", metavar="FILE")
    args = parser.parse_args()
    work = scratch("recovery-latency")
    src = work / "src"
    src.mkdir()
    (src / "job.py").write_text(SCRIPT)
    stamps, home = work / "stamps", work / "home"
    env = env_with(TFLAUNCH_HOME=str(home))
    tfl = [sys.executable, "-m", "tflaunch", "run", "--source-dir", str(src), "--env", f"STAMP_DIR={stamps}", *JOB]
    measure("local, 4 processes", tfl + ["job.py"], stamps, home, env, args.repeat, 1.0)
    if args.no_ssh:
        return
    if args.ssh:
        config = ["--ssh-config", args.ssh_config] if args.ssh_config else []
        measure(f"ssh {args.ssh}, 4 processes", tfl + config + ["--hosts", f"{args.ssh}:3", "job.py"],
                stamps, home, env, args.repeat, 2.0)
        return
    from tests.infra.hosts import missing_requirements, start_loopback
    reason = missing_requirements()
    if reason:
        print(f"ssh: skipped ({reason})")
        return
    workdir = f"/var/tmp/tflaunch-bench-{os.getpid()}"
    hosts = start_loopback(workdir)
    try:
        measure("ssh loop1 (loopback sshd)", tfl + ["--ssh-config", hosts.config, "--hosts", "loop1:3", "job.py"],
                stamps, home, env, args.repeat, 2.0)
    finally:
        hosts.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
