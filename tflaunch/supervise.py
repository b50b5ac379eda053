"""Supervision: the launcher's side of a run, from Preparing to its final status.

:class:`Supervisor` holds the run's lease (heartbeat), builds the working copy, starts an agent on
every host (:mod:`tflaunch.launch`: locally or over ssh), copies the job's files to hosts that do not
share the launcher's filesystem, starts the planned processes, streams their output when attached
(prefixed ``[rank N]`` when there are several), enforces the timeout, and stops everything, on every
host, as soon as one process fails (fail fast: SIGTERM, SIGKILL after the grace period) or the run is
cancelled (Ctrl-C / SIGTERM / SIGHUP / ``runs cancel``; a second Ctrl-C kills at once). At the end it
brings each host's ``./outputs`` and ``./logs`` into the record and writes the final status, whose
error names the host, rank and exit code or signal of the first process that failed.
:func:`spawn_detached` runs the same supervisor in a background process (``run --detach``,
:meth:`tflaunch.Experiment.submit`).
"""
from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time

from . import agent as agent_mod
from . import fsio, tail
from .collect import COLLECTED, merge_outputs
from .errors import SpecError, TflaunchError
from .gpus import host_gpus
from .hostprep import HostPrep, PrepFailure
from .hosts import is_local
from .launch import AgentConnection
from .launch.hostrun import ORPHAN_GRACE, HostRun, LaunchFailure  # also tflaunch.supervise's names
from .launch.local import discard_agent, process_spec, spawn_agent
from .launch.ssh import SshOptions, resolve_addresses, spawn_ssh_agent
from .plan import ProcessPlan, RunContext, machine_ids, plan, ports_needed
from .tfconfig import TF_BACKENDS, backend
from .snapshot import MANIFEST, materialize
from .spec import JobSpec
from .store import (CANCELED, COMPLETED, FAILED, FINALIZING, LOG_DIR, RUNNING, TERMINAL, RunRecord, Store,
                    now_iso, rank_log)
from .slurm import in_allocation
from .target import allocation_target, target_hosts

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Callable, Sequence, TextIO

__all__ = ["Supervisor", "spawn_detached", "Detached", "detached_main", "DEFAULT_GRACE", "prestart_agents"]

log = logging.getLogger(__name__)

DEFAULT_GRACE = 10.0
CANCEL_POLL = 0.5
STREAM_POLL = 0.1
HELLO_MARGIN = 20.0  # beyond ssh's connect timeout: login, the remote interpreter's start-up
PROBE_FILE = ".tflaunch-probe"


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def prestart_agents(compute_target: dict[str, Any] | None, python: str | None = None,
                    ) -> dict[str, AgentConnection]:
    """Start the agents of a run's hosts now (an ssh login takes ~0.2 s) so that it overlaps the snapshot."""
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


