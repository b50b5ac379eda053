"""Slurm: time from sbatch's acceptance to every task running, `tflaunch run --slurm` vs a hand-written
batch script doing the same (goal: <= 1.10x).

Needs root and Debian's Slurm (tests/infra/setup.sh): it starts the tests' two-node cluster (h1, h2 in
network namespaces, tests/infra/slurm.py). A trial submits 2 nodes x 2 tasks of a script whose first
line records time.time(); the clock starts when sbatch has returned the job id (the hand-written one:
right after `sbatch --parsable` returns; tflaunch's: the time of its `slurm_submitted` event) and
stops at the last task's stamp. The hand-written script is what a user would write without tflaunch:
`#SBATCH --nodes=2 --ntasks-per-node=2` and `srun python task.py`. Trials alternate.

slurmctld starts batch jobs on a one-second tick here, so a single trial's time depends on where in
that second the job was accepted (0-1 s of the total). Each submission starts after a random pause
(0-1 s, not timed), so that this wait is uniform for both variants (submitting right after the
previous job ended would lock it to the tick); judge by the means over many trials.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from _util import REPO, env_with, scratch

TASK = """\
import os, time
t = time.time()
open(os.path.join(os.environ["STAMPS"], "task-%s" % os.environ.get("SLURM_PROCID", os.environ.get("TFLAUNCH_RANK"))),
     "w").write(repr(t))
"""


def wait_stamps(stamps: Path, n: int, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = list(stamps.glob("task-*"))
        if len(files) == n and all(f.read_text() for f in files):
            return max(float(f.read_text()) for f in files)
        time.sleep(0.02)
    raise RuntimeError(f"only {len(list(stamps.glob('task-*')))} of {n} tasks started in {timeout} s")


def wait_idle(env: dict) -> None:
    while subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip():
        time.sleep(0.05)


def hand_written(work: Path, env: dict, trial: int) -> float:
    stamps = work / f"hand-{trial}"
    stamps.mkdir()
    script = work / "hand.sh"
    script.write_text(f"#!/bin/sh\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=2\n"
                      f"#SBATCH --output={work}/hand-%j.out\n"
                      f"exec srun {sys.executable} {work / 'src' / 'task.py'}\n")
    out = subprocess.run(["sbatch", "--parsable", str(script)], env=dict(env, STAMPS=str(stamps)), check=True,
                         capture_output=True, text=True, cwd=work)
    accepted = time.time()
    assert out.stdout.strip().isdigit(), out
    return wait_stamps(stamps, 4) - accepted


def with_tflaunch(work: Path, env: dict, trial: int) -> float:
    stamps = work / f"tfl-{trial}"
    stamps.mkdir()
    out = subprocess.run([sys.executable, "-m", "tflaunch", "run", "--slurm", "--detach", "--nodes", "2",
                          "--procs-per-node", "2", "--source-dir", str(work / "src"), "task.py"],
                         env=dict(env, STAMPS=str(stamps)), check=True, capture_output=True, text=True, cwd=work)
    run_id = out.stdout.strip()
    last = wait_stamps(stamps, 4)
    events = [json.loads(line) for line in
              (Path(env["TFLAUNCH_HOME"]) / "runs" / run_id / "events.jsonl").read_text().splitlines()]
    submitted = next(e["time"] for e in events if e["event"] == "slurm_submitted")
    accepted = datetime.fromisoformat(submitted.replace("Z", "+00:00")).timestamp()
    return last - accepted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.infra.hosts import start_netns
    from tests.infra.slurm import missing_requirements, start_cluster

    reason = missing_requirements()
    if reason:
        print(f"skipped: {reason}")
        return
    work = scratch("slurm-submit")
    (work / "src").mkdir()
    (work / "src" / "task.py").write_text(TASK)
    infra = Path(f"/var/tmp/tflaunch-infra-{os.getpid()}")
    hosts = start_netns(str(infra / "netns"), names=("h1", "h2"))
    try:
        with start_cluster(str(infra / "slurm"), hosts) as cluster:
            env = {k: v for k, v in env_with(TFLAUNCH_HOME=str(work / "home")).items() if not k.startswith("SLURM_")}
            env.update(cluster.env)
            hand_written(work, env, -1)  # warm-up: page cache, the first job after slurmctld starts
            wait_idle(env)
            with_tflaunch(work, env, -1)
            wait_idle(env)
            hand, tfl = [], []
            for trial in range(args.repeat):
                for fn, into in ((hand_written, hand), (with_tflaunch, tfl))[::1 if trial % 2 == 0 else -1]:
                    time.sleep(random.random())
                    into.append(fn(work, env, trial))
                    wait_idle(env)
    finally:
        hosts.stop()
        subprocess.run(["rm", "-rf", str(infra)])
    print(f"sbatch accepted -> 4 tasks (2 nodes x 2) running, {args.repeat} alternating trials each:")
    for name, times in (("hand-written sbatch + srun", hand), ("tflaunch run --slurm", tfl)):
        print(f"  {name:27s} mean {statistics.mean(times) * 1000:5.0f} ms  median {statistics.median(times) * 1000:5.0f} ms"
              f"  (min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f})")
    print(f"  ratio of means: {statistics.mean(tfl) / statistics.mean(hand):.2f}x   ratio of medians: "
          f"{statistics.median(tfl) / statistics.median(hand):.2f}x   (goal <= 1.10x)")


if __name__ == "__main__":
    main()
