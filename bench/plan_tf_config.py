"""Planning a parameter-server job on 1,000 hosts x 8 slots (goal: < 1 s).

Times ``tflaunch.plan.processes.plan`` (placement, ports, the cluster, every process's environment) plus building
all 8,000 TF_CONFIG strings, as the launcher does before starting the processes: 1 chief, 7,989
workers and 10 ps tasks, ports as the agents would report them. Host names are short (``n0001``): with
8,000 tasks TF_CONFIG nears Linux's 128 KiB limit for one environment variable, which tflaunch checks.
Also times ``place`` alone for a multiworker job of the same size. Median of N runs.

    python bench/plan_tf_config.py [--repeat 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import _util  # noqa: F401  (puts the checkout on sys.path)
from tflaunch import MultiWorkerConfiguration, SSHTarget, TensorflowConfiguration
from tflaunch.spec.hosts import Host
from tflaunch.plan.processes import RunContext, plan
from tflaunch.spec import Estimator
from tflaunch.plan.tfconfig import place

HOSTS, SLOTS = 1000, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    names = [f"n{i:04d}:{SLOTS}" for i in range(HOSTS)]
    hosts = [Host(f"n{i:04d}", SLOTS) for i in range(HOSTS)]
    ports = {h.name: list(range(20000, 20000 + SLOTS)) for h in hosts}
    ctx = RunContext(run_id="bench", experiment="bench", run_dir="/r", work_dir="/r/work", home="/h")

    def ps_job() -> float:
        start = time.perf_counter()
        spec = Estimator("/s", entry_script="t.py", compute_target=SSHTarget(names), node_count=HOSTS,
                         distributed_training=TensorflowConfiguration(HOSTS * SLOTS - 11, 10, chief=True)).job_spec()
        procs = plan(spec, ctx, hosts, ports=ports)
        size = sum(len(p.environment()["TF_CONFIG"]) for p in procs)
        elapsed = time.perf_counter() - start
        assert len(procs) == HOSTS * SLOTS and size > 0
        return elapsed

    def mw_place() -> float:
        start = time.perf_counter()
        spec = Estimator("/s", entry_script="t.py", compute_target=SSHTarget(names), node_count=HOSTS,
                         process_count_per_node=SLOTS, distributed_training=MultiWorkerConfiguration()).job_spec()
        place(spec)
        return time.perf_counter() - start

    ps = statistics.median(ps_job() for _ in range(args.repeat))
    mw = statistics.median(mw_place() for _ in range(args.repeat))
    print(f"ps job, {HOSTS} hosts x {SLOTS} slots: spec + plan + 8,000 TF_CONFIG strings: {ps * 1000:.0f} ms "
          f"(goal < 1000 ms: {'met' if ps < 1 else 'MISSED'}; ratio to goal {ps:.2f}x)")
    print(f"multiworker job, same size: spec + placement: {mw * 1000:.0f} ms")


if __name__ == "__main__":
    main()
