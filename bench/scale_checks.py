"""In-process operations the tests run at scale, each timed against a floor measured in the same run.

The tests check what these return (tests/test_models.py, test_report.py, test_hosts.py); their speed
is measured here (median of N):
  Model.list over 1,000 registered versions (4 names x 250)
      baseline: reading and parsing the same 1,000 model.json files (os.scandir + json.loads)
  report.render of one run with a 1,000,000-point series, downsampled to 1,000 points (spikes kept)
      baseline: one pass over the 1,000,000 values in C (min and max); also shown: the same run with
      1,000 points (the page's fixed cost)
  expand_nodelist("n[0001-1000]") (a Slurm node list)
      baseline: the same 1,000 names built by a list comprehension

    python bench/scale_checks.py [--repeat 5]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import time
from typing import Callable

from _util import scratch

from tflaunch.history import report
from tflaunch.spec.hosts import expand_nodelist
from tflaunch.history.models import Model, register


def median_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def row(label: str, seconds: float, baseline: float, former: str) -> None:
    print(f"  {label:44s} {seconds * 1000:8.1f} ms   baseline {baseline * 1000:7.1f} ms   "
          f"ratio {seconds / baseline:6.1f}x   ({former})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"median of {args.repeat}")

    home = scratch("scale-checks") / "home"
    src = home.parent / "model.keras"
    src.write_bytes(b"m")
    for i in range(1000):
        register(str(home), f"m{i % 4}", src, tags={"i": str(i)})
    models_dir = home / "models"

    def read_all() -> int:
        count = 0
        for name in os.scandir(models_dir):
            if name.is_dir() and not name.name.startswith("."):
                for version in os.scandir(name.path):
                    path = os.path.join(version.path, "model.json")
                    if os.path.exists(path):
                        with open(path, "rb") as fh:
                            json.loads(fh.read())
                        count += 1
        return count

    assert read_all() == 1000 and len(Model.list(str(home))) == 1000
    row("Model.list, 1,000 versions", median_time(lambda: Model.list(str(home)), args.repeat),
        median_time(read_all, args.repeat), "the test used to assert < 1 s")

    n = 1_000_000
    rng = random.Random(3)
    values = [math.sin(i / 20000) + rng.random() * 0.1 for i in range(n)]
    values[123_457], values[777_777] = 1000.0, -500.0
    big = {"id": "big", "metrics": {"m": {"steps": list(range(n)), "values": values}}}
    small = {"id": "small", "metrics": {"m": {"steps": list(range(0, n, 1000)), "values": values[::1000]}}}
    assert "downsampled to 1000 points" in report.render([big], max_points=1000)
    floor = median_time(lambda: (min(values), max(values)), args.repeat)
    fixed = median_time(lambda: report.render([small], max_points=1000), args.repeat)
    row("report.render, 1,000,000 points -> 1,000",
        median_time(lambda: report.render([big], max_points=1000), args.repeat), floor,
        f"the test used to assert < 5 s; the page with 1,000 points: {fixed * 1000:.1f} ms")

    expected = [f"n{i:04d}" for i in range(1, 1001)]
    assert expand_nodelist("n[0001-1000]") == expected
    repeat = args.repeat * 100  # microseconds each: more rounds
    row("expand_nodelist('n[0001-1000]')", median_time(lambda: expand_nodelist("n[0001-1000]"), repeat),
        median_time(lambda: [f"n{i:04d}" for i in range(1, 1001)], repeat), "the test used to assert < 0.5 s")


if __name__ == "__main__":
    main()
