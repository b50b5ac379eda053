"""The ``srun`` launcher: inside a Slurm allocation (launcher ``srun``, the default there), one
launcher process started from this machine's agent starts every process, and no agent runs on the
other nodes. The job's files are on a filesystem every node sees; the rank wrapper and its per-rank
table (``ranks.json``: what differs between ranks, such as TF_CONFIG's task) are written to the
record's ``launch/`` directory. The launcher is an ``srun`` step for the plain, ps and multiworker
distributions (:func:`step_launch`), mpirun with its own Slurm support (or ``srun --mpi``) for MPI
(:func:`tflaunch.launch.mpi.launch_for`). Its output goes to ``tflaunch_logs/srun.log`` or
``mpirun.log``; Slurm stops what is left of a step when it ends.
"""
from __future__ import annotations

import json
import os

from .. import fsio, slurm
from ..remote import rank
from ..errors import SpecError
from ..plan.mpirun import MpiLaunch
from ..plan.processes import plan, ports_needed
from .hostrun import ORPHAN_GRACE, LaunchFailure
from .mpi import launch_for
from .one_process import PER_RANK, OneProcessLauncher, host_counts, wrapper_source

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from ..plan.processes import ProcessPlan
    from ..spec import JobSpec

__all__ = ["SrunStepLauncher", "step_launch", "STEP_FILES"]

STEP_FILES = "launch"  # in the record: the rank wrapper and its table, for an srun step's nodes


def step_launch(spec: JobSpec, processes: list[ProcessPlan], run_id: str, files_dir: str) -> MpiLaunch:
    """The one ``srun`` step that starts every process of a plain/ps/multiworker job inside a Slurm
    allocation, through the rank wrapper: what every rank shares goes into srun's environment
    (``--export=ALL``), what differs into ``ranks.json`` (TF_CONFIG is built from the cluster, held once,
    and each rank's role and index). Pure."""
    envs = [p.environment() for p in processes]
    names = set().union(*envs)
    differ = {k for k in names if len({e.get(k) for e in envs}) > 1} | set(PER_RANK)
    differ.discard("TF_CONFIG")
    cluster = processes[0].tf_cluster or None
    common = {k: v for k, v in envs[0].items() if k not in differ and (k != "TF_CONFIG" or not cluster)}
    table = {"cluster": cluster, "gpu_positions": bool(spec.use_gpu),
             "ranks": {str(p.rank): {"env": {k: e[k] for k in sorted(differ) if k in e}, "role": p.role,
                                     "index": p.index, "ports": [p.port] if cluster and isinstance(p.port, int) else []}
                       for p, e in zip(processes, envs)}}
    files = {"rank.py": (wrapper_source(), 0o644), "ranks.json": (json.dumps(table), 0o644),
             "cwd": (processes[0].cwd, 0o644)}
    hosts = host_counts(processes)
    hostfile = None
    if len({n for _, n in hosts}) > 1 or len({h for h, _ in hosts}) < len(hosts):
        hostfile = os.path.join(files_dir, "hostfile")
        files["hostfile"] = (slurm.hostfile_text(hosts), 0o644)
        common["SLURM_HOSTFILE"] = hostfile
    program = [spec.python, "-I", "-S", "-c", rank.bootstrap(run_id, files_dir), *processes[0].argv]
    argv = slurm.step_argv(hosts, program, hostfile=hostfile, job_name=f"tflaunch-{run_id}")
    return MpiLaunch(argv, common, files, os.environ.get("PATH"))


class SrunStepLauncher(OneProcessLauncher):
    """One launcher process for every node of the allocation; its tasks stop together."""

    ranks_stop_together = True

    def begin(self) -> None:
        """Start this machine's agent now: its start-up overlaps the preparations."""
        if self.launcher is None:
            self.launcher = self.local_agent(self.here(), 0)

    def stop_ranks(self, ranks: list[int]) -> None:
        if self.launcher is not None:
            self.launcher.conn.terminate(self.session.grace)

    def planned_host(self, p: ProcessPlan, reported: str) -> str | None:
        return p.host if reported.split(".")[0] != p.host.split(".")[0] else reported  # node names ~ host names

    def start(self, preview: list[ProcessPlan]) -> None:
        """Plan with the allocation's nodes, write the rank wrapper and its table where every node sees
        them, start the one launcher from this machine's agent."""
        session = self.session
        spec, hosts = session.spec, session.hosts
        self.begin()
        files_dir = session.record.path(STEP_FILES)
        host_info = session.prep.step_info()  # no agents on the nodes: the rank wrapper does their part
        try:
            needed = ports_needed(spec, hosts)
            ports = slurm.step_ports(session.scheduler.job_id, needed) if needed else {}
            addresses = {}
            if needed or session.distribution.tf_config:
                addresses = slurm.node_addresses([h.name for h in hosts])
            gpus = None
            if spec.use_gpu:
                count = spec.gpus_per_node or slurm.gpus_per_node(os.environ)
                if not count:
                    raise SpecError("--gpu inside Slurm: the allocation has no GPUs (SLURM_GPUS_ON_NODE is not "
                                    "set): ask for them (--gpus-per-node) or give --gpus-per-node N")
                gpus = {h.name: [str(i) for i in range(count)] for h in hosts}
            processes = plan(spec, session.context(), hosts, ports=ports, addresses=addresses, gpus=gpus,
                             machines={h.name: h.name for h in hosts},
                             pythons={h.name: host_info["python"] for h in hosts} if host_info.get("python") else None)
            if session.distribution.launcher == "mpirun":
                launch = launch_for(spec, processes, session.record.id, remote=len(hosts) > 1, files_dir=files_dir)
            else:
                launch = step_launch(spec, processes, session.record.id, files_dir)
        except (SpecError, slurm.SlurmError) as exc:
            raise LaunchFailure(str(exc)) from None
        if host_info:
            launch.files["host.json"] = (json.dumps(host_info), 0o644)
        os.makedirs(files_dir, exist_ok=True)
        for name, (text, mode) in launch.files.items():
            path = os.path.join(files_dir, name)
            fsio.atomic_write_bytes(path, text.encode("utf-8"), fsync=False)
            os.chmod(path, mode)
        hosts_json = [{"name": h.name, "node": i, "address": addresses.get(h.name, h.name),
                       "ports": ports.get(h.name, []), "slots": h.slots, "launcher": "srun"}
                      for i, h in enumerate(hosts)]
        fsio.atomic_write_json(session.record.path("hosts.json"), hosts_json)
        self.record(processes, launch)
        self.launcher.conn.start({"token": session.record.id, "agent_id": 0, "grace": session.grace,
                                  "orphan_grace": ORPHAN_GRACE, "lease_timeout": session.lease_timeout, "sweep": True,
                                  "processes": [self.process(launch)]})
        session.started = True
