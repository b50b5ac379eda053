"""Job environments: the first build of one 5-package environment from a wheelhouse with uv vs pip, and the
cost of resolving an environment that is already built (goal: < 50 ms added to a run).

First build: requests and its four dependencies (idna, urllib3, certifi, charset-normalizer), downloaded
once into a wheelhouse (bench/work/env-house; generated stand-in wheels of similar size when PyPI cannot
be reached), then built offline (--no-index --find-links) into a fresh root every trial, alternating
builders, each through tflaunch.envs.ensure_environment (the builder subprocess, venv, install, freeze,
env.json, rename). "cold": a fresh cache directory per trial (uv's cache, the unpacked bundled pip);
"warm": one cache directory for all trials (the usual case on a machine that has built before).

Reuse: request_environment(python, pip_packages=[5 packages]) + ensure_environment(...) on the built
environment vs the same two calls without packages (request_environment returns None at once), in this
process, median of N, the job's interpreter being .venv's (TensorFlow and ~150 packages installed); and
what importing tflaunch.envs costs a fresh launcher process once.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from _util import REPO, scratch

from tflaunch import envs

PACKAGES = ["requests", "idna", "urllib3", "certifi", "charset-normalizer"]


def wheelhouse() -> tuple[str, str]:
    house = REPO / "bench" / "work" / "env-house"
    if len(list(house.glob("*.whl"))) >= 5:
        return str(house), "PyPI wheels (cached)"
    house.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--isolated", "-q", "--only-binary", ":all:",
                          "-d", str(house), "requests"], env={**env, "PIP_CONFIG_FILE": os.devnull})
    if got.returncode == 0 and len(list(house.glob("*.whl"))) >= 5:
        return str(house), "PyPI wheels"
    sys.path.insert(0, str(REPO))
    from tests.infra.wheels import make_wheel

    for name in PACKAGES:
        make_wheel(house, name, "1.0", files={f"{name.replace('-', '_')}/data{i}.py": os.urandom(4096).hex().encode()
                                              for i in range(20)})
    return str(house), "generated stand-in wheels (PyPI not reachable)"


def first_builds(python: str, house: str, trials: int, cold: bool, work) -> dict[str, list[float]]:
    index = envs.IndexOptions(find_links=[house], no_index=True)
    req = envs.request_environment(python, pip_packages=PACKAGES, index=index, inherit=False,
                                   home=str(work / "home"))
    times: dict[str, list[float]] = {"uv": [], "pip": []}
    shared = work / "cache-warm"
    saved = os.environ.get("XDG_CACHE_HOME")
    try:
        for trial in range(trials + 1):  # trial 0 warms the OS file cache (and the warm caches); not counted
            for builder in ("uv", "pip") if trial % 2 == 0 else ("pip", "uv"):
                root = work / f"root-{builder}-{cold}-{trial}"
                os.environ["XDG_CACHE_HOME"] = str(work / f"cache-{builder}-{trial}" if cold else shared)
                start = time.perf_counter()
                result = envs.ensure_environment(req, str(root), builder=builder)
                elapsed = time.perf_counter() - start
                assert result.built and result.builder == builder and len(result.freeze) == 5, result
                if trial:
                    times[builder].append(elapsed)
    finally:
        if saved is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = saved
    return times


def reuse(python: str, house: str, repeat: int, work) -> tuple[float, float]:
    home = work / "home-reuse"
    root = str(home / "envs")
    index = envs.IndexOptions(find_links=[house], no_index=True)
    req = envs.request_environment(python, pip_packages=PACKAGES, index=index, home=str(home))
    envs.ensure_environment(req, root)

    def with_env() -> float:
        start = time.perf_counter()
        r = envs.request_environment(python, pip_packages=PACKAGES, index=index, home=str(home))
        res = envs.ensure_environment(r, root)
        assert not res.built
        return time.perf_counter() - start

    def without() -> float:
        start = time.perf_counter()
        assert envs.request_environment(python, pip_packages=(), index=index, home=str(home)) is None
        return time.perf_counter() - start

    with_env(), without()
    a = statistics.median(with_env() for _ in range(repeat))
    b = statistics.median(without() for _ in range(repeat))
    return a, b


def import_cost(repeat: int) -> float:
    """What a fresh launcher process pays once to import tflaunch.envs (and _envbuild) after what a run
    imports anyway (tflaunch.submit), timed inside that process (median of fresh processes)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "tflaunch")], check=True, env=env)
    code = ("import time, tflaunch.submit\nt = time.perf_counter()\nimport tflaunch.envs\n"
            "print(time.perf_counter() - t)")
    return statistics.median(float(subprocess.run([sys.executable, "-c", code], check=True, env=env,
                                                  capture_output=True, text=True).stdout) for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=51)
    parser.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"),
                        help="the job's interpreter (default .venv's)")
    args = parser.parse_args()
    if envs.find_uv() is None:
        sys.exit("uv is not installed: pip install uv (the dev extra has it)")
    work = scratch("env-build")
    house, what = wheelhouse()
    print(f"wheelhouse: {house} ({what}): {', '.join(sorted(os.listdir(house)))}")
    for cold in (True, False):
        times = first_builds(args.python, house, args.trials, cold, work)
        uv, pip = statistics.median(times["uv"]), statistics.median(times["pip"])
        label = "cold caches" if cold else "warm caches"
        print(f"first build, {label}: uv {uv * 1000:7.0f} ms, pip {pip * 1000:7.0f} ms (medians of {args.trials}; "
              f"uv {min(times['uv']) * 1000:.0f}-{max(times['uv']) * 1000:.0f}, "
              f"pip {min(times['pip']) * 1000:.0f}-{max(times['pip']) * 1000:.0f})  pip/uv = {pip / uv:.1f}x")
    with_env, without = reuse(args.python, house, args.repeat, work)
    print(f"resolve a built environment: {with_env * 1000:6.2f} ms; without packages: {without * 1000:6.3f} ms; "
          f"added {(with_env - without) * 1000:.2f} ms (goal < 50 ms; median of {args.repeat})")
    print(f"importing tflaunch.envs in a fresh launcher after tflaunch.submit (once per process): "
          f"{import_cost(21) * 1000:.1f} ms (median of 21)")


if __name__ == "__main__":
    main()
