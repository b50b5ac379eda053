"""Scheduling overhead of a sweep: 50 trials, 4 at a time, vs the same 50 commands through `xargs -P 4` (goal <= 1.2x).

Wall time of the whole command, start to exit, median of N rounds (the variants alternate within a
round), each measurement with a fresh TFLAUNCH_HOME, all in this one run of the script:
  xargs tflaunch run: 50 x `python -m tflaunch run --source-dir DIR trivial.py --x V` (attached: each
                      waits for its run to end), V = 0..49, fed through `xargs -P 4` (the baseline)
  sweep:              `python -m tflaunch sweep --param 'x=choice(0,...,49)' --sampling grid
                      --max-total-runs 50 --max-concurrent-runs 4 --slots 4 ... trivial.py` (attached;
                      --slots 4 so that this machine's CPU count does not cap it), which must end
                      Completed with 50 Completed trials
  xargs bare python:  50 x `python trivial.py --x V` through `xargs -P 4` (for information: what
                      tflaunch itself adds per run)
The trivial script parses --x and logs it as the metric `score` (the sweep's primary metric).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _util import env_with, scratch

TRIALS = 50
CONCURRENT = 4
TRIVIAL = ("import argparse\nfrom tflaunch import Run\n"
           "parser = argparse.ArgumentParser()\nparser.add_argument('--x', type=float, required=True)\n"
           "Run.get_context().log('score', parser.parse_args().x)\n")
NAMES = ("xargs -P 4 tflaunch run", "tflaunch sweep", "xargs -P 4 bare python")


class Failed(Exception):
    pass


def run_timed(argv: list[str], env: dict, stdin: str | None = None) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, input=stdin, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return time.perf_counter() - start, proc


def tflaunch_json(argv: list[str], env: dict) -> object:
    proc = subprocess.run([sys.executable, "-m", "tflaunch", *argv], env=env, text=True, capture_output=True)
    if proc.returncode != 0:
        raise Failed(f"tflaunch {' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


def check_runs(env: dict, what: str) -> None:
    """The 50 runs of the xargs baseline are recorded Completed, each with its score."""
    runs = tflaunch_json(["runs", "list", "--json"], env)
    done = sorted(float((r.get("metrics") or {}).get("score", -1)) for r in runs if r["status"] == "Completed")
    if len(runs) != TRIALS or done != [float(v) for v in range(TRIALS)]:
        counts = {s: sum(1 for r in runs if r["status"] == s) for s in {r["status"] for r in runs}}
        raise Failed(f"{what}: expected {TRIALS} Completed runs with scores 0..{TRIALS - 1}, found {len(runs)} "
                     f"runs {counts}, {len(done)} Completed with a score")


def check_sweep(proc: subprocess.CompletedProcess, env: dict) -> None:
    """The sweep ended Completed with 50 Completed trials, x = 0..49."""
    found = re.findall(r"tflaunch: sweep (\S+) (\w+)", proc.stderr)
    if proc.returncode != 0 or not found:
        raise Failed(f"tflaunch sweep exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-800:]}")
    sweep_id = found[-1][0]
    state = tflaunch_json(["sweep", "show", sweep_id, "--json"], env)
    status = state["status"].get("status")
    trials = state.get("trials", [])
    completed = sorted(t["hyperparameters"].get("x") for t in trials if t["status"] == "Completed")
    if status != "Completed" or len(trials) != TRIALS or completed != list(range(TRIALS)):
        counts = {s: sum(1 for t in trials if t["status"] == s) for s in {t["status"] for t in trials}}
        raise Failed(f"sweep {sweep_id} ended {status} with {len(trials)} trials {counts} (expected Completed "
                     f"with {TRIALS} Completed trials, x = 0..{TRIALS - 1})")


def wait_gone(home: Path, timeout: float = 30.0) -> None:
    """Wait until no process started for ``home`` is left (trial supervisors and the sweep's driver, which
    carry ``--home HOME``, may still be exiting when the command has returned)."""
    mark = str(home).encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        if mark in fh.read():
                            left.append(pid)
                except OSError:
                    pass
        if not left:
            return
        time.sleep(0.05)
    raise Failed(f"processes of {home} still running after {timeout:.0f} s")


def measure(name: str, work: Path, src: Path, base_env: dict, count: int) -> float:
    home = work / f"home-{name.split()[-1]}-{time.monotonic_ns()}"
    env = dict(base_env, TFLAUNCH_HOME=str(home))
    py = sys.executable
    values = "".join(f"{v}\n" for v in range(count))
    xargs = ["xargs", "-P", str(CONCURRENT), "-I{}"]
    try:
        if name == NAMES[0]:
            elapsed, proc = run_timed(xargs + [py, "-m", "tflaunch", "run", "--source-dir", str(src), "trivial.py",
                                               "--x", "{}"], env, values)
        elif name == NAMES[1]:
            choices = ",".join(str(v) for v in range(count))
            elapsed, proc = run_timed(
                [py, "-m", "tflaunch", "sweep", "--param", f"x=choice({choices})", "--sampling", "grid",
                 "--primary-metric", "score", "--goal", "maximize", "--max-total-runs", str(count),
                 "--max-concurrent-runs", str(CONCURRENT), "--slots", str(CONCURRENT), "--source-dir", str(src),
                 "trivial.py"], env)
        else:
            elapsed, proc = run_timed(xargs + [py, str(src / "trivial.py"), "--x", "{}"], env, values)
        wait_gone(home)
        if count == TRIALS:  # not the warm-up
            if name == NAMES[1]:
                check_sweep(proc, env)
            else:
                if name == NAMES[0]:
                    check_runs(env, name)
                if proc.returncode != 0:
                    raise Failed(f"{name}: xargs exited {proc.returncode} (a command failed): "
                                 f"{proc.stderr.strip()[-800:]}")
        return elapsed
    finally:
        shutil.rmtree(home, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = scratch("sweep-overhead")
    try:
        src = work / "src"
        src.mkdir()
        (src / "trivial.py").write_text(TRIVIAL)
        env = env_with()
        env.pop("TFLAUNCH_HOME", None)
        for name in NAMES:  # warm up (page cache, bytecode): 4 trials each
            measure(name, work, src, env, CONCURRENT)
        times: dict[str, list[float]] = {name: [] for name in NAMES}
        for i in range(args.repeat):
            order = NAMES[i % 3:] + NAMES[:i % 3]  # each variant runs first in some round
            for name in order:
                times[name].append(measure(name, work, src, env, TRIALS))
    except Failed as exc:
        print(f"sweep_overhead: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {name: statistics.median(values) for name, values in times.items()}
    base, sweep, bare = med[NAMES[0]], med[NAMES[1]], med[NAMES[2]]
    print(f"{TRIALS} trials of trivial.py, {CONCURRENT} at a time, command start to exit (median of {args.repeat}; "
          f"{os.cpu_count()} CPUs)")
    for name in NAMES:
        runs = ", ".join(f"{v:.2f}" for v in times[name])
        print(f"  {name:26s} {med[name]:6.2f} s   {med[name] / TRIALS * 1000:6.1f} ms per trial   (runs: {runs})")
    verdict = "met" if sweep / base <= 1.2 else "missed"
    print(f"  sweep / xargs tflaunch run = {sweep / base:.2f}x (goal <= 1.2x: {verdict}); the sweep adds "
          f"{(sweep - base) / TRIALS * 1000:.1f} ms per trial")
    print(f"  for information: xargs tflaunch run / xargs bare python = {base / bare:.2f}x, "
          f"tflaunch run adds {(base - bare) / TRIALS * 1000:.1f} ms per trial")
    return 0


if __name__ == "__main__":
    sys.exit(main())
