"""Pure planning: job spec + where the run lives + hosts -> the processes to start.

Nothing here touches the filesystem, the network or a process; the same inputs give the same plan,
which is what ``run --dry-run`` prints and what the launcher executes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .distributions import distribution
from ..errors import SpecError
from .gpus import NO_GPU_ROLES, split
from ..spec.hosts import Host, is_local
from ..spec import JobSpec
from ..history.store import rank_log
from .tfconfig import Task, assign_ports, check_size, cluster_json, job_hosts, place, ports_per_host, tf_config

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Mapping, Sequence

__all__ = ["Host", "RunContext", "ProcessPlan", "plan", "ports_needed", "machine_ids", "COORDINATOR_VAR"]

COORDINATOR_VAR = "TFLAUNCH_COORDINATOR"
ENV_PYTHON = "ENV_PYTHON"  # argv[0] before the job's environment is known on a host (--dry-run)



@dataclass(frozen=True)
class RunContext:
    """Where a run lives: its id, record directory, the process working directory, the home."""

    run_id: str
    experiment: str
    run_dir: str
    work_dir: str
    home: str
    pythonpath: str | None = None  # tflaunch for the script's imports (see tflaunch.pythonpath)
    attempt: int = 1  # which attempt of the run this is (restarts, requeues): TFLAUNCH_ATTEMPT


@dataclass
class ProcessPlan:
    """One process: where and how it starts, and the environment tflaunch adds to the inherited one.

    ``role``/``index`` are its TensorFlow task (``worker``/rank for backends without TF_CONFIG);
    ``port`` is its cluster port. Its ``TF_CONFIG`` is built on demand from ``tf_cluster``, the cluster
    JSON shared by every process of the plan (a 1,000-host plan holds it once, not once per process).
    """

    host: str
    rank: int
    local_rank: int
    world_size: int
    role: str
    index: int
    argv: list[str]
    cwd: str
    env: dict[str, str] = field(default_factory=dict)
    stdout: str = ""
    stderr: str = ""
    port: int | str | None = None
    tf_cluster: str = ""

    @property
    def tf_config(self) -> str | None:
        return tf_config(self.tf_cluster, self.role, self.index) if self.tf_cluster else None

    def environment(self) -> dict[str, str]:
        """Every variable tflaunch adds, TF_CONFIG included (the user's own ``--env`` values win)."""
        config = self.tf_config
        if config is None or "TF_CONFIG" in self.env:
            return self.env
        return {"TF_CONFIG": config, **self.env}

    @property
    def label(self) -> str:
        """How console lines of this process are prefixed: ``[rank 3] ``, or ``[ps 0] `` with TF_CONFIG."""
        return f"[{self.role} {self.index}] " if self.tf_cluster else f"[rank {self.rank}] "

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["tf_cluster"]
        data["env"] = self.environment()
        return data


def ports_needed(spec: JobSpec, hosts: Sequence[Host]) -> dict[str, int]:
    """How many free ports each host must reserve before the processes start.

    Native TensorFlow jobs need one per cluster task (none with ``port_base``); other jobs of several
    processes get one on the first host, handed to every process as ``TFLAUNCH_COORDINATOR=host:port``
    (for a rendezvous the script sets up itself). MPI jobs rendezvous through mpirun: none.
    """
    hosts = job_hosts(spec, hosts)
    kind = distribution(spec.distributed)
    if not kind.rendezvous_ports:
        return {}
    if kind.tf_config:
        if (spec.distributed or {}).get("port_base") is not None:
            return {}
        counts = ports_per_host(place(spec, hosts), spec.node_count)
        return {hosts[node].name: n for node, n in enumerate(counts) if n}
    return {hosts[0].name: 1} if spec.world_size > 1 else {}


def machine_ids(hosts: Sequence[Host], hostnames: Mapping[str, str] | None = None) -> dict[str, str]:
    """Which host entries are one machine: host name -> an id shared by entries of the same machine
    (``hostnames``: what each host's agent reported; without it, every local name is this machine)."""
    hostnames = hostnames or {}
    return {h.name: hostnames.get(h.name) or ("this machine" if is_local(h.name) else h.name) for h in hosts}


def plan(spec: JobSpec, ctx: RunContext, hosts: Sequence[Host] | None = None, *,
         work_dirs: Mapping[str, str] | None = None, ports: Mapping[str, Sequence[int]] | None = None,
         addresses: Mapping[str, str] | None = None, gpus: Mapping[str, Sequence[str]] | None = None,
         machines: Mapping[str, str] | None = None, pythons: Mapping[str, str] | None = None,
         data_paths: Mapping[str, Mapping[str, str]] | None = None) -> list[ProcessPlan]:
    """Processes for ``spec`` on the first ``node_count`` of ``hosts`` (default: its compute target's),
    in rank order.

    Ranks are host-major (rank = node index x processes per node + local rank) except for
    parameter-server jobs, whose tasks are spread over the hosts (see :mod:`tflaunch.plan.tfconfig`).
    ``work_dirs`` gives a host's working directory when it is not ``ctx.work_dir`` (hosts without a
    shared filesystem get a copy), ``ports`` what each host reserved (see :func:`ports_needed`;
    shown as ``PORT`` when unknown, as in ``--dry-run``), ``addresses`` how other hosts reach a host
    when not by its name, ``gpus`` the GPUs each host offers a ``use_gpu`` job (see
    :mod:`tflaunch.plan.gpus`; ``CUDA_VISIBLE_DEVICES`` shows ``GPUS`` for a host not in it), ``machines``
    which host entries are the same machine (:func:`machine_ids`): they split that machine's GPUs and
    its ``port_base`` numbering between them, ``pythons`` a host's interpreter when it is not
    ``spec.python`` (the job's environment, built on each host), ``data_paths`` where each host has the
    job's data inputs (``{data:NAME}`` in the arguments becomes that path; default: the input's own path,
    ``DATA`` for a download whose place is not known yet).
    """
    hosts = job_hosts(spec, hosts)
    tasks = place(spec, hosts)
    world = len(tasks)
    work_dirs = work_dirs or {}
    addresses = addresses or {}
    machines = machines or machine_ids(hosts)
    kind = distribution(spec.distributed)
    common = {
        "PYTHONUNBUFFERED": "1",
        "TFLAUNCH_RUN_ID": ctx.run_id,
        "TFLAUNCH_RUN_DIR": ctx.run_dir,
        "TFLAUNCH_HOME": ctx.home,
        "TFLAUNCH_EXPERIMENT": ctx.experiment,
        "TFLAUNCH_WORLD_SIZE": str(world),
        "TFLAUNCH_ATTEMPT": str(ctx.attempt),
    }
    if ctx.pythonpath:
        common["TFLAUNCH_PYTHONPATH"] = ctx.pythonpath
    if (spec.recovery or {}).get("hang_timeout"):  # the hang watchdog may ask for stacks (tflaunch.remote.stacks)
        common["TFLAUNCH_STACKS_SIGNAL"] = "SIGURG"  # (STACKS_VAR, STACKS_SIGNAL there)
    cluster = ""
    task_ports: dict[int, int | str] = {}
    if kind.tf_config:
        reserved = [(ports or {}).get(h.name) or [] for h in hosts]
        task_ports = assign_ports(tasks, reserved, (spec.distributed or {}).get("port_base"),
                                  [machines[h.name] for h in hosts])
        too_high = [p for p in task_ports.values() if isinstance(p, int) and p > 65535]
        if too_high:
            raise SpecError(f"port_base (--port-base): a machine needs ports up to {max(too_high)}, above 65535")
        cluster = cluster_json(tasks, [addresses.get(h.name, h.name) for h in hosts], task_ports)
        check_size(cluster, world)
    else:
        for name, count in ports_needed(spec, hosts).items():
            reserved = (ports or {}).get(name) or []
            port = str(reserved[0]) if reserved else "PORT"
            common[COORDINATOR_VAR] = f"{addresses.get(name, name)}:{port}"
    common.update(kind.env)
    if not spec.use_gpu:
        common["CUDA_VISIBLE_DEVICES"] = ""
    devices: dict[int, str] = {}
    if spec.use_gpu and kind.gpu_split:  # else (MPI, Horovod): every rank sees its host's GPUs, picks by local rank
        # per machine: two host entries of one machine share its GPUs
        by_machine: dict[str, list[Task]] = {}
        for t in tasks:
            by_machine.setdefault(machines[hosts[t.node].name], []).append(t)
        for mine in by_machine.values():
            name = hosts[mine[0].node].name
            if gpus is None or name not in gpus:
                for t in mine:
                    devices[t.rank] = "" if t.role in NO_GPU_ROLES else "GPUS"
                continue
            for t, value in zip(mine, split(name, gpus[name], [t.role for t in mine], spec.gpus_shared)):
                devices[t.rank] = value
    pythons = pythons or {}
    argvs: dict[str, list[str]] = {}
    inputs_env: dict[str, str] = {}
    for h in hosts:
        if h.name in argvs:
            continue
        python = pythons.get(h.name) or (ENV_PYTHON if spec.environment else spec.python)
        arguments = spec.arguments
        if spec.inputs:
            from .. import data
            paths = data.host_paths(spec.inputs, (data_paths or {}).get(h.name))
            arguments = data.substitute(arguments, paths)
            inputs_env[h.name] = json.dumps(paths, sort_keys=True)
        argvs[h.name] = [python, spec.entry_script, *arguments]
    processes = []
    for t in tasks:
        host = hosts[t.node].name
        env = dict(common)
        if host in inputs_env:
            env["TFLAUNCH_INPUT_DATASETS"] = inputs_env[host]  # (tflaunch.data.INPUTS_VAR)
        env["TFLAUNCH_RANK"] = str(t.rank)
        env["TFLAUNCH_LOCAL_RANK"] = str(t.local_rank)
        env["TFLAUNCH_NODE_RANK"] = str(t.node)
        if t.rank in devices:
            env["CUDA_VISIBLE_DEVICES"] = devices[t.rank]
        env.update(spec.environment_variables)
        processes.append(ProcessPlan(
            host=host, rank=t.rank, local_rank=t.local_rank, world_size=world, role=t.role,
            index=t.index, argv=list(argvs[host]), cwd=work_dirs.get(host, ctx.work_dir), env=env,
            stdout=rank_log(t.rank, "stdout"), stderr=rank_log(t.rank, "stderr"),
            port=task_ports.get(t.rank), tf_cluster=cluster,
        ))
    return processes
