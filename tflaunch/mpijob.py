"""Supervising an MPI job (``--backend mpi``): mpirun starts the ranks, tflaunch watches over them.

The engine's agents still come up on every host, but only to hold the job's files (copied where the
filesystem is not shared), the rank wrapper (:mod:`tflaunch.rank`) and, in *sweep* mode, the power
to stop every process of the run on their host. The agent on this machine starts the one launcher
process (mpirun, or srun inside Slurm) built by :func:`tflaunch.mpirun.launcher`. Its output is split
back into per-rank files by :class:`tflaunch.rank.Demux`; what mpirun says itself goes to
``tflaunch_logs/mpirun.log`` (and the console, as ``[mpirun] ...``). The first rank whose program fails is the
root cause and stops the job at once (mpirun's own abort is not waited for). When mpirun has ended,
each host's agent sweeps what is left of the run there (an MPI daemon or a rank that mpirun failed
to stop): counted, stopped and reported as a warning. If tflaunch itself is killed, the agents lose
their connection and sweep as well.
"""
from __future__ import annotations

import logging
import os
import sys
import time

from . import fsio, rank, tail
from .agent import rank_dir
from .errors import SpecError
from .launch import AgentConnection
from .launch.local import spawn_agent
from .launch.ssh import SshOptions, ssh_argv
from .mpirun import MpiInstall, MpiLaunch, launcher, ssh_wrapper
from .plan import ProcessPlan, machine_ids, plan
from .store import LOG_DIR

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

    from .spec import JobSpec
    from .supervise import HostRun, Supervisor

__all__ = ["MpiJob", "MPIRUN", "MPIRUN_LOG", "PER_RANK", "launch_for"]

log = logging.getLogger(__name__)

MPIRUN = -1  # the launcher process's index in the agent protocol (ranks are 0..N-1)
MPIRUN_LOG = f"{LOG_DIR}/mpirun.log"
PER_RANK = ("TFLAUNCH_RANK", "TFLAUNCH_LOCAL_RANK", "TFLAUNCH_NODE_RANK")  # set by the rank wrapper
SWEEP_GRACE = 2.0


def launch_for(spec: JobSpec, processes: list[ProcessPlan], run_id: str, remote: bool) -> MpiLaunch:
    """The :class:`~tflaunch.mpirun.MpiLaunch` of a job whose ranks are ``processes``, with every file
    the hosts' agents write for it (the rank wrapper, mpirun's ssh wrapper, a hostfile): also what
    ``--dry-run`` shows."""
    dist = spec.distributed or {}
    install = MpiInstall.from_dict(dist["mpi"])
    hosts: list[tuple[str, int]] = []
    for p in processes:
        if hosts and hosts[-1][0] == p.host:
            hosts[-1] = (p.host, hosts[-1][1] + 1)
        else:
            hosts.append((p.host, 1))
    env = {k: v for k, v in processes[0].environment().items() if k not in PER_RANK}
    env[rank.PPN_VAR] = str(spec.process_count_per_node)
    program = [spec.python, "-I", "-S", "-c", rank.bootstrap(run_id), spec.python, spec.entry_script,
               *spec.arguments]
    target = spec.compute_target or {}
    in_slurm = str(target.get("source")) == "SLURM_JOB_NODELIST"
    srun = dist.get("srun_mpi") if dist.get("launcher") == "srun" else None
    launch = launcher(install, hosts, program, env, files_dir=rank_dir(run_id), remote=remote,
                      as_root=os.geteuid() == 0, user_args=dist.get("mpi_args") or [],
                      oversubscribe=bool(target.get("oversubscribe")), in_slurm=in_slurm, use_srun=srun,
                      path=os.environ.get("PATH"), iface=dist.get("mpi_iface"))
    launch.files["rank.py"] = (rank.__loader__.get_source(rank.__name__), 0o644)  # type: ignore[union-attr]
    if remote and not in_slurm:
        ssh = ssh_argv("HOST", "COMMAND", SshOptions.from_dict(target.get("ssh")))[:-3]
        launch.files["ssh"] = (ssh_wrapper(ssh, run_id, sys.executable), 0o755)
    return launch


