"""Launchers: how a run's processes start. ``agents`` (a tflaunch agent on every host starts its
processes: locally or over ssh), ``mpirun`` (the agents hold the files, one mpirun starts the ranks)
and ``srun`` (inside a Slurm allocation: one srun step starts every process, no agent on the nodes).

A launcher is a :class:`Launcher` subclass, given the run's :class:`~tflaunch.launch.session.Session`
(never the supervisor). The supervisor calls, in order: :meth:`~Launcher.begin` (early, before the
snapshot is materialized), :meth:`~Launcher.connect` (start the hosts' agents), :meth:`~Launcher.follow` (its own log on the console), :meth:`~Launcher.start`
(plan with what the hosts answered and start the processes), then, while the run goes,
:meth:`~Launcher.on_event` for each agent event, :meth:`~Launcher.stop_ranks` when the outcome policy
stops some ranks and :meth:`~Launcher.restart_ranks` when it starts some again (and
:meth:`~Launcher.signal_ranks` when the hang watchdog asks them for their stacks); :meth:`~Launcher.watched` says which agents' end is the run's end; :meth:`~Launcher.finish`
and :meth:`~Launcher.close` at the end. Which one a run gets: its scheduler's choice
(:meth:`tflaunch.schedule.Scheduler.step_launcher`), else its distribution's
(:attr:`tflaunch.plan.distributions.Distribution.launcher`). A new launcher is a module and a line of
:data:`LAUNCHERS`.
"""
from __future__ import annotations

import importlib

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

    from ..plan.processes import ProcessPlan
    from .hostrun import HostRun
    from .session import Session

__all__ = ["Launcher", "LAUNCHERS", "launcher_for"]

# name -> "module:class", imported when a run uses it
LAUNCHERS: dict[str, str] = {
    "agents": "tflaunch.launch.agents:AgentLauncher",
    "mpirun": "tflaunch.launch.mpi:MpirunLauncher",
    "srun": "tflaunch.launch.srun_step:SrunStepLauncher",
}


class Launcher:
    """How the processes of one run start (the defaults: nothing to do)."""

    name = "launcher"
    ranks_stop_together = False  # True: stop_ranks can only stop them all at once (one srun step)
    restarts_ranks = False  # True: restart_ranks can start some ranks again while the others go on

    def __init__(self, session: Session) -> None:
        self.session = session

    def begin(self) -> None:
        """Before the job's files are materialized: start what takes long to start."""

    def connect(self, log_file: Any, prestarted: dict[str, Any]) -> None:
        """Start (or adopt from ``prestarted``) the agents of the run's hosts into ``session.runs``."""

    def follow(self) -> None:
        """Show the launcher's own messages on the console (when attached; the ranks' are shown already)."""

    def start(self, preview: list[ProcessPlan]) -> None:
        """Plan with what the hosts answered (``preview``: the plan made without asking them) and start
        the processes; set ``session.started``. Raises LaunchFailure / PrepFailure; returns early when
        the run was stopped meanwhile."""
        raise NotImplementedError

    def on_event(self, run: HostRun, event: dict[str, Any]) -> bool:
        """Handle an agent event only this launcher knows; True if ``event`` was one."""
        return False

    def watched(self) -> list[HostRun]:
        """The agents whose end is the end of the run's processes."""
        return self.session.runs

    def stop_ranks(self, ranks: list[int]) -> None:
        """Stop these ranks (SIGTERM, SIGKILL after the grace period); the others go on."""
        session = self.session
        for run in session.runs:
            mine = [rank for rank in ranks if session.processes[rank].host == run.name]
            if mine and not run.finished:
                run.conn.send({"cmd": "terminate", "grace": session.grace, "indices": mine})

    def signal_ranks(self, name: str) -> list[HostRun]:
        """Send the signal ``name`` to every rank's program that catches it (the hang watchdog's stack
        request, :mod:`tflaunch.supervise.watchdog`); return the agents asked: each answers ``signalled``
        (none: this launcher cannot reach the ranks)."""
        asked = []
        for run in self.session.runs:
            indices = [p.rank for p in run.processes]
            if indices and not run.finished and run.conn.send({"cmd": "signal", "signal": name, "indices": indices}):
                asked.append(run)
        return asked

    def restart_ranks(self, processes: list[ProcessPlan], exited: set[int]) -> bool:
        """Start these ranks again (they have ended; ``exited``: every rank of the run that has), where
        they ran; False when it cannot be done yet (try again shortly). Only where :attr:`restarts_ranks`."""
        raise NotImplementedError

    def log_for(self, index: int) -> str | None:
        """The log (relative to the record) of a process index that is not a rank (the launcher's own)."""
        return None

    def finish(self) -> None:
        """The processes have ended: clean up after them on the hosts."""

    def close(self) -> None:
        """Release what the launcher holds (files); called once, last."""


def launcher_for(session: Session) -> Launcher:
    """The launcher of a run: the scheduler's when it imposes one, else the distribution's."""
    name = session.scheduler.step_launcher() or session.distribution.launcher
    module, _, cls = LAUNCHERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)(session)
