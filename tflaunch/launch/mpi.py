"""The ``mpirun`` launcher (``--backend mpi``): mpirun starts the ranks, tflaunch watches over them.

The agents still come up on every host, but only to hold the job's files (copied where the filesystem
is not shared), the rank wrapper (:mod:`tflaunch.remote.rank`) and, in *sweep* mode, the power to stop every
process of the run on their host. The agent on this machine starts the one mpirun built by
:func:`tflaunch.plan.mpirun.launcher` (:class:`~tflaunch.launch.one_process.OneProcessLauncher`: output
split per rank, mpirun's own in ``tflaunch_logs/mpirun.log``). The first rank whose program fails is
the root cause and stops the job at once (mpirun's own abort is not waited for). When mpirun has
ended, each host's agent sweeps what is left of the run there (an MPI daemon or a rank that mpirun
failed to stop): counted, stopped and reported as a warning. If tflaunch itself is killed, the agents
lose their connection and sweep as well. Inside a Slurm allocation MPI jobs start from
:mod:`tflaunch.launch.srun_step` (also with mpirun), with :func:`launch_for`.
"""
from __future__ import annotations

import json
import os
import sys
import time

from .. import slurm
from ..remote.agent import rank_dir
from ..errors import SpecError
from ..plan.mpirun import MpiInstall, MpiLaunch, launcher, ssh_wrapper
from ..plan.processes import machine_ids, plan
from .agents import open_agents, setup_agents
from .hostrun import ORPHAN_GRACE, LaunchFailure
from .one_process import PER_RANK, OneProcessLauncher, host_counts, wrapper_source
from .ssh import SshOptions, ssh_argv

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

    from ..plan.processes import ProcessPlan
    from ..spec import JobSpec
    from . import AgentConnection
    from .hostrun import HostRun

__all__ = ["MpirunLauncher", "launch_for", "SWEEP_GRACE"]

SWEEP_GRACE = 2.0


def launch_for(spec: JobSpec, processes: list[ProcessPlan], run_id: str, remote: bool,
               files_dir: str | None = None) -> MpiLaunch:
    """The :class:`~tflaunch.plan.mpirun.MpiLaunch` of a job whose ranks are ``processes``, with every file
    the hosts' agents write for it (the rank wrapper, mpirun's ssh wrapper, a hostfile): also what
    ``--dry-run`` shows. ``files_dir``: a directory every node sees (inside Slurm), instead of the
    same path under /tmp on every host."""
    from ..remote import rank

    dist = spec.distributed or {}
    install = MpiInstall.from_dict(dist["mpi"])
    hosts = host_counts(processes)
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
    launch.files["rank.py"] = (wrapper_source(), 0o644)
    if files_dir is not None:
        launch.files["cwd"] = (processes[0].cwd, 0o644)
    if remote and not in_slurm:
        ssh = ssh_argv("HOST", "COMMAND", SshOptions.from_dict(target.get("ssh")))[:-3]
        launch.files["ssh"] = (ssh_wrapper(ssh, run_id, sys.executable), 0o755)
    return launch


class MpirunLauncher(OneProcessLauncher):
    """mpirun, started by the agent on this machine; the hosts' agents hold the files and sweep."""

    def connect(self, log_file: Any, prestarted: dict[str, AgentConnection]) -> None:
        open_agents(self.session, log_file, prestarted)

    def start(self, preview: list[ProcessPlan]) -> None:
        session = self.session
        prep = session.prep
        local = next((run for run in session.runs if run.conn.local), None)
        if local is None:  # mpirun runs here even when this machine is not one of the hosts
            local = self.local_agent("(launcher)", len(session.runs))
        self.launcher = local
        remote_hosts = any(not run.conn.local for run in session.runs)
        try:
            launch = launch_for(session.spec, preview, session.record.id, remote=remote_hosts)
        except SpecError as exc:
            raise LaunchFailure(str(exc)) from None
        files = {name: list(item) for name, item in launch.files.items()}
        mpirun = self.process(launch)
        if len(session.runs) == 1 and not prep.needed:  # this machine only: one round trip (files, then mpirun)
            if prep.home_result is not None:
                files[f"host.{os.uname().nodename}.json"] = [json.dumps({"python": prep.home_result.python}), 0o644]
            prep.record_environment()
            self.record(preview, launch)
            session.runs[0].processes = preview
            local.conn.start({"token": session.record.id, "agent_id": local.node, "grace": session.grace,
                              "orphan_grace": ORPHAN_GRACE, "lease_timeout": session.lease_timeout, "sweep": True,
                              "rank": {"files": files, "cwd": session.work_dir}, "processes": [mpirun]})
            session.started = True
            return

        def setup(run: HostRun) -> dict[str, Any]:
            return {"sweep": True, "rank": {"files": files, "cwd": session.work_dir if run.conn.local else None}}

        if setup_agents(session, {}, setup) is None:
            return
        for run in session.runs:
            if run.hello.get("rank_error"):
                raise LaunchFailure(f"host {run.name}: {run.hello['rank_error']}")
        told = [run for run in session.runs if not run.launcher_only and (not run.conn.local or prep.host_info(run))]
        for run in told:  # where the ranks run here, their interpreter, data paths (and --setup's changes)
            run.conn.send({"cmd": "rank_cwd", "cwd": session.work_dir if run.shared or run.conn.local else run.work_dir,
                           "info": prep.host_info(run)})
        deadline = time.monotonic() + session.ssh.connect_timeout + 20
        if not session.wait(lambda: all(run.rank_ready for run in told), deadline, "to write the rank wrapper"):
            return
        hosts = [run for run in session.runs if not run.launcher_only]
        work_dirs = {run.name: run.work_dir for run in hosts if run.work_dir}
        try:
            processes = plan(session.spec, session.context(), session.hosts, work_dirs=work_dirs,
                             machines=machine_ids(session.hosts, {run.name: run.hello.get("hostname") for run in hosts}))
        except SpecError as exc:
            raise LaunchFailure(str(exc)) from None
        session.record_hosts({}, {})
        self.record(processes, launch)
        for run in session.runs:
            run.processes = [p for p in processes if p.host == run.name]
        self.launcher.conn.send({"cmd": "start", "processes": [mpirun]})
        session.started = True

    def on_event(self, run: HostRun, event: dict[str, Any]) -> bool:
        kind = event.get("event")
        if kind == "rank_ready":
            run.rank_ready = True
        elif kind == "swept":
            run.swept = True
            count = int(event.get("count") or 0)
            if count:
                self.session.warnings.append(f"host {run.name}: {count} process(es) of the run were still running "
                                             "after mpirun ended (MPI daemons or ranks); tflaunch stopped them")
        else:
            return super().on_event(run, event)
        return True

    def finish(self) -> None:
        """mpirun has ended: have every other host's agent stop what is left of the run there."""
        session = self.session
        runs = [run for run in session.runs if run is not self.launcher and not run.conn.eof]
        for run in runs:
            run.conn.send({"cmd": "sweep", "grace": SWEEP_GRACE})
        try:
            session.wait(lambda: all(run.swept or run.conn.eof for run in runs), time.monotonic() + 10 + SWEEP_GRACE,
                         "to stop what mpirun left")
        except LaunchFailure as exc:
            session.warnings.append(f"after mpirun ended: {exc}")
