"""The job's environment (:mod:`tflaunch.envs`) on every host of a run, one of the preparation phases of
:mod:`tflaunch.launch.hostprep`.

When it is built already under the home it is used as it is, and nothing is started for it. Otherwise it
is built once under the home, from this machine (the one most likely to reach the package index; through
the run's agent here, or one started for it when this machine is not one of the hosts), and every host
that sees the home shares it (concurrent builders wait for the one that builds); a host that does not see
the home (it cannot read the probe file written there for it) builds its own copy in node-local scratch at
the same time, from the same request, with the wheelhouses it cannot see sent to it first with the job's
files. Each host's environment goes into the run's ``environment.json`` and its key into the run's status;
the launcher's own view of it (reuse or build) into ``tflaunch_logs/environment.log``. For a Slurm srun
step it is built here first, under the home, which every node sees.
"""
from __future__ import annotations

import os
import sys
import time

from .. import progress
from .phase_exec import PrepFailure
from ..history.store import LOG_DIR

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

    from .hostrun import HostRun
    from .session import Session
    from .phase_exec import PhaseExec

__all__ = ["HostEnvironment", "ENV_LOG"]

ENV_LOG = f"{LOG_DIR}/environment.log"  # the launcher's own view of the environment (reuse or build)
HOME_PROBE = ".tflaunch-home-probe"


