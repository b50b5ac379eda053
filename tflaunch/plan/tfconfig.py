"""Roles, placement and ``TF_CONFIG`` for native distributed TensorFlow (pure functions).

Roles are TensorFlow's, in lower case: ``chief``, ``worker``, ``ps``, ``evaluator``.

* ``--backend ps`` (:class:`~tflaunch.spec.TensorflowConfiguration`): an optional chief, ``worker_count``
  workers, ``parameter_server_count`` ps tasks and an optional evaluator. Ranks follow that order, so
  rank 0 is the chief (worker 0 when there is no chief).
* ``--backend multiworker`` (:class:`~tflaunch.spec.MultiWorkerConfiguration`): ``node_count`` x
  ``process_count_per_node`` workers, ranks host-major as in the engine (worker *i* is rank *i*;
  worker 0 acts as chief), then an optional evaluator.
* Every other backend: one ``worker`` per rank, host-major, and no ``TF_CONFIG``.

**Placement** (``ps``), as in the reference (``node_count`` nodes with ``worker_count`` workers and
``parameter_server_count`` ps spread over them): the chief, the workers and the evaluator take one slot
each and are dealt round-robin over the ``node_count`` hosts in the order chief, worker 0, worker 1, ...,
evaluator, starting at node 0 and skipping hosts whose slots are full (``--oversubscribe``: no limit). A
parameter server takes no slot: it shares a node with workers, the ps tasks being dealt round-robin from
the last node backwards (ps 0 on the last node, ps 1 on the one before, ...: away from the chief or
worker 0 on node 0). The reference's example (2 nodes, 2 workers, 1 ps) is node 0: worker 0; node 1:
worker 1, ps 0. With one node everything is on it. Every node must get at least one task. The multiworker evaluator goes on the
last node with a free slot.

**TF_CONFIG**: ``{"cluster": {"chief": [...], "worker": [...], "ps": [...]}, "task": {"type": ROLE,
"index": I}, "environment": "cloud"}``, roles with no task left out. The evaluator is never listed in
the cluster; its own ``TF_CONFIG`` names it as the task. Addresses are ``HOST:PORT``; the ports of a
host's cluster tasks come from the engine's reservation (free ports found by the host's agent), or are
``port_base``, ``port_base+1``, ... in rank order on each host.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from .distributions import DISTRIBUTIONS, backend_name
from ..errors import SpecError
from ..spec.hosts import Host

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Mapping, Sequence

    from ..spec import JobSpec

__all__ = ["Task", "TF_BACKENDS", "place", "cluster_tasks", "ports_per_host", "assign_ports",
           "cluster_json", "tf_config", "TF_CONFIG_LIMIT", "describe_roles", "job_hosts", "check_size",
           "backend"]

TF_BACKENDS = tuple(name for name, d in DISTRIBUTIONS.items() if d.tf_config)
# Linux refuses an environment string longer than MAX_ARG_STRLEN (32 pages: 131072 bytes incl. the NUL).
TF_CONFIG_LIMIT = 131072 - len("TF_CONFIG=") - 1


@dataclass(frozen=True)
class Task:
    """One process of a job: its rank, TensorFlow role and index, node (host index) and local rank."""

    rank: int
    role: str
    index: int
    node: int
    local_rank: int


def backend(spec: JobSpec) -> str:
    """The job's backend: ``plain``, ``ps``, ``multiworker`` or ``mpi`` (see :mod:`tflaunch.plan.distributions`)."""
    return backend_name(spec.distributed)


def _roles(spec: JobSpec) -> list[tuple[str, int]]:
    """(role, index) in rank order."""
    dist = spec.distributed or {}
    kind = backend(spec)
    if kind == "ps":
        roles = [("chief", 0)] if dist.get("chief") else []
        roles += [("worker", i) for i in range(int(dist["worker_count"]))]
        roles += [("ps", i) for i in range(int(dist["parameter_server_count"]))]
    else:
        roles = [("worker", i) for i in range(spec.node_count * spec.process_count_per_node)]
    if kind in TF_BACKENDS and dist.get("evaluator"):
        roles.append(("evaluator", 0))
    return roles


def describe_roles(spec: JobSpec) -> str:
    """``"1 chief, 2 workers, 1 ps"``: what the job asks for, for messages."""
    counts: dict[str, int] = {}
    for role, _ in _roles(spec):
        counts[role] = counts.get(role, 0) + 1
    return ", ".join(f"{n} {role}{'s' if n > 1 and role != 'ps' else ''}" for role, n in counts.items())


def _hosts_text(hosts: Sequence[Host]) -> str:
    shown = ", ".join(f"{h.name}:{h.slots}" for h in hosts[:6]) + (", ..." if len(hosts) > 6 else "")
    return f"{len(hosts)} host{'s' if len(hosts) > 1 else ''} ({shown})"


def job_hosts(spec: JobSpec, hosts: Sequence[Host] | None = None) -> list[Host]:
    """The job's ``node_count`` hosts: the first of ``hosts``, by default of its compute target (without
    one, this machine, which takes every process)."""
    if hosts is None:
        if spec.compute_target:
            hosts = [Host(str(name), int(slots)) for name, slots in spec.compute_target["hosts"]]
        else:
            hosts = [Host("localhost", max(1, len(_roles(spec))))]
    if len(hosts) < spec.node_count:
        raise SpecError(f"--nodes {spec.node_count} needs {spec.node_count} hosts, got {len(hosts)}")
    return list(hosts)[:spec.node_count]


