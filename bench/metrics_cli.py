"""Issue 7 benchmarks, against the issue's goals (ratio = time / goal, below 1 meets it):

* `tflaunch runs metrics RUN` over one run with 1,000,000 points (goal < 1 s): the points are written by the
  real writer (`tflaunch.history.metrics.MetricsWriter`, what `run.log` uses: 2 metrics x 500,000 steps), the run is
  finished as a launcher finishes it (which parses the metrics once into the run's cache), then the whole
  `python -m tflaunch runs metrics` process is timed: as the user meets it after the run, with the cache
  deleted (a reader that comes while the run is still being written, before any cache), and with `--json`
  (every point printed);
* `tflaunch runs list --metric acc` over 10,000 finished runs that each logged `acc` and `loss` (goal < 0.5 s):
  warm (the finished-runs index exists, as after any earlier `runs list`) and cold (index deleted: every
  run's status and metrics read).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from _util import REPO, env_with, run_cmd, scratch


def _make_big_run(home: str, points: int) -> str:
    sys.path.insert(0, str(REPO))
    from tflaunch.history.metrics import MetricsWriter, load
    from tflaunch.history.store import COMPLETED, Store, now_iso

    rec = Store(home).create_run("bench", {"spec": {"entry_script": "train.py"}})
    writer = MetricsWriter(rec.path("metrics"), 0)
    rng = random.Random(1)
    started = time.perf_counter()
    for i in range(points // 2):
        writer.log("loss", rng.random(), i)
        writer.log("acc", rng.random(), i)
    writer.close()
    logged = time.perf_counter() - started
    load(rec.dir)  # what the launcher does when the run ends (tflaunch.supervise: _finalize)
    rec.release_reserve()
    rec.write_status(COMPLETED, started=now_iso(), ended=now_iso(), exit_code=0)
    os.unlink(rec.path("lease.json"))
    print(f"logged {points} points through MetricsWriter in {logged:.1f} s "
          f"({logged / points * 1e6:.1f} us per point)")
    return rec.id


def _make_runs(args: tuple[str, int, int]) -> int:
    sys.path.insert(0, str(REPO))
    from tflaunch.history.metrics import MetricsWriter
    from tflaunch.history.store import COMPLETED, Store, now_iso

    home, start, count = args
    store = Store(home)
    for i in range(start, start + count):
        rec = store.create_run("bench", {"spec": {"entry_script": "train.py", "arguments": ["--lr", "0.01"]}})
        writer = MetricsWriter(rec.path("metrics"), 0)
        for epoch in range(10):
            writer.log("acc", i / 10000 + epoch / 100, epoch)
            writer.log("loss", 1 / (epoch + 1), epoch)
        writer.close()
        rec.release_reserve()
        rec.write_status(COMPLETED, started=now_iso(), ended=now_iso(), exit_code=0)
        os.unlink(rec.path("lease.json"))
    return count


def _median(cmd: list[str], env: dict, repeat: int, before=None) -> float:
    times = []
    for _ in range(repeat):
        if before:
            before()
        times.append(run_cmd(cmd, env))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    work = scratch("metrics")
    home = str(work / "home")
    env = env_with(TFLAUNCH_HOME=home)
    run_id = _make_big_run(home, args.points)
    cache = os.path.join(home, "runs", run_id, "metrics", ".cache-1.marshal")
    cmd = [sys.executable, "-m", "tflaunch", "runs", "metrics", run_id]
    print(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.rstrip())
    warm = _median(cmd, env, args.repeat)
    cold = _median(cmd, env, args.repeat, before=lambda: os.unlink(cache))
    as_json = _median(cmd + ["--json"], env, args.repeat)
    print(f"runs metrics, {args.points} points (whole process): {warm * 1000:.0f} ms, ratio to the 1 s goal "
          f"{warm / 1.0:.2f}; without the cache {cold * 1000:.0f} ms ({cold:.2f}); --json {as_json * 1000:.0f} ms "
          f"({as_json:.2f})")

    work = scratch("metrics-list")
    home = str(work / "home")
    env = env_with(TFLAUNCH_HOME=home)
    started = time.perf_counter()
    half = args.runs // 2
    with ProcessPoolExecutor(2) as pool:
        made = sum(pool.map(_make_runs, [(home, 0, half), (home, half, args.runs - half)]))
    print(f"wrote {made} runs with metrics in {time.perf_counter() - started:.0f} s")
    cmd = [sys.executable, "-m", "tflaunch", "runs", "list", "--metric", "acc"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == made + 1 and out[1].split()[-1] != "-", out[:2]
    index = os.path.join(home, "cache", "runs-index.txt")
    warm = _median(cmd, env, args.repeat)
    cold = _median(cmd, env, args.repeat, before=lambda: os.unlink(index))
    warm_json = _median([*cmd, "--json"], env, args.repeat)
    print(f"runs list --metric acc, {made} runs (whole process): {warm * 1000:.0f} ms, ratio to the 0.5 s goal "
          f"{warm / 0.5:.2f}; --json {warm_json * 1000:.0f} ms ({warm_json / 0.5:.2f}); index deleted "
          f"{cold * 1000:.0f} ms ({cold / 0.5:.2f})")


if __name__ == "__main__":
    main()
