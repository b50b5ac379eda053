"""Making every host ready before any process of a run starts: data mounts checked, ``--setup`` lines,
the job's environment, the preflight version check, data downloads (:class:`HostPrep`).

Each phase runs on every host at once, through the host's agent (``exec``: a helper process whose output
comes back over the connection into ``tflaunch_logs/<phase>-<node>.log``, and to the console when the
run is attached; :mod:`tflaunch.launch.phase_exec`), and is waited for on every host before the next one starts;
the first phase that fails on a host fails the run with its reason, naming the host:

1. ``data``: every host has each mounted input (the agent says so in its hello);
2. ``setup``: the ``--setup`` lines, in one shell (bash when the host has it, else sh); the environment the
   shell leaves is what the host's processes start from (``module load cuda`` takes effect);
3. ``environment``: the job's environment (:mod:`tflaunch.envs`, on the hosts :mod:`tflaunch.launch.host_environment`):
   built once under the home, which every host that sees it shares (concurrent builders wait for the one
   that builds), and built in node-local scratch on a host that does not see the home, from the same
   request (wheelhouses it cannot see are sent to it first);
4. ``preflight``: with several hosts, TensorFlow (and Keras, Horovod, mpi4py) must be the same on all of
   them (``--no-preflight`` skips it);
5. ``data`` again: downloads are copied on each host into node-local scratch, from its own view of the
   path when it has one, else streamed from the launcher; the agents remove them when the run ends.

What the hosts' processes are then told comes from here too: an MPI rank's interpreter and data paths
(:meth:`HostPrep.host_info`), and for a Slurm srun step, which has no agents, the share of this work its
rank wrapper does on every node (:meth:`HostPrep.step_info`).
"""
from __future__ import annotations

import logging
import os
import re
import time

from .. import data
from .host_environment import ENV_LOG, HostEnvironment
from .phase_exec import PhaseExec, PrepFailure
from .transfer import send_tar

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

    from .hostrun import HostRun
    from .session import Session

__all__ = ["HostPrep", "PrepFailure", "setup_script", "ENV_LOG"]

log = logging.getLogger(__name__)

def setup_script(lines: list[str]) -> str:
    """The ``--setup`` lines as one shell script: each line must succeed (the first that does not ends the
    script with its status, naming it); at the end the environment is written to ``$TFLAUNCH_ENV_OUT`` by
    the agent's Python (``$TFLAUNCH_SETUP_PYTHON``), for the processes to start from."""
    parts = ['trap \'__tflaunch_rc=$?; [ "$__tflaunch_rc" -eq 0 ] || echo "tflaunch: --setup line $__tflaunch_line '
             'exited with status $__tflaunch_rc" >&2\' EXIT']  # also when a line itself calls exit
    for i, line in enumerate(lines, 1):
        parts.append(f"__tflaunch_line={i}")
        parts.append(line)
        parts.append('__tflaunch_rc=$?; [ "$__tflaunch_rc" -eq 0 ] || exit "$__tflaunch_rc"')
    parts.append("trap - EXIT")
    parts.append('exec "$TFLAUNCH_SETUP_PYTHON" -I -S -c "import json,os,sys; '
                 'json.dump(dict(os.environ), open(sys.argv[1], \'w\'))" "$TFLAUNCH_ENV_OUT"')
    return "\n".join(parts) + "\n"


_SETUP_FAILED = re.compile(r"^tflaunch: --setup line (\d+) exited with status (\d+)$")

# bash when the host has it (what `module` and most `source env.sh` files expect), else sh
_SHELL = 'if command -v bash >/dev/null 2>&1; then exec bash -c "$TFLAUNCH_SETUP"; else exec sh -c "$TFLAUNCH_SETUP"; fi'