def place(spec: JobSpec, hosts: Sequence[Host] | None = None) -> list[Task]:
    """Where every process of ``spec`` runs, in rank order; SpecError when they do not fit.

    ``hosts``: the job's hosts (default: see :func:`job_hosts`).
    """
    hosts = job_hosts(spec, hosts)
    oversubscribe = bool((spec.compute_target or {}).get("oversubscribe"))
    roles = _roles(spec)
    kind = backend(spec)
    nodes = len(hosts)
    placed: list[int] = [0] * len(roles)  # node of each rank
    used = [0] * nodes
    if kind == "ps":
        if nodes > len(roles):
            raise SpecError(f"--nodes {nodes}: the job has only {len(roles)} processes ({describe_roles(spec)}), "
                            "so a node would be idle; use fewer nodes")
        order = sorted(range(len(roles)), key=lambda r: (("chief", "worker", "evaluator", "ps").index(roles[r][0]),
                                                         roles[r][1]))
        slotted = [r for r in order if roles[r][0] != "ps"]
        cursor = 0
        for rank in slotted:  # one slot each, round-robin from the first node
            for step in range(nodes):
                node = (cursor + step) % nodes
                if oversubscribe or used[node] < hosts[node].slots:
                    break
            else:
                raise SpecError(f"{describe_roles(spec)} need {len(slotted)} slots (ps tasks take none) but "
                                f"{_hosts_text(hosts)} have {sum(h.slots for h in hosts)}: use more hosts, fewer "
                                "tasks or --oversubscribe")
            placed[rank] = node
            used[node] += 1
            cursor = node + 1
        for i, rank in enumerate(order[len(slotted):]):  # ps: no slot; round-robin from the last node back
            node = nodes - 1 - i % nodes
            placed[rank] = node
            used[node] += 1
    else:
        ppn = spec.process_count_per_node
        for rank, (role, _) in enumerate(roles):
            if role != "evaluator":
                placed[rank] = rank // ppn
                used[rank // ppn] += 1
                continue
            for node in reversed(range(nodes)):
                if oversubscribe or used[node] < hosts[node].slots:
                    break
            else:
                raise SpecError(f"the evaluator needs a free slot but the workers fill {_hosts_text(hosts)}: "
                                "use fewer --procs-per-node, more hosts or --oversubscribe")
            placed[rank] = node
            used[node] += 1
    local: list[int] = [0] * nodes
    tasks = []
    for rank, (role, index) in enumerate(roles):
        node = placed[rank]
        tasks.append(Task(rank=rank, role=role, index=index, node=node, local_rank=local[node]))
        local[node] += 1
    if kind in TF_BACKENDS:
        port_base = (spec.distributed or {}).get("port_base")
        if port_base is not None:
            top = port_base + max(ports_per_host(tasks, nodes)) - 1
            if top > 65535:
                raise SpecError(f"port_base (--port-base) {port_base}: a host needs ports up to {top}, above 65535")
    return tasks


def cluster_tasks(tasks: Sequence[Task]) -> list[Task]:
    """The tasks listed in the cluster (every one but the evaluator)."""
    return [t for t in tasks if t.role != "evaluator"]


def ports_per_host(tasks: Sequence[Task], nodes: int) -> list[int]:
    """How many ports each node's cluster tasks need."""
    counts = [0] * nodes
    for t in cluster_tasks(tasks):
        counts[t.node] += 1
    return counts


def assign_ports(tasks: Sequence[Task], reserved: Sequence[Sequence[int | str]] | None,
                 port_base: int | None, machines: Sequence[str] | None = None) -> dict[int, int | str]:
    """rank -> port of each cluster task: the node's reserved ports in rank order, or ``port_base``,
    ``port_base+1``, ... counted per machine (``machines[node]``: two host entries that are one machine
    share the numbering); ``"PORT"`` where none is known yet (``--dry-run``)."""
    nxt: dict[int, int] = {}
    per_machine: dict[str, int] = {}
    ports: dict[int, int | str] = {}
    for t in cluster_tasks(tasks):
        k = nxt.get(t.node, 0)
        nxt[t.node] = k + 1
        if port_base is not None:
            machine = machines[t.node] if machines else str(t.node)
            ports[t.rank] = port_base + per_machine.get(machine, 0)
            per_machine[machine] = per_machine.get(machine, 0) + 1
        else:
            mine = reserved[t.node] if reserved is not None and t.node < len(reserved) else ()
            ports[t.rank] = mine[k] if k < len(mine) else "PORT"
    return ports


def cluster_json(tasks: Sequence[Task], addresses: Sequence[str], ports: Mapping[int, int | str]) -> str:
    """The ``cluster`` part of TF_CONFIG, as compact JSON (built once, shared by every process)."""
    cluster: dict[str, list[str]] = {}
    for role in ("chief", "worker", "ps"):
        members = sorted((t for t in tasks if t.role == role), key=lambda t: t.index)
        if members:
            cluster[role] = [f"{addresses[t.node]}:{ports[t.rank]}" for t in members]
    return json.dumps(cluster, separators=(",", ":"))


def tf_config(cluster: str, role: str, index: int) -> str:
    """One process's TF_CONFIG, given the cluster JSON from :func:`cluster_json`."""
    return ('{"cluster":%s,"task":{"type":%s,"index":%d},"environment":"cloud"}'
            % (cluster, json.dumps(role), index))


def check_size(cluster: str, tasks: int) -> None:
    """SpecError when TF_CONFIG would exceed what Linux allows in one environment variable."""
    size = len(tf_config(cluster, "evaluator", tasks))
    if size > TF_CONFIG_LIMIT:
        raise SpecError(f"TF_CONFIG for {tasks} tasks would be {size // 1024} KiB; Linux allows one environment "
                        "variable 128 KiB: run fewer processes (e.g. one worker per host using all its GPUs)")
