"""What the launchers that start every rank through ONE process have in common (mpirun, an srun
step): that process is started by this machine's agent under the index :data:`LAUNCHER_INDEX`, its
output is split back into per-rank files by :class:`tflaunch.launch.demux.Demux` (the rank wrapper marks each
line, and reports each rank's start and exit), and what it says itself goes to its own log
(``tflaunch_logs/mpirun.log`` or ``srun.log``, and the console as ``[mpirun] ...``). Its exit is
reported to the outcome policy, which decides what it means.
"""
from __future__ import annotations

import logging
import os

from .. import fsio, tail
from ..remote import rank
from .demux import Demux
from ..spec.hosts import is_local
from ..history.store import LOG_DIR
from ..history.withheld import mask_for_record
from . import AgentConnection
from .hostrun import LAUNCHER_INDEX, HostRun
from .launcher import Launcher
from .local import spawn_agent

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

    from ..plan.mpirun import MpiLaunch
    from ..plan.processes import ProcessPlan
    from .session import Session

__all__ = ["OneProcessLauncher", "LAUNCHER_INDEX", "MPIRUN_LOG", "SRUN_LOG", "PER_RANK", "host_counts",
           "wrapper_source"]

log = logging.getLogger(__name__)

MPIRUN_LOG = f"{LOG_DIR}/mpirun.log"
SRUN_LOG = f"{LOG_DIR}/srun.log"  # an srun step's own messages
PER_RANK = ("TFLAUNCH_RANK", "TFLAUNCH_LOCAL_RANK", "TFLAUNCH_NODE_RANK")  # set by the rank wrapper


def host_counts(processes: list[ProcessPlan]) -> list[tuple[str, int]]:
    """(host, number of consecutive ranks there), in rank order."""
    hosts: list[tuple[str, int]] = []
    for p in processes:
        if hosts and hosts[-1][0] == p.host:
            hosts[-1] = (p.host, hosts[-1][1] + 1)
        else:
            hosts.append((p.host, 1))
    return hosts


def wrapper_source() -> str:
    """The rank wrapper's source (:mod:`tflaunch.remote.rank`), written where the ranks start."""
    return rank.__loader__.get_source(rank.__name__)  # type: ignore[union-attr]


