"""The ``agents`` launcher: a tflaunch agent on every host (a child process here, ``ssh host python``
elsewhere) starts that host's processes and reports their output and exit (the plain, ps and
multiworker distributions). Also what every launcher with agents shares: starting them
(:func:`open_agents`, :func:`prestart_agents`) and setting them up (:func:`setup_agents`: their
hello, the job's files copied where the filesystem is not shared, the hosts' preparations).
"""
from __future__ import annotations

import os
import time

from .. import fsio, progress
from ..plan.gpus import host_gpus
from ..spec.hosts import is_local
from ..plan.processes import machine_ids, plan, ports_needed
from ..errors import SpecError
from . import AgentConnection
from .hostrun import ORPHAN_GRACE, HostRun, LaunchFailure
from .launcher import Launcher
from .local import process_spec, spawn_agent
from .session import HELLO_MARGIN
from .ssh import SshOptions, resolve_addresses, spawn_ssh_agent
from .transfer import upload

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Callable

    from ..plan.processes import ProcessPlan
    from .session import Session

__all__ = ["AgentLauncher", "prestart_agents", "open_agents", "setup_agents", "start_host", "PROBE_FILE"]

PROBE_FILE = ".tflaunch-probe"


def prestart_agents(compute_target: dict[str, Any] | None, python: str | None = None,
                    ) -> dict[str, AgentConnection]:
    """Start the agents of a run's hosts now (an ssh login takes ~0.2 s) so that it overlaps the snapshot."""
    from ..spec.target import target_hosts

    ssh = SshOptions.from_dict((compute_target or {}).get("ssh"))
    agents: dict[str, AgentConnection] = {}
    if (compute_target or {}).get("launcher") == "srun" or (compute_target or {}).get("kind") == "slurm":
        return agents  # one srun step, started by its own agent
    for host in target_hosts(compute_target):
        if host.name in agents:
            continue
        if is_local(host.name):
            agents[host.name] = AgentConnection(spawn_agent(), host.name)
        elif python:
            agents[host.name] = spawn_ssh_agent(host.name, python, ssh)
    return agents


def open_agents(session: Session, log_file: Any, prestarted: dict[str, AgentConnection]) -> None:
    """An agent for every host of the run (taken from ``prestarted`` when it is there)."""
    for node, host in enumerate(session.hosts):
        conn = prestarted.pop(host.name, None)
        if conn is None:
            if is_local(host.name):
                conn = AgentConnection(spawn_agent(log_file), host.name)
            else:
                conn = spawn_ssh_agent(host.name, session.spec.python, session.ssh)
        session.runs.append(HostRun(host.name, node, conn))


def setup_agents(session: Session, needed: dict[str, int], more: Callable[[HostRun], dict[str, Any]] | None = None,
                 ) -> list[HostRun] | None:
    """Send every agent its setup (``needed``: ports per host; ``more``: extra setup per host), wait
    for their hellos, copy the job's files to the hosts that do not share this filesystem, prepare the
    hosts; return the remote hosts' runs, or None if the run was stopped meanwhile."""
    record = session.record
    remote = [run for run in session.runs if not run.conn.local]
    probe = None
    if remote:
        content = f"{record.id} {os.urandom(8).hex()}"
        fsio.atomic_write_bytes(os.path.join(session.work_dir, PROBE_FILE), content.encode())
        probe = {"path": os.path.join(session.work_dir, PROBE_FILE), "content": content}
    for run in session.runs:
        setup = {"token": record.id, "agent_id": run.node, "grace": session.grace, "orphan_grace": ORPHAN_GRACE,
                 "lease_timeout": session.lease_timeout, "ports": needed.get(run.name, 0),
                 "scratch_root": session.target.get("remote_scratch"),
                 "probe": None if run.conn.local else probe, "gpus": session.spec.use_gpu}
        if more is not None:
            setup.update(more(run))
        setup.update(session.prep.setup_fields(run))
        try:
            run.conn.start(setup)
        except OSError:
            pass  # the agent is gone; its end of file says why
    deadline = time.monotonic() + session.ssh.connect_timeout + HELLO_MARGIN
    if not session.wait(_connected(session), deadline, "to answer"):
        return None
    if probe:
        os.unlink(probe["path"])
    for run in remote:
        run.shared = bool(run.hello.get("shared"))
    upload(session, [run for run in remote if not run.shared])
    if session.stop_reason:
        return None
    if not session.prep.run([run for run in session.runs if not run.launcher_only]):
        return None
    session.prep.record_environment()
    return remote


