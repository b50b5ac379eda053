"""One host of a run as its launcher sees it: the agent connection and what the host reported
(:class:`HostRun`), and the failure that ends a run before its processes start (:class:`LaunchFailure`).
Shared by the supervisor and its launch helpers (:mod:`tflaunch.launch.hostprep`, the launchers)."""
from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

    from ..plan.processes import ProcessPlan
    from . import AgentConnection

__all__ = ["HostRun", "LaunchFailure", "ORPHAN_GRACE", "LAUNCHER_INDEX"]

ORPHAN_GRACE = 2.0  # an agent whose launcher is gone stops the run's processes after this long
LAUNCHER_INDEX = -1  # the one process that starts every rank (mpirun, an srun step): its index (ranks are 0..N-1)


class LaunchFailure(Exception):
    """A host could not be brought up; the run ends Failed (launch_failed)."""


class HostRun:
    """One host of the run: its agent connection and what it reported."""

    def __init__(self, name: str, node: int, conn: AgentConnection) -> None:
        self.name = name
        self.node = node
        self.conn = conn
        self.hello: dict[str, Any] | None = None
        self.shared = conn.local
        self.work_dir = ""
        self.unpacked = False
        self.collected = False
        self.discarded: dict[str, Any] | None = None  # what its copy held outside ./outputs, ./logs (collect)
        self.cleaned = False
        self.error: str | None = None
        self.processes: list[ProcessPlan] = []
        self.collect_file: Any = None
        self.launcher_only = False  # MPI: the agent that runs mpirun on this machine, which is not a host
        self.rank_ready = False  # MPI: the rank wrapper knows its working directory here
        self.swept = False  # MPI: what mpirun left here was stopped
        self.execs: dict[str, dict[str, Any]] = {}  # helper processes that ended (setup, builds, copies)

    @property
    def finished(self) -> bool:
        return self.conn.done or self.conn.eof
