"""`runs export` + `runs import` of a run with ~1 GB of outputs vs `tar cf` + `tar xf` of the same run
directory (goal <= 1.2x).

The run is a real `tflaunch run` whose script writes --mb MB of random (incompressible) bytes into
./outputs, in --files files. Timed, medians over --repeat rounds, each step ending with `sync`:

* tflaunch: `python -m tflaunch runs export RUN -o run.tar` then `runs import run.tar` into an empty home
  (every member checked, the snapshot's objects hashed, the run staged and renamed into place);
* tar: `tar cf dir.tar -C HOME/runs RUN` then `tar xf dir.tar` into an empty directory (no checks; the
  snapshot stays a dangling link, its files are not in that archive).

Both read and write the same filesystem (--dir, default /dev/shm, a RAM filesystem, as bench/snapshot.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap

from _util import env_with, run_cmd, scratch, sync

SCRIPT = """
import os, sys
mb, files = int(sys.argv[1]), int(sys.argv[2])
os.makedirs("outputs", exist_ok=True)
block = os.urandom(1 << 20)
per_file = max(1, mb // files)
for i in range(files):
    with open(f"outputs/part-{i:04d}.bin", "wb") as fh:
        fh.write(i.to_bytes(8, "little"))
        for _ in range(per_file):
            fh.write(block)
from tflaunch import Run
Run.get_context().log("loss", 0.5)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024, help="size of the run's outputs (default 1024)")
    parser.add_argument("--files", type=int, default=8, help="how many output files (default 8)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                        help="where to work (default /dev/shm; bench/work to include a disk)")
    args = parser.parse_args()
    work = scratch("archive", args.dir)
    home = work / "home"
    env = env_with(TFLAUNCH_HOME=str(home))
    (work / "proj").mkdir()
    (work / "proj" / "train.py").write_text(textwrap.dedent(SCRIPT))
    subprocess.run([sys.executable, "-m", "tflaunch", "run", "--source-dir", str(work / "proj"), "train.py", "--",
                    str(args.mb), str(args.files)], env=env, check=True, stdout=subprocess.DEVNULL)
    run_id = json.loads(subprocess.run([sys.executable, "-m", "tflaunch", "runs", "list", "--json"], env=env,
                                       check=True, capture_output=True, text=True).stdout)[0]["id"]
    size = sum(p.stat().st_size for p in (home / "runs" / run_id).rglob("*") if p.is_file())
    tfl = [sys.executable, "-m", "tflaunch"]

    def ours() -> tuple[float, float]:
        for p in (work / "run.tar", work / "home2"):
            subprocess.run(["rm", "-rf", str(p)], check=True)
        sync()
        export = run_cmd([*tfl, "runs", "export", run_id, "-o", str(work / "run.tar")], env) + _synced()
        imported = run_cmd([*tfl, "--home", str(work / "home2"), "runs", "import", str(work / "run.tar")], env) + _synced()
        return export, imported

    def theirs() -> tuple[float, float]:
        for p in (work / "dir.tar", work / "out"):
            subprocess.run(["rm", "-rf", str(p)], check=True)
        (work / "out").mkdir()
        sync()
        create = run_cmd(["tar", "cf", str(work / "dir.tar"), "-C", str(home / "runs"), run_id]) + _synced()
        extract = run_cmd(["tar", "xf", str(work / "dir.tar"), "-C", str(work / "out")]) + _synced()
        return create, extract

    rounds_ours, rounds_tar = [], []
    for _ in range(args.repeat):
        rounds_tar.append(theirs())
        rounds_ours.append(ours())
    e, i = (statistics.median(r[k] for r in rounds_ours) for k in (0, 1))
    c, x = (statistics.median(r[k] for r in rounds_tar) for k in (0, 1))
    print(f"run {run_id}: {size / 2**20:.0f} MB in {args.files} output files, {args.repeat} rounds, in {work}")
    print(f"tflaunch: export {e:.2f} s + import {i:.2f} s = {e + i:.2f} s")
    print(f"tar:      cf     {c:.2f} s + xf     {x:.2f} s = {c + x:.2f} s")
    print(f"ratio:    {(e + i) / (c + x):.2f}x (goal <= 1.2x); export {e / c:.2f}x, import {i / x:.2f}x")
    subprocess.run(["rm", "-rf", str(work)], check=True)


def _synced() -> float:
    import time

    start = time.perf_counter()
    sync()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
