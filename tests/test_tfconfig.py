"""Native TensorFlow jobs, planned: roles, placement over hosts, ports, TF_CONFIG, GPUs per process."""
from __future__ import annotations

import json
import random

import pytest

from tflaunch import Estimator, MultiWorkerConfiguration, SpecError, SSHTarget, TensorflowConfiguration
from tflaunch.plan.gpus import host_gpus, split
from tflaunch.spec.hosts import Host
from tflaunch.plan.processes import RunContext, plan, ports_needed
from tflaunch.plan.tfconfig import TF_CONFIG_LIMIT, place

CTX = RunContext(run_id="20261123-000000-000-00000000", experiment="e", run_dir="/r", work_dir="/r/work", home="/h")


def _spec(hosts=None, nodes=1, ppn=1, dist=None, **kwargs):
    target = SSHTarget(hosts, **kwargs.pop("target", {})) if hosts else "local"
    return Estimator("/s", entry_script="t.py", compute_target=target, node_count=nodes, process_count_per_node=ppn,
                     distributed_training=dist, **kwargs).job_spec()


def _ports(spec, hosts):
    """Distinct fake reserved ports, as the agents would report them."""
    counter = iter(range(30000, 40000))
    return {name: [next(counter) for _ in range(n)] for name, n in ports_needed(spec, hosts).items()}


def _configs(procs):
    return [json.loads(p.environment()["TF_CONFIG"]) for p in procs]


def test_ps_tf_config_has_the_reference_shape():
    spec = _spec(dist=TensorflowConfiguration(worker_count=2, parameter_server_count=1, chief=True))
    hosts = [Host("localhost", 4)]
    procs = plan(spec, CTX, hosts, ports=_ports(spec, hosts), addresses={"localhost": "node0"})
    assert [(p.rank, p.role, p.index) for p in procs] == [(0, "chief", 0), (1, "worker", 0), (2, "worker", 1), (3, "ps", 0)]
    configs = _configs(procs)
    cluster = configs[0]["cluster"]
    assert list(cluster) == ["chief", "worker", "ps"]
    assert [len(cluster[r]) for r in cluster] == [1, 2, 1]
    addresses = cluster["chief"] + cluster["worker"] + cluster["ps"]
    assert len(set(addresses)) == 4 and all(a.startswith("node0:3") for a in addresses)
    for p, config in zip(procs, configs):
        assert config == {"cluster": cluster, "task": {"type": p.role, "index": p.index}, "environment": "cloud"}
        assert f"node0:{p.port}" in addresses
        assert p.env["GRPC_FAIL_FAST"] == "use_caller"
        assert p.label == f"[{p.role} {p.index}] "


def test_reference_defaults_without_chief_worker_0_is_rank_0():
    spec = _spec(dist=TensorflowConfiguration())  # worker_count=1, parameter_server_count=1
    procs = plan(spec, CTX)
    assert [(p.role, p.index) for p in procs] == [("worker", 0), ("ps", 0)]
    assert set(_configs(procs)[0]["cluster"]) == {"worker", "ps"}  # no chief listed


def test_evaluator_names_itself_but_is_never_in_the_cluster():
    spec = _spec(dist=TensorflowConfiguration(2, 1, chief=True, evaluator=True))
    procs = plan(spec, CTX)
    evaluator = procs[-1]
    assert (evaluator.role, evaluator.rank, evaluator.port) == ("evaluator", 4, None)
    configs = _configs(procs)
    assert configs[-1]["task"] == {"type": "evaluator", "index": 0}
    assert all("evaluator" not in c["cluster"] for c in configs)
    assert sum(len(v) for v in configs[0]["cluster"].values()) == 4


def test_multiworker_lists_only_workers_host_major():
    spec = _spec(["a:2", "b:2"], nodes=2, ppn=2, dist=MultiWorkerConfiguration())
    hosts = [Host("a", 2), Host("b", 2)]
    procs = plan(spec, CTX, hosts, ports=_ports(spec, hosts))
    assert [(p.host, p.role, p.index, p.rank) for p in procs] == [
        ("a", "worker", 0, 0), ("a", "worker", 1, 1), ("b", "worker", 2, 2), ("b", "worker", 3, 3)]
    configs = _configs(procs)
    assert list(configs[0]["cluster"]) == ["worker"]
    assert [w.split(":")[0] for w in configs[0]["cluster"]["worker"]] == ["a", "a", "b", "b"]
    assert "GRPC_FAIL_FAST" not in procs[0].env