class MpiJob:
    """The MPI part of one :class:`~tflaunch.supervise.Supervisor`."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.launcher: HostRun | None = None
        self.demux = rank.Demux(self._write, self._other, self._rank_event)
        self.rank_hosts: dict[int, str] = {}  # rank -> the host name it reported
        self.misplaced = False
        self._log: Any = None

    log_path = MPIRUN_LOG  # mpirun's own messages, in the record

    @staticmethod
    def is_launcher(index: int) -> bool:
        """Whether an agent process index is mpirun's (the ranks are 0..N-1)."""
        return index == MPIRUN

    # -- launch ----------------------------------------------------------------------------------------
    def follow(self) -> None:
        """Stream mpirun's own messages to the console (the ranks' output is followed per rank)."""
        sup = self.sup
        if sup.stream:
            sup._followers.append(tail.Follower(sup.record.path(MPIRUN_LOG), sup.stderr, prefix="[mpirun] "))

    def launch(self, preview: list[ProcessPlan]) -> None:
        from .supervise import ORPHAN_GRACE, HostRun, LaunchFailure

        sup = self.sup
        local = next((run for run in sup.runs if run.conn.local), None)
        if local is None:  # mpirun runs here even when this machine is not one of the hosts
            with open(sup.record.path(LOG_DIR, "launcher.log"), "ab") as agent_log:
                local = HostRun("(launcher)", len(sup.runs), AgentConnection(spawn_agent(agent_log), "localhost"))
            local.launcher_only = True
            sup.runs.append(local)
        self.launcher = local
        remote_hosts = any(not run.conn.local for run in sup.runs)
        try:
            launch = launch_for(sup.spec, preview, sup.record.id, remote=remote_hosts)
        except SpecError as exc:
            raise LaunchFailure(str(exc)) from None
        files = {name: list(item) for name, item in launch.files.items()}
        mpirun = {"index": MPIRUN, "argv": launch.argv, "cwd": sup.work_dir, "env": dict(launch.env, PATH=launch.path),
                  "stdout": None, "stderr": None}
        if len(sup.runs) == 1:  # this machine only: one round trip (files, then mpirun, in the setup)
            self._record(preview, launch)
            sup.runs[0].processes = preview
            local.conn.start({"token": sup.record.id, "agent_id": local.node, "grace": sup.grace,
                              "orphan_grace": ORPHAN_GRACE, "sweep": True,
                              "rank": {"files": files, "cwd": sup.work_dir}, "processes": [mpirun]})
            sup.started = True
            return

        def setup(run: HostRun) -> dict[str, Any]:
            return {"sweep": True, "rank": {"files": files, "cwd": sup.work_dir if run.conn.local else None}}

        remote = sup._setup_agents({}, setup)
        if remote is None:
            return
        for run in sup.runs:
            if run.hello.get("rank_error"):
                raise LaunchFailure(f"host {run.name}: {run.hello['rank_error']}")
        for run in remote:
            run.conn.send({"cmd": "rank_cwd", "cwd": sup.work_dir if run.shared else run.work_dir})
        deadline = time.monotonic() + sup.ssh.connect_timeout + 20
        if not sup._wait(lambda: all(run.rank_ready for run in remote), deadline, "to write the rank wrapper"):
            return
        hosts = [run for run in sup.runs if not run.launcher_only]
        work_dirs = {run.name: run.work_dir for run in hosts if run.work_dir}
        try:
            processes = plan(sup.spec, sup._context(), sup.hosts, work_dirs=work_dirs,
                             machines=machine_ids(sup.hosts, {run.name: run.hello.get("hostname") for run in hosts}))
        except SpecError as exc:
            raise LaunchFailure(str(exc)) from None
        sup._record_hosts({}, {})
        self._record(processes, launch)
        for run in sup.runs:
            run.processes = [p for p in processes if p.host == run.name]
        self.launcher.conn.send({"cmd": "start", "processes": [mpirun]})
        sup.started = True

    def _record(self, processes: list[ProcessPlan], launch: MpiLaunch) -> None:
        sup = self.sup
        for p in processes:
            sup.processes[p.rank] = p
        sup._record_processes(processes)
        os.makedirs(sup.record.path("mpi"), exist_ok=True)
        fsio.atomic_write_json(sup.record.path("mpi", "launch.json"), launch.to_dict(), fsync=False)
        sup.record.event("mpirun", argv=launch.argv)
        log.debug("run %s: %s", sup.record.id, " ".join(launch.argv))
        self._log = open(sup.record.path(MPIRUN_LOG), "ab", buffering=0)

    # -- events ----------------------------------------------------------------------------------------
    def on_event(self, run: HostRun, event: dict[str, Any]) -> bool:
        """Handle what only an MPI job has; True if ``event`` was that."""
        kind = event.get("event")
        if kind == "rank_ready":
            run.rank_ready = True
        elif kind == "swept":
            run.swept = True
            count = int(event.get("count") or 0)
            if count:
                self.sup.warnings.append(f"host {run.name}: {count} process(es) of the run were still running "
                                         "after mpirun ended (MPI daemons or ranks); tflaunch stopped them")
        elif kind == "output" and event.get("index") == MPIRUN:
            self.demux.feed(int(event["fd"]), event["data"])
        elif kind == "exited" and event.get("index") == MPIRUN:
            self._mpirun_exited(run, int(event["returncode"]))
        else:
            return False
        return True

    def _write(self, rank_: int, fd: int, data: bytes) -> None:
        if rank_ in self.sup.processes:
            self.sup._rank_file(rank_, fd).write(data)
        else:
            self._other(fd, data)

    def _other(self, fd: int, data: bytes) -> None:
        if self._log is not None:
            self._log.write(data)

    def _rank_event(self, rank_: int, kind: str, text: str) -> None:
        sup = self.sup
        p = sup.processes.get(rank_)
        if p is None:
            return
        if kind == "s":
            pid, _, host = text.partition(" ")
            self.rank_hosts[rank_] = host
            sup.record.event("process_started", index=rank_, pid=int(pid) if pid.isdigit() else None, host=host)
            planned = next((run.hello.get("hostname") for run in sup.runs if run.name == p.host and run.hello), None)
            if planned and host != planned and not self.misplaced:
                self.misplaced = True  # e.g. a --mpi-arg that changes the mapping
                sup.warnings.append(f"rank {rank_} runs on {host}, not on {p.host} ({planned}) as tflaunch planned: "
                                    "mpirun mapped the ranks differently, so TFLAUNCH_NODE_RANK and the hosts "
                                    "in processes.json follow the plan, not mpirun")
            return
        try:
            rc = int(text)
        except ValueError:
            return
        sup.returncodes[rank_] = rc
        sup.record.event("process_exited", index=rank_, returncode=rc, host=self.rank_hosts.get(rank_, p.host))
        if rc != 0 and sup.stop_reason is None:
            sup._fail(p.host, rank_, rc)

    def _mpirun_exited(self, run: HostRun, rc: int) -> None:
        sup = self.sup
        self.demux.close()
        sup.record.event("process_exited", index=MPIRUN, returncode=rc, host=run.name)
        if sup.stop_reason is not None:
            return
        missing = [r for r in sup.processes if r not in sup.returncodes]
        if rc != 0:
            how = sup._how(rc)
            last = self.last_words()
            sup.failure = {"index": MPIRUN, "rank": None, "host": run.name, "returncode": rc}
            sup._stop("signal" if rc < 0 else "exit_code",
                      f"mpirun {how}" + (f" before rank(s) {_ranks(missing)} reported" if missing else "")
                      + (f": {last}" if last else ""))
        elif missing:
            for r in missing:
                sup.returncodes[r] = 0
            sup.warnings.append(f"rank(s) {_ranks(missing)} did not report their exit status; mpirun exited "
                                "with code 0, so they are counted as successful")

    def last_words(self) -> str:
        """mpirun's last line of its own (why it failed, usually)."""
        data = tail.tail_bytes(self.sup.record.path(MPIRUN_LOG))
        lines = [line.strip() for line in data.decode("utf-8", "replace").splitlines() if line.strip()
                 and not set(line.strip()) <= set("-=*")]
        return lines[-1][:300] if lines else ""

    # -- end -------------------------------------------------------------------------------------------
    def sweep(self) -> None:
        """mpirun has ended: have every other host's agent stop what is left of the run there."""
        sup = self.sup
        runs = [run for run in sup.runs if run is not self.launcher and not run.conn.eof]
        for run in runs:
            run.conn.send({"cmd": "sweep", "grace": SWEEP_GRACE})
        from .supervise import LaunchFailure
        try:
            sup._wait(lambda: all(run.swept or run.conn.eof for run in runs), time.monotonic() + 10 + SWEEP_GRACE,
                      "to stop what mpirun left")
        except LaunchFailure as exc:
            sup.warnings.append(f"after mpirun ended: {exc}")

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(str(r) for r in sorted(ranks)[:8])
    return shown + (", ..." if len(ranks) > 8 else "")
