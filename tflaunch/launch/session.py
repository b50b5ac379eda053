"""The run being launched, as its launcher and the host preparations see it (:class:`Session`): the
record, the spec, the hosts, their agents (:class:`~tflaunch.launch.hostrun.HostRun`), the planned
processes, the console, and the few ways to act on the run: wait for the agents while events are
served, stop it, record what was planned.

The supervisor (:mod:`tflaunch.supervise`) builds one per run and gives it to the launcher
(:mod:`tflaunch.launch.launcher`) and to :class:`~tflaunch.launch.hostprep.HostPrep`; neither sees the
supervisor itself. Waiting serves events through the supervisor's loop (``serve``), and the outcome
policy (``policy``: who failed, why the run stops) is the supervisor's too.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time

from .. import fsio, tail
from ..plan.distributions import distribution
from ..plan.processes import RunContext
from . import lease_timeout
from .hostrun import LaunchFailure
from .ssh import SshOptions

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Callable, Iterator, TextIO

    from ..plan.processes import ProcessPlan
    from ..history.record import RunRecord
    from ..schedule import Scheduler
    from ..spec import JobSpec
    from .hostrun import HostRun

__all__ = ["Session", "HELLO_MARGIN"]

log = logging.getLogger(__name__)

HELLO_MARGIN = 20.0  # beyond ssh's connect timeout: login, the remote interpreter's start-up


class Session:
    """One run being launched: what every launcher may read and the few things it may do."""

    def __init__(self, record: RunRecord, spec: JobSpec, scheduler: Scheduler, *, experiment: str, grace: float,
                 work_dir: str, stream: bool, stdout: TextIO, stderr: TextIO) -> None:
        from ..spec.target import target_hosts

        self.record = record
        self.experiment = experiment
        self.spec = spec
        self.scheduler = scheduler
        self.target: dict[str, Any] = spec.compute_target or {}
        self.hosts = target_hosts(spec.compute_target)[:spec.node_count]
        self.distribution = distribution(spec.distributed)
        self.ssh = SshOptions.from_dict(self.target.get("ssh"))
        self.grace = grace
        self.lease_timeout = lease_timeout()  # the agents': their setups' "lease_timeout" (keepalive() pings)
        self.attempt = 1  # which attempt of the run (restarts, Slurm requeues): TFLAUNCH_ATTEMPT
        self.work_dir = work_dir
        self.stream = stream
        self.stdout = stdout
        self.stderr = stderr
        self.runs: list[HostRun] = []  # every agent of the run (hosts, and this machine's when it is not one)
        self.processes: dict[int, ProcessPlan] = {}  # rank -> what was started
        self.pgids: set[int] = set()  # of local processes, for stopping them without an agent
        self.warnings: list[str] = []
        self.followers: list[tail.Follower] = []  # files shown on the console while attached
        self.started = False  # start commands sent
        self.prep: Any = None  # tflaunch.launch.hostprep.HostPrep
        self.policy: Any = None  # tflaunch.supervise.policy.FailFast: the run's outcome so far
        self.serve: Callable[[float], None] = lambda timeout: None  # serve events for up to timeout s
        self._relay_files: dict[tuple[int, int], Any] = {}

    # -- the run's state ------------------------------------------------------------------------------
    @property
    def stop_reason(self) -> str | None:
        """Why the run is being stopped (None while it is not)."""
        return self.policy.stop_reason

    def stop(self, reason: str, detail: str) -> None:
        """Stop the whole run (every process on every host), for ``reason``."""
        self.policy.stop(reason, detail)

    def context(self) -> RunContext:
        from ..pythonpath import library_path

        return RunContext(run_id=self.record.id, experiment=self.experiment, run_dir=self.record.dir,
                          work_dir=self.work_dir, home=self.record.store.home,
                          pythonpath=library_path(self.record.store.home), attempt=self.attempt)

    def follow(self, path: str, prefix: str, stderr: bool = True) -> None:
        """Show a file of the record on the console while attached (``path`` relative to the record)."""
        if self.stream:
            self.followers.append(tail.Follower(self.record.path(path), self.stderr if stderr else self.stdout,
                                                prefix=prefix))

    # -- waiting for the agents -----------------------------------------------------------------------
    def wait(self, condition: Callable[[], bool], deadline: float | None, what: str) -> bool:
        """Serve events until ``condition()``; False if the run was stopped meanwhile.

        Raises LaunchFailure when a host's agent ends or reports an error, or at ``deadline``.
        """
        while not condition():
            self.serve(0.1)
            if self.stream:
                for f in self.followers:
                    f.poll()
            if self.stop_reason:
                return False
            for run in self.runs:
                if run.error:
                    raise LaunchFailure(f"host {run.name}: {run.error}")
                if run.conn.eof and not condition():
                    detail = run.conn.stderr_tail() or f"exit status {run.conn.popen.wait()}"
                    raise LaunchFailure(f"cannot start the tflaunch agent on host {run.name}: {detail}")
            if deadline is not None and time.monotonic() > deadline:
                slow = [run.name for run in self.runs if not run.hello]
                raise LaunchFailure(f"host {', '.join(slow) or '?'} did not answer within "
                                    f"{self.ssh.connect_timeout + HELLO_MARGIN:g} s")
        return True

    def keepalive(self, now: float) -> None:
        """Ping the agents that have a lease and were sent nothing for a while (``now``: time.monotonic()):
        called whenever events are served, for as long as the connections are open."""
        for run in self.runs:
            run.conn.keepalive(now)

    @contextlib.contextmanager
    def keeping_alive(self) -> Iterator[None]:
        """Keep the agents' leases from a thread while this one does something long without serving events
        (writing a tar of the job's files, streaming it to the hosts)."""
        import threading

        done = threading.Event()

        def ping() -> None:
            while not done.wait(0.5):
                self.keepalive(time.monotonic())

        thread = threading.Thread(target=ping, name="tflaunch-keepalive", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def on_event(self, run: HostRun, event: dict[str, Any]) -> bool:
        """The agents' events about the host itself and the files it holds; True if ``event`` was one."""
        kind = event.get("event")
        if kind == "output":
            self.rank_file(int(event["index"]), int(event["fd"])).write(event["data"])
        elif kind == "hello":
            run.hello = event
        elif kind == "unpacked":
            run.unpacked = True
        elif kind == "data" and run.collect_file is not None and not run.collect_file.closed:
            run.collect_file.write(event["data"])
        elif kind == "collected":
            run.collected = True
            run.discarded = event.get("discarded")
        elif kind == "cleaned":
            run.cleaned = True
        elif kind == "error":
            run.error = f"{event.get('cmd')}: {event.get('error')}"
        else:
            return False
        return True

    def rank_file(self, rank: int, fd: int) -> Any:
        """The log file a rank's stdout (``fd`` 1) or stderr (2) is appended to."""
        fh = self._relay_files.get((rank, fd))
        if fh is None:
            p = self.processes[rank]
            fh = self._relay_files[(rank, fd)] = open(self.record.path(p.stdout if fd == 1 else p.stderr),
                                                      "ab", buffering=0)
        return fh

    # -- stopping -------------------------------------------------------------------------------------
    def terminate_all(self, grace: float) -> None:
        """SIGTERM every process of the run on every host (SIGKILL after ``grace``)."""
        for run in self.runs:
            if not run.finished:
                run.conn.terminate(grace)

    def kill_all(self) -> None:
        for run in self.runs:
            if not run.finished:
                run.conn.kill()

    def abandon_agents(self) -> None:
        """Stop every process of the run without waiting for the agents (remote ones stop when closed)."""
        from ..remote import agent

        for run in self.runs:
            run.conn.kill()
        agent.stop_run(self.record.id, self.pgids, 1.0, {os.getpid()})

    def new_attempt(self) -> None:
        """The processes of this attempt have ended and the run starts again: close the agents, forget
        them and their processes (the logs are appended to), count the attempt."""
        self.close()
        self.runs = []
        self.processes = {}
        self.pgids = set()
        self.started = False
        self.attempt += 1

    def close(self) -> None:
        for run in self.runs:
            run.conn.close()
        for fh in self._relay_files.values():
            fh.close()
        self._relay_files.clear()

    # -- what the record keeps ------------------------------------------------------------------------
    def record_hosts(self, ports: dict[str, list[int]], addresses: dict[str, str]) -> None:
        """``hosts.json``: the run's hosts (not the agent that only starts mpirun on this machine)."""
        hosts = [{"name": run.name, "node": run.node, "hostname": run.hello.get("hostname"),
                  "address": addresses.get(run.name, run.name), "agent_pid": run.hello.get("pid"),
                  "local": run.conn.local, "shared_filesystem": run.shared, "work_dir": run.work_dir or self.work_dir,
                  "ports": ports.get(run.name, []), "gpus": run.hello.get("gpus")}
                 for run in self.runs if not run.launcher_only]  # MPI: mpirun's agent here is no host
        fsio.atomic_write_json(self.record.path("hosts.json"), hosts)
        self.record.event("hosts", hosts=hosts)

    def record_processes(self, processes: list[ProcessPlan]) -> None:
        """``processes.json``: each process's rank, role, host, port and GPUs; ``tf_cluster.json``: the
        cluster of TF_CONFIG (a process's TF_CONFIG is that cluster and its role and index)."""
        for p in processes:
            self.processes[p.rank] = p
        rows = [{"rank": p.rank, "role": p.role, "index": p.index, "host": p.host, "local_rank": p.local_rank,
                 "port": p.port, "cuda_visible_devices": p.environment().get("CUDA_VISIBLE_DEVICES"),
                 "label": p.label.strip(), "stdout": p.stdout, "stderr": p.stderr} for p in processes]
        fsio.atomic_write_json(self.record.path("processes.json"), rows)
        if processes and processes[0].tf_cluster:
            fsio.atomic_write_json(self.record.path("tf_cluster.json"), json.loads(processes[0].tf_cluster))
