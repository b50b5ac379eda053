"""Snapshot of a generated 1 GB / 10,000-file tree: first run vs `cp -r` (goal <= 1.5x),
unchanged re-run vs first run (goal <= 5 %).

All three write to the same filesystem (bench/work) with a warm page cache. Each timing includes a
final `sync` (data on disk, as a user waiting for a run would need anyway), which keeps one step's
write-back from being billed to the next; medians over --repeat rounds. "Snapshot" is what `tflaunch run`
does before the job starts: scan (ignore rules, limits), store new contents in the object store,
build the tree of hard links to them (once per distinct tree), link the run's snapshot/ to it,
write snapshot.json. The job's private working copy is
built later, by the launcher; its cost is printed for information.
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

from _util import scratch, sync, timed

from tflaunch.history.snapshot import SnapshotLimits, materialize, scan, store


def generate(root, total_bytes: int, files: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    weights = [rng.expovariate(1.0) for _ in range(files)]
    scale = total_bytes / sum(weights)
    block = os.urandom(1 << 20)  # incompressible, and no two files share content (offsets differ)
    for i, w in enumerate(weights):
        size = max(1, int(w * scale))
        path = root / f"d{i // 100:03d}" / f"f{i % 100:03d}.bin"
        path.parent.mkdir(exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(i.to_bytes(8, "little"))
            remaining = size - 8
            offset = i % 4096
            while remaining > 0:
                chunk = block[offset:offset + min(remaining, len(block) - offset)]
                fh.write(chunk)
                remaining -= len(chunk)
                offset = 0
    (root / "train.py").write_text("print('hi')\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                        help="where to work (default: /dev/shm, a RAM filesystem: it takes the VM disk's "
                             "erratic write-back out of the comparison; give bench/work to include a disk)")
    args = parser.parse_args()
    work = scratch("snapshot", args.dir)
    src = work / "src"
    src.mkdir()
    generate(src, args.mb * 1024 * 1024, args.files)
    time.sleep(2.5)                                    # older than the stat cache's racy window
    subprocess.run(f"find {src} -type f -exec cat {{}} + > /dev/null", shell=True, check=True)  # warm cache
    sync()
    home = work / "home"
    limits = SnapshotLimits(max_bytes=(args.mb + 100) * 1024 * 1024, max_files=args.files + 10)
    runs = []

    def snap():
        run_dir = work / f"run{len(runs)}"
        run_dir.mkdir()
        runs.append(run_dir)
        store(scan(str(src), "train.py", home=str(home), limits=limits), str(home), str(run_dir))
        sync()

    def copy():
        subprocess.run(["cp", "-r", str(src), str(work / "cp-copy")], check=True)
        sync()

    def workcopy():
        manifest = json.loads((runs[0] / "snapshot.json").read_text())
        materialize(manifest, str(home), str(work / "workcopy"))
        sync()

    cps, firsts, reruns, works = [], [], [], []
    for round_no in range(args.repeat + 1):  # round 0 warms up (a VM's first touch of memory is slow)
        subprocess.run(["rm", "-rf", str(work / "cp-copy"), str(work / "workcopy"), str(home)]
                       + [str(r) for r in runs], check=True)
        runs.clear()
        sync()
        timings = timed(copy), timed(snap), timed(snap), timed(workcopy)
        if round_no:
            for series, value in zip((cps, firsts, reruns, works), timings):
                series.append(value)
    cp, first, rerun, work_copy = (statistics.median(x) for x in (cps, firsts, reruns, works))
    manifest = json.loads((runs[0] / "snapshot.json").read_text())
    print(f"tree: {manifest['total_bytes'] / 1e6:.0f} MB in {manifest['file_count']} files  (python {sys.version.split()[0]})")
    print(f"medians of {args.repeat} rounds after a warm-up round, each step ending with sync; in {work.parent}")
    print(f"cp -r:                    {cp:6.2f} s   {[round(x, 2) for x in cps]}")
    print(f"tflaunch first snapshot:  {first:6.2f} s   ratio vs cp -r: {first / cp:.2f}x (goal <= 1.5x)   {[round(x, 2) for x in firsts]}")
    print(f"tflaunch unchanged rerun: {rerun:6.3f} s   ratio vs first: {rerun / first * 100:.1f} % (goal <= 5 %)   {[round(x, 3) for x in reruns]}")
    print(f"(the job's private working copy, built by the launcher: {work_copy:.2f} s, "
          f"{work_copy / cp:.2f}x cp -r)")
    subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
