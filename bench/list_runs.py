"""`tflaunch runs list --json` over 10,000 runs (goal < 0.3 s) vs MLflow's file store `search_runs`
over the same 10,000 runs (goal: tflaunch >= 50x faster).

The runs are written once through each tool's own API: tflaunch's store (`Store.create_run` and the
final status) and MLflow's `MlflowClient` (create_run, a param, a tag, set_terminated) in a file store
(`MLFLOW_ALLOW_FILE_STORE=true`). tflaunch is timed as a whole `python -m tflaunch runs list --json`
process (interpreter start included), with its finished-run cache cold (deleted) and warm; MLflow's
`search_runs` is timed inside an already started interpreter, `import mlflow` excluded. MLflow runs
from its own virtualenv (bench/.venv-mlflow, made by `make bench`).
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

MLFLOW_PY = REPO / "bench" / ".venv-mlflow" / "bin" / "python"

MLFLOW_SCRIPT = r"""
import json, os, sys, time
os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
import logging, warnings
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
from mlflow.tracking import MlflowClient
path, n, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
client = MlflowClient(tracking_uri="file://" + path)
if not os.path.exists(os.path.join(path, "created")):
    exp = client.create_experiment("bench")
    for i in range(n):
        run = client.create_run(exp, tags={"entry_script": "train.py"})
        client.log_param(run.info.run_id, "learning_rate", "0.01")
        client.set_terminated(run.info.run_id, "FINISHED" if i % 10 else "FAILED")
    open(os.path.join(path, "created"), "w").write(exp)
exp = open(os.path.join(path, "created")).read()
times = []
for _ in range(repeat):
    start = time.perf_counter()
    runs = client.search_runs([exp], max_results=50000)
    times.append(time.perf_counter() - start)
print(json.dumps({"count": len(runs), "times": times}))
"""


def _make_runs(args: tuple[str, int, int]) -> int:
    sys.path.insert(0, str(REPO))
    from tflaunch.history.store import COMPLETED, FAILED, Store, now_iso

    home, start, count = args
    store = Store(home)
    for i in range(start, start + count):
        rec = store.create_run("bench", {"spec": {"entry_script": "train.py", "arguments": ["--lr", "0.01"]}},
                               tags={"i": str(i)})
        rec.release_reserve()
        rec.write_status(COMPLETED if i % 10 else FAILED, started=now_iso(), ended=now_iso(),
                         exit_code=0 if i % 10 else 1)
        os.unlink(rec.path("lease.json"))
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="reuse bench/work/list-runs if present")
    args = parser.parse_args()
    work = REPO / "bench" / "work" / "list-runs"
    if not (args.keep and (work / "done").exists()):
        work = scratch("list-runs")
        started = time.perf_counter()
        half = args.runs // 2
        with ProcessPoolExecutor(2) as pool:
            made = sum(pool.map(_make_runs, [(str(work / "home"), 0, half), (str(work / "home"), half, args.runs - half)]))
        print(f"wrote {made} tflaunch runs in {time.perf_counter() - started:.0f} s")
        (work / "done").write_text("")
    env = env_with(TFLAUNCH_HOME=str(work / "home"))
    cmd = [sys.executable, "-m", "tflaunch", "runs", "list", "--json"]
    count = len(json.loads(subprocess.run(cmd, env=env, capture_output=True, check=True).stdout))
    colds = []
    for _ in range(args.repeat):
        (work / "home" / "cache" / "runs-index.txt").unlink(missing_ok=True)
        colds.append(run_cmd(cmd, env))
    warms = [run_cmd(cmd, env) for _ in range(args.repeat)]
    cold, warm = statistics.median(colds), statistics.median(warms)
    print(f"tflaunch runs list --json, {count} runs (whole process): warm {warm * 1000:.0f} ms (goal < 300 ms), "
          f"cold cache {cold * 1000:.0f} ms")
    if not MLFLOW_PY.exists():
        print(f"MLflow comparison skipped: {MLFLOW_PY} missing (make bench creates it)")
        return
    mlflow_dir = work / "mlruns"
    mlflow_dir.mkdir(exist_ok=True)
    started = time.perf_counter()
    out = subprocess.run([str(MLFLOW_PY), "-c", MLFLOW_SCRIPT, str(mlflow_dir), str(args.runs), "3"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    version = subprocess.run([str(MLFLOW_PY), "-c", "import mlflow; print(mlflow.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    mlflow_time = statistics.median(result["times"])
    print(f"MLflow {version} file store search_runs, {result['count']} runs (in-process): {mlflow_time * 1000:.0f} ms "
          f"(setup+search {time.perf_counter() - started:.0f} s)")
    print(f"ratio: tflaunch warm is {mlflow_time / warm:.0f}x faster, cold {mlflow_time / cold:.0f}x (goal >= 50x)")
    (work / "done").write_text("")


if __name__ == "__main__":
    main()
