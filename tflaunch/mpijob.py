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

Inside a Slurm allocation (launcher ``srun``, the default there) no agent runs on the other nodes:
the job's files are on a filesystem every node sees, the rank wrapper and its per-rank table
(``ranks.json``: what differs between ranks, such as TF_CONFIG's task) are written to the record's
``launch/`` directory, and one launcher starts every process: an ``srun`` step for the plain, ps and
multiworker backends (:func:`step_launch`), mpirun with its own Slurm support (or ``srun --mpi``) for
MPI. Its output goes to ``tflaunch_logs/srun.log`` or ``mpirun.log``; Slurm stops what is left of a
step when it ends.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

from . import fsio, rank, slurm, tail
from .agent import rank_dir
from .errors import SpecError
from .hosts import is_local
from .launch import AgentConnection
from .launch.local import spawn_agent
from .launch.ssh import SshOptions, ssh_argv
from .mpirun import MpiInstall, MpiLaunch, launcher, ssh_wrapper
from .plan import ProcessPlan, machine_ids, plan, ports_needed
from .store import LOG_DIR
from .tfconfig import TF_BACKENDS

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

    from .spec import JobSpec
    from .launch.hostrun import HostRun
    from .supervise import Supervisor

__all__ = ["MpiJob", "MPIRUN", "MPIRUN_LOG", "SRUN_LOG", "PER_RANK", "launch_for", "step_launch"]

log = logging.getLogger(__name__)

MPIRUN = -1  # the launcher process's index in the agent protocol (ranks are 0..N-1)
MPIRUN_LOG = f"{LOG_DIR}/mpirun.log"
SRUN_LOG = f"{LOG_DIR}/srun.log"  # an srun step's own messages
STEP_FILES = "launch"  # in the record: the rank wrapper and its table, for an srun step's nodes
PER_RANK = ("TFLAUNCH_RANK", "TFLAUNCH_LOCAL_RANK", "TFLAUNCH_NODE_RANK")  # set by the rank wrapper
SWEEP_GRACE = 2.0


def _host_counts(processes: list[ProcessPlan]) -> list[tuple[str, int]]:
    hosts: list[tuple[str, int]] = []
    for p in processes:
        if hosts and hosts[-1][0] == p.host:
            hosts[-1] = (p.host, hosts[-1][1] + 1)
        else:
            hosts.append((p.host, 1))
    return hosts


def _wrapper_source() -> str:
    return rank.__loader__.get_source(rank.__name__)  # type: ignore[union-attr]


def launch_for(spec: JobSpec, processes: list[ProcessPlan], run_id: str, remote: bool,
               files_dir: str | None = None) -> MpiLaunch:
    """The :class:`~tflaunch.mpirun.MpiLaunch` of a job whose ranks are ``processes``, with every file
    the hosts' agents write for it (the rank wrapper, mpirun's ssh wrapper, a hostfile): also what
    ``--dry-run`` shows. ``files_dir``: a directory every node sees (inside Slurm), instead of the
    same path under /tmp on every host."""
    dist = spec.distributed or {}
    install = MpiInstall.from_dict(dist["mpi"])
    hosts = _host_counts(processes)
    env = {k: v for k, v in processes[0].environment().items() if k not in PER_RANK}
    env[rank.PPN_VAR] = str(spec.process_count_per_node)
    program = [spec.python, "-I", "-S", "-c", rank.bootstrap(run_id, files_dir), spec.python, spec.entry_script,
               *spec.arguments]
    target = spec.compute_target or {}
    in_slurm = slurm.in_allocation(target)
    srun = dist.get("srun_mpi") if dist.get("launcher") == "srun" else None
    launch = launcher(install, hosts, program, env, files_dir=files_dir or rank_dir(run_id), remote=remote,
                      as_root=os.geteuid() == 0, user_args=dist.get("mpi_args") or [],
                      oversubscribe=bool(target.get("oversubscribe")), in_slurm=in_slurm, use_srun=srun,
                      path=os.environ.get("PATH"), iface=dist.get("mpi_iface"))
    if launch.path is None:
        launch.path = os.environ.get("PATH")
    launch.files["rank.py"] = (_wrapper_source(), 0o644)
    if files_dir is not None:
        launch.files["cwd"] = (processes[0].cwd, 0o644)
    if remote and not in_slurm:
        ssh = ssh_argv("HOST", "COMMAND", SshOptions.from_dict(target.get("ssh")))[:-3]
        launch.files["ssh"] = (ssh_wrapper(ssh, run_id, sys.executable), 0o755)
    return launch


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
    files = {"rank.py": (_wrapper_source(), 0o644), "ranks.json": (json.dumps(table), 0o644),
             "cwd": (processes[0].cwd, 0o644)}
    hosts = _host_counts(processes)
    hostfile = None
    if len({n for _, n in hosts}) > 1 or len({h for h, _ in hosts}) < len(hosts):
        hostfile = os.path.join(files_dir, "hostfile")
        files["hostfile"] = (slurm.hostfile_text(hosts), 0o644)
        common["SLURM_HOSTFILE"] = hostfile
    program = [spec.python, "-I", "-S", "-c", rank.bootstrap(run_id, files_dir), *processes[0].argv]
    argv = slurm.step_argv(hosts, program, hostfile=hostfile, job_name=f"tflaunch-{run_id}")
    return MpiLaunch(argv, common, files, os.environ.get("PATH"))


class MpiJob:
    """The MPI part of one :class:`~tflaunch.supervise.Supervisor`."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.launcher: HostRun | None = None
        self.demux = rank.Demux(self._write, self._other, self._rank_event)
        self.rank_hosts: dict[int, str] = {}  # rank -> the host name it reported
        self.misplaced = False
        self._log: Any = None
        self.name = "mpirun" if sup.backend == "mpi" and (sup.spec.distributed or {}).get("launcher") != "srun" \
            else "srun"
        self.log_path = MPIRUN_LOG if self.name == "mpirun" else SRUN_LOG  # its own messages, in the record

    @staticmethod
    def is_launcher(index: int) -> bool:
        """Whether an agent process index is mpirun's (the ranks are 0..N-1)."""
        return index == MPIRUN

    # -- launch ----------------------------------------------------------------------------------------
    def follow(self) -> None:
        """Stream mpirun's own messages to the console (the ranks' output is followed per rank)."""
        sup = self.sup
        if sup.stream:
            sup._followers.append(tail.Follower(sup.record.path(self.log_path), sup.stderr, prefix=f"[{self.name}] "))

    def launch(self, preview: list[ProcessPlan]) -> None:
        from .launch.hostrun import ORPHAN_GRACE, HostRun, LaunchFailure

        sup = self.sup
        if sup.step:
            self._launch_step()
            return
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
        mpirun = self._process(launch)
        if len(sup.runs) == 1 and not sup.prep.needed:  # this machine only: one round trip (files, then mpirun)
            if sup.prep.home_result is not None:
                files[f"host.{os.uname().nodename}.json"] = [json.dumps({"python": sup.prep.home_result.python}), 0o644]
            sup.prep.record_environment()
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
        told = [run for run in sup.runs if not run.launcher_only and (not run.conn.local or sup.prep.host_info(run))]
        for run in told:  # where the ranks run here, their interpreter, data paths (and --setup's changes)
            run.conn.send({"cmd": "rank_cwd", "cwd": sup.work_dir if run.shared or run.conn.local else run.work_dir,
                           "info": sup.prep.host_info(run)})
        deadline = time.monotonic() + sup.ssh.connect_timeout + 20
        if not sup._wait(lambda: all(run.rank_ready for run in told), deadline, "to write the rank wrapper"):
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

    def _process(self, launch: MpiLaunch) -> dict[str, Any]:
        """The launcher as the agent starts it."""
        env = dict(launch.env)
        if launch.path:
            env["PATH"] = launch.path
        return {"index": MPIRUN, "argv": launch.argv, "cwd": self.sup.work_dir, "env": env,
                "stdout": None, "stderr": None}

    def spawn_launcher(self) -> HostRun:
        """Start this machine's agent for an srun step (early: its start-up overlaps the preparations)."""
        from .launch.hostrun import HostRun

        if self.launcher is None:
            sup = self.sup
            here = next((h.name for h in sup.hosts if is_local(h.name)), "(launcher)")
            with open(sup.record.path(LOG_DIR, "launcher.log"), "ab") as agent_log:
                self.launcher = HostRun(here, 0, AgentConnection(spawn_agent(agent_log), "localhost"))
            self.launcher.launcher_only = True
            sup.runs.append(self.launcher)
        return self.launcher

    def _launch_step(self) -> None:
        """Inside a Slurm allocation: plan with the allocation's nodes, write the rank wrapper and its
        table where every node sees them, start the one launcher from this machine's agent."""
        from .launch.hostrun import ORPHAN_GRACE, LaunchFailure

        sup = self.sup
        spec, hosts = sup.spec, sup.hosts
        local = self.spawn_launcher()
        files_dir = sup.record.path(STEP_FILES)
        host_info = sup.prep.step_info()  # no agents on the nodes: the rank wrapper does their part
        try:
            needed = ports_needed(spec, hosts)
            ports = slurm.step_ports(sup.slurm_job, needed) if needed else {}
            addresses = {}
            if needed or sup.backend in TF_BACKENDS:
                addresses = slurm.node_addresses([h.name for h in hosts])
            gpus = None
            if spec.use_gpu:
                count = spec.gpus_per_node or slurm.gpus_per_node(os.environ)
                if not count:
                    raise SpecError("--gpu inside Slurm: the allocation has no GPUs (SLURM_GPUS_ON_NODE is not "
                                    "set): ask for them (--gpus-per-node) or give --gpus-per-node N")
                gpus = {h.name: [str(i) for i in range(count)] for h in hosts}
            processes = plan(spec, sup._context(), hosts, ports=ports, addresses=addresses, gpus=gpus,
                             machines={h.name: h.name for h in hosts},
                             pythons={h.name: host_info["python"] for h in hosts} if host_info.get("python") else None)
            if sup.backend == "mpi":
                launch = launch_for(spec, processes, sup.record.id, remote=len(hosts) > 1, files_dir=files_dir)
            else:
                launch = step_launch(spec, processes, sup.record.id, files_dir)
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
        fsio.atomic_write_json(sup.record.path("hosts.json"), hosts_json)
        self._record(processes, launch)
        local.conn.start({"token": sup.record.id, "agent_id": 0, "grace": sup.grace, "orphan_grace": ORPHAN_GRACE,
                          "sweep": True, "processes": [self._process(launch)]})
        sup.started = True

    def _record(self, processes: list[ProcessPlan], launch: MpiLaunch) -> None:
        sup = self.sup
        for p in processes:
            sup.processes[p.rank] = p
        sup._record_processes(processes)
        os.makedirs(sup.record.path("mpi"), exist_ok=True)
        fsio.atomic_write_json(sup.record.path("mpi", "launch.json"), launch.to_dict(), fsync=False)
        sup.record.event(self.name, argv=launch.argv)
        log.debug("run %s: %s", sup.record.id, " ".join(launch.argv))
        self._log = open(sup.record.path(self.log_path), "ab", buffering=0)

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
            if sup.step:  # Slurm node names are (usually) host names
                planned = p.host if host.split(".")[0] != p.host.split(".")[0] else host
            else:
                planned = next((run.hello.get("hostname") for run in sup.runs if run.name == p.host and run.hello),
                               None)
            if planned and host != planned and not self.misplaced:
                self.misplaced = True  # e.g. a --mpi-arg that changes the mapping
                sup.warnings.append(f"rank {rank_} runs on {host}, not on {p.host} ({planned}) as tflaunch planned: "
                                    f"{self.name} mapped the ranks differently, so TFLAUNCH_NODE_RANK and the hosts "
                                    f"in processes.json follow the plan, not {self.name}")
            return
        try:
            rc = int(text)
        except ValueError:
            return
        sup._process_exited(self.rank_hosts.get(rank_, p.host), rank_, rc)

    def _mpirun_exited(self, run: HostRun, rc: int) -> None:
        sup = self.sup
        self.demux.close()
        sup.record.event("process_exited", index=MPIRUN, returncode=rc, host=run.name)
        if sup.stop_reason is not None:
            return
        missing = [r for r in sup.processes if r not in sup.returncodes]
        wound_down = sup.lead_done and all(r in sup.stopping or sup.returncodes.get(r) == 0 for r in sup.processes)
        if rc != 0 and not wound_down:
            how = sup._how(rc)
            last = self.last_words()
            sup.failure = {"index": MPIRUN, "rank": None, "host": run.name, "returncode": rc}
            sup._stop("signal" if rc < 0 else "exit_code",
                      f"{self.name} {how}" + (f" before rank(s) {_ranks(missing)} reported" if missing else "")
                      + (f": {last}" if last else ""))
        elif wound_down:
            for r in missing:  # stopped by tflaunch after the chief ended: not failures
                sup.returncodes[r] = -15
        elif missing:
            for r in missing:
                sup.returncodes[r] = 0
            sup.warnings.append(f"rank(s) {_ranks(missing)} did not report their exit status; {self.name} exited "
                                "with code 0, so they are counted as successful")

    def last_words(self) -> str:
        """mpirun's last line of its own (why it failed, usually)."""
        data = tail.tail_bytes(self.sup.record.path(self.log_path))
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
        from .launch.hostrun import LaunchFailure
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