class Supervisor:
    """Runs one prepared run record to completion in this process."""

    def __init__(self, record: RunRecord, *, stream: bool = False, stdout: TextIO | None = None,
                 stderr: TextIO | None = None, on_lease: Any = None,
                 agents: dict[str, AgentConnection] | None = None) -> None:
        self.record = record
        self.definition = record.definition()
        self.spec = JobSpec.from_dict(self.definition["spec"])
        self.target = self.spec.compute_target or {}
        self.submitted = self.target.get("kind") == "slurm"  # by `run --slurm`: hosts come with the allocation
        self._target_error: str | None = None
        if self.submitted:
            try:
                self.target = self.spec.compute_target = allocation_target(self.target, self.spec.node_count,
                                                                           self.spec.procs_per_host)
            except SpecError as exc:
                self._target_error = str(exc)
        self.hosts = target_hosts(self.spec.compute_target)[:self.spec.node_count]
        self.ssh = SshOptions.from_dict(self.target.get("ssh"))
        self.grace = float(self.definition.get("grace", DEFAULT_GRACE))
        self.stream = stream
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.on_lease = on_lease
        self._prestarted = dict(agents or {})  # started early by the caller (see prestart_agents)
        self.runs: list[HostRun] = []
        self.processes: dict[int, ProcessPlan] = {}
        self.pgids: set[int] = set()  # of local processes, for stopping them without an agent
        self.returncodes: dict[int, int] = {}
        self.failure: dict[str, Any] | None = None  # the first process that failed
        self.stop_reason: str | None = None  # canceled|timeout|launch_failed|agent_lost|internal|external|exit_code|signal
        self.stop_detail = ""
        self.killed = False
        self.started = False  # start commands sent
        self.running = False  # a process has started (status Running)
        self.deadline: float | None = None  # max_run_duration_seconds, counted from the first start
        self.warnings: list[str] = []
        distributed = self.spec.distributed or {}
        self.backend = backend(self.spec)
        self.evaluator_grace = float(distributed.get("evaluator_grace") or 0)
        self.lead_done = False  # the chief (worker 0 when there is none) exited 0: the others wind down
        self.lead_ended = 0.0
        self.wind_down: dict[int, float] = {}  # rank -> when tflaunch stops it (after the lead ended)
        self.stopping: set[int] = set()  # ranks tflaunch stopped after the lead ended: not failures
        self._signals: list[int] = []
        self._interrupts = 0
        self._followers: list[tail.Follower] = []
        self._relay_files: dict[tuple[int, int], Any] = {}
        # Inside a Slurm allocation with the srun launcher, one srun step starts every process and no
        # agent runs on the other nodes (hosts come from the allocation, resolved when the job starts)
        self.slurm_job = os.environ.get("SLURM_JOB_ID") if in_allocation(self.target) else None
        if self.submitted and self.slurm_job is None:
            self.slurm_job = (record.lease() or {}).get("slurm_job_id")
        self.step = in_allocation(self.target) and self.target.get("launcher") == "srun"
        self.mpi: Any = None  # tflaunch.mpijob.MpiJob: one launcher process (mpirun, or an srun step)
        if self.backend == "mpi" or self.step:  # imported only for those: not on every run's start-up
            from .mpijob import MpiJob
            self.mpi = MpiJob(self)
        scratch = self.definition.get("scratch")
        self.work_dir = os.path.join(scratch, record.id) if scratch else record.work_dir
        self.prep = HostPrep(self)  # setup lines, the job's environment, preflight, data inputs
        self.prep_tail = ""  # output of the preparation step that failed

    # -- signals -------------------------------------------------------------------------------------
    def _install_signals(self) -> tuple[Any, ...]:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        old_fd = signal.set_wakeup_fd(self._wake_w)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        return old_fd, old

    def _restore_signals(self, saved: tuple[Any, ...]) -> None:
        old_fd, old = saved
        signal.set_wakeup_fd(old_fd)
        for s, handler in old.items():
            signal.signal(s, handler)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals.append(signum)

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGINT:
                self._interrupts += 1
                if self._interrupts > 1:
                    self._kill_now()
                    continue
                self.cancel("interrupted (Ctrl-C)")
                log.info("press Ctrl-C again to kill the run's processes now")
            else:
                request = self.record.cancel_requested()  # `runs cancel` writes a request, then signals
                if request:
                    self.cancel(str(request.get("reason")))
                    continue
                ended = self._slurm_ending(wait=1.0) if signum == signal.SIGTERM and self.slurm_job else None
                if ended is not None:
                    self._stop(*ended)
                else:
                    self.cancel(f"launcher received {signal.Signals(signum).name}")

    def _slurm_ending(self, wait: float = 0.0) -> tuple[str, str] | None:
        """Why Slurm is stopping this run's job (SIGTERM at the time limit, on preemption, scancel,
        node failure): (stop reason, detail), or None when Slurm cannot tell (within ``wait`` s)."""
        from . import slurm

        deadline = time.monotonic() + wait
        while True:
            try:
                info = slurm.job_info(str(self.slurm_job))
            except slurm.SlurmError as exc:  # scontrol itself may catch the SIGTERM meant for the job
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                log.warning("run %s: cannot ask Slurm why the job is stopping: %s", self.record.id, exc)
                return None
            state = slurm.job_state(info)
            if state in ("COMPLETING", "RUNNING"):  # the end state shows once the job is gone
                state = slurm.REASON_STATES.get((info or {}).get("Reason", ""), state)
            if state in slurm.ENDED or time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        log.debug("run %s: Slurm reports job %s as %s (Reason=%s)", self.record.id, self.slurm_job,
                  (info or {}).get("JobState"), (info or {}).get("Reason"))
        fields = slurm.final_fields(dict(info or {}, JobState=state), str(self.slurm_job), None) \
            if state in slurm.ENDED else None
        if fields is None:
            return None
        if fields["status"] == CANCELED:
            return "canceled", fields["cancel_reason"]
        return fields["error"]["reason"], fields["error"]["message"]

    # -- stopping ------------------------------------------------------------------------------------
    def _stop(self, reason: str, detail: str) -> None:
        if self.stop_reason is None:
            self.stop_reason, self.stop_detail = reason, detail
            self.wind_down.clear()  # everything is being stopped now
            log.info("stopping run %s: %s", self.record.id, detail)
            for run in self.runs:
                if not run.finished:
                    run.conn.terminate(self.grace)

    def cancel(self, detail: str) -> None:
        self._stop("canceled", detail)

    def _kill_now(self) -> None:
        self._stop("canceled", "killed (Ctrl-C twice)")
        self.killed = True
        for run in self.runs:
            if not run.finished:
                run.conn.kill()

    # -- main ----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Supervise the run and return its final run object."""
        saved = self._install_signals()
        try:
            self.record.write_lease(slurm_job_id=self.slurm_job)
            if self.slurm_job:
                current = (self.record.read_status(check_lease=False) or {}).get("slurm") or {}
                self.record.write_status(slurm={**current, "job_id": self.slurm_job, "submitted": self.submitted,
                                                "launcher": self.target.get("launcher"),
                                                "nodes": [h.name for h in self.hosts]})
            if self.on_lease is not None:
                self.on_lease()
            try:
                self._prepare_and_launch()
                if self.started:
                    self._loop()
                if self.mpi is not None:
                    self.mpi.sweep()
                self._collect_remote()
            except LaunchFailure as exc:
                self._stop("launch_failed", str(exc))
            except PrepFailure as exc:
                self.prep_tail = exc.tail
                self._stop(exc.reason, str(exc))
            except BaseException as exc:  # never leave a run Running or processes behind
                log.exception("run %s: launcher error", self.record.id)
                self._stop("internal", f"tflaunch internal error: {exc!r}")
                self._abandon_agents()
                if not isinstance(exc, Exception):
                    raise
            finally:
                self._close_agents()
            return self._finalize()
        finally:
            for conn in self._prestarted.values():  # never used: canceled before launch
                if conn.popen.stdin is not None and not conn.popen.stdin.closed:
                    discard_agent(conn.popen)
            for f in self._followers:
                f.close()
            for fh in self._relay_files.values():
                fh.close()
            if self.mpi is not None:
                self.mpi.close()
            self.prep.close()
            self._restore_signals(saved)

    def _context(self) -> RunContext:
        from .pylib import library_path

        return RunContext(run_id=self.record.id, experiment=self.definition["experiment"], run_dir=self.record.dir,
                          work_dir=self.work_dir, home=self.record.store.home,
                          pythonpath=library_path(self.record.store.home))

    def _open_agents(self, log_file: Any) -> None:
        if self.step:
            return  # the launcher's own agent only (see MpiJob.launch)
        for node, host in enumerate(self.hosts):
            conn = self._prestarted.pop(host.name, None)
            if conn is None:
                if is_local(host.name):
                    conn = AgentConnection(spawn_agent(log_file), host.name)
                else:
                    conn = spawn_ssh_agent(host.name, self.spec.python, self.ssh)
            self.runs.append(HostRun(host.name, node, conn))

    def _prepare_and_launch(self) -> None:
        record = self.record
        if self._target_error:
            raise LaunchFailure(self._target_error)
        if self.step:
            self.mpi.spawn_launcher()
        self._check_cancel()
        manifest = fsio.read_json(record.path(MANIFEST))
        materialize(manifest, record.store.home, self.work_dir)
        for name in COLLECTED:
            os.makedirs(os.path.join(self.work_dir, name), exist_ok=True)
        self.prep.record_inputs()
        self._handle_signals()
        self._check_cancel()
        if self.stop_reason:
            return
        ctx = self._context()
        home_env = self.prep.reuse_home_environment()  # built already: no host needs to be asked
        try:
            preview = plan(self.spec, ctx, self.hosts,
                           pythons={h.name: home_env.python for h in self.hosts} if home_env else None)
        except SpecError as exc:
            raise LaunchFailure(str(exc)) from None
        if self.stream:
            prefix = len(preview) > 1
            for p in preview:
                label = p.label if prefix else ""
                self._followers.append(tail.Follower(record.path(p.stdout), self.stdout, prefix=label))
                self._followers.append(tail.Follower(record.path(p.stderr), self.stderr, prefix=label))
        if self.mpi is not None:
            self.mpi.follow()
        with open(record.path(LOG_DIR, "launcher.log"), "ab") as agent_log:
            self._open_agents(agent_log)
        needed = ports_needed(self.spec, self.hosts)
        if self.mpi is not None:
            self.mpi.launch(preview)
            return
        if len(self.runs) == 1 and self.runs[0].conn.local and not needed and not self.spec.use_gpu \
                and not self.prep.needed:
            # the common case: one round trip
            processes = preview
            if len(processes) > 1 or self.backend != "plain":
                self._record_processes(processes)
            self.prep.record_environment()
            self._start_host(self.runs[0], processes, setup=True)
            return
        remote = self._setup_agents(needed)
        if remote is None:
            return
        work_dirs = {run.name: run.work_dir for run in self.runs if run.work_dir}
        ports = {run.name: run.hello.get("ports") or [] for run in self.runs}
        addresses = {}
        if remote:  # others cannot reach "localhost": use this machine's name; aliases: ssh's HostName
            addresses = {run.name: run.hello.get("hostname") or run.name for run in self.runs if run.conn.local}
            if needed or self.backend in TF_BACKENDS:
                addresses.update(resolve_addresses([run.name for run in remote], self.ssh))
        try:
            gpus = None
            if self.spec.use_gpu:
                gpus = {run.name: host_gpus(run.name, run.hello.get("gpus"), self.spec.gpus_per_node)
                        for run in self.runs}
            machines = machine_ids(self.hosts, {run.name: run.hello.get("hostname") for run in self.runs})
            processes = plan(self.spec, ctx, self.hosts, work_dirs=work_dirs, ports=ports, addresses=addresses,
                             gpus=gpus, machines=machines, pythons=self.prep.pythons or None,
                             data_paths=self.prep.data_paths)
        except SpecError as exc:
            raise LaunchFailure(str(exc)) from None
        self._record_hosts(ports, addresses)
        self._record_processes(processes)
        by_host: dict[str, list[ProcessPlan]] = {}
        for p in processes:
            by_host.setdefault(p.host, []).append(p)
        for run in self.runs:
            self._start_host(run, by_host.get(run.name, []))

    def _setup_agents(self, needed: dict[str, int], more: Callable[[HostRun], dict[str, Any]] | None = None,
                      ) -> list[HostRun] | None:
        """Send every agent its setup (``needed``: ports per host; ``more``: extra setup per host), wait
        for their hellos, copy the job's files to the hosts that do not share this filesystem; return
        the remote hosts' runs, or None if the run was stopped meanwhile."""
        record = self.record
        remote = [run for run in self.runs if not run.conn.local]
        probe = None
        if remote:
            content = f"{record.id} {os.urandom(8).hex()}"
            fsio.atomic_write_bytes(os.path.join(self.work_dir, PROBE_FILE), content.encode())
            probe = {"path": os.path.join(self.work_dir, PROBE_FILE), "content": content}
        for run in self.runs:
            setup = {"token": record.id, "agent_id": run.node, "grace": self.grace, "orphan_grace": ORPHAN_GRACE,
                     "ports": needed.get(run.name, 0), "scratch_root": self.target.get("remote_scratch"),
                     "probe": None if run.conn.local else probe, "gpus": self.spec.use_gpu}
            if more is not None:
                setup.update(more(run))
            setup.update(self.prep.setup_fields(run))
            try:
                run.conn.start(setup)
            except OSError:
                pass  # the agent is gone; its end of file says why
        deadline = time.monotonic() + self.ssh.connect_timeout + HELLO_MARGIN
        if not self._wait(lambda: all(run.hello for run in self.runs), deadline, "to answer"):
            return None
        if probe:
            os.unlink(probe["path"])
        for run in remote:
            run.shared = bool(run.hello.get("shared"))
        self._upload([run for run in remote if not run.shared])
        if self.stop_reason:
            return None
        if not self.prep.run([run for run in self.runs if not run.launcher_only]):
            return None
        self.prep.record_environment()
        return remote

    def _start_host(self, run: HostRun, processes: list[ProcessPlan], setup: bool = False) -> None:
        run.processes = processes
        for p in processes:
            self.processes[p.rank] = p
        specs = [process_spec(p, self.record.dir if run.conn.local else None) for p in processes]
        if setup:
            run.conn.start({"token": self.record.id, "agent_id": run.node, "grace": self.grace,
                            "orphan_grace": ORPHAN_GRACE, "processes": specs})
        else:
            run.conn.send({"cmd": "start", "processes": specs})
        self.started = True

    def _record_hosts(self, ports: dict[str, list[int]], addresses: dict[str, str]) -> None:
        hosts = [{"name": run.name, "node": run.node, "hostname": run.hello.get("hostname"),
                  "address": addresses.get(run.name, run.name), "agent_pid": run.hello.get("pid"),
                  "local": run.conn.local, "shared_filesystem": run.shared, "work_dir": run.work_dir or self.work_dir,
                  "ports": ports.get(run.name, []), "gpus": run.hello.get("gpus")}
                 for run in self.runs]
        fsio.atomic_write_json(self.record.path("hosts.json"), hosts)
        self.record.event("hosts", hosts=hosts)

    def _record_processes(self, processes: list[ProcessPlan]) -> None:
        """``processes.json``: each process's rank, role, host, port and GPUs; ``tf_cluster.json``: the
        cluster of TF_CONFIG (a process's TF_CONFIG is that cluster and its role and index)."""
        rows = [{"rank": p.rank, "role": p.role, "index": p.index, "host": p.host, "local_rank": p.local_rank,
                 "port": p.port, "cuda_visible_devices": p.environment().get("CUDA_VISIBLE_DEVICES"),
                 "label": p.label.strip(), "stdout": p.stdout, "stderr": p.stderr} for p in processes]
        fsio.atomic_write_json(self.record.path("processes.json"), rows)
        if processes and processes[0].tf_cluster:
            fsio.atomic_write_json(self.record.path("tf_cluster.json"), json.loads(processes[0].tf_cluster))

    def _upload(self, runs: list[HostRun]) -> None:
        """Copy the working directory to hosts that cannot see it (a tar stream over each connection)."""
        if not runs:
            return
        import tarfile
        import threading

        from .pylib import library_path

        path = self.record.path(".upload.tar")
        lib = library_path(self.record.store.home)
        with tarfile.open(path, "w") as tar:
            for entry in sorted(os.listdir(self.work_dir)):
                tar.add(os.path.join(self.work_dir, entry), arcname=entry)
            if lib and os.path.isdir(lib):  # tflaunch for the script's imports (see tflaunch.pylib)
                tar.add(lib, arcname=".tflaunch-lib")
            for name, directory in self.prep.wheelhouses(runs):  # for an environment built there
                tar.add(directory, arcname=name)

        def send(run: HostRun) -> None:
            with open(path, "rb") as fh:
                while True:
                    chunk = fh.read(1 << 20)
                    if not chunk or not run.conn.send({"cmd": "data"}, chunk):
                        break
            run.work_dir = os.path.join(run.hello["scratch"], "work")
            run.conn.send({"cmd": "unpack", "dest": run.work_dir})

        threads = [threading.Thread(target=send, args=(run,), daemon=True) for run in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        os.unlink(path)
        log.info("copied the job's files to %s (no shared filesystem)", ", ".join(run.name for run in runs))
        self._wait(lambda: all(run.unpacked for run in runs), None, "to unpack the job's files")

    def _wait(self, condition: Callable[[], bool], deadline: float | None, what: str) -> bool:
        """Serve events until ``condition()``; False if the run was stopped meanwhile.

        Raises LaunchFailure when a host's agent ends or reports an error, or at ``deadline``.
        """
        next_cancel_poll = time.monotonic() + CANCEL_POLL
        while not condition():
            self._poll(0.1)
            if self.stream:
                for f in self._followers:
                    f.poll()
            if time.monotonic() >= next_cancel_poll:  # `runs cancel` from another machine: a request file
                self._check_cancel()
                next_cancel_poll = time.monotonic() + CANCEL_POLL
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

    def _poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` for events or signals and handle them."""
        fds = [self._wake_r] + [run.conn.fileno() for run in self.runs if not run.conn.eof]
        try:
            ready = select.select(fds, [], [], max(0.0, timeout))[0]
        except InterruptedError:
            ready = []
        if self._wake_r in ready:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
        self._handle_signals()
        for run in self.runs:
            if run.conn.eof:
                continue
            for event in run.conn.read_events():
                self._on_event(run, event)

    def _check_cancel(self) -> None:
        request = self.record.cancel_requested()
        if request is not None:
            self.cancel(str(request.get("reason") or "cancel requested"))

    def _loop(self) -> None:
        lease = self.record.lease() or {}
        interval = float(lease.get("interval", 2.0))
        next_beat = time.monotonic() + interval
        next_cancel_poll = time.monotonic() + CANCEL_POLL
        watched = [self.mpi.launcher] if self.mpi is not None and self.mpi.launcher else self.runs
        while not all(run.finished for run in watched):
            now = time.monotonic()
            wait = min(next_beat, next_cancel_poll) - now
            if self.deadline is not None:
                wait = min(wait, self.deadline - now)
            if self.wind_down:
                wait = min(wait, min(self.wind_down.values()) - now)
            if self.stream:
                wait = min(wait, STREAM_POLL)
            self._poll(wait)
            for run in self.runs:
                if run.conn.eof and not run.conn.done and not run.error:
                    run.error = "lost"
                    detail = run.conn.stderr_tail()
                    self._stop("agent_lost", f"lost the tflaunch agent on host {run.name}" +
                               (f": {detail}" if detail else ""))
                    if run.conn.local:
                        self._abandon_agents()
            now = time.monotonic()
            if self.wind_down and self.stop_reason is None:
                self._wind_down(now)
            if self.deadline is not None and now >= self.deadline:
                if self.lead_done:  # the chief's outcome stands: only the stragglers are stopped
                    self.wind_down = {rank: now for rank in self.wind_down}
                    self._wind_down(now)
                else:
                    self._stop("timeout", f"run exceeded max_run_duration_seconds="
                                          f"{self.spec.max_run_duration_seconds:g} and was stopped")
                self.deadline = None
            if now >= next_cancel_poll:
                self._check_cancel()
                next_cancel_poll = now + CANCEL_POLL
            if now >= next_beat:
                self._heartbeat()
                next_beat = now + interval
                if self.stop_reason == "external":
                    break
            if self.stream:
                for f in self._followers:
                    f.poll()
        for f in self._followers:
            f.poll(final=True)

    def _rank_file(self, rank: int, fd: int) -> Any:
        """The log file a rank's stdout (``fd`` 1) or stderr (2) is appended to."""
        fh = self._relay_files.get((rank, fd))
        if fh is None:
            p = self.processes[rank]
            fh = self._relay_files[(rank, fd)] = open(self.record.path(p.stdout if fd == 1 else p.stderr),
                                                      "ab", buffering=0)
        return fh

    def _on_event(self, run: HostRun, event: dict[str, Any]) -> None:
        if self.mpi is not None and self.mpi.on_event(run, event):
            return
        if self.prep.on_event(run, event):
            return
        kind = event.get("event")
        if kind == "output":
            self._rank_file(int(event["index"]), int(event["fd"])).write(event["data"])
        elif kind == "started":
            if run.conn.local:
                self.pgids.add(int(event["pid"]))
            self.record.event("process_started", index=event.get("index"), pid=event.get("pid"), host=run.name)
            if not self.running:
                self.running = True
                self.record.write_status(RUNNING, started=now_iso(), **self.prep.status_fields)
                if self.spec.max_run_duration_seconds:
                    self.deadline = time.monotonic() + float(self.spec.max_run_duration_seconds)
            if self.stop_reason:  # stopped while starting
                run.conn.terminate(0 if self.killed else self.grace)
        elif kind == "exited":
            self._process_exited(run.name, int(event["index"]), int(event["returncode"]))
        elif kind == "spawn_failed":
            self._stop("launch_failed", f"could not start {self.spec.entry_script} on host {run.name}: "
                                        f"{event.get('error')}")
        elif kind == "hello":
            run.hello = event
        elif kind == "unpacked":
            run.unpacked = True
        elif kind == "data" and run.collect_file is not None and not run.collect_file.closed:
            run.collect_file.write(event["data"])
        elif kind == "collected":
            run.collected = True
        elif kind == "cleaned":
            run.cleaned = True
        elif kind == "error":
            run.error = f"{event.get('cmd')}: {event.get('error')}"

    def _process_exited(self, host: str, index: int, rc: int) -> None:
        """A process of the run ended with ``rc`` (negative: killed by that signal)."""
        self.returncodes[index] = rc
        self.wind_down.pop(index, None)
        self.record.event("process_exited", index=index, returncode=rc, host=host)
        if self.stop_reason is not None or index in self.stopping:
            pass
        elif self.lead_done:  # after the chief: its outcome stands; a late failure is worth a warning
            if rc != 0:
                self.warnings.append(f"{self._who(index, host)} {self._how(rc)} after the "
                                     f"{self._role_text(0)} had ended")
        elif rc != 0:
            self._fail(host, index, rc)
        elif index == 0 and self.backend in TF_BACKENDS:
            self._lead_finished()

    def _role_text(self, rank: int) -> str:
        p = self.processes.get(rank)
        return f"{p.role} {p.index}" if p else f"rank {rank}"

    def _who(self, rank: int, host: str) -> str:
        if len(self.processes) <= 1:
            return self.spec.entry_script
        if self.backend in TF_BACKENDS:
            return f"{self.spec.entry_script} ({self._role_text(rank)}, rank {rank} on host {host})"
        return f"{self.spec.entry_script} (rank {rank} on host {host})"

    @staticmethod
    def _how(rc: int) -> str:
        return f"was killed by {_signal_name(rc)}" if rc < 0 else f"exited with code {rc}"

    def _fail(self, host: str, index: int, rc: int) -> None:
        """Fail fast: the first process to fail ends the run; it is the root cause."""
        p = self.processes.get(index)
        self.failure = {"index": index, "rank": index, "host": host, "returncode": rc}
        if p is not None and self.backend in TF_BACKENDS:
            self.failure.update(role=p.role, task_index=p.index)
        if self.slurm_job and rc in (-signal.SIGTERM, -signal.SIGKILL, 128 + signal.SIGTERM):
            # Slurm stops the job's tasks itself (runs cancel + scancel, time limit, preemption): say why
            request = self.record.cancel_requested()
            ended = ("canceled", str(request.get("reason"))) if request else self._slurm_ending(wait=1.0)
            if ended is not None:
                self._stop(*ended)
                return
        self._stop("signal" if rc < 0 else "exit_code", f"{self._who(index, host)} {self._how(rc)}")

    def _lead_finished(self) -> None:
        """The chief (worker 0 when there is none) exited 0: the run's outcome. ps tasks, and the workers of
        a parameter-server job, block in ``server.join()``: stop them now; multiworker peers get the grace
        period to end on their own, the evaluator ``evaluator_grace``; then they are stopped too."""
        self.lead_done = True
        self.lead_ended = now = time.monotonic()
        for rank, p in self.processes.items():
            if rank in self.returncodes:
                continue
            if p.role == "evaluator":
                self.wind_down[rank] = now + self.evaluator_grace
            elif self.backend == "multiworker":
                self.wind_down[rank] = now + self.grace
            else:
                self.wind_down[rank] = now
        log.info("run %s: %s exited with code 0; stopping the tasks still running", self.record.id, self._role_text(0))
        self._wind_down(now)

    def _wind_down(self, now: float) -> None:
        if self.step and self.mpi is not None and self.mpi.launcher is not None:
            # one srun step: its tasks stop together, once the last of them is due
            if self.wind_down and all(at <= now for at in self.wind_down.values()):
                self.stopping.update(self.wind_down)
                self.wind_down.clear()
                self.mpi.launcher.conn.terminate(self.grace)
            return
        due = [rank for rank, at in self.wind_down.items() if at <= now]
        if not due:
            return
        for rank in due:
            del self.wind_down[rank]
            p = self.processes[rank]
            if p.role == "evaluator" and now > self.lead_ended:
                self.warnings.append(f"the {self._role_text(rank)} was still running {now - self.lead_ended:.0f} s "
                                     f"after the {self._role_text(0)} ended and was stopped")
        self.stopping.update(due)
        for run in self.runs:
            mine = [rank for rank in due if self.processes[rank].host == run.name]
            if mine and not run.finished:
                run.conn.send({"cmd": "terminate", "grace": self.grace, "indices": mine})

    def _collect_remote(self) -> None:
        """Fetch ./outputs and ./logs from hosts without a shared filesystem, then clean up there."""
        runs = [run for run in self.runs if not run.shared and run.work_dir and (run.conn.done or run.swept)
                and not run.conn.eof]
        if not runs:
            return
        base = self.record.path(".collect")
        os.makedirs(base, exist_ok=True)
        for run in runs:
            run.collect_file = open(os.path.join(base, f"{run.node}.tar"), "wb")
            run.conn.send({"cmd": "collect", "dir": run.work_dir, "names": list(COLLECTED)})
        try:
            self._wait(lambda: all(run.collected or run.conn.eof for run in runs), None, "to send outputs")
        except LaunchFailure as exc:
            self.warnings.append(f"collecting outputs: {exc}")
        for run in runs:
            run.collect_file.close()
        if not self.target.get("keep_remote"):
            for run in runs:
                run.conn.send({"cmd": "cleanup"})
            try:
                self._wait(lambda: all(run.cleaned or run.conn.eof for run in runs), time.monotonic() + 30, "")
            except LaunchFailure as exc:
                self.warnings.append(f"removing the remote copies: {exc}")
        else:
            for run in runs:
                log.info("kept the job's directory on host %s: %s", run.name, os.path.dirname(run.work_dir))

    def _close_agents(self) -> None:
        for run in self.runs:
            run.conn.close()

    def _heartbeat(self) -> None:
        try:
            self.record.write_lease(slurm_job_id=self.slurm_job)
        except OSError as exc:
            log.warning("run %s: cannot renew the lease: %s", self.record.id, exc)
        current = self.record.read_status(check_lease=False) or {}
        if current.get("status") in TERMINAL:  # someone declared us lost: stop, don't overwrite
            log.error("run %s was finalized by another process (%s); stopping", self.record.id,
                      (current.get("error") or {}).get("reason"))
            self._stop("external", "finalized elsewhere")
            self._abandon_agents()

    def _abandon_agents(self) -> None:
        """Stop every process of the run without waiting for the agents (remote ones stop when closed)."""
        for run in self.runs:
            run.conn.kill()
        agent_mod.stop_run(self.record.id, self.pgids, 1.0, {os.getpid()})

    # -- finalize ------------------------------------------------------------------------------------
    def _stderr_tail(self, index: int) -> str:
        p = self.processes.get(index)
        if p is not None:
            path = p.stderr
        elif self.mpi is not None and self.mpi.is_launcher(index):
            path = self.mpi.log_path
        else:
            path = rank_log(index, "stderr")
        data = tail.tail_bytes(self.record.path(path))
        lines = data.decode("utf-8", "replace").replace("\r", "\n").splitlines()
        return "\n".join(lines[-10:])

    def _outcome(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"exit_code": None, "signal": None, "error": None}
        failure = self.failure
        if failure is not None:
            rc = failure["returncode"]
            fields["signal" if rc < 0 else "exit_code"] = _signal_name(rc) if rc < 0 else rc
        elif self.returncodes.get(0) is not None and self.stop_reason in ("canceled", "timeout"):
            rc = self.returncodes[0]
            fields["signal" if rc < 0 else "exit_code"] = _signal_name(rc) if rc < 0 else rc
        reason = self.stop_reason
        if reason == "canceled":
            return {"status": CANCELED, **fields, "cancel_reason": self.stop_detail}
        if reason is not None:
            fields["error"] = {"reason": reason, "message": self.stop_detail}
            if failure is not None:
                fields["error"].update({k: failure[k] for k in ("rank", "host", "role", "task_index")
                                        if k in failure})
        else:
            missing = [i for i in self.processes if i not in self.returncodes] or not self.processes
            if not missing:
                fields["exit_code"] = 0
                return {"status": COMPLETED, **fields}
            fields["error"] = {"reason": "internal", "message": "the processes' exit statuses were not reported"}
        stderr_tail = self.prep_tail or self._stderr_tail(failure["index"] if failure else 0)
        if stderr_tail:
            fields["error"]["stderr_tail"] = stderr_tail
        return {"status": FAILED, **fields}

    def _merge_remote_outputs(self) -> None:
        base = self.record.path(".collect")
        if not os.path.isdir(base):
            return
        import tarfile

        incoming = []

        def first_rank(run: HostRun) -> int:  # ps jobs spread ranks: not node x processes per node
            return min((p.rank for p in run.processes), default=1 << 30)

        for run in self.runs:
            tar_path = os.path.join(base, f"{run.node}.tar")
            if not os.path.exists(tar_path):
                continue
            dest = os.path.join(base, str(run.node))
            try:
                with tarfile.open(tar_path) as tar:
                    if hasattr(tarfile, "data_filter"):
                        tar.extractall(dest, filter="data")
                    else:
                        tar.extractall(dest)
            except (OSError, tarfile.TarError) as exc:
                self.warnings.append(f"the outputs from host {run.name} could not be unpacked: {exc} "
                                     f"(kept in {tar_path})")
                continue
            os.unlink(tar_path)
            incoming.append((run.name, first_rank(run), dest))
        shared = [run for run in self.runs if run.shared]
        work_rank = min(first_rank(run) for run in shared) if shared else 1 << 30
        work_host = min(shared, key=first_rank).name if shared else "launcher"
        self.warnings += merge_outputs(self.work_dir, work_rank, work_host, incoming, self.record.dir)
        shutil.rmtree(base, ignore_errors=True)

    def _finalize(self) -> dict[str, Any]:
        record = self.record
        if self.stop_reason == "external":
            return record.read_status(check_lease=False) or {}
        outcome = self._outcome()
        try:
            record.write_status(FINALIZING)
        except OSError as exc:
            log.warning("run %s: cannot record Finalizing: %s", record.id, exc)
        try:
            self._merge_remote_outputs()
            record.collect_outputs(self.work_dir)
        except OSError as exc:
            reason = "disk_full" if fsio.is_disk_full(exc) else "collect_failed"
            message = (f"collecting ./outputs and ./logs into the record failed: {exc.strerror or exc}; "
                       f"the files were left in {self.work_dir}")
            previous = outcome.get("error")
            if previous:
                previous["message"] += f"; then {message}"
            else:
                note = f"{outcome.get('cancel_reason')}; then " if outcome["status"] == CANCELED else ""
                outcome.update(status=FAILED, error={"reason": reason, "message": note + message})
                outcome.pop("cancel_reason", None)
        else:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        for warning in self.warnings:
            log.warning("run %s: %s", record.id, warning)
            record.event("warning", message=warning)
        if self.warnings:
            outcome["warnings"] = self.warnings
        try:  # parse the script's metrics once now, so the first `runs metrics` reads only the cache
            from .metrics import load
            load(record.dir)
        except (OSError, ValueError) as exc:
            log.warning("run %s: cannot read its metrics: %s", record.id, exc)
        outcome["ended"] = now_iso()
        record.release_reserve()
        current = record.read_status(check_lease=False) or {}
        if current.get("status") in TERMINAL:
            return current
        status = outcome.pop("status")
        final = record.write_status(status, **self.prep.status_fields, **outcome)
        try:
            os.unlink(record.path("lease.json"))
        except OSError:
            pass
        return final


# ---------------------------------------------------------------------------------------------------
# detached supervisor

_DETACHED_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
                  "from tflaunch.supervise import detached_main; sys.exit(detached_main(sys.argv[2:]))")


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Detached:
    """A background supervisor being started for ``record``: ready once it holds the run's lease.

    ``env``: variables set for it (and so for its local agent); ``boot``/``args``/``site``: another
    background process that takes ``--home H --ready-fd N [ARGS] RUN_ID`` (a sweep's driver; ``site``:
    with the interpreter's site-packages). :meth:`poll` (without blocking) and :meth:`wait` say when it is
    ready; if it does not get that far, the run is recorded Failed (``launch_failed``) and TflaunchError
    raised. Several can be started at once (a sweep's trials) and polled together.
    """

    def __init__(self, record: RunRecord, *, env: dict[str, str] | None = None, boot: str = _DETACHED_BOOT,
                 args: Sequence[str] = (), site: bool = False) -> None:
        self.record = record
        self.log_path = record.path(LOG_DIR, "launcher.log")
        self.got = b""
        self.fd = -1
        self.proc: subprocess.Popen | None = None
        self.started = time.monotonic()
        ready_r, ready_w = os.pipe()
        try:
            with open(self.log_path, "ab") as log_file:
                self.proc = subprocess.Popen(
                    [sys.executable, "-I", *(() if site else ("-S",)), "-c", boot, _package_root(), "--home",
                     record.store.home, "--ready-fd", str(ready_w), *args, record.id],
                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True,
                    pass_fds=(ready_w,), close_fds=True, env=None if env is None else {**os.environ, **env})
        except OSError as exc:
            os.close(ready_r)
            self._fail(str(exc))
        finally:
            os.close(ready_w)
        self.fd = ready_r
        os.set_blocking(ready_r, False)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else -1

    def _fail(self, error: str) -> None:
        self.close()
        message = f"the background supervisor for run {self.record.id} did not start ({error}); see {self.log_path}"
        self.record.write_status(FAILED, ended=now_iso(), error={"reason": "launch_failed", "message": message})
        raise TflaunchError(message)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def poll(self) -> bool:
        """True once it holds the lease ("ready\n" on the pipe), False while starting; TflaunchError if it
        exited first."""
        if self.fd < 0:
            return True
        while b"\n" not in self.got:
            try:
                chunk = os.read(self.fd, 64)
            except BlockingIOError:
                return False
            if not chunk:
                break
            self.got += chunk
        if self.got.startswith(b"ready"):
            self.close()
            return True
        self._fail(f"exit status {self.proc.poll() if self.proc is not None else None}")
        return False

    def wait(self, timeout: float = 60.0) -> int:
        """Block until ready (its pid) or ``timeout`` seconds after the start (TflaunchError)."""
        while not self.poll():
            left = self.started + timeout - time.monotonic()
            if left <= 0:
                self._fail(f"exit status {self.proc.poll() if self.proc is not None else None}")
            select.select([self.fd], [], [], left)
        return self.pid


def spawn_detached(record: RunRecord, timeout: float = 60.0, **kwargs: Any) -> int:
    """Start a background supervisor for ``record`` (see :class:`Detached` for ``kwargs``); return its pid
    once it holds the lease. If it does not get that far, the run is recorded Failed (``launch_failed``)
    and TflaunchError raised."""
    return Detached(record, **kwargs).wait(timeout)


def in_job_command(home: str, run_id: str) -> list[str]:
    """What a batch script runs for a run submitted with ``--slurm``: this tflaunch, as the job's
    supervisor (the same interpreter and package path: a cluster's login and compute nodes share them)."""
    return [sys.executable, "-I", "-S", "-c", _DETACHED_BOOT, _package_root(), "--home", home, "--slurm", run_id]


def _wait_for_submitter(record: RunRecord, timeout: float = 60.0) -> None:
    """A job can start before ``sbatch`` has returned to the submitter: let it record Queued first."""
    from .store import PREPARING

    deadline = time.monotonic() + timeout
    while (record.read_status(check_lease=False) or {}).get("status") == PREPARING and time.monotonic() < deadline:
        time.sleep(0.05)


def detached_main(argv: list[str]) -> int:
    """Entry point of the background supervisor (``--home H --ready-fd N RUN_ID``), and of a Slurm
    job's (``--home H --slurm RUN_ID``: its exit status is the run's, so Slurm's job state agrees)."""
    import argparse

    parser = argparse.ArgumentParser(prog="tflaunch-supervisor")
    parser.add_argument("--home", required=True)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--ready-fd", type=int)
    group.add_argument("--slurm", action="store_true")
    parser.add_argument("run_id")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s supervisor %(levelname)s %(message)s")
    try:
        record = Store(args.home).run(args.run_id)
    except TflaunchError as exc:
        log.error("%s", exc)
        return 1
    if args.slurm:
        from .store import exit_code_for

        for sig in (signal.SIGUSR1, signal.SIGUSR2):  # a --signal meant for the tasks must not kill us
            signal.signal(sig, lambda *_: None)
        _wait_for_submitter(record)
        log.info("run %s starts in Slurm job %s on %s", record.id, os.environ.get("SLURM_JOB_ID"),
                 os.environ.get("SLURM_JOB_NODELIST"))
        try:
            final = Supervisor(record, stream=False).run()
        except Exception:
            log.exception("supervisor for run %s failed", args.run_id)
            return 1
        log.info("run %s %s", record.id, final.get("status"))
        return exit_code_for(final)

    def ready() -> None:
        try:
            os.write(args.ready_fd, b"ready\n")
        except OSError:  # the submitter is gone (a sweep's driver killed meanwhile): the run goes on
            pass
        os.close(args.ready_fd)

    try:
        Supervisor(record, stream=False, on_lease=ready).run()
    except Exception:
        log.exception("supervisor for run %s failed", args.run_id)
        return 1
    return 0