def test_ps_placement_spreads_chief_and_ps_over_nodes():
    spec = _spec(["n0:4", "n1:4"], nodes=2, dist=TensorflowConfiguration(4, 2, chief=True))
    tasks = place(spec)
    where = {(t.role, t.index): t.node for t in tasks}
    assert where[("chief", 0)] == 0 and where[("ps", 0)] == 1 and where[("ps", 1)] == 0
    assert sorted(where.values()).count(0) == 4 and sorted(where.values()).count(1) == 3
    # local ranks count up per node in rank order
    for node in (0, 1):
        mine = [t for t in tasks if t.node == node]
        assert [t.local_rank for t in mine] == list(range(len(mine)))


def test_ps_placement_respects_uneven_slots_and_is_deterministic():
    spec = _spec(["big:6", "small:1", "mid:2"], nodes=3, dist=TensorflowConfiguration(5, 3, chief=True))
    tasks = place(spec)
    counts = [sum(t.node == n and t.role != "ps" for t in tasks) for n in range(3)]
    assert counts == [3, 1, 2]  # chief, workers: one slot each, round-robin, full hosts skipped
    assert [t.node for t in tasks if t.role == "ps"] == [2, 1, 0]  # ps take no slot, from the last node back
    assert place(spec) == tasks


def test_reference_ps_example_fits_two_single_slot_hosts():
    """node_count=2, worker_count=2, parameter_server_count=1 on two hosts of one slot each (the
    reference's example): a ps shares a node with a worker instead of needing a slot of its own."""
    spec = _spec(["h1", "h2"], nodes=2, dist=TensorflowConfiguration(worker_count=2, parameter_server_count=1))
    where = [(t.role, t.index, t.node, t.local_rank) for t in place(spec)]
    assert where == [("worker", 0, 0, 0), ("worker", 1, 1, 0), ("ps", 0, 1, 1)]


@pytest.mark.parametrize("hosts,nodes,dist,fragment", [
    (["a:1", "b:1"], 2, TensorflowConfiguration(3, 1, chief=True),
     "1 chief, 3 workers, 1 ps need 4 slots (ps tasks take none) but 2 hosts (a:1, b:1) have 2"),
    (["a:4", "b:4", "c:4"], 3, TensorflowConfiguration(1, 1), "--nodes 3: the job has only 2 processes"),
    (["a:2"], 1, MultiWorkerConfiguration(evaluator=True), "the evaluator needs a free slot"),
])
def test_jobs_that_do_not_fit_are_refused(hosts, nodes, dist, fragment):
    ppn = 2 if isinstance(dist, MultiWorkerConfiguration) else 1
    with pytest.raises(SpecError) as info:
        _spec(hosts, nodes=nodes, ppn=ppn, dist=dist)
    assert fragment in str(info.value)


def test_oversubscribe_lets_tasks_exceed_slots():
    spec = _spec(["a:1", "b:1"], nodes=2, dist=TensorflowConfiguration(3, 1, chief=True),
                 target={"oversubscribe": True})
    assert [sum(t.node == n for t in place(spec)) for n in (0, 1)] == [2, 3]


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(worker_count=0), "worker_count (--workers): must be an integer >= 1, got 0"),
    (dict(worker_count=-1), "worker_count (--workers): must be an integer >= 1"),
    (dict(parameter_server_count=-2), "parameter_server_count (--ps): must be an integer >= 0"),
    (dict(port_base=70000), "port_base (--port-base): must be a port number"),
    (dict(evaluator_grace=-1), "evaluator_grace (--evaluator-grace): must be a number of seconds >= 0"),
    (dict(chief="yes"), "chief (--chief): must be True or False"),
])
def test_bad_counts_are_clear_errors(kwargs, fragment):
    with pytest.raises(SpecError) as info:
        TensorflowConfiguration(**kwargs)
    assert fragment in str(info.value)


def test_port_base_gives_fixed_ports_per_host_and_needs_no_reservation():
    spec = _spec(["a:4", "b:4"], nodes=2, dist=TensorflowConfiguration(3, 1, chief=True, port_base=2222))
    hosts = [Host("a", 4), Host("b", 4)]
    assert ports_needed(spec, hosts) == {}
    procs = plan(spec, CTX, hosts)
    assert sorted((p.host, p.port) for p in procs) == [("a", 2222), ("a", 2223), ("b", 2222), ("b", 2223), ("b", 2224)]
    with pytest.raises(SpecError, match="needs ports up to 65536"):
        _spec(["a:4"], dist=TensorflowConfiguration(1, 1, port_base=65535))


def test_ports_are_reserved_per_host_for_each_cluster_task():
    spec = _spec(["a:4", "b:4"], nodes=2, dist=TensorflowConfiguration(3, 2, chief=True, evaluator=True))
    hosts = [Host("a", 4), Host("b", 4)]
    needed = ports_needed(spec, hosts)
    assert sum(needed.values()) == 6  # every task but the evaluator
    procs = plan(spec, CTX, hosts, ports=_ports(spec, hosts))
    assert len({(p.host, p.port) for p in procs if p.role != "evaluator"}) == 6
    # dry run: ports not known yet
    assert "a:PORT" in plan(spec, CTX, hosts)[0].environment()["TF_CONFIG"]


