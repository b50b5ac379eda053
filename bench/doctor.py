"""`tflaunch doctor` over real ssh hosts vs the least any check can cost: one `ssh HOST true` per host, in parallel.

Hosts: h1, h2, h3, sshd in network namespaces (tests/infra/hosts.py, as the tests start them; needs root).
Variants, alternating, median of --repeat trials each, all in this one run:
  baseline            `ssh -F CFG hN true` for every host at once, until the last one returns
  doctor (in-process) tflaunch.doctor.check_hosts(...): the agents' start, their reports, the round trip
  doctor (command)    `python -m tflaunch doctor --hosts h1,h2,h3`: the same plus interpreter start-up,
                      imports, the table
Each doctor check starts the agent over ssh exactly as a run does and has it run the job's interpreter once
(package metadata of tensorflow/keras/horovod/mpi4py), `mpirun --version` and `nvidia-smi -L`.

Also: the agent's start-up when no report is asked for (payload written -> hello read, a local agent), with
tflaunch/agent.py as it is vs the same source without host_report (it must not have become slower).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

from _util import REPO, env_with


def parallel_ssh(config: str, names: list[str]) -> float:
    start = time.perf_counter()
    procs = [subprocess.Popen(["ssh", "-F", config, name, "true"], stdin=subprocess.DEVNULL) for name in names]
    if any(p.wait() != 0 for p in procs):
        raise RuntimeError("ssh HOST true failed")
    return time.perf_counter() - start


def in_process(config: str, names: list[str]) -> float:
    from tflaunch import doctor
    from tflaunch.launch.ssh import SshOptions

    start = time.perf_counter()
    request = doctor.report_request(sys.executable, mpirun="mpirun", gpus=True)
    checks = doctor.check_hosts(names, request, python=sys.executable, ssh=SshOptions(config=config))
    took = time.perf_counter() - start
    if any(c.result["failure"] for c in checks):
        raise RuntimeError([c.result["error"] for c in checks])
    return took


def command(config: str, names: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tflaunch", "doctor", "--hosts", ",".join(names), "--ssh-config", config],
                   env=env, check=True, stdout=subprocess.DEVNULL, cwd="/")
    return time.perf_counter() - start


def agent_startup(repeat: int) -> None:
    import json

    from tflaunch.launch import BOOTSTRAP, _framed

    source = (REPO / "tflaunch" / "agent.py").read_text()
    start = source.find("\ndef host_report(")
    end = source.find("\ndef ", start + 1)
    call = '**({"report": host_report(spec["report"])} if "report" in spec else {})'
    if start < 0 or end < 0 or call not in source:
        print("agent start-up: skipped (host_report not found as expected)")
        return
    without = source[:start] + source[end:].replace(call, "**{}")
    setup = _framed(json.dumps({"token": "bench"}).encode())

    def once(text: str) -> tuple[float, float]:
        """(wall seconds from the payload written to the hello read, CPU seconds of the agent process)."""
        p = subprocess.Popen([sys.executable, "-I", "-S", "-c", BOOTSTRAP], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
        t = time.perf_counter()
        p.stdin.write(_framed(text.encode()) + setup)
        p.stdin.flush()
        line = p.stdout.readline()
        took = time.perf_counter() - t
        p.stdin.close()
        _, _, usage = os.wait4(p.pid, 0)
        p.returncode = 0
        if b'"hello"' not in line:
            raise RuntimeError(line)
        return took, usage.ru_utime + usage.ru_stime

    names = ("agent.py without host_report", "agent.py (with host_report)")
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeat):  # alternating, so that load on the machine hits both alike
        for name, text in zip(names, (without, source)):
            w, c = once(text)
            wall[name].append(w)
            cpu[name].append(c)
    print(f"local agent start-up, no report asked (median of {repeat}; CPU: the agent process's user+sys, "
          "interpreter start included)")
    for name in names:
        ratio = "" if name == names[0] else (
            f"   ratio wall {statistics.median(wall[name]) / statistics.median(wall[names[0]]):.2f}x, "
            f"CPU {statistics.median(cpu[name]) / statistics.median(cpu[names[0]]):.2f}x")
        print(f"  {name:42s} wall {statistics.median(wall[name]) * 1000:6.1f} ms, "
              f"CPU {statistics.median(cpu[name]) * 1000:6.1f} ms{ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=11)
    args = parser.parse_args()
    agent_startup(max(args.repeat, 41))
    from tests.infra.hosts import missing_requirements, start_netns

    reason = missing_requirements(netns=True)
    if reason:
        print(f"doctor: skipped ({reason})")
        return
    workdir = f"/var/tmp/tflaunch-bench-doctor-{os.getpid()}"
    hosts = start_netns(workdir, names=("h1", "h2", "h3"))
    env = env_with(TFLAUNCH_HOME=os.path.join(workdir, "home"))
    try:
        names = list(hosts.names)
        variants = {"baseline: ssh HOST true x3 (parallel)": lambda: parallel_ssh(hosts.config, names),
                    "doctor, in-process (check_hosts)": lambda: in_process(hosts.config, names),
                    "tflaunch doctor --hosts h1,h2,h3": lambda: command(hosts.config, names, env)}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for fn in variants.values():  # warm up: page cache, bytecode, the hosts' first logins
            fn()
        for _ in range(args.repeat):
            for name, fn in variants.items():
                times[name].append(fn())
        medians = {name: statistics.median(values) for name, values in times.items()}
        base = next(iter(medians.values()))
        print(f"3 ssh hosts (netns), median of {args.repeat}, {os.cpu_count()} cores, "
              f"{'ssh ' + subprocess.run(['ssh', '-V'], capture_output=True, text=True).stderr.strip()}")
        for name, value in medians.items():
            ratio = "" if value is base else f"   ratio to the baseline {value / base:.2f}x"
            print(f"  {name:42s} {value * 1000:7.1f} ms{ratio}")
    finally:
        hosts.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
