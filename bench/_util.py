"""Small helpers shared by the benchmark scripts (timing, medians, a scratch directory)."""
from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def scratch(name: str, base: str | None = None) -> Path:
    """A fresh directory under ``base`` (default bench/work, the checkout's filesystem)."""
    path = (Path(base) / "tflaunch-bench" if base else REPO / "bench" / "work") / name
    subprocess.run(["rm", "-rf", str(path)], check=True)
    path.mkdir(parents=True)
    return path


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_cmd(argv: Sequence[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(list(argv), env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def median_of(fn: Callable[[], float], repeat: int) -> float:
    return statistics.median(fn() for _ in range(repeat))


def env_with(**extra: str) -> dict:
    """Environment for timed tflaunch processes: the checkout on the path, bytecode caching on (as in
    an installed package; some shells set PYTHONDONTWRITEBYTECODE, which recompiles tflaunch each time)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "tflaunch")], check=True, env=env)
    return env


def sync() -> None:
    subprocess.run(["sync"], check=False)


@contextlib.contextmanager
def netns_hosts(enabled: bool = True) -> Iterator[Any]:
    """Two real ssh hosts h1, h2 (sshd in network namespaces, tests/infra/hosts.py), or None when
    ``enabled`` is false or this machine cannot run them (the reason is printed)."""
    if not enabled:
        yield None
        return
    from tests.infra.hosts import missing_requirements, start_netns
    reason = missing_requirements(netns=True)
    if reason:
        print(f"ssh: skipped ({reason})")
        yield None
        return
    workdir = f"/var/tmp/tflaunch-bench-{os.getpid()}"
    hosts = start_netns(workdir, names=("h1", "h2"))
    try:
        yield hosts
    finally:
        hosts.stop()
        shutil.rmtree(workdir, ignore_errors=True)