class HostEnvironment:
    """The job's environment on one run's hosts (its :class:`~tflaunch.launch.session.Session`), built
    through the preparation's helper processes (``execs``)."""

    def __init__(self, session: Session, execs: PhaseExec) -> None:
        self.session = session
        self.spec = session.spec
        self.execs = execs
        execs.keep_apart("environment", b"TFLAUNCH_ENV_")  # the builder's result line: no one's reading
        self.request: Any = None
        if self.spec.environment:
            from ..envs import EnvRequest
            self.request = EnvRequest.from_dict(self.spec.environment)
        self.home_result: Any = None  # the environment under the home, when already known here
        self.results: dict[str, Any] = {}  # host -> EnvResult
        self.pythons: dict[str, str] = {}  # host -> the environment's interpreter there
        self.builder = (self.spec.packages or {}).get("builder") or "auto"
        self._probe: dict[str, str] | None = None
        self._shipped: set[str] = set()  # hosts that were sent the wheelhouses

    @property
    def pending(self) -> bool:
        """Whether the hosts' agents are needed for it: there is one, and it is not known built."""
        return self.request is not None and self.home_result is None

    def home_envs_root(self) -> str:
        from ..envs import home_envs_root
        return home_envs_root(self.session.record.store.home)

    def reuse_home_environment(self) -> Any:
        """The environment under the home if it is built already (cheap: nothing is started); else None."""
        if self.request is None:
            return None
        from .. import envs

        root = self.home_envs_root()
        if not envs.is_built(root, self.request.key):
            return None
        with open(self.session.record.path(ENV_LOG), "ab") as fh:
            self.home_result = envs.ensure_environment(self.request, root, log=fh)
        progress.report("environment", f"environment: {self.request.key[:12]} reused", done=True)
        return self.home_result

    # -- what the agents are told at setup ------------------------------------------------------------
    def home_probe(self, run: HostRun) -> dict[str, str] | None:
        """The file under the home a remote host's agent looks for (whether it sees the home), written
        here once for all of them; None when there is no environment or ``run`` is this machine."""
        if self.request is None or run.conn.local:
            return None
        if self._probe is None:
            root = self.home_envs_root()
            os.makedirs(root, exist_ok=True)
            path = os.path.join(root, f"{HOME_PROBE}-{self.session.record.id}")
            content = f"{self.session.record.id} {os.urandom(8).hex()}"
            with open(path, "w") as fh:
                fh.write(content)
            self._probe = {"path": path, "content": content}
        return self._probe

    def forget_probe(self) -> None:
        if self._probe is not None:
            try:
                os.unlink(self._probe["path"])
            except OSError:
                pass
            self._probe = None

    def local_links(self) -> list[str]:
        """The environment's wheelhouses that are directories (URLs are fetched by each host itself)."""
        if self.request is None:
            return []
        index = self.request.to_dict().get("index") or {}
        return [x for x in index.get("find_links") or [] if "://" not in x and not x.startswith("file:")]

    def wheelhouses(self, runs: list[HostRun]) -> list[tuple[str, str]]:
        """(name in the job's files, directory) of the wheelhouses that hosts getting a copy of the job's
        files cannot see themselves: they travel with the files (``.tflaunch-wheels/N``)."""
        links = self.local_links()
        lacking = [run for run in runs if any(not (run.hello.get("paths") or {}).get(d) for d in links)]
        self._shipped = {run.name for run in lacking}
        return [(f".tflaunch-wheels/{i}", d) for i, d in enumerate(links) if os.path.isdir(d)] if lacking else []

    def _ship_wheelhouses(self, run: HostRun) -> list[str] | None:
        """The wheelhouses as a host that could not see them has them (sent with the job's files)."""
        if run.name not in self._shipped or not run.work_dir:
            return None
        return [os.path.join(run.work_dir, ".tflaunch-wheels", str(i)) for i in range(len(self.local_links()))]

    # -- the phase ----------------------------------------------------------------------------------------
    def build(self, runs: list[HostRun]) -> bool:
        """Build (or reuse) the job's environment: the one under the home is built from this machine (the
        one most likely to reach the package index; its hosts may not), every host that sees the home uses
        it, and each host that does not builds its own copy at the same time. False if the run was stopped
        meanwhile; raises PrepFailure."""
        request = self.request
        if request is None:
            return True
        from .. import envs
        from ..errors import TflaunchError

        sharing = [run for run in runs if run.conn.local or run.hello.get("home_shared")]
        builders: list[tuple[HostRun, str, list[str] | None]] = []  # (agent, root, wheelhouses there)
        here = None
        if sharing and self.home_result is None:
            here, made = self._launcher_agent(runs)
            if here is None:
                return False
            builders.append((here, self.home_envs_root(), None))
        for run in runs:
            if run not in sharing:
                builders.append((run, envs.node_envs_root(self.session.target.get("remote_scratch")),
                                 self._ship_wheelhouses(run)))
        started = time.monotonic()
        try:
            commands = {}
            for run, root, links in builders:
                python = sys.executable if run is here else self.spec.python
                argv = envs.builder_command(python, request, root, find_links_here=links, builder=self.builder,
                                            uv=envs.find_uv() if run.conn.local else None)
                commands[run.name] = {"id": "environment", "argv": argv, "cwd": "/"}
            agents = [run for run, _, _ in builders]
            where = ", ".join("this machine" if run is here and run.launcher_only else f"host {run.name}"
                              for run in agents)
            if agents:
                progress.report("environment", f"environment: building or reusing {request.key[:12]} on {where} (log: "
                                               f"{ENV_LOG})", slow=True)
            if agents and not self.execs.run_all("environment", commands, agents, "to build the job's environment"):
                return False
            for run in agents:
                output = b"\n".join(self.execs.kept("environment", run) or [b"(no result)"])
                try:
                    result = envs.parse_builder_output(output)
                except TflaunchError as exc:  # EnvBuildError: the builder's one line
                    where = "this machine" if run is here and run.launcher_only else f"host {run.name}"
                    raise PrepFailure("environment", f"building the job's environment on {where} failed: {exc}",
                                      self.execs.tail("environment", run)) from None
                if run is here:
                    self.home_result = result
                else:
                    self.results[run.name] = result
        finally:
            if here is not None and here.launcher_only:
                here.conn.close()
                self.session.runs.remove(here)
        for run in sharing:
            self.results[run.name] = self.home_result
        if builders:
            built = sum(1 for r, _, _ in builders if (self.home_result if r is here else self.results[r.name]).built)
            progress.report("environment", f"environment: {request.key[:12]} " + (f"built on {built} of {len(builders)}"
                            if built else "reused") + f" ({time.monotonic() - started:.1f} s)", done=True)
            self.session.record.event("environment", seconds=round(time.monotonic() - started, 3),
                                      built={("(this machine)" if r is here and r.launcher_only else r.name):
                                             (self.home_result if r is here else self.results[r.name]).built
                                             for r, _, _ in builders})
        for run in runs:
            self.pythons[run.name] = self.results[run.name].python
        return True

    def _launcher_agent(self, runs: list[HostRun]) -> tuple[HostRun | None, bool]:
        """An agent on this machine to build through: the run's own when this machine is one of its hosts,
        else one started for it (its builder dies with it if tflaunch is killed)."""
        local = next((run for run in runs if run.conn.local), None)
        if local is not None:
            return local, False
        from . import AgentConnection
        from .local import spawn_agent
        from .hostrun import ORPHAN_GRACE, HostRun

        session = self.session
        with open(session.record.path(LOG_DIR, "launcher.log"), "ab") as agent_log:
            run = HostRun("(this machine)", len(session.runs), AgentConnection(spawn_agent(agent_log), "localhost"))
        run.launcher_only = True
        session.runs.append(run)
        run.conn.start({"token": session.record.id, "agent_id": "environment", "grace": session.grace,
                        "orphan_grace": ORPHAN_GRACE, "lease_timeout": session.lease_timeout})
        if not session.wait(lambda: bool(run.hello), time.monotonic() + 60, "to start"):
            run.conn.close()
            session.runs.remove(run)
            return None, True
        return run, True

    def home_python(self) -> str:
        """The interpreter of the environment under the home, built here first if need be (an srun step:
        there are no agents on the nodes, and every node sees the home). Raises PrepFailure."""
        if self.home_result is None:
            from .. import envs
            from ..errors import TflaunchError

            try:
                with open(self.session.record.path(ENV_LOG), "ab") as fh:
                    self.home_result = envs.ensure_environment(self.request, self.home_envs_root(), log=fh,
                                                               builder=self.builder)
            except TflaunchError as exc:
                raise PrepFailure("environment", f"building the job's environment failed: {exc}") from None
        return self.home_result.python

    # -- what the record keeps ---------------------------------------------------------------------------
    def record(self) -> dict[str, Any] | None:
        """Write ``environment.json``: the environment of every host (key, path, builder, freeze); return
        the status's ``environment`` (the key, and whether it was built for this run), None if there is none."""
        results = dict(self.results)
        if not results and self.home_result is not None:
            results = {h.name: self.home_result for h in self.session.hosts}
        if not results:
            return None
        from .. import fsio

        first = next(iter(results.values()))
        # not synced on its own: the status write that follows (Running, or the final one) is
        fsio.atomic_write_json(self.session.record.path("environment.json"),
                               {"key": first.key, "hosts": {h: r.to_dict() for h, r in results.items()}}, fsync=False)
        return {"key": first.key, "python": first.python, "built": any(r.built for r in results.values()),
                "builder": first.builder, "packages": len(first.freeze)}
