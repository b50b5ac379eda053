"""Added launch overhead of `tflaunch run` for a trivial script vs running it bare (goal: < 100 ms).

Both are timed from process start to exit, median of N runs, in this one run of the script:
  bare:     python trivial.py
  tflaunch: python -m tflaunch run --source-dir DIR trivial.py   (attached: snapshot, record, agent,
            output streaming, outputs collection, final status; a fresh TFLAUNCH_HOME)
"""
from __future__ import annotations

import argparse
import sys

from _util import env_with, median_of, run_cmd, scratch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    work = scratch("launch")
    src = work / "src"
    src.mkdir()
    (src / "trivial.py").write_text("print('hi')\n")
    env = env_with(TFLAUNCH_HOME=str(work / "home"))
    run_cmd([sys.executable, "-m", "tflaunch", "run", "--source-dir", str(src), "trivial.py"], env)  # warm up
    bare = median_of(lambda: run_cmd([sys.executable, str(src / "trivial.py")], env), args.repeat)
    tfl = median_of(lambda: run_cmd([sys.executable, "-m", "tflaunch", "run", "--source-dir", str(src),
                                     "trivial.py"], env), args.repeat)
    detach = median_of(lambda: run_cmd([sys.executable, "-m", "tflaunch", "run", "--detach", "--source-dir",
                                        str(src), "trivial.py"], env), args.repeat)
    print(f"bare python trivial.py:        {bare * 1000:7.1f} ms (median of {args.repeat})")
    print(f"tflaunch run trivial.py:       {tfl * 1000:7.1f} ms")
    print(f"tflaunch run --detach (return):{detach * 1000:7.1f} ms")
    print(f"added overhead:                {(tfl - bare) * 1000:7.1f} ms  (goal < 100 ms)  ratio {tfl / bare:.2f}x")


if __name__ == "__main__":
    main()
