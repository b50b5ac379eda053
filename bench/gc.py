"""`tflaunch gc` over a home of 10,000 runs and 100,000 snapshot objects: its time, and a check that
nothing referenced was removed.

The home is made with the store's own API: --trees source trees of --files small files each (distinct
contents: trees x files objects), each snapshotted once (`snapshot.scan` + `snapshot.store`, as `run`
does) and given to --runs runs in all (`snapshot.link`, as a sweep's trials get theirs); then --orphans
of the trees lose every run (their run directories removed, as a purge does), so their trees and objects
are what gc should remove. Timed, as whole `python -m tflaunch gc` processes, `--grace 0` (everything is
older than that; the 2 s coarse-timestamp margin is waited out first):

* `gc --dry-run --json` (median of --repeat): the full walk and the references, nothing removed;
* `gc` once: removes the orphans' trees and objects;
* `gc` again: nothing left to remove.

For scale, `find HOME -printf .` (one walk of the same home, nothing read) is timed as well. After the
real gc every kept run's tree, listing and objects are checked to be there, and the orphans' gone.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from _util import REPO, env_with, run_cmd, scratch


def _make(args: tuple[str, str, int, int, int, int]) -> list[tuple[str, str]]:
    """Trees [first, first + count) with their runs; returns (run id, tree key) of every run made."""
    sys.path.insert(0, str(REPO))
    from tflaunch.history import snapshot
    from tflaunch.history.store import COMPLETED, Store, now_iso

    home, sources, first, count, files, runs_per_tree = args
    store = Store(home)
    made = []
    for t in range(first, first + count):
        src = os.path.join(sources, f"tree-{t}")
        os.makedirs(os.path.join(src, "pkg"), exist_ok=True)
        for i in range(files):
            with open(os.path.join(src, "pkg" if i % 2 else "", f"f{i}.py"), "w") as fh:
                fh.write(f"# tree {t} file {i}\nVALUE = {t * files + i}\n")
        with open(os.path.join(src, "train.py"), "w") as fh:
            fh.write(f"print({t})\n")
        scan = snapshot.scan(src, "train.py", home=home)
        first_run = None
        for r in range(runs_per_tree):
            rec = store.create_run("bench", {"spec": {"entry_script": "train.py"}})
            if first_run is None:
                manifest = snapshot.store(scan, home, rec.dir, threads=1)
                first_run = rec.dir
            else:
                manifest = snapshot.link(home, first_run, rec.dir)
            rec.release_reserve()
            rec.write_status(COMPLETED, started=now_iso(), ended=now_iso(), exit_code=0)
            os.unlink(rec.path("lease.json"))
            made.append((rec.id, manifest["tree"]))
    return made


def _gc(env: dict, home: str, *extra: str) -> tuple[float, dict]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "tflaunch", "gc", "--home", home, "--grace", "0", "--json", *extra],
                         env=env, capture_output=True, text=True, check=True).stdout
    return time.perf_counter() - start, json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--trees", type=int, default=1_000)
    parser.add_argument("--files", type=int, default=100, help="files (objects) per tree, train.py included")
    parser.add_argument("--orphans", type=int, default=100, help="trees whose runs are all removed")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = scratch("gc")
    home, sources = str(work / "home"), str(work / "src")
    per_tree = max(1, args.runs // args.trees)
    started = time.perf_counter()
    half = args.trees // 2
    with ProcessPoolExecutor(2) as pool:
        parts = pool.map(_make, [(home, sources, 0, half, args.files - 1, per_tree),
                                 (home, sources, half, args.trees - half, args.files - 1, per_tree)])
        made = [item for part in parts for item in part]
    trees = {key for _, key in made}
    orphaned = set(sorted(trees)[:args.orphans])
    for run_id, key in made:
        if key in orphaned:
            subprocess.run(["rm", "-rf", os.path.join(home, "runs", run_id)], check=True)
    objects = sum(len(names) for _, _, names in os.walk(os.path.join(home, "objects")))
    print(f"home: {len(made) - sum(1 for _, k in made if k in orphaned)} runs kept, {len(trees)} trees "
          f"({len(orphaned)} orphaned), {objects} objects; made in {time.perf_counter() - started:.0f} s")
    env = env_with()
    time.sleep(2.5)  # past gc's coarse-timestamp margin: with --grace 0 everything unreferenced may go
    walk = statistics.median(run_cmd(["find", home, "-printf", "."], env=env) for _ in range(args.repeat))
    dry = [_gc(env, home, "--dry-run") for _ in range(args.repeat)]
    dry_time = statistics.median(t for t, _ in dry)
    real_time, report = _gc(env, home)
    again_time, again = _gc(env, home)
    removed = report["removed"]
    print(f"gc --dry-run: median {dry_time:.2f} s of {args.repeat} (would remove {dry[0][1]['count']} entries, "
          f"{dry[0][1]['bytes'] / 1e6:.1f} MB)")
    print(f"gc:           {real_time:.2f} s, removed {removed['trees']['count']} trees, "
          f"{removed['objects']['count']} objects ({report['bytes'] / 1e6:.1f} MB)")
    print(f"gc again:     {again_time:.2f} s, removed {again['count']}")
    print(f"find over the same home (one walk, for scale): {walk:.2f} s; gc --dry-run / find = {dry_time / walk:.1f}x")
    lost = []
    for run_id, key in made:
        if key in orphaned:
            continue
        listing = os.path.join(home, "trees", key + ".json")
        if not os.path.isdir(os.path.join(home, "trees", key)) or not os.path.isfile(listing):
            lost.append(f"{run_id}: tree {key[:12]}")
            continue
    for key in trees - orphaned:
        with open(os.path.join(home, "trees", key + ".json")) as fh:
            for _rel, digest, _size, executable in json.load(fh)["files"]:
                path = os.path.join(home, "objects", digest[:2], digest[2:] + (".x" if executable else ""))
                if not os.path.exists(path):
                    lost.append(f"object {digest[:12]} of tree {key[:12]}")
    left = [key for key in orphaned if os.path.exists(os.path.join(home, "trees", key))]
    print(f"check: {len(lost)} referenced entries lost, {len(left)} orphaned trees left")
    if lost or left:
        raise SystemExit("; ".join((lost + left)[:5]))


if __name__ == "__main__":
    main()
