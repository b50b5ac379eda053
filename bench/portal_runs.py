"""The portal's runs page over 10,000 runs (goal < 300 ms), served by a real `tflaunch ui`.

The runs are written as bench/list_runs.py writes them (the store's own API: created, then Completed or
Failed). `python -m tflaunch ui --port 0 --home HOME` is started once; each round GETs `/` (the HTML runs
page: every run listed, sorted, filtered, the newest 500 shown) and `/api/runs` (the same as JSON) over
loopback with urllib, timed from the request to the last byte. The first request of each kind is shown
apart (the finished-runs index cold: deleted before the portal starts), then the median of the rest. For
scale, the same home's `python -m tflaunch runs list --json` (a whole process) is timed too.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor

from _util import REPO, env_with, run_cmd, scratch
from list_runs import _make_runs


def _get(url: str) -> tuple[float, int]:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response:
        size = len(response.read())
    return time.perf_counter() - start, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--keep", action="store_true", help="reuse bench/work/portal-runs if present")
    args = parser.parse_args()
    work = REPO / "bench" / "work" / "portal-runs"
    home = work / "home"
    if not (args.keep and (work / "done").exists()):
        work = scratch("portal-runs")
        half = args.runs // 2
        with ProcessPoolExecutor(2) as pool:
            made = sum(pool.map(_make_runs, [(str(home), 0, half), (str(home), half, args.runs - half)]))
        (work / "done").write_text(str(made))
    env = env_with(TFLAUNCH_HOME=str(home))
    index = home / "cache" / "runs-index.txt"
    if index.exists():
        index.unlink()
    ui = subprocess.Popen([sys.executable, "-m", "tflaunch", "ui", "--port", "0", "--home", str(home)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = ui.stdout.readline().strip()
        if not url.startswith("http://"):
            raise SystemExit(f"tflaunch ui did not print its URL (got {url!r})")
        cold_page, size_page = _get(url)
        cold_api, size_api = _get(url + "api/runs")
        page = [_get(url)[0] for _ in range(args.repeat)]
        api = [_get(url + "api/runs")[0] for _ in range(args.repeat)]
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    listing = statistics.median(run_cmd([sys.executable, "-m", "tflaunch", "runs", "list", "--json"], env=env)
                                for _ in range(max(3, args.repeat // 3)))
    med_page, med_api = statistics.median(page), statistics.median(api)
    print(f"{args.runs} runs in {home}; portal {url}")
    print(f"GET /          first {cold_page * 1000:.0f} ms (index cold), then median {med_page * 1000:.0f} ms "
          f"of {args.repeat} ({size_page / 1024:.0f} KB); goal < 300 ms: {med_page / 0.3:.2f}x of the goal")
    print(f"GET /api/runs  first {cold_api * 1000:.0f} ms, then median {med_api * 1000:.0f} ms "
          f"({size_api / 1024:.0f} KB)")
    print(f"runs list --json (a whole process, for scale): {listing * 1000:.0f} ms; "
          f"page / that = {med_page / listing:.2f}x")
    if os.environ.get("BENCH_STRICT") and med_page >= 0.3:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
