"""`tflaunch run --dry-run --json` of 1,000 hosts x 8 slots vs `ssh -G` of the same 1,000 names.

A dry run with remote hosts asks ssh for each host's HostName (``ssh -G``, 32 at a time, as the launcher
does before it starts anything), then plans 8,000 processes and prints them (~7.5 MB of JSON). Whole
processes, timed from start to exit, median of N rounds (the variants alternate), in this one run:
  ssh -G x 1000:   xargs -P 32 running tflaunch's own `ssh -G ... -- HOST` command line once per name
                   (the baseline: the address lookups alone, with nothing of tflaunch)
  1 host:          tflaunch run --dry-run --json --hosts node0000:8 train.py (tflaunch's fixed cost)
  1,000 hosts:     tflaunch run --dry-run --json --hostfile hosts.txt train.py
The ratio is 1,000 hosts / ssh -G x 1000; "tflaunch's own share" is what the 1,000-host dry run takes
beyond the lookups and the 1-host dry run (planning, serializing and printing 8,000 processes).
(tests/test_multihost.py plans the same 1,000 hosts for correctness and no longer times it.)

    python bench/dry_run_hosts.py [--repeat 3] [--hosts 1000]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from _util import env_with, scratch

from tflaunch.launch.ssh import SshOptions, ssh_argv

SLOTS = 8


def timed_run(argv: list[str], env: dict, stdin: str | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, input=stdin, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--hosts", type=int, default=1000)
    args = parser.parse_args()
    work = scratch("dry-run-hosts")
    src = work / "src"
    src.mkdir()
    (src / "train.py").write_text("")
    names = [f"node{i:04d}" for i in range(args.hosts)]
    hostfile = work / "hosts.txt"
    hostfile.write_text("".join(f"{n} slots={SLOTS}\n" for n in names))
    env = env_with(TFLAUNCH_HOME=str(work / "home"))
    tfl = [sys.executable, "-m", "tflaunch", "run", "--source-dir", str(src), "--dry-run", "--json"]
    many = tfl + ["--hostfile", str(hostfile), "train.py"]
    one = tfl + ["--hosts", f"{names[0]}:{SLOTS}", "train.py"]
    lookup = ssh_argv("HOST", "", SshOptions())[:-2]  # [..., "--"]: xargs appends each name
    lookup.insert(1, "-G")
    xargs = ["xargs", "-P", "32", "-n", "1", *lookup]
    stdin = "".join(n + "\n" for n in names)

    # warm up, and check that each variant does the whole job
    _, out = timed_run(many, env)
    plan = json.loads(out)
    assert len(plan["processes"]) == args.hosts * SLOTS and len(plan["addresses"]) == args.hosts, \
        (len(plan["processes"]), len(plan["addresses"]))
    _, out = timed_run(xargs, env, stdin)
    assert sum(line.startswith("hostname ") for line in out.splitlines()) == args.hosts
    timed_run(one, env)

    times: dict[str, list[float]] = {"ssh": [], "one": [], "many": []}
    for _ in range(args.repeat):
        times["ssh"].append(timed_run(xargs, env, stdin)[0])
        times["one"].append(timed_run(one, env)[0])
        times["many"].append(timed_run(many, env)[0])
    ssh, one_host, many_hosts = (statistics.median(times[k]) for k in ("ssh", "one", "many"))
    own = many_hosts - ssh - one_host
    rows = [(f"ssh -G x {args.hosts} (xargs -P 32): the baseline", ssh, ""),
            ("tflaunch dry run, 1 host", one_host, ""),
            (f"tflaunch dry run, {args.hosts} hosts", many_hosts, f"{many_hosts / ssh:.2f}x the baseline"),
            ("tflaunch's own share (beyond ssh -G, 1 host)", own,
             f"{own / (args.hosts * SLOTS) * 1e6:.0f} us per process")]
    print(f"dry run, {args.hosts} hosts x {SLOTS} slots (median of {args.repeat}, whole processes)")
    for label, seconds, note in rows:
        print(f"  {label:46s} {seconds * 1000:7.0f} ms   {note}".rstrip())


if __name__ == "__main__":
    main()