class HostPrep:
    """The preparation phases of one run's hosts (its :class:`~tflaunch.launch.session.Session`): their
    order, the setup lines, the preflight check, the data inputs; the helper processes and their logs are
    :attr:`execs`' (:class:`~tflaunch.launch.phase_exec.PhaseExec`), the job's environment :attr:`environment`'s
    (:class:`~tflaunch.launch.host_environment.HostEnvironment`)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.spec = session.spec
        self.execs = PhaseExec(session)
        self.environment = HostEnvironment(session, self.execs)
        self.data_paths: dict[str, dict[str, str]] = {}
        self.status_fields: dict[str, Any] = {}  # for the run object: environment, inputs (written with Running)

    # -- the job's environment, as the launchers see it ---------------------------------------------------
    @property
    def home_result(self) -> Any:
        """The environment under the home, when already known here (an EnvResult), else None."""
        return self.environment.home_result

    @property
    def results(self) -> dict[str, Any]:
        """host -> its EnvResult (once the environment phase is done)."""
        return self.environment.results

    @property
    def pythons(self) -> dict[str, str]:
        """host -> the environment's interpreter there (once the environment phase is done)."""
        return self.environment.pythons

    def reuse_home_environment(self) -> Any:
        """The environment under the home if it is built already (cheap: nothing is started); else None."""
        return self.environment.reuse_home_environment()

    def wheelhouses(self, runs: list[HostRun]) -> list[tuple[str, str]]:
        """(name in the job's files, directory) of the wheelhouses that travel with the job's files."""
        return self.environment.wheelhouses(runs)

    # -- what the agents are told at setup ------------------------------------------------------------
    @property
    def needed(self) -> bool:
        """Whether the hosts need the slow path (their agents' help) before the processes start."""
        if self.spec.setup_commands or self.spec.inputs:
            return True
        return self.environment.pending

    def setup_fields(self, run: HostRun) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        probe = self.environment.home_probe(run)
        if probe is not None:
            fields["home_probe"] = probe
        paths = sorted({p for item in self.spec.inputs for p in item["paths"]} | set(self.environment.local_links()))
        if paths:
            fields["paths"] = paths
        if self.session.target.get("keep_remote"):
            fields["keep"] = True
        if self.spec.preflight and len({h.name for h in self.session.hosts}) > 1:
            from ..doctor import report_request
            fields["report"] = report_request(self.spec.python)
        return fields

    # -- the phases -------------------------------------------------------------------------------------
    def run(self, runs: list[HostRun]) -> bool:
        """Every phase on ``runs``; False if the run was stopped meanwhile. Raises PrepFailure."""
        self.environment.forget_probe()
        self._check_mounts(runs)
        for phase in (self._setup, self.environment.build, self._preflight, self._downloads):
            if not phase(runs) or self.session.stop_reason:
                return False
        return True

    def on_event(self, run: HostRun, event: dict[str, Any]) -> bool:
        """Handle an ``exec_output``/``exec_done`` event; True if it was one."""
        return self.execs.on_event(run, event)

    def close(self) -> None:
        self.execs.close()
        self.environment.forget_probe()

    def _check_mounts(self, runs: list[HostRun]) -> None:
        for item in self.spec.inputs:
            if item["mode"] != data.MOUNT:
                continue
            path = item["paths"][0]
            lacking = [run.name for run in runs if not (run.hello.get("paths") or {}).get(path)]
            if lacking:
                raise PrepFailure("data", f"input {item['name']!r}: {path} does not exist on host"
                                          f"{'s' if len(lacking) > 1 else ''} {', '.join(lacking)}")

    def _setup(self, runs: list[HostRun]) -> bool:
        lines = self.spec.setup_commands
        if not lines:
            return True
        script = setup_script(lines)
        commands = {run.name: {"id": "setup", "argv": ["/bin/sh", "-c", _SHELL], "capture_env": True,
                               "cwd": run.work_dir or self.session.work_dir,
                               "env": {"TFLAUNCH_SETUP": script,
                                       "TFLAUNCH_SETUP_PYTHON": run.hello.get("executable") or self.spec.python}}
                    for run in runs}
        started = time.monotonic()
        if not self.execs.run_all("setup", commands, runs, "to run the --setup lines"):
            return False
        self.session.record.event("setup", seconds=round(time.monotonic() - started, 3),
                                  hosts=[run.name for run in runs])
        failed = self.execs.failed(runs, "setup")
        if failed:
            run = failed[0]
            done = run.execs["setup"]
            text = self.execs.tail("setup", run)
            found = next((m for m in map(_SETUP_FAILED.match, reversed(text.splitlines())) if m), None)
            if found and 0 < int(found.group(1)) <= len(lines):
                why = f"--setup line {found.group(1)} exited with status {found.group(2)}: {lines[int(found.group(1)) - 1]}"
            else:
                why = done.get("error") or f"exited with status {done['returncode']}"
            others = f" (also on {', '.join(r.name for r in failed[1:])})" if len(failed) > 1 else ""
            raise PrepFailure("setup", f"--setup failed on host {run.name}{others}: {why}", text)
        return True

    def _preflight(self, runs: list[HostRun]) -> bool:
        if not self.spec.preflight or len(runs) < 2:
            return True
        from ..doctor import differences

        reports = {}
        for run in runs:
            report = dict(run.hello.get("report") or {})  # the job's interpreter, as the agent found it
            if run.name in self.results:  # with the environment's own packages over it
                packages = dict(report.get("packages") or {})
                packages.update(_packages_in(self.results[run.name].freeze))
                report["packages"] = packages
            if report.get("packages") is not None:
                reports[run.name] = report
        if len(reports) < 2:
            return True
        problems = differences(reports, ("tensorflow",))
        if problems:
            raise PrepFailure("preflight", "; ".join(problems) +
                              " (install the same TensorFlow everywhere, or --no-preflight to start anyway)")
        return True

    def _downloads(self, runs: list[HostRun]) -> bool:
        downloads = [item for item in self.spec.inputs if item["mode"] == data.DOWNLOAD]
        for run in runs:
            self.data_paths[run.name] = {}
        for item in downloads:
            commands = {}
            streamed = []
            for run in runs:
                dest = data.download_dest(item, run.hello.get("scratch") or "/tmp", run.work_dir or self.session.work_dir)
                self.data_paths[run.name][item["name"]] = dest
                visible = all((run.hello.get("paths") or {}).get(p) for p in item["paths"])
                if visible:
                    commands[run.name] = {"id": f"data:{item['name']}", "owns": dest, "cwd": "/",
                                          "argv": [run.hello.get("executable") or self.spec.python, "-I", "-S", "-c",
                                                   data.COPY_PROGRAM, *item["paths"], dest]}
                else:
                    streamed.append((run, dest))
            if streamed:
                _send_input(self.session, item, streamed)
            started = time.monotonic()
            if commands and not self.execs.run_all("data", commands, [r for r in runs if r.name in commands],
                                                   f"to copy input {item['name']!r}"):
                return False
            failed = self.execs.failed(runs, f"data:{item['name']}")
            if failed:
                raise PrepFailure("data", f"input {item['name']!r}: copying {item['paths'][0]} on host "
                                          f"{failed[0].name} failed", self.execs.tail("data", failed[0]))
            self.session.record.event("data_downloaded", name=item["name"], seconds=round(time.monotonic() - started, 3),
                                      hosts={r.name: self.data_paths[r.name][item["name"]] for r in runs})
        return True

    # -- what MPI ranks are told (tflaunch.remote.rank.apply_host) --------------------------------------------
    def host_info(self, run: HostRun) -> dict[str, Any]:
        """What this host's ranks need beyond their working directory: their interpreter, data paths."""
        info: dict[str, Any] = {}
        python = self.pythons.get(run.name) or (self.home_result.python if self.home_result else None)
        if python:
            info["python"] = python
        if self.spec.inputs:
            info["data"] = data.host_paths(self.spec.inputs, self.data_paths.get(run.name))
        return info

    def step_info(self) -> dict[str, Any]:
        """An srun step's share of the preparation, done by the rank wrapper on every node (there are no
        agents there): the environment is built here first (under the home, which every node sees)."""
        if any(item["mode"] == data.DOWNLOAD for item in self.spec.inputs):
            raise PrepFailure("data", "as_download() inside a Slurm allocation's srun step: use as_mount() (the "
                                      "nodes see the path), or --launcher ssh")
        info: dict[str, Any] = {}
        if self.environment.request is not None:
            info["python"] = self.environment.home_python()
            self.record_environment()
        if self.spec.setup_commands:
            info["setup_script"] = setup_script(self.spec.setup_commands)
        mounts = [item["paths"][0] for item in self.spec.inputs if item["mode"] == data.MOUNT]
        if mounts:
            info["check_paths"] = mounts
            info["data"] = data.host_paths(self.spec.inputs, None)
        return info

    # -- what the record keeps ---------------------------------------------------------------------------
    def record_environment(self) -> None:
        """``environment.json``: the environment of every host (key, path, builder, freeze); the status
        gets the key and whether it was built for this run."""
        fields = self.environment.record()
        if fields is not None:
            self.status_fields["environment"] = fields

    def record_inputs(self) -> None:
        """``inputs.json`` and the status's ``inputs``: each input's name, path, mode, files, bytes (and a
        content fingerprint for downloads), counted on this machine when it has the path."""
        if not self.spec.inputs:
            return
        from .. import fsio

        rows = data.describe_inputs(self.spec.inputs)
        fsio.atomic_write_json(self.session.record.path("inputs.json"), rows, fsync=False)
        self.status_fields["inputs"] = rows