class OneProcessLauncher(Launcher):
    """Every rank is started by one process (``self.launcher``: the agent here that runs it)."""

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.launcher: HostRun | None = None
        self.demux = Demux(self._write, self._other, self._rank_event)
        self.rank_hosts: dict[int, str] = {}  # rank -> the host name it reported
        self.misplaced = False
        self._log: Any = None
        dist = session.spec.distributed or {}
        self.name = "mpirun" if session.distribution.launcher == "mpirun" and dist.get("launcher") != "srun" \
            else "srun"
        self.log_path = MPIRUN_LOG if self.name == "mpirun" else SRUN_LOG  # its own messages, in the record

    def follow(self) -> None:
        self.session.follow(self.log_path, f"[{self.name}] ")

    def watched(self) -> list[HostRun]:
        return [self.launcher] if self.launcher is not None else self.session.runs

    def log_for(self, index: int) -> str | None:
        return self.log_path if index == LAUNCHER_INDEX else None

    def signal_ranks(self, name: str) -> list[HostRun]:
        """The ranks are not the agents' children: each machine's agent (in sweep mode) finds the run's
        ranks there (``TFLAUNCH_RANK``) and signals them. Machines without an agent (an srun step's other
        nodes) are not reached."""
        asked, machines = [], set()
        for run in self.session.runs:
            machine = (run.hello or {}).get("hostname") or run.name
            if machine not in machines and not run.finished and run.conn.send({"cmd": "signal", "signal": name}):
                machines.add(machine)
                asked.append(run)
        return asked

    def local_agent(self, name: str, node: int) -> HostRun:
        """An agent on this machine that is not one of the run's hosts, to start the launcher from."""
        session = self.session
        with open(session.record.path(LOG_DIR, "launcher.log"), "ab") as agent_log:
            run = HostRun(name, node, AgentConnection(spawn_agent(agent_log), "localhost"))
        run.launcher_only = True
        session.runs.append(run)
        return run

    def here(self) -> str:
        """This machine's name among the run's hosts, else "(launcher)"."""
        return next((h.name for h in self.session.hosts if is_local(h.name)), "(launcher)")

    def process(self, launch: MpiLaunch) -> dict[str, Any]:
        """The launcher as the agent starts it."""
        env = dict(launch.env)
        if launch.path:
            env["PATH"] = launch.path
        return {"index": LAUNCHER_INDEX, "argv": launch.argv, "cwd": self.session.work_dir, "env": env,
                "stdout": None, "stderr": None}

    def record(self, processes: list[ProcessPlan], launch: MpiLaunch) -> None:
        session = self.session
        session.record_processes(processes)
        os.makedirs(session.record.path("mpi"), exist_ok=True)
        shown = launch.to_dict()
        shown["env"] = mask_for_record(shown.get("env") or {}, session.record)  # never a secret's value
        fsio.atomic_write_json(session.record.path("mpi", "launch.json"), shown, fsync=False)
        session.record.event(self.name, argv=launch.argv)
        log.debug("run %s: %s", session.record.id, " ".join(launch.argv))
        self._log = open(session.record.path(self.log_path), "ab", buffering=0)

    # -- events ----------------------------------------------------------------------------------------
    def on_event(self, run: HostRun, event: dict[str, Any]) -> bool:
        kind = event.get("event")
        if kind == "output" and event.get("index") == LAUNCHER_INDEX:
            self.demux.feed(int(event["fd"]), event["data"])
        elif kind == "exited" and event.get("index") == LAUNCHER_INDEX:
            self.demux.close()
            rc = int(event["returncode"])
            self.session.record.event("process_exited", index=LAUNCHER_INDEX, returncode=rc, host=run.name)
            self.session.policy.launcher_exited(self.name, run.name, rc, self.last_words)
        else:
            return False
        return True

    def _write(self, rank_: int, fd: int, data: bytes) -> None:
        if rank_ in self.session.processes:
            self.session.rank_file(rank_, fd).write(data)
        else:
            self._other(fd, data)

    def _other(self, fd: int, data: bytes) -> None:
        if self._log is not None:
            self._log.write(data)

    def planned_host(self, p: ProcessPlan, reported: str) -> str | None:
        """The host name a rank planned on ``p.host`` should report (None: not known)."""
        return next((run.hello.get("hostname") for run in self.session.runs if run.name == p.host and run.hello),
                    None)

    def _rank_event(self, rank_: int, kind: str, text: str) -> None:
        session = self.session
        p = session.processes.get(rank_)
        if p is None:
            return
        if kind == "s":
            pid, _, host = text.partition(" ")
            self.rank_hosts[rank_] = host
            session.record.event("process_started", index=rank_, pid=int(pid) if pid.isdigit() else None, host=host)
            planned = self.planned_host(p, host)
            if planned and host != planned and not self.misplaced:
                self.misplaced = True  # e.g. a --mpi-arg that changes the mapping
                session.warnings.append(f"rank {rank_} runs on {host}, not on {p.host} ({planned}) as tflaunch "
                                        f"planned: {self.name} mapped the ranks differently, so TFLAUNCH_NODE_RANK "
                                        f"and the hosts in processes.json follow the plan, not {self.name}")
            return
        try:
            rc = int(text)
        except ValueError:
            return
        session.policy.process_exited(self.rank_hosts.get(rank_, p.host), rank_, rc)

    def last_words(self) -> str:
        """The launcher's last line of its own (why it failed, usually)."""
        data = tail.tail_bytes(self.session.record.path(self.log_path))
        lines = [line.strip() for line in data.decode("utf-8", "replace").splitlines() if line.strip()
                 and not set(line.strip()) <= set("-=*")]
        return lines[-1][:300] if lines else ""

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
