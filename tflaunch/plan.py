"""Pure planning: job spec + where the run lives + hosts -> the processes to start.

Nothing here touches the filesystem, the network or a process; the same inputs give the same plan,
which is what ``run --dry-run`` prints and what the launcher executes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .hosts import Host
from .spec import JobSpec
from .store import LOG_DIR

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Mapping, Sequence

__all__ = ["Host", "RunContext", "ProcessPlan", "plan", "ports_needed", "LOCALHOST", "COORDINATOR_VAR"]

COORDINATOR_VAR = "TFLAUNCH_COORDINATOR"


LOCALHOST = Host("localhost", 1)


@dataclass(frozen=True)
class RunContext:
    """Where a run lives: its id, record directory, the process working directory, the home."""

    run_id: str
    experiment: str
    run_dir: str
    work_dir: str
    home: str


@dataclass
class ProcessPlan:
    """One process: where and how it starts, and the environment tflaunch adds to the inherited one."""

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ports_needed(spec: JobSpec, hosts: Sequence[Host]) -> dict[str, int]:
    """How many free ports each host must reserve before the processes start.

    A job of several processes gets one on the first host, handed to every process as
    ``TFLAUNCH_COORDINATOR=host:port`` (for a rendezvous the script sets up itself).
    """
    return {hosts[0].name: 1} if spec.world_size > 1 else {}


def plan(spec: JobSpec, ctx: RunContext, hosts: Sequence[Host] = (LOCALHOST,), *,
         work_dirs: Mapping[str, str] | None = None, ports: Mapping[str, Sequence[int]] | None = None,
         addresses: Mapping[str, str] | None = None) -> list[ProcessPlan]:
    """Processes for ``spec`` on the first ``node_count`` of ``hosts``, ranks host-major
    (rank = node index x processes per node + local rank).

    ``work_dirs`` gives a host's working directory when it is not ``ctx.work_dir`` (hosts without a
    shared filesystem get a copy), ``ports`` what each host reserved (see :func:`ports_needed`;
    shown as ``PORT`` when unknown, as in ``--dry-run``), ``addresses`` how other hosts reach a host
    when not by its name.
    """
    ppn = spec.process_count_per_node
    world = spec.node_count * ppn
    if len(hosts) < spec.node_count:
        raise ValueError(f"{spec.node_count} nodes need {spec.node_count} hosts, got {len(hosts)}")
    work_dirs = work_dirs or {}
    addresses = addresses or {}
    common = {
        "PYTHONUNBUFFERED": "1",
        "TFLAUNCH_RUN_ID": ctx.run_id,
        "TFLAUNCH_RUN_DIR": ctx.run_dir,
        "TFLAUNCH_HOME": ctx.home,
        "TFLAUNCH_EXPERIMENT": ctx.experiment,
        "TFLAUNCH_WORLD_SIZE": str(world),
    }
    for name, count in ports_needed(spec, hosts).items():
        reserved = (ports or {}).get(name) or []
        port = str(reserved[0]) if reserved else "PORT"
        common[COORDINATOR_VAR] = f"{addresses.get(name, name)}:{port}"
    if not spec.use_gpu:
        common["CUDA_VISIBLE_DEVICES"] = ""
    argv = [spec.python, spec.entry_script, *spec.arguments]
    processes = []
    for node in range(spec.node_count):
        host = hosts[node].name
        cwd = work_dirs.get(host, ctx.work_dir)
        for local_rank in range(ppn):
            rank = node * ppn + local_rank
            env = dict(common)
            env["TFLAUNCH_RANK"] = str(rank)
            env["TFLAUNCH_LOCAL_RANK"] = str(local_rank)
            env["TFLAUNCH_NODE_RANK"] = str(node)
            env.update(spec.environment_variables)
            processes.append(ProcessPlan(
                host=host, rank=rank, local_rank=local_rank, world_size=world, role="worker",
                index=rank, argv=list(argv), cwd=cwd, env=env,
                stdout=f"{LOG_DIR}/rank-{rank}.stdout", stderr=f"{LOG_DIR}/rank-{rank}.stderr",
            ))
    return processes