def _send_input(session: Session, item: dict[str, Any], targets: list[tuple[HostRun, str]]) -> None:
    """Send ``item`` as a tar stream to hosts that cannot see it (unpacked into ``dest``, owned there)."""
    missing = [p for p in item["paths"] if not os.path.exists(p)]
    if missing:
        names = ", ".join(run.name for run, _ in targets)
        raise PrepFailure("data", f"input {item['name']!r}: {missing[0]} does not exist on host {names} nor "
                                  "on this machine (to be sent from here)")
    path = session.record.path(f".data-{item['name']}.tar")
    try:
        with session.keeping_alive():  # no events served meanwhile: the agents' leases still are
            data.write_tar(item, path)
            send_tar(targets, path, owned=True)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    runs = [run for run, _ in targets]
    session.wait(lambda: all(run.unpacked for run in runs), None, f"to unpack input {item['name']!r}")
    log.info("sent input %r to %s (it cannot see %s)", item["name"], ", ".join(r.name for r in runs),
             item["paths"][0])


def _packages_in(freeze: list[str]) -> dict[str, Any]:
    """The packages a doctor report compares, as an environment's ``pip freeze`` has them (only those
    it has: the others come from the interpreter it inherits from)."""
    versions: dict[str, tuple[str, str]] = {}
    for line in freeze:
        name, sep, version = line.partition("==")
        if sep:
            versions[name.strip().lower().replace("_", "-")] = (name.strip(), version.strip())
    found = {}
    for wanted, dists in (("tensorflow", ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-intel")),
                          ("keras", ("keras",)), ("horovod", ("horovod",)), ("mpi4py", ("mpi4py",))):
        for dist in dists:
            if dist in versions:
                found[wanted] = {"version": versions[dist][1], "distribution": versions[dist][0]}
                break
    return found

