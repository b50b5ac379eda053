"""Start-up of many processes: from the command to every process running (goal: <= 1.10x the baseline).

Each process of a trivial script appends time.time() to a marks file as its first statement; a
trial's time is the latest mark minus the moment the command was started. Median of N trials per
variant, all variants in this one run, alternating:
  local: tflaunch run --nodes 1 --procs-per-node 8   vs  mpirun -np 8 python mark.py (if mpirun is on
         PATH)  and  8 x python mark.py started in parallel by a Python parent (plain subprocess)
  ssh:   tflaunch run --hosts h1:2,h2:2               vs  4 x `ssh hN python mark.py` in parallel
         (h1, h2: sshd in network namespaces, tests/infra/hosts.py; needs root; --no-ssh skips it)
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

MARK = "import time, os\nopen(os.environ['MARKS'], 'a').write('%.6f\\n' % time.time())\n"
PARALLEL = ("import subprocess, sys\nps = [subprocess.Popen([sys.executable, sys.argv[1]]) for _ in range(int(sys.argv[2]))]\n"
            "sys.exit(max(p.wait() for p in ps))\n")


def trial(argv: list[str], marks: str, count: int, env: dict) -> float:
    if os.path.exists(marks):
        os.unlink(marks)
    start = time.time()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(marks) as fh:
        stamps = [float(line) for line in fh if line.strip()]
    if len(stamps) != count:
        raise RuntimeError(f"{argv[:4]}: {len(stamps)} of {count} processes ran")
    return max(stamps) - start


def compare(variants: dict[str, list[str]], marks: str, count: int, env: dict, repeat: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, argv in variants.items():  # warm up (page cache, bytecode)
        trial(argv, marks, count, env)
    for _ in range(repeat):
        for name, argv in variants.items():
            times[name].append(trial(argv, marks, count, env))
    return {name: statistics.median(values) for name, values in times.items()}


def report(title: str, medians: dict[str, float], subject: str, repeat: int) -> None:
    print(f"{title} (median of {repeat})")
    for name, value in medians.items():
        ratio = "" if name == subject else f"   tflaunch / this = {medians[subject] / value:.2f}x"
        print(f"  {name:34s} {value * 1000:7.1f} ms{ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=11)
    parser.add_argument("--no-ssh", action="store_true")
    args = parser.parse_args()
    work = scratch("multi-launch")
    src = work / "src"
    src.mkdir()
    (src / "mark.py").write_text(MARK)
    (work / "parallel.py").write_text(PARALLEL)
    marks = str(work / "marks")
    env = env_with(TFLAUNCH_HOME=str(work / "home"), MARKS=marks, OMPI_ALLOW_RUN_AS_ROOT="1",
                   OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    py = sys.executable
    tfl = [py, "-m", "tflaunch", "run", "--source-dir", str(src)]
    local = {"tflaunch run --procs-per-node 8": tfl + ["--nodes", "1", "--procs-per-node", "8", "mark.py"],
             "8 x subprocess (parallel)": [py, str(work / "parallel.py"), str(src / "mark.py"), "8"]}
    if shutil.which("mpirun"):
        local["mpirun -np 8"] = ["mpirun", "--oversubscribe", "-np", "8", py, str(src / "mark.py")]
    report("8 local processes, command -> all running", compare(local, marks, 8, env, args.repeat),
           "tflaunch run --procs-per-node 8", args.repeat)
    with netns_hosts(not args.no_ssh) as hosts:
        if hosts is None:
            return
        raw = [py, "-c", "import subprocess, sys\n"
               "ps = [subprocess.Popen(['ssh', '-F', sys.argv[1], h, f'MARKS={sys.argv[3]} {sys.executable} {sys.argv[2]}'])"
               " for h in ('h1', 'h1', 'h2', 'h2')]\nsys.exit(max(p.wait() for p in ps))\n",
               hosts.config, str(src / "mark.py"), marks]
        remote = {"tflaunch run --hosts h1:2,h2:2": tfl + ["--ssh-config", hosts.config, "--hosts", "h1:2,h2:2",
                                                           "--env", f"MARKS={marks}", "mark.py"],
                  "4 x ssh host python (parallel)": raw}
        report("4 processes on 2 ssh hosts, command -> all running", compare(remote, marks, 4, env, args.repeat),
               "tflaunch run --hosts h1:2,h2:2", args.repeat)


if __name__ == "__main__":
    main()
