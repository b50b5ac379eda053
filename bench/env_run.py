"""What a job environment that is already built adds to a run: `tflaunch run --pip ...` vs the same run
without packages (goal: < 50 ms added).

Both are `python -m tflaunch run --source-dir DIR trivial.py`, timed from process start to exit, in one
fresh TFLAUNCH_HOME; the environment (two small wheels from a wheelhouse made here, --no-index) is built
once before timing. The two variants alternate trial by trial, so load on the machine hits both alike;
the result is the median of the per-pair differences (and the ratio of the medians).
"""
from __future__ import annotations

import argparse
import statistics
import sys

from _util import REPO, env_with, run_cmd, scratch

sys.path.insert(0, str(REPO))
from tests.infra.wheels import make_wheel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    work = scratch("env_run")
    src = work / "src"
    src.mkdir()
    (src / "trivial.py").write_text("print('hi')\n")
    house = work / "wheels"
    make_wheel(house, "tfl-alpha", "1.0")
    make_wheel(house, "tfl-beta", "2.0", requires=["tfl-alpha>=1"])
    env = env_with(TFLAUNCH_HOME=str(work / "home"))
    plain = [sys.executable, "-m", "tflaunch", "run", "--source-dir", str(src), "trivial.py"]
    with_env = [sys.executable, "-m", "tflaunch", "run", "--source-dir", str(src), "--pip", "tfl-beta",
                "--no-index", "--find-links", str(house), "trivial.py"]
    run_cmd(with_env, env)  # builds the environment
    run_cmd(plain, env)  # warm caches
    pairs = []
    for i in range(args.repeat):
        order = (plain, with_env) if i % 2 == 0 else (with_env, plain)
        times = {id(cmd): run_cmd(cmd, env) for cmd in order}
        pairs.append((times[id(plain)], times[id(with_env)]))
    a = statistics.median(p for p, _ in pairs)
    b = statistics.median(e for _, e in pairs)
    added = statistics.median(e - p for p, e in pairs)
    print(f"run without packages:            {a * 1000:7.1f} ms (median of {args.repeat})")
    print(f"run with a built environment:    {b * 1000:7.1f} ms")
    print(f"added (median of paired diffs):  {added * 1000:7.1f} ms  (goal < 50 ms)  ratio of medians {b / a:.3f}x")


if __name__ == "__main__":
    main()
