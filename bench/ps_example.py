"""Wall time of the parameter-server example under tflaunch vs the same processes started by hand
(goal: by hand / tflaunch >= 0.95, i.e. tflaunch costs nothing that matters).

Both run examples/tf_distributed/train_ps.py as chief + 2 workers + 1 ps on this machine, CPU only,
``--epochs E``, and are timed from the command's start to its exit (the servers' teardown included):
  tflaunch: python -m tflaunch run --backend ps --workers 2 --ps 1 --chief train_ps.py -- --epochs E
  by hand:  python examples/tf_distributed/run_by_hand.py ps --workers 2 --ps 1 -- --epochs E
            (free ports, hand-written TF_CONFIG, subprocess.Popen, SIGTERM to the servers at the end)
Trials alternate between the two; the medians are compared. TensorFlow's import (seconds per
process, four at once) dominates both, so the machine's own drift shows; use enough trials.

    python bench/ps_example.py [--trials 5] [--epochs 3]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from _util import REPO, env_with, scratch

EXAMPLE = REPO / "examples" / "tf_distributed"


def timed(argv: list[str], cwd: str, env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    took = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{argv[:4]} exited {result.returncode}: {result.stderr[-1000:]}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    work = scratch("ps_example")
    env = env_with(TFLAUNCH_HOME=str(work / "home"), TF_CPP_MIN_LOG_LEVEL="2")
    script_args = ["--", "--epochs", str(args.epochs)]
    tfl = [sys.executable, "-m", "tflaunch", "run", "--source-dir", str(EXAMPLE), "--backend", "ps",
           "--workers", "2", "--ps", "1", "--chief", "train_ps.py", *script_args]
    hand = [sys.executable, str(EXAMPLE / "run_by_hand.py"), "ps", "--workers", "2", "--ps", "1", *script_args]
    (work / "hand").mkdir()
    timed(hand, str(work / "hand"), env)  # warm the page cache (TensorFlow's files) for both
    tflaunch_s, hand_s = [], []
    for _ in range(args.trials):
        hand_s.append(timed(hand, str(work / "hand"), env))
        tflaunch_s.append(timed(tfl, str(work), env))
    t, h = statistics.median(tflaunch_s), statistics.median(hand_s)
    print(f"trials: {args.trials} each, epochs {args.epochs}")
    print(f"by hand:  median {h:.2f} s  ({', '.join(f'{x:.2f}' for x in hand_s)})")
    print(f"tflaunch: median {t:.2f} s  ({', '.join(f'{x:.2f}' for x in tflaunch_s)})")
    print(f"by hand / tflaunch = {h / t:.3f} (goal >= 0.95: {'met' if h / t >= 0.95 else 'MISSED'})")


if __name__ == "__main__":
    main()