def _connected(session: Session) -> Callable[[], bool]:
    """Whether every agent has said hello (the hosts stage's progress: ``hosts: 3/8 connected``)."""
    shown: list[Any] = [None]

    def connected() -> bool:
        hosts = [run for run in session.runs if not run.launcher_only]
        count = sum(1 for run in hosts if run.hello)
        everyone = all(run.hello for run in session.runs)
        if (count, everyone) != shown[0] and not all(run.conn.local for run in hosts):  # ssh logins only
            shown[0] = (count, everyone)
            progress.report("hosts", f"hosts: {count}/{len(hosts)} connected", done=everyone)
        return everyone
    return connected


def start_host(session: Session, run: HostRun, processes: list[ProcessPlan], setup: bool = False) -> None:
    """Have a host's agent start its processes (``setup``: with its setup, in one message)."""
    run.processes = processes
    for p in processes:
        session.processes[p.rank] = p
    specs = [process_spec(p, session.record.dir if run.conn.local else None) for p in processes]
    if setup:
        run.conn.start({"token": session.record.id, "agent_id": run.node, "grace": session.grace,
                        "orphan_grace": ORPHAN_GRACE, "lease_timeout": session.lease_timeout, "processes": specs})
    else:
        run.conn.send({"cmd": "start", "processes": specs})
    session.started = True


class AgentLauncher(Launcher):
    """Each host's agent starts that host's processes."""

    name = "agents"
    restarts_ranks = True

    def restart_ranks(self, processes: list[ProcessPlan], exited: set[int]) -> bool:
        session = self.session
        by_host: dict[str, list[ProcessPlan]] = {}
        for p in processes:
            by_host.setdefault(p.host, []).append(p)
        runs = [run for run in session.runs if run.name in by_host]
        for run in runs:  # an agent whose processes all ended reports "done" first: wait for it
            if all(p.rank in exited for p in run.processes) and not run.conn.done:
                return False
        for run in runs:
            run.conn.done = False
            for p in by_host[run.name]:
                session.processes[p.rank] = p
            run.processes = [session.processes[p.rank] for p in run.processes]
            specs = [process_spec(p, session.record.dir if run.conn.local else None) for p in by_host[run.name]]
            run.conn.send({"cmd": "start", "processes": specs})
        return True

    def connect(self, log_file: Any, prestarted: dict[str, AgentConnection]) -> None:
        open_agents(self.session, log_file, prestarted)

    def start(self, preview: list[ProcessPlan]) -> None:
        session = self.session
        spec, runs = session.spec, session.runs
        needed = ports_needed(spec, session.hosts)
        if len(runs) == 1 and runs[0].conn.local and not needed and not spec.use_gpu and not session.prep.needed:
            # the common case: one round trip
            if len(preview) > 1 or session.distribution.tf_config:
                session.record_processes(preview)
            session.prep.record_environment()
            start_host(session, runs[0], preview, setup=True)
            return
        remote = setup_agents(session, needed)
        if remote is None:
            return
        work_dirs = {run.name: run.work_dir for run in runs if run.work_dir}
        ports = {run.name: run.hello.get("ports") or [] for run in runs}
        addresses = {}
        if remote:  # others cannot reach "localhost": use this machine's name; aliases: ssh's HostName
            addresses = {run.name: run.hello.get("hostname") or run.name for run in runs if run.conn.local}
            if needed or session.distribution.tf_config:
                addresses.update(resolve_addresses([run.name for run in remote], session.ssh))
        try:
            gpus = None
            if spec.use_gpu:
                gpus = {run.name: host_gpus(run.name, run.hello.get("gpus"), spec.gpus_per_node) for run in runs}
            machines = machine_ids(session.hosts, {run.name: run.hello.get("hostname") for run in runs})
            processes = plan(spec, session.context(), session.hosts, work_dirs=work_dirs, ports=ports,
                             addresses=addresses, gpus=gpus, machines=machines,
                             pythons=session.prep.pythons or None, data_paths=session.prep.data_paths)
        except SpecError as exc:
            raise LaunchFailure(str(exc)) from None
        session.record_hosts(ports, addresses)
        session.record_processes(processes)
        by_host: dict[str, list[ProcessPlan]] = {}
        for p in processes:
            by_host.setdefault(p.host, []).append(p)
        for run in runs:
            start_host(session, run, by_host.get(run.name, []))
