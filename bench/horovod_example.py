"""The Horovod example's training throughput under tflaunch vs under raw mpirun (goal: >= 0.98x).

examples/horovod/train_hvd.py (2 ranks, synthetic data) measures its own global samples/s over the
epochs after the first (metrics.json). The same script runs alternately under
`tflaunch run --backend mpi --procs-per-node 2` and under the raw mpirun command line tflaunch would
use (from --dry-run --json, without the rank wrapper). The goal is judged on the median of the
paired ratios (this VM's speed drifts by more than the effect measured); the ratio of the medians
is printed too. Needs
.venv-horovod (make horovod).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys

from _util import REPO, env_with, scratch

VENV = REPO / ".venv-horovod"
ARGS = ["--epochs", "4", "--samples", "65536", "--batch-size", "128"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if not (VENV / ".horovod-ready").exists():
        sys.exit(f"{VENV} missing: make horovod")
    work = scratch("horovod")
    src = work / "src"
    shutil.copytree(REPO / "examples" / "horovod", src)
    env = env_with(TFLAUNCH_HOME=str(work / "home"))
    mpirun, python = str(VENV / "bin" / "mpirun"), str(VENV / "bin" / "python")
    tfl = [sys.executable, "-m", "tflaunch", "run", "--backend", "mpi", "--mpirun", mpirun, "--python", python,
           "--procs-per-node", "2", "--source-dir", str(src), "train_hvd.py", "--", *ARGS]
    plan = json.loads(subprocess.run(tfl[:4] + ["--dry-run", "--json"] + tfl[4:], env=env, check=True,
                                     capture_output=True, text=True).stdout)["launcher"]
    argv = plan["argv"]
    raw = argv[:argv.index("-I") - 1] + [python, str(src / "train_hvd.py"), *ARGS, "--outputs", str(work / "outputs")]
    raw_env = dict(env, **plan["env"], PATH=plan["path"])
    rates: dict[str, list[float]] = {"tflaunch": [], "raw mpirun": []}
    for i in range(args.repeat + 1):  # the first round warms up (page cache, TensorFlow's files)
        subprocess.run(tfl, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        runs = sorted(p for p in (work / "home" / "runs").iterdir() if not p.name.startswith("."))
        tfl_rate = json.loads((runs[-1] / "outputs" / "metrics.json").read_text())["samples_per_second"]
        subprocess.run(raw, env=raw_env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        raw_rate = json.loads((work / "outputs" / "metrics.json").read_text())["samples_per_second"]
        if i:
            rates["tflaunch"].append(tfl_rate)
            rates["raw mpirun"].append(raw_rate)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"Horovod example, 2 ranks, {' '.join(ARGS)}: global samples/s after epoch 1 (median of {args.repeat})")
    for key, value in med.items():
        print(f"  {key:12s} {value:9.0f} samples/s   (runs: {', '.join(f'{v:.0f}' for v in rates[key])})")
    ratio = med["tflaunch"] / med["raw mpirun"]
    paired = statistics.median(t / r for t, r in zip(rates["tflaunch"], rates["raw mpirun"]))
    print(f"  ratio of the medians {ratio:.3f}x; median of the paired ratios (each tflaunch run over the raw "
          f"run right after it, which cancels the VM's drift) {paired:.3f}x (goal >= 0.98x): "
          f"{'met' if paired >= 0.98 else 'MISSED'}")


if __name__ == "__main__":
    main()
