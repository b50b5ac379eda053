"""Hang watchdog overhead: a flooding job (PROCS processes each writing MB megabytes of stdout lines as
fast as they can) through tflaunch with and without --hang-timeout (goal: < 2 % slower).

The watchdog never fires here (the job is never quiet); what it costs is its checks: the supervisor
wakes every tenth of the timeout (at least every 0.2 s: --hang-timeout 2 is its busiest setting, used
here) and stats the ranks' logs and metric files, or notes an output event for relayed output. Runs
alternate with and without it, attached with the console to /dev/null; the ratios are of the medians of
the wall time, of the CPU time of tflaunch and everything it started (the job included: noisy, it is
mostly the writers' own system time) and of the CPU time of the supervising process alone (where the
watchdog runs). --ssh adds the same pair over two ssh hosts (network namespaces, needs root), where
every chunk of output is an event the watchdog sees.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

from _util import env_with, netns_hosts, scratch

WRITER = """\
import os, sys
total = int(sys.argv[1]) << 20
line = ("%d " % int(os.environ.get("TFLAUNCH_RANK", 0))).encode() + b"x" * 90 + b"\\n"
chunk = line * (65536 // len(line))
written = 0
while written < total:
    written += os.write(1, chunk[:total - written])
"""
WATCHDOG = ["--hang-timeout", "2", "--hang-grace", "0"]
# `python -m tflaunch ARGS` that reports its own CPU time (not its children's) on stderr as it exits
SELF_CPU = ("import atexit, resource, runpy, sys\n"
            "def report():\n"
            "    r = resource.getrusage(resource.RUSAGE_SELF)\n"
            "    sys.stderr.write('self-cpu %f\\n' % (r.ru_utime + r.ru_stime))\n"
            "atexit.register(report)\n"
            "sys.argv[0] = 'tflaunch'\n"
            "runpy.run_module('tflaunch', run_name='__main__')\n")


def run_once(argv: list[str], env: dict) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of tflaunch and its descendants, of tflaunch alone) of one run."""
    start = time.perf_counter()
    with open(os.devnull, "wb") as null:
        proc = subprocess.Popen([sys.executable, "-c", SELF_CPU, *argv], env=env, stdout=null,
                                stderr=subprocess.PIPE)
        err = proc.stderr.read().decode("utf-8", "replace")
        _, status, usage = os.wait4(proc.pid, 0)
    took = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"tflaunch exited {proc.returncode}: {' '.join(argv)}\n{err[-2000:]}")
    mine = float([line for line in err.splitlines() if line.startswith("self-cpu ")][-1].split()[1])
    return took, usage.ru_utime + usage.ru_stime, mine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="per process (default 200)")
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--ssh", action="store_true")
    args = parser.parse_args()
    work = scratch("watchdog-overhead")
    src = work / "src"
    src.mkdir()
    (src / "writer.py").write_text(WRITER)
    home = work / "home"
    env = env_with(TFLAUNCH_HOME=str(home))
    tfl = ["run", "--source-dir", str(src)]
    job = ["writer.py", str(args.mb)]
    pairs = {f"local, {args.procs} processes (output to files)": tfl + ["--procs-per-node", str(args.procs)]}
    with netns_hosts(args.ssh) as hosts:
        if hosts is not None:
            half = max(1, args.procs // 2)
            pairs[f"ssh, 2 hosts x {half} (relayed)"] = tfl + ["--ssh-config", hosts.config,
                                                              "--hosts", f"h1:{half},h2:{half}"]
        print(f"{args.procs} writers x {args.mb} MB, with and without {' '.join(WATCHDOG)} "
              f"(median of {args.repeat}, alternating)")
        for name, argv in pairs.items():
            without, with_it = [], []
            for _ in range(args.repeat):
                without.append(run_once(argv + job, env))
                shutil.rmtree(home, ignore_errors=True)
                with_it.append(run_once(argv + WATCHDOG + job, env))
                shutil.rmtree(home, ignore_errors=True)
            print(f"  {name}")
            for i, what in enumerate(("wall time", "CPU, all processes", "CPU, supervisor alone")):
                before, after = (statistics.median(run[i] for run in runs) for runs in (without, with_it))
                print(f"    {what:24s} without {before:6.2f} s  with {after:6.2f} s  ratio {after / before:5.3f}"
                      "  (goal < 1.02)")


if __name__ == "__main__":
    main()
