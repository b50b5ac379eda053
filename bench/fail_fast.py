"""Fail-fast latency: from the first process failing to the launcher's exit with every process gone
(goal: <= 0.5 s local, <= 2 s over ssh).

Rank 2 of 4 writes time.time() to a file and exits 3 a moment after start; the others sleep 120 s
(they die by SIGTERM, the default grace). A trial's latency is the launcher's exit minus rank 2's
stamp, taken once no process of the run is left (checked by the run's token in /proc, which sees
the namespaced ssh hosts too). Median of N trials.
  local: tflaunch run --procs-per-node 4
  ssh:   tflaunch run --hosts h1:2,h2:2 (sshd in network namespaces; needs root; --no-ssh skips it)
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from _util import env_with, netns_hosts, scratch

SCRIPT = """\
import os, sys, time
if os.environ["TFLAUNCH_RANK"] == "2":
    time.sleep(0.5)
    open(os.environ["STAMP"], "w").write("%.6f" % time.time())
    sys.exit(3)
time.sleep(120)
"""


def trial(argv: list[str], stamp: str, env: dict) -> float:
    from tflaunch.remote.agent import run_pids
    if os.path.exists(stamp):
        os.unlink(stamp)
    result = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ended = time.time()
    if result.returncode != 3:
        raise RuntimeError(f"expected exit 3, got {result.returncode}: {result.stderr[-500:]}")
    run_id = result.stderr.split("run ", 1)[1].split()[0]
    if run_pids(run_id):
        raise RuntimeError(f"processes of {run_id} survived the launcher")
    with open(stamp) as fh:
        return ended - float(fh.read())


def measure(name: str, argv: list[str], stamp: str, env: dict, repeat: int, goal: float) -> None:
    trial(argv, stamp, env)  # warm up
    times = [trial(argv, stamp, env) for _ in range(repeat)]
    print(f"{name:34s} median {statistics.median(times) * 1000:6.0f} ms  max {max(times) * 1000:6.0f} ms"
          f"  (goal <= {goal * 1000:.0f} ms, {repeat} trials)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--no-ssh", action="store_true")
    args = parser.parse_args()
    work = scratch("fail-fast")
    src = work / "src"
    src.mkdir()
    (src / "fail.py").write_text(SCRIPT)
    stamp = str(work / "stamp")
    env = env_with(TFLAUNCH_HOME=str(work / "home"), STAMP=stamp)
    tfl = [sys.executable, "-m", "tflaunch", "run", "--source-dir", str(src)]
    measure("local, 4 processes", tfl + ["--procs-per-node", "4", "fail.py"], stamp, env, args.repeat, 0.5)
    with netns_hosts(not args.no_ssh) as hosts:
        if hosts is not None:
            measure("ssh, 2 hosts x 2 processes", tfl + ["--ssh-config", hosts.config, "--hosts", "h1:2,h2:2",
                                                         "--env", f"STAMP={stamp}", "fail.py"],
                    stamp, env, args.repeat, 2.0)


if __name__ == "__main__":
    main()