def test_tf_config_over_the_linux_limit_is_refused():
    names = [f"host-with-a-rather-long-name-{i:04d}.cluster.example.org:8" for i in range(1000)]
    with pytest.raises(SpecError, match="Linux allows one environment variable 128 KiB"):
        plan(_spec(names, nodes=1000, ppn=8, dist=MultiWorkerConfiguration()), CTX)
    assert TF_CONFIG_LIMIT < 131072


def test_plan_for_1000_hosts_x_8_slots_shares_the_cluster():  # its speed: bench/plan_tf_config.py
    names = [f"n{i:04d}:8" for i in range(1000)]
    spec = _spec(names, nodes=1000, dist=TensorflowConfiguration(7989, 10, chief=True))
    hosts = [Host(f"n{i:04d}", 8) for i in range(1000)]
    ports = {h.name: list(range(20000, 20008)) for h in hosts}
    procs = plan(spec, CTX, hosts, ports=ports)
    assert len(procs) == 8000 and len({p.tf_cluster for p in procs}) == 1
    assert len({id(p.tf_cluster) for p in procs}) == 1  # one string, not 8,000 copies
    sample = random.Random(0).sample(procs, 20)
    for p in sample:
        config = json.loads(p.environment()["TF_CONFIG"])
        assert config["task"] == {"type": p.role, "index": p.index}
        assert len(config["cluster"]["worker"]) == 7989 and len(config["cluster"]["ps"]) == 10


def test_user_tf_config_wins():
    spec = _spec(dist=TensorflowConfiguration(1, 1), environment_variables={"TF_CONFIG": "{}"})
    assert all(p.environment()["TF_CONFIG"] == "{}" for p in plan(spec, CTX))


# -- GPUs -------------------------------------------------------------------------------------------

def test_host_gpus_preference_and_never_widening():
    assert host_gpus("a", {"visible": None, "found": ["0", "1", "2", "3"]}, None) == ["0", "1", "2", "3"]
    assert host_gpus("a", {"visible": "2,3", "found": None}, None) == ["2", "3"]  # Slurm gave us 2 and 3
    assert host_gpus("a", {"visible": "GPU-aa,GPU-bb", "found": None}, 1) == ["GPU-aa"]
    assert host_gpus("a", {}, 2) == ["0", "1"]
    with pytest.raises(SpecError, match="never widens"):
        host_gpus("a", {"visible": "2,3"}, 4)
    with pytest.raises(SpecError, match="no GPU found on host a .nvidia-smi: No such file"):
        host_gpus("a", {"visible": None, "found": None, "error": "nvidia-smi: No such file or directory"}, None)
    with pytest.raises(SpecError, match="hides every GPU"):
        host_gpus("a", {"visible": "", "found": None}, None)  # CUDA_VISIBLE_DEVICES="" means none


def test_split_gives_equal_contiguous_shares_and_none_to_ps():
    assert split("a", list("01234567"), ["worker"] * 8) == list("01234567")
    assert split("a", list("01234567"), ["worker"] * 2) == ["0,1,2,3", "4,5,6,7"]
    assert split("a", list("01234567"), ["worker"] * 3) == ["0,1", "2,3", "4,5"]
    assert split("a", ["0", "1"], ["chief", "ps", "worker"]) == ["0", "", "1"]
    with pytest.raises(SpecError, match="host a has 2 GPUs .0,1. for 3 processes .*--gpus-shared"):
        split("a", ["0", "1"], ["worker"] * 3)
    assert split("a", ["0", "1"], ["worker"] * 3, shared=True) == ["0", "1", "0"]


def test_plan_splits_each_hosts_gpus_over_its_processes():
    spec = _spec(["a:4", "b:4"], nodes=2, dist=TensorflowConfiguration(4, 2, chief=True), use_gpu=True)
    hosts = [Host("a", 4), Host("b", 4)]
    procs = plan(spec, CTX, hosts, gpus={"a": ["0", "1", "2", "3"], "b": ["4", "5", "6", "7"]})
    devices = {(p.role, p.index): p.env["CUDA_VISIBLE_DEVICES"] for p in procs}
    assert devices[("ps", 0)] == "" and devices[("ps", 1)] == ""
    used = [d for d in devices.values() if d]
    assert len(used) == 5 and len(set(",".join(used).split(","))) == len(",".join(used).split(","))
    cpu = _spec(dist=TensorflowConfiguration(2, 1))
    assert {p.env["CUDA_VISIBLE_DEVICES"] for p in plan(cpu, CTX)} == {""}
