"""The distributions a job can ask for, as one table of their differences (pure data, like
:data:`tflaunch.plan.mpirun.FLAVOURS` for MPI spellings).

``plain`` (no ``distributed_backend``: one or more processes that rendezvous on their own, through
``TFLAUNCH_COORDINATOR``), ``ps`` (native TensorFlow, ``ParameterServerStrategy``), ``multiworker``
(native TensorFlow, ``MultiWorkerMirroredStrategy``) and ``mpi`` (Horovod through mpirun). Planning
(:mod:`tflaunch.plan.processes`), the choice of launcher (:mod:`tflaunch.launch.launcher`) and the outcome policy
(:mod:`tflaunch.supervise.policy`, :mod:`tflaunch.supervise.restart`) read a row of :data:`DISTRIBUTIONS` instead of testing the name;
a new distribution is a new row.
"""
from __future__ import annotations

from dataclasses import dataclass, field

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Mapping

__all__ = ["Distribution", "DISTRIBUTIONS", "backend_name", "distribution"]


@dataclass(frozen=True)
class Distribution:
    """What sets one distribution apart."""

    name: str
    tf_config: bool = False  # each process gets TF_CONFIG; one port per cluster task (else TFLAUNCH_COORDINATOR)
    spread: bool = False  # tasks are dealt over the hosts' slots (a host asks for 1 process, takes what fits)
    rendezvous_ports: bool = True  # tflaunch reserves the ports the processes meet on (mpirun does its own)
    gpu_split: bool = True  # CUDA_VISIBLE_DEVICES split between a host's processes (else: all, picked by local rank)
    launcher: str = "agents"  # how the processes start outside a Slurm allocation (a name in launch.launcher)
    lead_decides: bool = False  # rank 0 (the chief, else worker 0) exiting 0 is the run's outcome
    after_lead: str = "stop"  # then the others: "stop" now (they block in server.join), "grace" to end on their own
    roles: bool = False  # errors and messages name the TensorFlow role and task index
    env: Mapping[str, str] = field(default_factory=dict)  # variables every process gets
    # after a failure (a run with max_restarts, tflaunch.supervise.restart): role -> what starts again,
    # "alone" (that task, same TF_CONFIG task and port, on its host), "with_chief" (that task and the
    # chief), "ignore" (never fails the run, not restarted); a role not here: the whole group
    restarts: Mapping[str, str] = field(default_factory=dict)


DISTRIBUTIONS: dict[str, Distribution] = {
    "plain": Distribution("plain"),
    # TensorFlow's guide for ParameterServerStrategy: GRPC_FAIL_FAST=use_caller
    # ClusterCoordinator: a lost worker is re-dispatched to and reconnected when it is back; a lost ps
    # needs the coordinator (the chief) restarted to re-create the variables from its checkpoint
    "ps": Distribution("ps", tf_config=True, spread=True, lead_decides=True, after_lead="stop", roles=True,
                       env={"GRPC_FAIL_FAST": "use_caller"},
                       restarts={"worker": "alone", "chief": "alone", "ps": "with_chief", "evaluator": "ignore"}),
    "multiworker": Distribution("multiworker", tf_config=True, lead_decides=True, after_lead="grace", roles=True),
    "mpi": Distribution("mpi", rendezvous_ports=False, gpu_split=False, launcher="mpirun"),
}


def backend_name(distributed: Mapping[str, Any] | None) -> str:
    """The backend of a spec's ``distributed`` dict: ``plain``, ``ps``, ``multiworker`` or ``mpi``."""
    return (distributed or {}).get("backend") or "plain"


def distribution(distributed: Mapping[str, Any] | None) -> Distribution:
    """The row of :data:`DISTRIBUTIONS` for a spec's ``distributed`` dict."""
    return DISTRIBUTIONS[backend_name(distributed)]
